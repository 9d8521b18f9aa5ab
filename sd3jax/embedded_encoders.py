"""Tiny stand-ins for SD3's three text encoders, so the embedded default runs anywhere.

THESE ARE NOT THE RELEASED ENCODERS. `build_embedded_encoders` writes randomly initialised
(seeded, frozen) CLIP-L-shaped, CLIP-G-shaped and T5-shaped text encoders with word-level
tokenizers over a given vocabulary (the shapes dataset's words). They carry no learned
language knowledge: they are fixed random maps from prompts to embeddings, enough for a
model trained on a closed vocabulary to learn prompt following, and small enough for a
laptop CPU. They are written in exactly the layout of a diffusers SD3 pipeline folder:

  FOLDER/text_encoder     CLIPTextModelWithProjection (quick-GELU, as CLIP-L/14)
  FOLDER/text_encoder_2   CLIPTextModelWithProjection (GELU, as OpenCLIP bigG/14)
  FOLDER/text_encoder_3   T5EncoderModel (gated-GELU, as T5 v1.1 XXL)
  FOLDER/tokenizer, tokenizer_2, tokenizer_3   transformers tokenizers (tokenizer.json)

so they load through the same code as the real weights
(`sd3jax.conditioning.TextEncoders.from_pipeline_folder`), and through transformers /
diffusers too. Default widths: CLIP-L 64, CLIP-G 128, T5 256, so the context is
(77 + L_t5, 256) and the pooled vector 64 + 128 = 192 (the released ones: 4096 and 2048).

Using the released encoders instead: download them ahead of time on a machine with
network access, e.g.

  huggingface-cli download stabilityai/stable-diffusion-3-medium-diffusers \
      --include "text_encoder*/*" "tokenizer*/*" --local-dir /data/sd3

and point the experiment's text-encoder folder at /data/sd3 (any folder with the six
subfolders above works). The MM-DiT's joint_attention_dim must then be 4096 (the T5 width)
and its pooled_projection_dim 2048; the sd3_medium / sd35_large experiments use these.
Precomputed embedding caches are keyed by the encoders that produced them, so switching
encoders means recomputing the cache.
"""
from __future__ import annotations

import json
import os
import unicodedata
from typing import Sequence

import numpy as np

from sd3jax.conditioning import LAYOUT
from sd3jax.interop.safetensors_io import save_state_dict

CLIP_BOS, CLIP_EOS, PAD, UNK, T5_EOS = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>", "</s>"
_PUNCTUATION = (",", ".")
_VOCAB_MULTIPLE = 128  # Model vocab rounded up (as T5's 32128) so "vocab" can be tensor-sharded.


def _pre_tokenizer():
  from tokenizers import pre_tokenizers
  return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                  pre_tokenizers.Punctuation("isolated")])


def _normalize(word: str) -> str:
  return unicodedata.normalize("NFKC", word).lower()


def _clean_words(words: Sequence[str]) -> list[str]:
  """Lower-cased, de-duplicated words (first occurrence wins), each one tokenizer piece."""
  if isinstance(words, str) or not words:
    raise ValueError("words must be a non-empty list of strings (the shapes vocabulary).")
  pre = _pre_tokenizer()
  specials = {CLIP_BOS, CLIP_EOS, PAD, UNK, T5_EOS}
  out, seen = [], set()
  for w in words:
    if not isinstance(w, str):
      raise TypeError(f"words must be strings, got {w!r}.")
    n = _normalize(w)
    pieces = [p for p, _ in pre.pre_tokenize_str(n)]
    if pieces != [n] or n in specials:
      raise ValueError(f"Word {w!r} is not a single token for a word-level tokenizer (it "
                       f"splits into {pieces}); pass words without spaces or punctuation.")
    if n not in seen:
      seen.add(n)
      out.append(n)
  return out + [p for p in _PUNCTUATION if p not in seen]


def _word_level_tokenizer(vocab: list[str], template: str, special: Sequence[str],
                          **special_tokens):
  """A transformers fast tokenizer over `vocab` (one id per word, unknown words -> <unk>)."""
  from tokenizers import Tokenizer, decoders, models, normalizers, processors
  from transformers import PreTrainedTokenizerFast

  ids = {w: i for i, w in enumerate(vocab)}
  tok = Tokenizer(models.WordLevel(ids, unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = _pre_tokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single=template, pair=f"{template} $B:1", special_tokens=[(s, ids[s]) for s in special])
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # Joins words with spaces.
  return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right",
                                 truncation_side="right", **special_tokens)


def _added(words: Sequence[str], added_words: Sequence[str]) -> list[str]:
  """added_words not already in words (lower-cased, each one tokenizer piece)."""
  if not added_words:
    return []
  known = set(_clean_words(words))
  return [w for w in _clean_words(added_words) if w not in known and w not in _PUNCTUATION]


