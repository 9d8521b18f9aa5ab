"""Data: the shapes dataset, image-text ingest, record format, grain pipelines.

Modules (imported explicitly; this package imports nothing heavy so grain
worker processes and tools start fast):
  shapes       procedural scenes, captions, VOCABULARY, eval prompts (numpy + PIL)
  shapes_tfds  TFDS builder for shapes (ArrayRecord, no TensorFlow):
               build_shapes / load_shapes
  shapes_edit  instruction-edit triplets of shapes scenes + their TFDS builder
               (build_edits / load_edits)
  records      ArrayRecord + msgpack record sets with a manifest (raw and
               precomputed examples): RecordWriter, ShardWriter, RecordSource
  ingest       image folders / webdataset tars -> image_text records
  pipeline     grain pipelines: make_image_text_pipeline, make_sequential_pipeline;
               layout-invariant global batches, aspect-ratio buckets
  latent_pipeline  the trainer's input: precomputed records -> batches
               (make_precomputed_pipeline, make_train_iterator)
  precompute   VAE moments + text embeddings -> precomputed records (sd3jax precompute);
               producer: what identifies such a record set (make_producer, producer_key)
"""
