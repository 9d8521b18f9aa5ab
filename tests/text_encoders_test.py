"""Flax CLIP / T5 text encoders against transformers' PyTorch models, loading, sharding."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from sd3jax import parallel
from sd3jax.embedded_encoders import build_embedded_encoders, clip_tokenizer, t5_tokenizer
from sd3jax.interop import transformers as tf_interop
from sd3jax.models import clip as clip_lib
from sd3jax.models import t5 as t5_lib

WORDS = ("a red green blue yellow circle square triangle star small large big tiny left right "
         "of above below next to the and on top").split()
SHORT = "a red circle"
LONG = " ".join(WORDS * 6)  # > 77 tokens: truncated.


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_np(x) -> np.ndarray:
  return x.detach().float().numpy()


@pytest.fixture(autouse=True)
def _seed():
  torch.manual_seed(0)


# ---------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------
def _tiny_clip(tmp_path, hidden_act: str, legacy_eos: bool, with_projection: bool = True):
  tok = clip_tokenizer(WORDS, pad_with_eos=True)
  cfg = transformers.CLIPTextConfig(
      vocab_size=128, hidden_size=32, intermediate_size=48, projection_dim=24,
      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
      hidden_act=hidden_act, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
      eos_token_id=2 if legacy_eos else tok.eos_token_id)
  cls = (transformers.CLIPTextModelWithProjection if with_projection
         else transformers.CLIPTextModel)
  model = cls(cfg).eval()
  with torch.no_grad():  # Non-trivial LayerNorm affines and biases (zeros / ones by default).
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path / "clip")
  model.save_pretrained(folder)
  return model, folder, tok


def _clip_inputs(tok, eos_id: int):
  ids, mask = tf_interop.tokenize_clip(tok, [SHORT, "", LONG])
  # A raw row where an id above the EOS comes after it: the two pooling rules differ here.
  raw = np.full((1, 77), tok.pad_token_id, np.int32)
  raw[0, :6] = [tok.bos_token_id, 5, 6, eos_id, 127, 126]
  raw_mask = np.zeros_like(raw)
  raw_mask[0, :6] = 1
  return np.concatenate([ids, raw]), np.concatenate([mask, raw_mask])


@pytest.mark.parametrize("hidden_act,legacy_eos", [("quick_gelu", True), ("gelu", False)])
def test_clip_with_projection_matches_transformers(tmp_path, hidden_act, legacy_eos):
  ref, folder, tok = _tiny_clip(tmp_path, hidden_act, legacy_eos)
  model, params = tf_interop.load_clip(folder)
  assert model.config.hidden_act == hidden_act and model.config.projection_dim == 24
  ids, mask = _clip_inputs(tok, tok.eos_token_id)
  assert ids.shape == (4, 77) and (mask[0] == 0).any()  # Padded rows.
  assert ids[2, -1] == tok.eos_token_id and mask[2].all()  # Truncated row keeps its EOS.
  apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
  for use_mask in (False, True):
    out = apply(params, ids, mask if use_mask else None)
    with torch.no_grad():
      want = ref(torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask) if use_mask else None,
                 output_hidden_states=True)
    assert len(out.hidden_states) == len(want.hidden_states) == 4
    for got_h, want_h in zip(out.hidden_states, want.hidden_states):
      assert rel_l2(got_h, torch_np(want_h)) < 1e-5
    assert rel_l2(out.last_hidden_state, torch_np(want.last_hidden_state)) < 1e-5
    assert rel_l2(out.text_embeds, torch_np(want.text_embeds)) < 1e-5
    # Per row too: each row's pooled position follows transformers' rule.
    for row in range(ids.shape[0]):
      assert rel_l2(out.text_embeds[row], torch_np(want.text_embeds[row])) < 1e-5
  # The two rules pick different tokens on the raw row: legacy = largest id (127), new = EOS.
  expected = 4 if legacy_eos else 3
  assert int(clip_lib.eos_positions(ids[3:], model.config.eos_token_id)[0]) == expected


def test_clip_text_model_without_projection(tmp_path):
  ref, folder, tok = _tiny_clip(tmp_path, "quick_gelu", False, with_projection=False)
  model, params = tf_interop.load_clip(folder)
  assert model.config.projection_dim is None and "text_projection" not in params
  ids, _ = _clip_inputs(tok, tok.eos_token_id)
  out = model.apply({"params": params}, ids)
  assert out.text_embeds is None
  with torch.no_grad():
    want = ref(torch.tensor(ids, dtype=torch.long))
  assert rel_l2(out.pooled, torch_np(want.pooler_output)) < 1e-5
  assert rel_l2(out.last_hidden_state, torch_np(want.last_hidden_state)) < 1e-5


def test_clip_bfloat16_close_to_float32(tmp_path):
  _, folder, tok = _tiny_clip(tmp_path, "gelu", False)
  model32, params = tf_interop.load_clip(folder)
  model16, params16 = tf_interop.load_clip(folder, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))  # Params stay f32.
  ids, _ = _clip_inputs(tok, tok.eos_token_id)
  a = model32.apply({"params": params}, ids)
  b = model16.apply({"params": params16}, ids)
  assert rel_l2(b.hidden_states[-2], a.hidden_states[-2]) < 3e-2
  assert rel_l2(b.text_embeds, a.text_embeds) < 3e-2


# ---------------------------------------------------------------------------------------
# T5
# ---------------------------------------------------------------------------------------
def test_relative_position_buckets_match_transformers():
  for buckets, distance in ((32, 128), (8, 20), (16, 32)):
    length = 300
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=buckets, max_distance=distance)
    got = t5_lib.relative_position_buckets(length, length, buckets, distance)
    np.testing.assert_array_equal(got, want.numpy())


def _tiny_t5(tmp_path, feed_forward_proj: str, shard: bool, d_model: int = 32):
  cfg = transformers.T5Config(
      vocab_size=128, d_model=d_model, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
      feed_forward_proj=feed_forward_proj, pad_token_id=0, eos_token_id=1,
      decoder_start_token_id=0)
  model = transformers.T5EncoderModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path / "t5")
  model.save_pretrained(folder, max_shard_size="20KB" if shard else "5GB")
  return model, folder


@pytest.mark.parametrize("feed_forward_proj,shard", [("gated-gelu", True), ("relu", False)])
def test_t5_encoder_matches_transformers(tmp_path, feed_forward_proj, shard):
  ref, folder = _tiny_t5(tmp_path, feed_forward_proj, shard)
  assert any(n.endswith(".index.json") for n in os.listdir(folder)) == shard
  model, params = tf_interop.load_t5(folder)
  assert model.config.is_gated_act == (feed_forward_proj == "gated-gelu")
  tok = t5_tokenizer(WORDS)
  ids, mask = tf_interop.tokenize_t5(tok, [SHORT, LONG, "the star"], max_length=40)
  assert (mask[0] == 0).any() and mask[1].all() and ids[1, -1] == tok.eos_token_id
  apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
  for use_mask in (False, True):
    got = apply(params, ids, mask if use_mask else None)
    with torch.no_grad():
      want = ref(torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask) if use_mask else None).last_hidden_state
    assert got.shape == (3, 40, 32)
    assert rel_l2(got, torch_np(want)) < 1e-5
  # Padding matters with a mask: the unpadded prefix of row 0 equals the row run alone.
  n = int(mask[0].sum())
  alone = model.apply({"params": params}, ids[:1, :n])
  masked = apply(params, ids, mask)
  assert rel_l2(masked[0, :n], alone[0]) < 1e-5


def test_t5_bfloat16_close_to_float32(tmp_path):
  _, folder = _tiny_t5(tmp_path, "gated-gelu", False)
  m32, p32 = tf_interop.load_t5(folder)
  m16, p16 = tf_interop.load_t5(folder, dtype=jnp.bfloat16)
  ids, _ = tf_interop.tokenize_t5(t5_tokenizer(WORDS), [SHORT, LONG], max_length=24)
  assert rel_l2(m16.apply({"params": p16}, ids), m32.apply({"params": p32}, ids)) < 3e-2


def test_t5_sharded_over_fsdp_and_tensor_equals_single_device(tmp_path):
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  rules = parallel.get_rules("fsdp_tp")
  config = t5_lib.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                           num_heads=4, relative_attention_num_buckets=8,
                           relative_attention_max_distance=20)
  model = t5_lib.T5EncoderModel(config)
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 24), 0, 128), np.int32)
  mask = np.ones_like(ids)
  mask[1, 15:] = 0

  init = lambda rng: model.init(rng, ids[:1])["params"]
  params, shardings = parallel.create_sharded(init, mesh, "fsdp_tp", jax.random.PRNGKey(0))
  q = params["block_0"]["attention"]["q"]["kernel"]
  assert shardings["block_0"]["attention"]["q"]["kernel"].spec == P("fsdp", "tensor")
  assert len({s.data.shape for s in q.addressable_shards}) == 1
  assert q.addressable_shards[0].data.shape == (16, 32)  # (64 / 4, 64 / 2): really sharded.
  assert shardings["block_0"]["mlp"]["wo"]["kernel"].spec == P("tensor", "fsdp")
  assert shardings["shared"].spec == P("tensor", "fsdp")

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m),
                 in_shardings=(shardings, parallel.batch_sharding(mesh, 2),
                               parallel.batch_sharding(mesh, 2)))
    sharded = fn(params, ids, mask)
    # The activation constraints are really applied (they silently vanish without a mesh).
    hlo = fn.lower(params, ids, mask).as_text()
  assert "sharding_constraint" in hlo and '{"tensor"}' in hlo
  assert not sharded.sharding.is_fully_replicated  # Batch stays split over (data, fsdp).
  host = jax.device_get(params)
  single = model.apply({"params": jax.device_put(host, jax.devices()[0])}, ids, mask)
  assert rel_l2(sharded, single) < 1e-5


def test_load_t5_with_mesh_places_shards(tmp_path):
  ref, folder = _tiny_t5(tmp_path, "gated-gelu", True, d_model=64)
  mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
  model, params = tf_interop.load_t5(folder, mesh=mesh, rules="fsdp_tp")
  wi = params["block_1"]["mlp"]["wi_0"]["kernel"]  # (64, 48): (embed, mlp).
  assert wi.sharding.spec == P("fsdp", "tensor")
  assert wi.addressable_shards[0].data.shape == (16, 24)
  ids, _ = tf_interop.tokenize_t5(t5_tokenizer(WORDS), [SHORT, LONG, "a star", "big"], 32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.get_rules("fsdp_tp")):
    got = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, ids)
  with torch.no_grad():
    want = ref(torch.tensor(ids, dtype=torch.long)).last_hidden_state
  assert rel_l2(got, torch_np(want)) < 1e-5


# ---------------------------------------------------------------------------------------
# The embedded encoders
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("embedded"))
  return build_embedded_encoders(folder, WORDS, seed=3, clip_l_width=32, clip_g_width=64,
                                 t5_width=128)


def test_embedded_encoders_agree_with_transformers(embedded):
  for sub, cls in (("text_encoder", transformers.CLIPTextModelWithProjection),
                   ("text_encoder_2", transformers.CLIPTextModelWithProjection)):
    tok = tf_interop.load_tokenizer(os.path.join(embedded, sub.replace("text_encoder",
                                                                       "tokenizer")))
    ids, _ = tf_interop.tokenize_clip(tok, [SHORT, LONG, "zebra circle"])
    model, params = tf_interop.load_clip(os.path.join(embedded, sub))
    out = model.apply({"params": params}, ids)
    ref = cls.from_pretrained(os.path.join(embedded, sub)).eval()
    with torch.no_grad():
      want = ref(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    assert rel_l2(out.hidden_states[-2], torch_np(want.hidden_states[-2])) < 1e-5
    assert rel_l2(out.text_embeds, torch_np(want.text_embeds)) < 1e-5
  tok = tf_interop.load_tokenizer(os.path.join(embedded, "tokenizer_3"), max_length=32)
  ids, _ = tf_interop.tokenize(tok, [SHORT, LONG])
  assert ids.shape == (2, 32)
  model, params = tf_interop.load_t5(os.path.join(embedded, "text_encoder_3"))
  ref = transformers.T5EncoderModel.from_pretrained(os.path.join(embedded, "text_encoder_3"))
  with torch.no_grad():
    want = ref.eval()(torch.tensor(ids, dtype=torch.long)).last_hidden_state
  assert rel_l2(model.apply({"params": params}, ids), torch_np(want)) < 1e-5
  # The stand-ins' shapes: CLIP-L + CLIP-G widths fit the T5 width.
  assert model.config.d_model >= 32 + 64


def test_embedded_encoders_are_deterministic_and_seeded(embedded, tmp_path):
  again = build_embedded_encoders(str(tmp_path / "again"), WORDS, seed=3, clip_l_width=32,
                                  clip_g_width=64, t5_width=128)
  other = build_embedded_encoders(str(tmp_path / "other"), WORDS, seed=4, clip_l_width=32,
                                  clip_g_width=64, t5_width=128)
  read = lambda f: open(os.path.join(f, "text_encoder_3", "model.safetensors"), "rb").read()
  assert read(again) == read(embedded)
  assert read(other) != read(embedded)
  assert "RANDOM" in open(os.path.join(embedded, "README.md")).read()


def test_embedded_tokenizers_round_trip(embedded):
  tok_l = tf_interop.load_tokenizer(os.path.join(embedded, "tokenizer"))
  tok_g = tf_interop.load_tokenizer(os.path.join(embedded, "tokenizer_2"))
  tok_t5 = tf_interop.load_tokenizer(os.path.join(embedded, "tokenizer_3"), max_length=16)
  prompt = "a small red circle left of a large blue square"
  for tok in (tok_l, tok_g, tok_t5):
    ids = tok(prompt).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    assert tok.decode(tok("A Red  Circle").input_ids, skip_special_tokens=True) == "a red circle"
    assert tok("a zebra").input_ids.count(tok.unk_token_id) == 1
  # CLIP: BOS ... EOS, padded to 77 with EOS (CLIP-L) or <pad> id 0 (bigG-style).
  ids_l, mask_l = tf_interop.tokenize_clip(tok_l, [prompt])
  ids_g, _ = tf_interop.tokenize_clip(tok_g, [prompt])
  n = len(prompt.split()) + 2
  assert tok_l.model_max_length == 77 and ids_l.shape == (1, 77) and mask_l.sum() == n
  assert ids_l[0, 0] == tok_l.bos_token_id and ids_l[0, n - 1] == tok_l.eos_token_id
  assert (ids_l[0, n:] == tok_l.eos_token_id).all() and (ids_g[0, n:] == 0).all()
  assert tok_l.eos_token_id == len(tok_l) - 1  # EOS is the largest id (legacy pooling agrees).
  # T5: words </s> <pad>...; truncation keeps the </s>.
  ids_t5, _ = tf_interop.tokenize(tok_t5, [prompt, LONG])
  assert ids_t5.shape == (2, 16) and ids_t5[0, n - 2] == 1 and (ids_t5[0, n - 1:] == 0).all()
  assert ids_t5[1, -1] == tok_t5.eos_token_id
  cfg = json.load(open(os.path.join(embedded, "text_encoder_3", "config.json")))
  assert cfg["vocab_size"] % 128 == 0 and cfg["vocab_size"] >= len(tok_t5)


def test_load_bpe_clip_tokenizer_from_vocab_and_merges(tmp_path):
  """The released CLIP tokenizer folders hold vocab.json + merges.txt (byte-level BPE)."""
  merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"),
            ("circl", "e</w>")]
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = [*letters, *(c + "</w>" for c in letters), *(a + b for a, b in merges),
           "<|startoftext|>", "<|endoftext|>"]
  json.dump({t: i for i, t in enumerate(vocab)}, open(tmp_path / "vocab.json", "w"))
  (tmp_path / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
             "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
            open(tmp_path / "tokenizer_config.json", "w"))
  tok = tf_interop.load_tokenizer(str(tmp_path))
  ids, mask = tf_interop.tokenize_clip(tok, ["a Red circle", "red"])
  bos, eos = len(vocab) - 2, len(vocab) - 1
  red, circle = vocab.index("red</w>"), vocab.index("circle</w>")
  assert ids.shape == (2, 77) and mask.sum(1).tolist() == [5, 3]
  assert ids[0, :5].tolist() == [bos, vocab.index("a</w>"), red, circle, eos]
  assert ids[1, :3].tolist() == [bos, red, eos] and (ids[1, 3:] == eos).all()


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def test_clear_errors(tmp_path, embedded):
  with pytest.raises(FileNotFoundError, match="config.json"):
    tf_interop.load_clip(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tf_interop.load_tokenizer(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="Unknown activation 'swiglu'"):
    clip_lib.CLIPTextConfig(hidden_act="swiglu")
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5_lib.T5Config(feed_forward_proj="gated-gelu-x")
  with pytest.raises(ValueError, match="Unknown activation"):
    t5_lib.T5Config(feed_forward_proj="gated-swiglu")
  with pytest.raises(ValueError, match="not T5"):
    tf_interop.load_t5(os.path.join(embedded, "text_encoder"))
  # A config that does not describe the weights (one layer more than saved).
  bad = tmp_path / "bad"
  bad.mkdir()
  src = os.path.join(embedded, "text_encoder")
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["num_hidden_layers"] += 1
  json.dump(cfg, open(bad / "config.json", "w"))
  os.symlink(os.path.join(src, "model.safetensors"), bad / "model.safetensors")
  with pytest.raises(KeyError, match="layers.2"):
    tf_interop.load_clip(str(bad))
  cfg["num_hidden_layers"] -= 2  # One layer fewer: leftover weights.
  json.dump(cfg, open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match="were not used"):
    tf_interop.load_clip(str(bad))
  cfg["num_hidden_layers"] += 1
  cfg["hidden_size"] = 48  # Shapes disagree with config.json.
  cfg["num_attention_heads"] = 4
  json.dump(cfg, open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match="shapes disagree"):
    tf_interop.load_clip(str(bad))
  model, params = tf_interop.load_clip(src)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.apply({"params": params}, np.zeros((1, 78), np.int32))
  tok = tf_interop.load_tokenizer(os.path.join(embedded, "tokenizer"))
  with pytest.raises(ValueError, match="empty"):
    tf_interop.tokenize_clip(tok, [])
  with pytest.raises(TypeError, match="strings"):
    tf_interop.tokenize_clip(tok, ["a", 3])
  with pytest.raises(ValueError, match="single token"):
    clip_tokenizer(["red", "top left"])
  with pytest.raises(ValueError, match="must not exceed t5_width"):
    build_embedded_encoders(str(tmp_path / "x"), WORDS, clip_l_width=64, clip_g_width=128,
                            t5_width=128)
