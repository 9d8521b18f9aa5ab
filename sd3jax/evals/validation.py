"""Validation loss at fixed timesteps: the paper's training-progress metric (Esser et al., Sec. 5).

For every held-out example i and each of `num_t` evenly spaced t_j = (j + 1/2) / num_t:

  eps_i ~ N(0, I) from np.random.default_rng([seed, 11, i])   (one noise per example)
  loss_ij = weight(t_j) * mean_pixels (model(z_t(x0_i, eps_i, t_j), t_j, text_i) - target)^2

with every text encoder kept (no dropout). Reported: the mean over t of the per-t means, and
each per-t mean. With config.eval.conditioning_gap, the same losses with every encoder dropped
(zeros, what training's dropout feeds) are computed too, and

  cond_gap = val_loss(all encoders dropped) - val_loss(real captions)

(same examples, t and noise) says how much of the loss the text explains; cond_gap_rel is
that as a fraction of the dropped loss. A model that learns its prompts grows it; one that
ignores the text keeps it near 0.

Why it is bitwise the same on any data-parallel mesh: the per-device batch is fixed
(config.eval.per_device_batch), so every device runs the same program on the same rows
whatever the device count; per-example losses are gathered to the host and summed in
float64 numpy in example order, so no cross-device reduction order enters the number.
(Tensor parallelism splits contractions and is not covered by that guarantee.)

The held-out examples come from config.eval.path (precomputed records, original captions,
no shuffling) or, for synthetic runs, from the synthetic source with seed + 1. Records of
several aspect-ratio buckets are evaluated bucket by bucket (one program per latent shape)
and also reported per bucket: val_loss/<H>x<W> (pixels).
"""
from __future__ import annotations

from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from sd3jax import conditioning
from sd3jax import parallel

INPUT_KEYS = ("latents",) + tuple(conditioning.EMBEDDING_KEYS)


def fixed_timesteps(num_t: int) -> np.ndarray:
  """num_t evenly spaced midpoints of (0, 1), float32: never exactly data or noise."""
  return ((np.arange(num_t, dtype=np.float64) + 0.5) / num_t).astype(np.float32)


def t_key(t: float) -> str:
  return f"{float(t):.4f}"