def clip_tokenizer(words: Sequence[str], pad_with_eos: bool = True, model_max_length: int = 77,
                   added_words: Sequence[str] = ()):
  """Word-level CLIP-style tokenizer: <|startoftext|> words <|endoftext|>, padded to 77.

  CLIP-L's released tokenizer pads with <|endoftext|>, OpenCLIP bigG's with a token of id 0
  ("!"); `pad_with_eos=False` gives the latter's behaviour with <pad> (id 0). The EOS id is
  not 2, so pooling reads the first EOS (transformers' current rule). `added_words` take the
  ids after every other token (see build_embedded_encoders).
  """
  vocab = [PAD, UNK] + _clean_words(words) + [CLIP_BOS, CLIP_EOS] + _added(words, added_words)
  return _word_level_tokenizer(
      vocab, f"{CLIP_BOS} $A:0 {CLIP_EOS}", (CLIP_BOS, CLIP_EOS), bos_token=CLIP_BOS,
      eos_token=CLIP_EOS, unk_token=UNK, pad_token=CLIP_EOS if pad_with_eos else PAD,
      model_max_length=model_max_length)


def t5_tokenizer(words: Sequence[str], model_max_length: int = 512,
                 added_words: Sequence[str] = ()):
  """Word-level T5-style tokenizer: words </s>, pad id 0, eos id 1, unk id 2 (as T5's)."""
  vocab = [PAD, T5_EOS, UNK] + _clean_words(words) + _added(words, added_words)
  return _word_level_tokenizer(vocab, f"$A:0 {T5_EOS}", (T5_EOS,), eos_token=T5_EOS,
                               unk_token=UNK, pad_token=PAD, model_max_length=model_max_length)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _clip_weights(rng: np.random.Generator, vocab: int, width: int, layers: int,
                  max_positions: int) -> dict[str, np.ndarray]:
  """Random CLIP text weights in transformers naming; scales follow transformers' init,
  with small random biases so every tensor carries signal."""
  normal = lambda std, *shape: (rng.standard_normal(shape) * std).astype(np.float32)
  in_std = width**-0.5 * (2 * layers)**-0.5
  state = {
      "text_model.embeddings.token_embedding.weight": normal(0.02, vocab, width),
      "text_model.embeddings.position_embedding.weight": normal(0.02, max_positions, width),
      "text_model.final_layer_norm.weight": 1 + normal(0.02, width),
      "text_model.final_layer_norm.bias": normal(0.02, width),
      "text_projection.weight": normal(width**-0.5, width, width),
  }
  for i in range(layers):
    p = f"text_model.encoder.layers.{i}."
    for name, std in (("q_proj", in_std), ("k_proj", in_std), ("v_proj", in_std),
                      ("out_proj", width**-0.5)):
      state[f"{p}self_attn.{name}.weight"] = normal(std, width, width)
      state[f"{p}self_attn.{name}.bias"] = normal(0.02, width)
    state[f"{p}mlp.fc1.weight"] = normal((2 * width)**-0.5, 4 * width, width)
    state[f"{p}mlp.fc1.bias"] = normal(0.02, 4 * width)
    state[f"{p}mlp.fc2.weight"] = normal(in_std, width, 4 * width)
    state[f"{p}mlp.fc2.bias"] = normal(0.02, width)
    for norm in ("layer_norm1", "layer_norm2"):
      state[f"{p}{norm}.weight"] = 1 + normal(0.02, width)
      state[f"{p}{norm}.bias"] = normal(0.02, width)
  return state


def _t5_weights(rng: np.random.Generator, vocab: int, width: int, layers: int, heads: int,
                d_kv: int, d_ff: int, buckets: int) -> dict[str, np.ndarray]:
  normal = lambda std, *shape: (rng.standard_normal(shape) * std).astype(np.float32)
  inner = heads * d_kv
  state = {
      "shared.weight": normal(1.0, vocab, width),
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
          normal(width**-0.5, buckets, heads),
      "encoder.final_layer_norm.weight": 1 + normal(0.02, width),
  }
  for i in range(layers):
    p = f"encoder.block.{i}.layer."
    state[p + "0.SelfAttention.q.weight"] = normal((width * d_kv)**-0.5, inner, width)
    state[p + "0.SelfAttention.k.weight"] = normal(width**-0.5, inner, width)
    state[p + "0.SelfAttention.v.weight"] = normal(width**-0.5, inner, width)
    state[p + "0.SelfAttention.o.weight"] = normal(inner**-0.5, width, inner)
    state[p + "0.layer_norm.weight"] = 1 + normal(0.02, width)
    state[p + "1.DenseReluDense.wi_0.weight"] = normal(width**-0.5, d_ff, width)
    state[p + "1.DenseReluDense.wi_1.weight"] = normal(width**-0.5, d_ff, width)
    state[p + "1.DenseReluDense.wo.weight"] = normal(d_ff**-0.5, width, d_ff)
    state[p + "1.layer_norm.weight"] = 1 + normal(0.02, width)
  return state


