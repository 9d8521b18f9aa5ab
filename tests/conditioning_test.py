"""SD3 conditioning == diffusers' StableDiffusion3Pipeline.encode_prompt; encoder dropout."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sd3jax import conditioning
from sd3jax.embedded_encoders import build_embedded_encoders

WORDS = ("a red green blue yellow circle square triangle star small large left right of above "
         "below the and").split()
T5_LENGTH = 24
CLIP_L, CLIP_G, T5_WIDTH = 32, 64, 128
PROMPTS = ["a red circle left of a blue square", " ".join(WORDS * 5)]  # 2nd: truncated.


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return build_embedded_encoders(str(tmp_path_factory.mktemp("sd3")), WORDS, seed=0,
                                 clip_l_width=CLIP_L, clip_g_width=CLIP_G, t5_width=T5_WIDTH)


@pytest.fixture(scope="module")
def ours(folder):
  return conditioning.TextEncoders.from_pipeline_folder(folder, t5_length=T5_LENGTH)


@pytest.fixture(scope="module")
def pipe_parts(folder):
  """The same folder loaded by transformers, as diffusers' pipeline loads it."""
  sub = lambda name: os.path.join(folder, name)
  clip = transformers.CLIPTextModelWithProjection
  return dict(
      text_encoder=clip.from_pretrained(sub("text_encoder")).eval(),
      text_encoder_2=clip.from_pretrained(sub("text_encoder_2")).eval(),
      text_encoder_3=transformers.T5EncoderModel.from_pretrained(sub("text_encoder_3")).eval(),
      tokenizer=transformers.AutoTokenizer.from_pretrained(sub("tokenizer")),
      tokenizer_2=transformers.AutoTokenizer.from_pretrained(sub("tokenizer_2")),
      tokenizer_3=transformers.AutoTokenizer.from_pretrained(sub("tokenizer_3")),
  )


def _pipeline(parts, with_t5: bool = True):
  from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                         StableDiffusion3Pipeline)
  # A tiny transformer only supplies joint_attention_dim (the width of the T5 zeros).
  transformer = SD3Transformer2DModel(
      sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
      num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
      pooled_projection_dim=CLIP_L + CLIP_G, out_channels=4, pos_embed_max_size=8)
  parts = dict(parts)
  if not with_t5:
    parts["text_encoder_3"] = parts["tokenizer_3"] = None
  return StableDiffusion3Pipeline(transformer=transformer, vae=None,
                                  scheduler=FlowMatchEulerDiscreteScheduler(), **parts)


def _compare(got, want, tol=1e-4):
  for g, w in zip(got, want, strict=True):
    if w is None:
      assert g is None
      continue
    w = w.float().numpy()
    assert g.shape == w.shape
    assert rel_l2(g, w) < tol, rel_l2(g, w)


def test_matches_diffusers_encode_prompt_with_t5_and_negative(ours, pipe_parts):
  pipe = _pipeline(pipe_parts)
  kwargs = dict(do_classifier_free_guidance=True, negative_prompt=["a star", "below the square"])
  with torch.no_grad():
    want = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=T5_LENGTH, **kwargs)
  got = ours.encode_prompt(PROMPTS, **kwargs)
  assert got[0].shape == (2, 77 + T5_LENGTH, T5_WIDTH) and got[2].shape == (2, CLIP_L + CLIP_G)
  _compare(got, want)
  # The CLIP channels are zero-padded up to the T5 width.
  assert float(jnp.abs(got[0][:, :77, CLIP_L + CLIP_G:]).max()) == 0.0
  assert float(jnp.abs(got[0][:, 77:]).max()) > 0.0


def test_matches_diffusers_with_per_encoder_prompts_and_clip_skip(ours, pipe_parts):
  pipe = _pipeline(pipe_parts)
  args = (["a red star", "a green triangle"], ["a small circle", "the square"],
          ["blue", "large yellow star above a circle"])
  with torch.no_grad():
    want = pipe.encode_prompt(*args, do_classifier_free_guidance=True, clip_skip=1,
                              max_sequence_length=T5_LENGTH)
  got = ours.encode_prompt(*args, do_classifier_free_guidance=True, clip_skip=1)
  _compare(got, want)
  # clip_skip=1 changes the positive context only; the negative ("") keeps the penultimate.
  plain = ours.encode_prompt(*args)
  assert rel_l2(got[0], plain[0]) > 1e-3
  np.testing.assert_array_equal(got[1], plain[1])


