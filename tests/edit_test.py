"""Instruction editing: the triplets and their checker, the records, step-0 exactness, the
condition dropout, dual guidance and the export to diffusers (sd3jax.edit).

One tiny text-to-image run (evaluate_test's config: 2 steps on synthetic data, a random f8
VAE at 32 px, the embedded encoders with the instruction words) is widened into an editing
model. The main job's editing stages run end to end in job_test.
"""
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from evaluate_test import CLIP_G, CLIP_L, SIZE, T5_TOKENS, T5_WIDTH, _config, _random_vae
from sd3jax import conditioning, parallel, sample, train
from sd3jax import config as config_lib
from sd3jax.data import latent_pipeline, precompute, records, shapes, shapes_edit
from sd3jax.edit import evaluate, sampling
from sd3jax.edit import model as edit_model
from sd3jax.embedded_encoders import build_embedded_encoders
from sd3jax.interop import diffusers as diffusers_interop
from sd3jax.interop import diffusers_vae
from sd3jax.models import mmdit
from sd3jax.models import vae as vae_lib


# ---------------------------------------------------------------------------------------------
# The triplets (no JAX)
# ---------------------------------------------------------------------------------------------

def test_triplets_change_one_thing_and_the_checker_scores_them():
  edits = [shapes_edit.make_edit(i, split="validation", seed=3) for i in range(150)]
  assert edits[7] == shapes_edit.make_edit(7, split="validation", seed=3)  # pure function
  assert set(Counter(e["edit_type"] for e in edits)) == set(shapes_edit.EDIT_TYPES)
  vocabulary = set(shapes.VOCABULARY) | set(shapes_edit.INSTRUCTION_WORDS)
  for e in edits:
    src, tgt, k = e["source_objects"], e["target_objects"], e["edited"]
    assert set(shapes.words(e["instruction"])) <= vocabulary, e["instruction"]
    key = lambda o: (o["color"], o["shape"], o["size"], o["cell"])
    untouched = [key(o) for i, o in enumerate(src) if i != k]
    assert set(untouched) <= {key(o) for o in tgt}, e  # nothing else moves
    assert len(tgt) == len(src) + {"add": 1, "remove": -1}.get(e["edit_type"], 0)
    if e["edit_type"] in ("recolour", "change_shape", "resize"):
      (after,) = [o for o in tgt if o["cell"] == src[k]["cell"]]
      changed = [f for f in ("color", "shape", "size") if after[f] != src[k][f]]
      assert changed == [{"recolour": "color", "change_shape": "shape",
                          "resize": "size"}[e["edit_type"]]], e
    # The checker on ground truth: the target is a perfect edit, the source (the copy
    # baseline) makes no edit and changes nothing.
    source, target = shapes_edit.render_edit(e)
    truth = evaluate.score_edit(target, source, e)
    assert truth["success"] and truth["exact"] and truth["preserved"] is not False, (e, truth)
    copy = evaluate.score_edit(source, source, e)
    assert not copy["success"] and copy["preserved"] is not False, (e, copy)
  # Held-out phrasings: about half of the held-out scenes, never in training.
  assert 0.3 < np.mean([e["held_out_phrasing"] for e in edits]) < 0.7
  train_edits = [shapes_edit.make_edit(i, split="train") for i in range(300)]
  assert not any(e["held_out_phrasing"] for e in train_edits)
  held = {t for e in edits if e["held_out_phrasing"] for t in [e["instruction"]]}
  assert not held & {e["instruction"] for e in train_edits}


def test_rates_carry_wilson_intervals():
  edits = [{"edit_type": "recolour", "held_out_phrasing": False}] * 24
  scores = [{"success": i < 21, "preserved": i < 20, "exact": False} for i in range(24)]
  rates = evaluate.summarize(scores, edits)["per_type"]["recolour"]
  k, n, z = 20, 24, 1.959964  # Wilson (1927) by its formula
  p = k / n
  half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  np.testing.assert_allclose(rates["preserved_ci"], [centre - half, centre + half], atol=1e-5)
  assert rates["success_ci"][0] < 21 / 24 < rates["success_ci"][1] < 1


