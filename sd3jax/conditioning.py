"""SD3's text conditioning: prompts -> (context, pooled) from CLIP-L, CLIP-G and T5.

Assembled exactly as diffusers' `StableDiffusion3Pipeline.encode_prompt` does it:

  clip_l  = CLIP-L hidden_states[-2]             (B, 77, 768)   penultimate layer, before
  clip_g  = CLIP-G hidden_states[-2]             (B, 77, 1280)  the final LayerNorm;
                                                                 clip_skip=k takes [-(k + 2)]
  t5      = T5 last hidden state                 (B, L_t5, 4096), zeros without a T5
  context = [pad(clip_l ++ clip_g, 4096) ; t5]   (B, 77 + L_t5, 4096) (++ on channels, ; on tokens)
  pooled  = clip_l_pooled ++ clip_g_pooled       (B, 768 + 1280)  projected EOS states

Neither CLIP nor T5 gets an attention mask (padding tokens are attended to), as in the
pipeline. The per-encoder tensors are exposed as well (`TextEncoders.encode`): the
precompute stage stores them so the trainer can drop encoders (`drop_encoders`) and
`assemble` the context per step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sd3jax import parallel
from sd3jax.interop import transformers as tf_interop
from sd3jax.interop.safetensors_io import read_config

ENCODERS = ("clip_l", "clip_g", "t5")
# encoder -> (model subfolder, tokenizer subfolder) in a diffusers SD3 pipeline folder.
LAYOUT = {
    "clip_l": ("text_encoder", "tokenizer"),
    "clip_g": ("text_encoder_2", "tokenizer_2"),
    "t5": ("text_encoder_3", "tokenizer_3"),
}
# Keys of the per-encoder dict: each encoder's sequence output, and the CLIPs' pooled vectors.
EMBEDDING_KEYS = ("clip_l", "clip_l_pooled", "clip_g", "clip_g_pooled", "t5")
Prompts = str | Sequence[str]


@dataclasses.dataclass
class Encoder:
  """One frozen text encoder: a Flax model, its params, its tokenizer and token length."""
  model: nn.Module
  params: Any
  tokenizer: Any
  max_length: int
  sources: tuple[str, ...] = ()  # Model and tokenizer folders it was loaded from (cache keys).


def assemble(clip_l: jax.Array, clip_g: jax.Array, t5: jax.Array | None,
             clip_l_pooled: jax.Array, clip_g_pooled: jax.Array, *,
             t5_length: int | None = None,
             t5_width: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Per-encoder outputs -> (context (B, 77 + L_t5, W_t5), pooled (B, P_l + P_g)).

  `t5=None` stands for a missing T5 and needs t5_length / t5_width: its part is zeros.
  Jit-able; extra keys of a per-encoder dict can be dropped with `assemble(**{k: d[k] ...})`.
  """
  if t5 is None:
    if t5_length is None or t5_width is None:
      raise ValueError("assemble(t5=None) needs t5_length and t5_width (the zeros' shape).")
    t5 = jnp.zeros((clip_l.shape[0], t5_length, t5_width), clip_l.dtype)
  clip = jnp.concatenate([clip_l, clip_g], axis=-1)
  width = t5.shape[-1]
  if clip.shape[-1] > width:
    raise ValueError(f"CLIP-L + CLIP-G width {clip.shape[-1]} exceeds the T5 width {width}; "
                     "SD3 zero-pads the CLIP channels up to the T5 width.")
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
  context = jnp.concatenate([clip, t5.astype(clip.dtype)], axis=1)
  pooled = jnp.concatenate([clip_l_pooled, clip_g_pooled], axis=-1)
  return context, pooled


def drop_encoders(rng: jax.Array, embeddings: Mapping[str, jax.Array],
                  p: float | jax.Array | Mapping[str, float]) -> dict[str, jax.Array]:
  """Zeroes each encoder's contribution independently per example with probability p.

  `embeddings` is a per-encoder dict (keys as EMBEDDING_KEYS; others pass through). A
  dropped CLIP loses both its sequence and its pooled vector. Dropping gives zeros, never
  the encoding of an empty prompt (SD3's practice). `p` is one probability or one per
  encoder name; encoder i's draw depends only on (rng, i), not on which others are present.
  """
  probs = dict(p) if isinstance(p, Mapping) else {name: p for name in ENCODERS}
  unknown = set(probs) - set(ENCODERS)
  if unknown:
    raise ValueError(f"drop_encoders: unknown encoders {sorted(unknown)}; use {ENCODERS}.")
  for name, q in probs.items():
    if isinstance(q, (int, float)) and not 0.0 <= q <= 1.0:
      raise ValueError(f"drop_encoders: p[{name!r}]={q} is not a probability in [0, 1].")
  out = dict(embeddings)
  for index, name in enumerate(ENCODERS):
    if name not in embeddings or name not in probs:
      continue
    x = embeddings[name]
    keep = jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - probs[name],
                                (x.shape[0],))
    for key in (name, f"{name}_pooled"):
      if key in embeddings:
        v = embeddings[key]
        out[key] = jnp.where(keep.reshape((-1,) + (1,) * (v.ndim - 1)), v, jnp.zeros_like(v))
  return out