def test_matches_diffusers_without_t5(folder, pipe_parts):
  ours = conditioning.TextEncoders.from_pipeline_folder(folder, use_t5=False,
                                                        t5_length=T5_LENGTH)
  assert ours.t5_width == T5_WIDTH  # Read from text_encoder_3/config.json.
  pipe = _pipeline(pipe_parts, with_t5=False)
  with torch.no_grad():
    want = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=True,
                              negative_prompt="blue", max_sequence_length=T5_LENGTH)
  got = ours.encode_prompt("a red circle", do_classifier_free_guidance=True,
                           negative_prompt="blue")
  _compare(got, want)
  assert float(jnp.abs(got[0][:, 77:]).max()) == 0.0  # Missing T5 -> zeros.


def test_no_guidance_and_call(ours, pipe_parts):
  pipe = _pipeline(pipe_parts)
  with torch.no_grad():
    want = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                              max_sequence_length=T5_LENGTH)
  got = ours.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
  assert got[1] is None and got[3] is None
  _compare(got, want)
  context, pooled = ours(PROMPTS)
  np.testing.assert_array_equal(context, got[0])
  np.testing.assert_array_equal(pooled, got[2])
  assert ours.context_shape == (77 + T5_LENGTH, T5_WIDTH)
  assert ours.pooled_width == CLIP_L + CLIP_G


def test_per_encoder_outputs_assemble_to_the_context(ours):
  emb = ours.encode(PROMPTS)
  assert set(emb) == set(conditioning.EMBEDDING_KEYS)
  assert emb["clip_l"].shape == (2, 77, CLIP_L) and emb["clip_g"].shape == (2, 77, CLIP_G)
  assert emb["t5"].shape == (2, T5_LENGTH, T5_WIDTH)
  context, pooled = jax.jit(conditioning.assemble)(**emb)
  want_context, want_pooled = ours(PROMPTS)
  np.testing.assert_allclose(context, want_context, rtol=0, atol=0)
  np.testing.assert_allclose(pooled, want_pooled, rtol=0, atol=0)
  np.testing.assert_array_equal(context[:, :77, :CLIP_L], emb["clip_l"])
  np.testing.assert_array_equal(context[:, :77, CLIP_L:CLIP_L + CLIP_G], emb["clip_g"])
  np.testing.assert_array_equal(context[:, 77:], emb["t5"])
  np.testing.assert_array_equal(pooled[:, CLIP_L:], emb["clip_g_pooled"])
  # Without T5: zeros of the requested shape.
  no_t5 = {k: v for k, v in emb.items() if k != "t5"}
  context, _ = conditioning.assemble(t5=None, t5_length=7, t5_width=T5_WIDTH, **no_t5)
  assert context.shape == (2, 84, T5_WIDTH) and float(jnp.abs(context[:, 77:]).max()) == 0.0


def test_drop_encoders(ours):
  emb = ours.encode(["a red circle", "a blue star", "the square", "a small triangle"])
  emb = {k: jnp.tile(v, (256,) + (1,) * (v.ndim - 1)) for k, v in emb.items()}  # B = 1024.
  emb["extra"] = jnp.ones((1024,))
  drop = jax.jit(conditioning.drop_encoders)
  rng = jax.random.PRNGKey(0)

  kept = drop(rng, emb, 0.0)
  for k in emb:
    np.testing.assert_array_equal(kept[k], emb[k])
  gone = drop(rng, emb, 1.0)
  for k in conditioning.EMBEDDING_KEYS:
    assert float(jnp.abs(gone[k]).max()) == 0.0
  np.testing.assert_array_equal(gone["extra"], emb["extra"])

  out = drop(rng, emb, 0.46)
  dropped = {}
  for name in conditioning.ENCODERS:
    zero = jnp.all(out[name] == 0, axis=tuple(range(1, out[name].ndim)))
    same = jnp.all(out[name] == emb[name], axis=tuple(range(1, out[name].ndim)))
    assert bool(jnp.all(zero | same))  # Whole examples are zeroed or kept, nothing else.
    if name != "t5":  # A dropped CLIP loses its pooled vector too.
      pooled_zero = jnp.all(out[f"{name}_pooled"] == 0, axis=1)
      np.testing.assert_array_equal(pooled_zero, zero)
    dropped[name] = np.asarray(zero)
    assert 0.38 < dropped[name].mean() < 0.54
  # Independent per encoder (joint rate ~ 0.46^2 = 0.21) and per example.
  both = (dropped["clip_l"] & dropped["t5"]).mean()
  assert 0.14 < both < 0.29
  assert not np.array_equal(dropped["clip_l"], dropped["clip_g"])
  # A dropped encoder gives zeros, not the encoding of an empty prompt (which is not zero).
  empty = ours.encode([""])
  assert float(jnp.abs(empty["clip_l"]).max()) > 0 and float(jnp.abs(empty["t5"]).max()) > 0
  # Per-encoder probabilities; encoders absent from p are kept; the draw is deterministic.
  out = drop(rng, emb, {"t5": 1.0})
  np.testing.assert_array_equal(out["clip_l"], emb["clip_l"])
  assert float(jnp.abs(out["t5"]).max()) == 0.0
  again = drop(rng, emb, 0.46)
  for name in conditioning.ENCODERS:
    np.testing.assert_array_equal(
        jnp.all(again[name] == 0, axis=tuple(range(1, again[name].ndim))), dropped[name])
  # A traced p works under jit too.
  traced = jax.jit(lambda r, e, p: conditioning.drop_encoders(r, e, p))(rng, emb, 0.46)
  np.testing.assert_array_equal(traced["t5"], again["t5"])