def test_a_forced_edit_type_that_does_not_fit_the_scene_is_refused():
  one = next(i for i in range(100) if len(shapes.sample_scene(0, "train", i)["objects"]) == 1)
  with pytest.raises(ValueError, match="remove.*does not apply to a scene of 1 objects"):
    shapes_edit.make_edit(one, edit_type="remove")


def test_added_words_leave_caption_encodings_unchanged(tmp_path):
  kw = dict(clip_l_width=CLIP_L, clip_g_width=CLIP_G, t5_width=T5_WIDTH)
  plain = build_embedded_encoders(str(tmp_path / "plain"), list(shapes.VOCABULARY), **kw)
  added = build_embedded_encoders(str(tmp_path / "added"), list(shapes.VOCABULARY),
                                  added_words=shapes_edit.INSTRUCTION_WORDS, **kw)
  a = conditioning.TextEncoders.from_pipeline_folder(plain, t5_length=T5_TOKENS)
  b = conditioning.TextEncoders.from_pipeline_folder(added, t5_length=T5_TOKENS)
  captions = ["a red circle in the top left", "An image with two shapes: a small blue square."]
  for x, y in zip(a(captions), b(captions)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  tok = b.encoders["t5"].tokenizer
  ids = tok(["take the red circle away"]).input_ids[0]
  assert tok.unk_token_id not in ids
  assert tok.unk_token_id in a.encoders["t5"].tokenizer(["take the red circle away"]).input_ids[0]


# ---------------------------------------------------------------------------------------------
# Records, model, sampling, export (one tiny run)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("edit")
  encoders = build_embedded_encoders(
      str(root / "encoders"), list(shapes.VOCABULARY), clip_l_width=CLIP_L,
      clip_g_width=CLIP_G, t5_width=T5_WIDTH, added_words=shapes_edit.INSTRUCTION_WORDS)
  vae, vae_params = _random_vae()
  diffusers_vae.save_vae(vae, vae_params, str(root / "vae"))
  folders = {"encoders": encoders, "vae": str(root / "vae")}
  t2i = _config(folders)
  with t2i.unlocked():
    t2i.eval.every_steps = 0
  t2i_dir = str(root / "t2i")
  assert train.train(t2i, t2i_dir).step == 2
  edit = _config(folders)
  with edit.unlocked():
    edit.init_from, edit.init_from_in_channels = t2i_dir, 16
    edit.model.in_channels = 32
  return {"root": root, "t2i": config_lib.complete(t2i), "t2i_dir": t2i_dir,
          "edit": config_lib.complete(edit), **folders, "vae_model": (vae, vae_params)}


def _widened(setup):
  """(model, host params, mesh): the editing model right after load_widened_weights."""
  c = setup["edit"]
  mesh = train.make_mesh(c, jax.devices()[:1])
  model = mmdit.MMDiT(config_lib.model_config(c))
  init = train.state_init_fn(train.mmdit_init_params(c, model, 1), optax.sgd(1.0))
  abstract, _ = train.abstract_state(init, mesh, parallel.get_rules(c.sharding_rules),
                                     jax.random.PRNGKey(0))
  with jax.set_mesh(mesh):
    params = edit_model.load_widened_weights(c, abstract.params)
  return model, jax.device_get(params), mesh


def test_step_0_predicts_as_the_text_to_image_model(setup):
  t2i_cfg = config_lib.model_config(setup["t2i"])
  mesh = train.make_mesh(setup["t2i"], jax.devices()[:1])
  t2i_model, t2i_params = sample.load_run_params(setup["t2i"], setup["t2i_dir"], mesh)
  model, params, _ = _widened(setup)
  assert params["patch_embed"]["kernel"].shape == (2 * 2 * 32, t2i_cfg.hidden_size)
  rng = np.random.default_rng(0)
  z = rng.standard_normal((3, 4, 4, 16)).astype(np.float32)
  t = np.asarray([0.2, 0.5, 0.9], np.float32)
  ctx = rng.standard_normal((3, 77 + T5_TOKENS, T5_WIDTH)).astype(np.float32)
  pooled = rng.standard_normal((3, CLIP_L + CLIP_G)).astype(np.float32)
  reference = np.asarray(t2i_model.apply({"params": jax.device_get(t2i_params)}, z, t, ctx,
                                         pooled))
  for source in (np.zeros_like(z), rng.standard_normal(z.shape).astype(np.float32)):
    ours = np.asarray(model.apply({"params": params}, np.concatenate([z, source], -1), t, ctx,
                                  pooled))
    np.testing.assert_array_equal(ours, reference)  # exactly: the new inputs are zero


def test_condition_dropout_rates_and_zeros():
  n, p = 30_000, 0.1
  ctx, pooled, image = jnp.ones((n, 2, 3)), jnp.ones((n, 4)), jnp.ones((n, 2, 2, 5))
  c, q, s = conditioning.drop_edit_conditions(jax.random.key(0), ctx, pooled, image, p)
  no_text = np.asarray(c.sum((1, 2)) == 0)
  assert np.array_equal(no_text, np.asarray(q.sum(1) == 0))  # context and pooled together
  assert set(np.unique(np.asarray(c))) <= {0.0, 1.0}
  no_image = np.asarray(s.sum((1, 2, 3)) == 0)
  fractions = [np.mean(no_text & ~no_image), np.mean(no_image & ~no_text),
               np.mean(no_text & no_image)]
  assert np.allclose(fractions, p, atol=0.01), fractions
  with pytest.raises(ValueError, match=r"\[0, 1/3\]"):
    conditioning.drop_edit_conditions(jax.random.key(0), ctx, pooled, image, 0.4)


def test_edit_records_carry_the_source_latent(setup, monkeypatch):
  from sd3jax.data import batch_encoder
  text_batches = []  # prompts per text-encoder program: instructions have no synthetic caption
  text_fn = batch_encoder.BatchEncoder.text_fn
  monkeypatch.setattr(batch_encoder.BatchEncoder, "text_fn",
                      lambda self, count=None: text_batches.append(count) or text_fn(self, count))
  build = shapes_edit.build_edits(str(setup["root"] / "edits"), SIZE, 12, 4, 0)
  source = shapes_edit.load_edits(build, "train")
  te = conditioning.TextEncoders.from_pipeline_folder(setup["encoders"], t5_length=T5_TOKENS,
                                                     t5_width=T5_WIDTH)
  out = str(setup["root"] / "edit_records")
  vae, params = setup["vae_model"]
  result = precompute.precompute(source, out, (vae, params), te, global_batch=4,
                                 resolution=SIZE, storage_dtype="float32",
                                 examples_per_shard=8, progress=False)
  assert result.complete and result.manifest["producer"]["source_image"] == "vae_mean"
  recs = records.RecordSource(out, kind=records.KIND_PRECOMPUTED)
  rec = recs[0]
  ex = source[int(rec["index"])]
  # Compiled as precompute compiles the VAE (XLA's own convolutions on CPU): the default
  # kernels round differently, by up to 3e-5.
  encode_fn = jax.jit(lambda x: vae.apply({"params": params}, x, method=type(vae).encode),
                      compiler_options=parallel.conv_compiler_options())
  encode = lambda img: encode_fn((img.astype(np.float32) / 127.5 - 1)[None])
  np.testing.assert_allclose(rec["source_vae_mean"], encode(ex["source_image"]).mean[0],
                             atol=1e-5)
  np.testing.assert_allclose(rec["vae_mean"], encode(ex["image"]).mean[0], atol=1e-5)
  assert rec["caption_original"] == ex["caption_original"] and "synthetic" not in rec
  assert set(text_batches) == {4}, text_batches  # the 4 instructions only, not 4 + 4 blanks
  for k, v in te.encode([ex["caption_original"]]).items():
    np.testing.assert_allclose(rec["original"][k], np.asarray(v[0]), rtol=1e-5, atol=1e-5,
                               err_msg=k)
  batch = next(latent_pipeline.make_precomputed_pipeline(
      out, global_batch=4, p_synthetic=0.0, keys=latent_pipeline.TRAIN_KEYS).iterator())
  assert batch["source_latents"].shape == batch["latents"].shape == (4, 4, 4, 16)
  row = records.RecordSource(out, kind=records.KIND_PRECOMPUTED)
  cfg = vae.config
  means = {int(r["index"]): r["source_vae_mean"] for r in (row[i] for i in range(len(row)))}
  assert any(np.allclose(b, vae_lib.normalize_latents(m, cfg.scaling_factor, cfg.shift_factor),
                         atol=1e-5) for b in batch["source_latents"] for m in means.values())


def test_dual_guidance_and_image_scale_on_a_source_blind_model(setup):
  """Right after widening the model cannot see the source: image guidance changes nothing,
  text guidance does, and the result depends on (seed, index) only."""
  model, params, mesh = _widened(setup)
  c = sample.run_config(setup["edit"], None)
  components = sample.load_run_components(c, mesh)
  pipe = sample.pipeline_from_params(c, model, params, components, mesh)
  images = np.stack([shapes_edit.render_edit(shapes_edit.make_edit(i), SIZE, SIZE)[0]
                     for i in range(3)])
  run = lambda **kw: sampling.edit(pipe, images, "make the red circle blue", steps=3,
                                   progress=False, **kw)
  base = run(image_cfg=1.5, text_cfg=5.0)
  assert base.shape == (3, SIZE, SIZE, 3) and 0 <= base.min() and base.max() <= 1
  np.testing.assert_allclose(run(image_cfg=3.0, text_cfg=5.0), base, atol=1e-5)
  assert np.abs(run(image_cfg=1.5, text_cfg=1.0) - base).max() > 1e-3
  with pytest.raises(ValueError, match="not an editing model"):
    t2i_pipe = sample.pipeline_from_run(sample.run_config(setup["t2i"], None), setup["t2i_dir"])
    sampling.edit(t2i_pipe, images, "make the red circle blue", steps=2, progress=False)


def test_export_is_a_diffusers_transformer_with_32_input_channels(setup, tmp_path):
  from diffusers import SD3Transformer2DModel
  model, params, _ = _widened(setup)
  rng = np.random.default_rng(1)
  kernel = np.asarray(params["patch_embed"]["kernel"]).copy()
  kernel[:] = rng.standard_normal(kernel.shape) * 0.1  # source channels in use
  params = {**params, "patch_embed": {**params["patch_embed"], "kernel": kernel}}
  folder = str(tmp_path / "transformer")
  diffusers_interop.save_transformer(model, params, folder)
  theirs = SD3Transformer2DModel.from_pretrained(folder)
  assert (theirs.config.in_channels, theirs.config.out_channels) == (32, 16)
  x = rng.standard_normal((2, 4, 4, 32)).astype(np.float32)
  t = np.asarray([0.3, 0.8], np.float32)
  ctx = rng.standard_normal((2, 77 + T5_TOKENS, T5_WIDTH)).astype(np.float32)
  pooled = rng.standard_normal((2, CLIP_L + CLIP_G)).astype(np.float32)
  ours = np.asarray(model.apply({"params": params}, x, t, ctx, pooled))
  with torch.no_grad():
    ref = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(ctx),
                 torch.from_numpy(pooled), torch.from_numpy(t * 1000.0)).sample
  np.testing.assert_allclose(ref.numpy().transpose(0, 2, 3, 1), ours, atol=1e-4)


def test_edit_command_errors_name_the_fix(setup, tmp_path):
  from PIL import Image
  png = str(tmp_path / "in.png")
  Image.fromarray(shapes_edit.render_edit(shapes_edit.make_edit(0), SIZE, SIZE)[0]).save(png)
  with pytest.raises(config_lib.ConfigError, match="text-to-image run"):
    sampling.edit_main(None, setup["t2i_dir"], [png], "make the red circle blue")
  with pytest.raises(config_lib.ConfigError, match="--instruction"):
    sampling.edit_main(None, setup["t2i_dir"], [png], "  ")
  with pytest.raises(FileNotFoundError, match="no such file"):
    sampling.read_image(str(tmp_path / "missing.png"))
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(records.DataError, match="not an image"):
    sampling.read_image(str(tmp_path / "bad.png"))