def drop_edit_conditions(rng: jax.Array, context: jax.Array, pooled: jax.Array,
                         image: jax.Array, p: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """InstructPix2Pix's condition dropout for an editing model: with probability p each, an
  example loses its text only, its source image only, or both (zeros, as SD3 drops text).

  Sampling then has the three predictions dual guidance combines: full, image only, none.
  """
  if not 0.0 <= 3 * p <= 1.0:
    raise ValueError(f"drop_edit_conditions: p={p} must be in [0, 1/3] (three disjoint cases).")
  u = jax.random.uniform(rng, (context.shape[0],))
  no_text = (u < p) | ((u >= 2 * p) & (u < 3 * p))
  no_image = (u >= p) & (u < 3 * p)
  keep = lambda x, drop: jnp.where(drop.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x)
  return keep(context, no_text), keep(pooled, no_text), keep(image, no_image)


def folder_fingerprint(folder: str) -> str:
  """sha256 over every file of a model / tokenizer folder (names and contents)."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, folder).encode() + b"\0")
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
  return h.hexdigest()


def _check_batch(prompts: list[str], other: list[str], what: str) -> None:
  if len(other) != len(prompts):
    raise ValueError(f"{what} has {len(other)} prompts but prompt has {len(prompts)}; pass "
                     "one per prompt (or a single string).")


class TextEncoders:
  """SD3's three frozen text encoders, and the (context, pooled) they give.

  clip_l / clip_g are CLIPTextModelWithProjection-shaped encoders; t5 may be None (then the
  T5 part is zeros of (t5_length (default 256), t5_width), as the reference pipeline gives).
  With a mesh, the models run under it with the logical axis rules `rules`.
  """

  def __init__(self, clip_l: Encoder, clip_g: Encoder, t5: Encoder | None = None, *,
               t5_length: int | None = None, t5_width: int | None = None,
               clip_skip: int | None = None, t5_attention_mask: bool = False,
               mesh: Mesh | None = None, rules: Any = "fsdp_tp"):
    for name, enc in (("clip_l", clip_l), ("clip_g", clip_g)):
      if enc is None or getattr(enc.model.config, "projection_dim", None) is None:
        raise ValueError(f"{name} must be a CLIP text encoder with a text projection "
                         "(CLIPTextModelWithProjection), as SD3 uses its projected pooled state.")
    if t5 is not None:
      width = t5.model.config.d_model
      if t5_width is not None and t5_width != width:
        raise ValueError(f"t5_width={t5_width} but the T5 encoder's d_model is {width}.")
      if t5_length is not None and t5_length != t5.max_length:
        raise ValueError(f"t5_length={t5_length} but the T5 encoder tokenizes to "
                         f"{t5.max_length} tokens.")
      t5_width, t5_length = width, t5.max_length
    elif t5_width is None:
      raise ValueError("Without a T5 encoder, t5_width (the MM-DiT's joint_attention_dim, "
                       "4096 for SD3) is needed for the zeros that replace it.")
    clip_width = clip_l.model.config.hidden_size + clip_g.model.config.hidden_size
    if clip_width > t5_width:
      raise ValueError(f"CLIP widths {clip_l.model.config.hidden_size} + "
                       f"{clip_g.model.config.hidden_size} exceed the context width {t5_width}.")
    self.encoders = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}
    self._hidden_index(clip_skip)
    self.t5_length = 256 if t5_length is None else int(t5_length)  # diffusers' default.
    self.t5_width = int(t5_width)
    self.clip_skip = clip_skip
    self.t5_attention_mask = t5_attention_mask
    self.mesh, self.rules = mesh, rules
    self._fns: dict[Any, Any] = {}

  # -- construction --------------------------------------------------------------------
  @classmethod
  def from_pipeline_folder(cls, folder: str, *, dtype: Any = jnp.float32, t5_length: int = 256,
                           use_t5: bool = True, t5_width: int | None = None,
                           clip_skip: int | None = None, t5_attention_mask: bool = False,
                           mesh: Mesh | None = None, rules: Any = "fsdp_tp") -> "TextEncoders":
    """From a diffusers SD3 pipeline folder (text_encoder{,_2,_3}, tokenizer{,_2,_3})."""
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"Text encoder folder {folder!r} does not exist.")
    encs: dict[str, Encoder | None] = {}
    for name in ENCODERS:
      model_dir, tok_dir = (os.path.join(folder, d) for d in LAYOUT[name])
      if name == "t5" and not use_t5:
        encs[name] = None
        if t5_width is None and os.path.exists(os.path.join(model_dir, "config.json")):
          t5_width = int(read_config(model_dir)["d_model"])
        continue
      encs[name] = load_encoder(name, model_dir, tok_dir,
                                t5_length if name == "t5" else None, dtype, mesh, rules)
    return cls(encs["clip_l"], encs["clip_g"], encs["t5"], t5_length=t5_length,
               t5_width=t5_width, clip_skip=clip_skip, t5_attention_mask=t5_attention_mask,
               mesh=mesh, rules=rules)

  # -- shapes and identity -------------------------------------------------------------
  @property
  def clip_length(self) -> int:
    return self.encoders["clip_l"].max_length

  @property
  def context_shape(self) -> tuple[int, int]:
    """(77 + L_t5, W_t5): the MM-DiT's context length and joint_attention_dim."""
    return self.clip_length + self.t5_length, self.t5_width

  @property
  def pooled_width(self) -> int:
    """The MM-DiT's pooled_projection_dim (2048 for SD3)."""
    return sum(self.encoders[n].model.config.projection_dim for n in ("clip_l", "clip_g"))

  def cache_key(self) -> dict[str, Any]:
    """What produced the embeddings: weights / tokenizer hashes, dtype, lengths, options."""
    key: dict[str, Any] = {"t5_length": self.t5_length, "t5_width": self.t5_width,
                           "clip_skip": self.clip_skip,
                           "t5_attention_mask": self.t5_attention_mask}
    for name, enc in self.encoders.items():
      if enc is None:
        key[name] = None
        continue
      key[name] = {"dtype": jnp.dtype(enc.model.dtype).name, "max_length": enc.max_length,
                   "files": [folder_fingerprint(s) for s in enc.sources] or None}
    return key

  # -- running -------------------------------------------------------------------------
  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    # jax.set_mesh, not `with mesh:`: flax's logical constraints only see the former.
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(parallel.get_rules(self.rules)))
    return stack

  def _clip(self, name: str, prompts: list[str], hidden_index: int):
    enc = self.encoders[name]
    ids, _ = tf_interop.tokenize(enc.tokenizer, prompts, self.clip_length)
    key = (name, hidden_index)
    if key not in self._fns:
      def fn(params, ids):
        out = enc.model.apply({"params": params}, ids)
        return out.hidden_states[hidden_index], out.text_embeds
      self._fns[key] = jax.jit(fn)
    with self._context():
      return self._fns[key](enc.params, ids)

  def _t5(self, prompts: list[str]):
    enc = self.encoders["t5"]
    batch = len(prompts)
    if enc is None:
      return jnp.zeros((batch, self.t5_length, self.t5_width), jnp.float32)
    ids, mask = tf_interop.tokenize(enc.tokenizer, prompts, self.t5_length)
    if "t5" not in self._fns:
      self._fns["t5"] = jax.jit(lambda params, ids, mask: enc.model.apply(
          {"params": params}, ids, mask))
    with self._context():
      return self._fns["t5"](enc.params, ids, mask if self.t5_attention_mask else None)

  def encode(self, prompt: Prompts, prompt_2: Prompts | None = None,
             prompt_3: Prompts | None = None, *,
             clip_skip: int | None = None) -> dict[str, jax.Array]:
    """Per-encoder outputs (keys EMBEDDING_KEYS), float32; `prompt_2` goes to CLIP-G and
    `prompt_3` to T5, both defaulting to `prompt` (as in diffusers)."""
    prompt = tf_interop.as_prompt_list(prompt, "prompt")
    prompt_2 = tf_interop.as_prompt_list(prompt_2 or prompt, "prompt_2")
    prompt_3 = tf_interop.as_prompt_list(prompt_3 or prompt, "prompt_3")
    _check_batch(prompt, prompt_2, "prompt_2")
    _check_batch(prompt, prompt_3, "prompt_3")
    skip = self.clip_skip if clip_skip is None else clip_skip
    return self._encode(prompt, prompt_2, prompt_3, self._hidden_index(skip))

  def _hidden_index(self, clip_skip: int | None) -> int:
    """clip_skip -> index into hidden_states (None: the penultimate layer, -2)."""
    if clip_skip is None:
      return -2
    layers = min(self.encoders[n].model.config.num_layers for n in ("clip_l", "clip_g"))
    if not 0 <= clip_skip <= layers - 1:
      raise ValueError(f"clip_skip={clip_skip} is out of range: the CLIPs have {layers} layers "
                       f"(0 <= clip_skip <= {layers - 1}).")
    return -(clip_skip + 2)

  def _encode(self, prompt: list[str], prompt_2: list[str], prompt_3: list[str],
              index: int) -> dict[str, jax.Array]:
    clip_l, clip_l_pooled = self._clip("clip_l", prompt, index)
    clip_g, clip_g_pooled = self._clip("clip_g", prompt_2, index)
    return {"clip_l": clip_l, "clip_l_pooled": clip_l_pooled, "clip_g": clip_g,
            "clip_g_pooled": clip_g_pooled, "t5": self._t5(prompt_3)}

  def __call__(self, prompt: Prompts, prompt_2: Prompts | None = None,
               prompt_3: Prompts | None = None, *,
               clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """prompts -> (context (B, 77 + L_t5, W_t5), pooled (B, P_l + P_g))."""
    return assemble(**self.encode(prompt, prompt_2, prompt_3, clip_skip=clip_skip))

  def encode_prompt(self, prompt: Prompts, prompt_2: Prompts | None = None,
                    prompt_3: Prompts | None = None, *, do_classifier_free_guidance: bool = True,
                    negative_prompt: Prompts | None = None,
                    negative_prompt_2: Prompts | None = None,
                    negative_prompt_3: Prompts | None = None, clip_skip: int | None = None):
    """diffusers' encode_prompt: (context, negative_context, pooled, negative_pooled).

    The negatives are None without guidance. As in diffusers, a missing negative prompt is
    "" and clip_skip applies to the positive prompt only.
    """
    prompt = tf_interop.as_prompt_list(prompt, "prompt")
    context, pooled = self(prompt, prompt_2, prompt_3, clip_skip=clip_skip)
    if not do_classifier_free_guidance:
      return context, None, pooled, None
    negative_prompt = negative_prompt or ""
    negative_prompt_2 = negative_prompt_2 or negative_prompt
    negative_prompt_3 = negative_prompt_3 or negative_prompt
    negs = []
    for what, neg in (("negative_prompt", negative_prompt),
                      ("negative_prompt_2", negative_prompt_2),
                      ("negative_prompt_3", negative_prompt_3)):
      neg = len(prompt) * [neg] if isinstance(neg, str) else tf_interop.as_prompt_list(neg, what)
      _check_batch(prompt, neg, what)
      negs.append(neg)
    neg_context, neg_pooled = assemble(**self._encode(*negs, index=-2))
    return context, neg_context, pooled, neg_pooled


def load_encoder(name: str, model_folder: str, tokenizer_folder: str,
                 max_length: int | None = None, dtype: Any = jnp.float32,
                 mesh: Mesh | None = None, rules: Any = "fsdp_tp") -> Encoder:
  """One encoder ("clip_l", "clip_g" or "t5") from a transformers model + tokenizer folder.

  CLIP token length is the tokenizer's model_max_length (77); T5's is `max_length`.
  """
  if name not in ENCODERS:
    raise ValueError(f"Unknown encoder {name!r}; use one of {ENCODERS}.")
  if name == "t5":
    if max_length is None:
      raise ValueError("The T5 token length (max_length; SD3 uses 77 or 256) is required.")
    model, params = tf_interop.load_t5(model_folder, dtype, mesh, rules)
  else:
    model, params = tf_interop.load_clip(model_folder, dtype, mesh, rules)
  tokenizer = tf_interop.load_tokenizer(tokenizer_folder, max_length)
  length = int(max_length or tokenizer.model_max_length)
  if name != "t5" and length > model.config.max_position_embeddings:
    raise ValueError(f"{name}: tokenizer length {length} exceeds the model's "
                     f"{model.config.max_position_embeddings} positions.")
  return Encoder(model, params, tokenizer, length, sources=(model_folder, tokenizer_folder))