def test_cache_key_tracks_the_weights(folder, ours, tmp_path):
  key = ours.cache_key()
  assert key["t5_length"] == T5_LENGTH and key["clip_l"]["dtype"] == "float32"
  assert key == conditioning.TextEncoders.from_pipeline_folder(
      folder, t5_length=T5_LENGTH).cache_key()
  other = build_embedded_encoders(str(tmp_path / "o"), WORDS, seed=1, clip_l_width=CLIP_L,
                                  clip_g_width=CLIP_G, t5_width=T5_WIDTH)
  other_key = conditioning.TextEncoders.from_pipeline_folder(other,
                                                             t5_length=T5_LENGTH).cache_key()
  assert other_key["t5"] != key["t5"] and other_key["clip_l"] != key["clip_l"]


def test_clear_errors(ours, folder, tmp_path):
  with pytest.raises(ValueError, match="prompt_2 has 1 prompts but prompt has 2"):
    ours.encode(PROMPTS, ["a"])
  with pytest.raises(ValueError, match="prompt_3 has 3 prompts"):
    ours.encode(PROMPTS, None, ["a", "b", "c"])
  with pytest.raises(ValueError, match="negative_prompt has 1 prompts"):
    ours.encode_prompt(PROMPTS, negative_prompt=["a"])
  with pytest.raises(ValueError, match="empty"):
    ours.encode([])
  with pytest.raises(TypeError, match="strings"):
    ours.encode(["a", None])
  with pytest.raises(ValueError, match="clip_skip=5 is out of range"):
    ours.encode(PROMPTS, clip_skip=5)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    conditioning.TextEncoders.from_pipeline_folder(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    conditioning.TextEncoders.from_pipeline_folder(str(tmp_path))
  enc = ours.encoders
  with pytest.raises(ValueError, match="t5_width"):
    conditioning.TextEncoders(enc["clip_l"], enc["clip_g"], None)
  with pytest.raises(ValueError, match="exceed the context width"):
    conditioning.TextEncoders(enc["clip_l"], enc["clip_g"], None, t5_width=64)
  with pytest.raises(ValueError, match="t5_length=77 but"):
    conditioning.TextEncoders(enc["clip_l"], enc["clip_g"], enc["t5"], t5_length=77)
  with pytest.raises(ValueError, match="max_length"):
    conditioning.load_encoder("t5", os.path.join(folder, "text_encoder_3"),
                              os.path.join(folder, "tokenizer_3"))
  with pytest.raises(ValueError, match="Unknown encoder"):
    conditioning.load_encoder("clip_h", folder, folder)
  with pytest.raises(ValueError, match="not a probability"):
    conditioning.drop_encoders(jax.random.PRNGKey(0), {"t5": jnp.ones((2, 3, 4))}, 1.5)
  with pytest.raises(ValueError, match="unknown encoders"):
    conditioning.drop_encoders(jax.random.PRNGKey(0), {"t5": jnp.ones((2, 3, 4))}, {"t6": 0.1})
  emb = ours.encode(["a"])
  with pytest.raises(ValueError, match="t5_length and t5_width"):
    conditioning.assemble(emb["clip_l"], emb["clip_g"], None, emb["clip_l_pooled"],
                          emb["clip_g_pooled"])
  with pytest.raises(ValueError, match="exceeds the T5 width"):
    conditioning.assemble(emb["clip_l"], emb["clip_g"], emb["t5"][..., :64],
                          emb["clip_l_pooled"], emb["clip_g_pooled"])