def example_noise(seed: int, indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Host noise for examples `indices`: a function of (seed, index) only, so of no mesh."""
  return np.stack([np.random.default_rng([int(seed), 11, int(i)]).standard_normal(
      shape, dtype=np.float32) for i in indices])


# ------------------------------------------------------------------------------------------------
# The held-out set.
# ------------------------------------------------------------------------------------------------
def _get(section: Any, key: str, default: Any) -> Any:
  return section.get(key, default) if hasattr(section, "get") else default


def num_examples(config: ConfigDict) -> int:
  n = int(_get(config.eval, "num_examples", 0))
  return n if n > 0 else int(_get(config.eval, "batches", 2)) * int(config.batch_size)


def proportional_shares(counts: np.ndarray, n: int) -> list[int]:
  """n split over buckets in proportion to `counts` (largest remainders), each <= its count."""
  counts = np.asarray(counts, np.int64)
  total = int(counts.sum())
  if n >= total:
    return counts.tolist()
  exact = counts * n / total
  share = np.floor(exact).astype(np.int64)
  for b in np.argsort(-(exact - share), kind="stable")[:n - int(share.sum())]:
    share[b] += 1
  return share.tolist()


def held_out_examples(config: ConfigDict) -> dict[str, np.ndarray]:
  """num_examples held-out examples (each bucket its first ones, in proportion to its size),
  full (every process holds all), float32; "latents" is a list when buckets differ."""
  n = num_examples(config)
  path = _get(config.eval, "path", "")
  if not path and config.data.source == "records":
    path = config.data.path
    logging.warning("config.eval.path is empty: the validation loss reads the training records "
                    "%s (fixed noise and t, but not a held-out split).", path)
  chunks, have = [], 0
  if path:
    from sd3jax.data import latent_pipeline as pipeline_lib
    from sd3jax.data import records
    source = records.RecordSource(path, kind=records.KIND_PRECOMPUTED)
    mismatches = pipeline_lib.config_mismatches(config, source.manifest.get("producer", {}))
    if mismatches:
      raise pipeline_lib.PrecomputeMismatchError(
          f"Validation records {path} do not fit this config: {'; '.join(mismatches)}.")
    n = min(n, len(source))
    # Batches of one, in order: step `offset[b] + k` is the k-th record of bucket b. Each
    # bucket gives its first records, in proportion to its size (one bucket: the first n).
    pipe = pipeline_lib.make_precomputed_pipeline(
        source, global_batch=1, seed=int(config.seed), p_synthetic=0.0, process_index=0,
        process_count=1, shuffle=False, num_epochs=1, keys=INPUT_KEYS + ("index",))
    counts = pipe.plan.counts
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
    steps = np.concatenate([offset[b] + np.arange(k)
                            for b, k in enumerate(proportional_shares(counts, n))])
    seen = {}
    for step in steps.tolist():
      batch = pipe.batch(step)
      seen[int(np.asarray(batch["index"]).reshape(-1)[0])] = {k: batch[k][0] for k in INPUT_KEYS}
    order = sorted(seen)
    out = {k: np.stack([seen[i][k] for i in order]).astype(np.float32)
           for k in INPUT_KEYS if k != "latents"}
    latents = [np.asarray(seen[i]["latents"], np.float32) for i in order]
    # Several buckets: a list (latent shapes differ); else one array as before.
    same = len({x.shape for x in latents}) == 1
    out["latents"] = np.stack(latents) if same else latents
    return out
  from sd3jax.data import synthetic
  it = synthetic.make_iterator(config, seed=int(config.seed) + 1)
  while have < n:
    b = next(it)
    chunks.append(b)
    have += len(b["latents"])
  return {k: np.concatenate([c[k] for c in chunks])[:n].astype(np.float32)
          for k in INPUT_KEYS if k in chunks[0]}


# ------------------------------------------------------------------------------------------------
# The computation.
# ------------------------------------------------------------------------------------------------
class ValidationLoss:
  """Callable (params) -> {"val_loss", "per_t": {t: loss}, "n"}; compiled once per mesh."""

  def __init__(self, config: ConfigDict, model: nn.Module, mesh: Mesh,
               examples: Mapping[str, np.ndarray] | None = None):
    from sd3jax import flow
    self.config, self.model, self.mesh = config, model, mesh
    self.rules = parallel.get_rules(config.sharding_rules)
    self.axes = dict(self.rules).get("act_batch", parallel.BATCH_AXES)
    names = (self.axes,) if isinstance(self.axes, str) else tuple(self.axes or ())
    self.shards = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    self.per_device = int(_get(config.eval, "per_device_batch", 2))
    self.timesteps = fixed_timesteps(int(_get(config.eval, "num_timesteps", 8)))
    self.seed = int(_get(config.eval, "seed", 0))
    self.examples = dict(held_out_examples(config) if examples is None else examples)
    self.n = len(self.examples["latents"])
    # Groups of one latent shape (one per bucket), each evaluated with its own program.
    shapes = [tuple(np.shape(x)) for x in self.examples["latents"]]
    self.groups = {hw: np.asarray([i for i, s in enumerate(shapes) if s == hw])
                   for hw in sorted(set(shapes))}
    # Per group, once: its latents and its fixed noise (a function of (seed, example index)).
    self.group_data = {hw: (np.stack([self.examples["latents"][i] for i in members]),
                            example_noise(self.seed, members, hw))
                       for hw, members in self.groups.items()}
    self.vae_factor = int(config.data.vae_factor)
    formulation = flow.get_formulation(config.flow.formulation)
    t5_width = int(config.model.joint_attention_dim)

    def per_example(params, x0, eps, emb, ts, dropped):
      """(T, b) losses; lax.map over t keeps one model call's shapes whatever num_t is."""
      if dropped:  # every encoder dropped: zeros, as conditioning.drop_encoders makes them
        emb = jax.tree.map(jnp.zeros_like, emb)
      context, pooled = conditioning.assemble(
          emb["clip_l"], emb["clip_g"], emb.get("t5"), emb["clip_l_pooled"],
          emb["clip_g_pooled"], t5_length=0, t5_width=t5_width)

      def at(t):
        tb = jnp.full((x0.shape[0],), t, jnp.float32)
        z = formulation.noisy(x0, eps, tb)
        target = formulation.target(x0, eps, tb)
        pred = model.apply({"params": params}, z, tb, context, pooled).astype(jnp.float32)
        err = (pred - target.astype(jnp.float32)) ** 2
        return formulation.loss_weight(tb) * jnp.mean(err.reshape(err.shape[0], -1), axis=1)
      return jax.lax.map(at, ts)

    self._fn = jax.jit(per_example, static_argnums=5,
                       out_shardings=NamedSharding(mesh, P(None, self.axes)))
    self.gap = bool(_get(config.eval, "conditioning_gap", False))

  def _place(self, x: np.ndarray) -> jax.Array:
    sharding = NamedSharding(self.mesh, P(self.axes, *([None] * (x.ndim - 1))))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  def per_example_losses(self, params: Any, dropped: bool = False) -> np.ndarray:
    """(num_t, n) float32 losses, example i in column i; `dropped`: every encoder zeroed."""
    chunk = self.per_device * self.shards
    out = np.zeros((len(self.timesteps), self.n), np.float32)
    ts = jnp.asarray(self.timesteps)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for shape, members in self.groups.items():
        latents, noise = self.group_data[shape]
        for start in range(0, len(members), chunk):
          # Pad a short chunk by repeating the group's last example.
          local = np.minimum(np.arange(start, start + chunk), len(members) - 1)
          index, real = members[local], int(min(chunk, len(members) - start))
          emb = {k: self._place(v[index]) for k, v in self.examples.items() if k != "latents"}
          losses = self._fn(params, self._place(latents[local]), self._place(noise[local]), emb,
                            ts, bool(dropped))
          out[:, members[start:start + real]] = np.asarray(_to_host(losses))[:, :real]
    return out

  def _mean(self, losses: np.ndarray) -> tuple[float, list[float]]:
    per_t = [float(np.add.reduce(row) / self.n) for row in losses.astype(np.float64)]
    return float(sum(per_t) / len(per_t)), per_t  # fixed order: example order

  def __call__(self, params: Any) -> dict[str, Any]:
    losses = self.per_example_losses(params)
    val, per_t = self._mean(losses)
    out = {"val_loss": val, "per_t": {t_key(t): v for t, v in zip(self.timesteps, per_t)},
           "n": self.n}
    if len(self.groups) > 1:
      f = self.vae_factor
      out["per_bucket"] = {
          f"{h * f}x{w * f}": float(np.mean(np.add.reduce(
              losses[:, members].astype(np.float64), axis=1) / len(members)))
          for (h, w, *_), members in self.groups.items()}
    if self.gap:
      dropped, dropped_t = self._mean(self.per_example_losses(params, dropped=True))
      out.update(val_loss_dropped=dropped, cond_gap=dropped - val,
                 cond_gap_rel=(dropped - val) / dropped if dropped > 0 else 0.0,
                 cond_gap_per_t={t_key(t): d - v for t, d, v in zip(self.timesteps, dropped_t,
                                                                      per_t)})
    return out


def _to_host(x: jax.Array) -> np.ndarray:
  """The full value on every process (a no-op gather on one host)."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def flat_metrics(result: Mapping[str, Any]) -> dict[str, float]:
  """{"val_loss", "val_loss_t<t>", and cond_gap* when measured}: the flat form for
  metrics.jsonl / TensorBoard."""
  out = {"val_loss": float(result["val_loss"])}
  out.update({f"val_loss/{k}": float(v) for k, v in result.get("per_bucket", {}).items()})
  out.update({f"val_loss_t{k}": float(v) for k, v in result["per_t"].items()})
  for key in ("val_loss_dropped", "cond_gap", "cond_gap_rel"):
    if key in result:
      out[key] = float(result[key])
  out.update({f"cond_gap_t{k}": float(v) for k, v in result.get("cond_gap_per_t", {}).items()})
  return out


__all__ = ["ValidationLoss", "fixed_timesteps", "example_noise", "held_out_examples",
           "flat_metrics", "num_examples", "t_key"]
