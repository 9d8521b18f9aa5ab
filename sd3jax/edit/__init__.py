"""Instruction-based image editing with the MM-DiT (InstructPix2Pix-style, as the SD3 paper).

The editing model is the text-to-image MM-DiT with the source image's latent concatenated to
the noisy latent along channels (in_channels 2 x 16), fine-tuned from a text-to-image run on
(source, instruction, target) triplets by the shared trainer.

  model     the text-to-image weights widened to the extra input channels (zeros)
  sampling  dual classifier-free guidance (image and text scales); `sd3jax edit`
  evaluate  success and preservation per edit type with the shapes checker, two baselines,
            the guidance table and a grid
  stages    the main job's edit stages (experiments/shapes_edit.py)

The training data are sd3jax.data.shapes_edit triplets, precomputed like any records (the
source image's posterior mean joins each record); the trainer adds the source latent and
InstructPix2Pix's condition dropout when a batch carries one (sd3jax.train).
"""