def build_embedded_encoders(folder: str, words: Sequence[str], seed: int = 0, *,
                            clip_l_width: int = 64, clip_g_width: int = 128,
                            t5_width: int = 256, num_layers: int = 2, num_heads: int = 4,
                            t5_model_max_length: int = 512, clip_max_length: int = 77,
                            added_words: Sequence[str] = ()) -> str:
  """Writes the three tiny random encoders + tokenizers into `folder`; returns `folder`.

  `clip_max_length` is the CLIP token length (77 as released; fewer for short captions
  on a CPU: the MM-DiT's context is clip_max_length + the T5 length). `added_words` get the
  ids after all others, as a tokenizer's added tokens: while the vocabulary stays within
  its rounded-up size (a multiple of 128) the weights are the same as without them, so text
  made of `words` encodes exactly as before (the editing model's verbs join the shapes
  vocabulary this way without changing the main job).

  Deterministic in (words, seed, sizes): rebuilding gives identical files. Call it from
  one process (it writes files) and let the others wait for it.
  """
  if clip_l_width + clip_g_width > t5_width:
    raise ValueError(f"clip_l_width + clip_g_width ({clip_l_width} + {clip_g_width}) must not "
                     f"exceed t5_width ({t5_width}): SD3 zero-pads the CLIP channels to the "
                     "T5 width (768 + 1280 <= 4096 in the released encoders).")
  for name, width in (("clip_l_width", clip_l_width), ("clip_g_width", clip_g_width),
                      ("t5_width", t5_width)):
    if width % num_heads:
      raise ValueError(f"{name}={width} is not divisible by num_heads={num_heads}.")
  from transformers import CLIPTextConfig, T5Config  # Heavy; only needed to write configs.

  os.makedirs(folder, exist_ok=True)
  toks = {"clip_l": clip_tokenizer(words, pad_with_eos=True, model_max_length=clip_max_length,
                                   added_words=added_words),
          "clip_g": clip_tokenizer(words, pad_with_eos=False, model_max_length=clip_max_length,
                                   added_words=added_words),
          "t5": t5_tokenizer(words, model_max_length=t5_model_max_length,
                             added_words=added_words)}
  for key, tok in toks.items():
    tok_dir = os.path.join(folder, LAYOUT[key][1])
    tok.save_pretrained(tok_dir)
    # transformers 5 writes its new class name; the old alias loads in 4.x and 5 alike.
    path = os.path.join(tok_dir, "tokenizer_config.json")
    with open(path) as f:
      tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
      json.dump(tok_cfg, f, indent=2, sort_keys=True)

  clip_vocab = len(toks["clip_l"])
  for index, (key, width, act) in enumerate((("clip_l", clip_l_width, "quick_gelu"),
                                             ("clip_g", clip_g_width, "gelu"))):
    vocab = _round_up(clip_vocab, _VOCAB_MULTIPLE)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
        projection_dim=width, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        max_position_embeddings=clip_max_length, hidden_act=act, layer_norm_eps=1e-5,
        pad_token_id=toks[key].pad_token_id, bos_token_id=toks[key].bos_token_id,
        eos_token_id=toks[key].eos_token_id)
    cfg.architectures = ["CLIPTextModelWithProjection"]
    state = _clip_weights(np.random.default_rng([seed, index]), vocab, width, num_layers,
                          clip_max_length)
    save_state_dict(state, os.path.join(folder, LAYOUT[key][0]),
                    json.loads(cfg.to_json_string()), weights_name="model.safetensors")

  d_kv, buckets = t5_width // num_heads, 32
  vocab = _round_up(len(toks["t5"]), _VOCAB_MULTIPLE)
  cfg = T5Config(
      vocab_size=vocab, d_model=t5_width, d_kv=d_kv, d_ff=2 * t5_width, num_layers=num_layers,
      num_heads=num_heads, relative_attention_num_buckets=buckets,
      relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
      pad_token_id=toks["t5"].pad_token_id, eos_token_id=toks["t5"].eos_token_id,
      decoder_start_token_id=toks["t5"].pad_token_id, tie_word_embeddings=False)
  cfg.architectures = ["T5EncoderModel"]
  state = _t5_weights(np.random.default_rng([seed, 2]), vocab, t5_width, num_layers, num_heads,
                      d_kv, 2 * t5_width, buckets)
  save_state_dict(state, os.path.join(folder, LAYOUT["t5"][0]),
                  json.loads(cfg.to_json_string()), weights_name="model.safetensors")

  with open(os.path.join(folder, "README.md"), "w") as f:
    f.write("Tiny RANDOM stand-ins for SD3's text encoders (CLIP-L, CLIP-G, T5), written by "
            "sd3jax.embedded_encoders.build_embedded_encoders(seed=%d). Not the released "
            "weights; see that module's docstring for how to use the real ones.\n" % seed)
  return folder
