"""When does the caption decide an attribute? The caption-flip test on shapes scenes.

A text-to-image flow model commits to each property of the image at some noise level; after
that the caption can no longer change it. To find where, real single-object scenes are
encoded, noised to level t0 with rectified flow (z = (1 - t0) x0 + t0 eps) and denoised from
there with the run's sampler settings (Euler on the run's shifted grid, CFG), twice:

  - under their own caption ("a red circle on the left"): how much of the scene survives;
  - under the caption with one attribute changed (shape, colour or position): the fraction
    of images the shapes checker reads as showing the *new* value.

At t0 = 0 nothing can change (the images are the VAE round trips); at t0 = 1 the start is
pure noise and the flipped caption is followed as well as any prompt. Where the "follows the
flipped caption" curve rises says at which noise level the model decides that attribute, and
how strongly the text decides it there (README, issue 16's ladder).

`salience` adds a loss-side view: how far a one-attribute change moves the latent the MM-DiT
regresses (circle -> square moves it a fifth as far as a colour change in the main job).

  python -m sd3jax.evals.decision --workdir RUN [--num 48] [--cfg X] [--out RUN/decision]
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd3jax import sample as sample_lib
from sd3jax.data import shapes
from sd3jax.evals import shapes_checker
from sd3jax.flow import samplers

ATTRIBUTES = ("shape", "color", "position")
DEFAULT_T0 = (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0)
SALIENCE_SCENES = 64


def _flipped(obj: dict[str, Any], attribute: str) -> dict[str, Any]:
  """The object with one attribute moved to the next value (shapes' order, cyclic)."""
  values = {"shape": shapes.SHAPES, "color": tuple(shapes.COLORS),
            "position": shapes.POSITIONS, "size": shapes.SIZES}[attribute]
  new = dict(obj)
  new[attribute] = values[(values.index(obj[attribute]) + 1) % len(values)]
  if attribute == "position":
    new["cell"] = shapes.POSITIONS.index(new["position"])
  return new


def _caption(obj: dict[str, Any]) -> str:
  return f"a {obj['color']} {obj['shape']} {shapes.POSITION_PHRASES[obj['position']]}"


def scenes(num: int, seed: int = 0) -> list[dict[str, Any]]:
  """`num` single-object scenes (colour, shape, size, cell, jitter) from their own stream."""
  rng = np.random.default_rng([seed, 31])
  out = []
  for _ in range(num):
    cell = int(rng.integers(len(shapes.POSITIONS)))
    out.append({"color": str(rng.choice(list(shapes.COLORS))),
                "shape": str(rng.choice(shapes.SHAPES)), "size": str(rng.choice(shapes.SIZES)),
                "cell": cell, "position": shapes.POSITIONS[cell],
                "jitter": [float(v) for v in rng.uniform(-1.0, 1.0, 2)]})
  return out


def denoise_from(pipeline: sample_lib.Pipeline, x0: jax.Array, t0: float, prompts: list[str], *,
                 steps: int, guidance: float, shift: float, seed: int = 0,
                 guidance_max_t: float = 1.0) -> np.ndarray:
  """Images [0, 1] after noising latents x0 to t0 and integrating the guided flow to 0.

  The levels are the sampler's (sigmas(steps, shift)) below t0, after t0 itself: from t0 = 1
  this is the run's own sampler on fresh noise.
  """
  if pipeline.formulation != "rf":
    raise ValueError(f"The caption-flip test noises with rectified flow; this pipeline's "
                     f"formulation is {pipeline.formulation!r}.")
  if not 0.0 <= t0 <= 1.0:
    raise ValueError(f"t0 must be in [0, 1] (0: no noise, 1: pure noise), got {t0}.")
  grid = samplers.sigmas(steps, shift)
  levels = jnp.asarray([t0] + [float(s) for s in grid if s < t0], jnp.float32)
  eps = sample_lib.initial_noise(seed, np.arange(x0.shape[0]), tuple(x0.shape[1:]))
  z = (1.0 - t0) * x0 + t0 * eps
  context, neg_context, pooled, neg_pooled = pipeline.encoders().encode_prompt(prompts)
  context = jnp.concatenate([context, neg_context])
  pooled = jnp.concatenate([pooled, neg_pooled])
  if levels.shape[0] == 1:  # t0 = 0: nothing to integrate.
    images = pipeline.vae.decode_latents(pipeline.vae_params, z)
  else:
    run = _integrate_fn(pipeline, guidance_max_t)
    images = run(pipeline.transformer_params, pipeline.vae_params, z, levels, context, pooled,
                 jnp.float32(guidance))
  return np.clip(np.asarray(images) / 2 + 0.5, 0.0, 1.0)


def _integrate_fn(pipeline: sample_lib.Pipeline, max_t: float):
  """jit(params, vae params, z, levels, context, pooled, guidance) -> images in [-1, 1]:
  guided Euler over `levels`, then decode. One per pipeline: captions and the guidance are
  arguments, so only a new number of levels compiles again."""
  key = ("caption_flip", float(max_t))
  if key in pipeline._cache:
    return pipeline._cache[key]
  model, vae = pipeline.transformer, pipeline.vae

  def run(tparams, vparams, z, levels, context, pooled, guidance):
    guided = samplers.cfg(
        lambda z, t: model.apply({"params": tparams}, z, t, context, pooled), guidance,
        max_t=max_t)

    def step(z, pair):
      s, s_next = pair
      return z + (s_next - s) * guided(z, jnp.broadcast_to(s, (z.shape[0],))), None
    z, _ = jax.lax.scan(step, z, (levels[:-1], levels[1:]))
    return vae.decode_latents(vparams, z)

  pipeline._cache[key] = jax.jit(run)
  return pipeline._cache[key]


def _reads(images: np.ndarray, objects: Sequence[dict[str, Any]], attribute: str) -> float:
  """Fraction of images whose largest detected object has `attribute` as in `objects`."""
  hits = []
  for image, obj in zip(images, objects):
    dom = shapes_checker.dominant_object(shapes_checker.detect_objects(image))
    hits.append(dom is not None and dom[attribute] == obj[attribute])
  return float(np.mean(hits))


def caption_flip(pipeline: sample_lib.Pipeline, *, t0s: Sequence[float] = DEFAULT_T0,
                 num: int = 48, steps: int = 28, guidance: float = 5.0, shift: float = 3.0,
                 size: int | None = None, seed: int = 0, guidance_max_t: float = 1.0,
                 attributes: Sequence[str] = ATTRIBUTES) -> dict[str, Any]:
  """The test above. Returns {"t0", "num", and per attribute {"kept", "follows_flip",
  "keeps_original"}: lists over t0}; "kept" is under the scene's own caption."""
  unknown = sorted(set(attributes) - set(ATTRIBUTES))
  if unknown:
    raise ValueError(f"Unknown attributes {unknown}; choose from {ATTRIBUTES}.")
  size = size or pipeline.default_size
  objs = scenes(num, seed)
  images = np.stack([shapes.render([o], size, size, "white") for o in objs])
  x0 = pipeline.vae.encode_to_latents(pipeline.vae_params,
                                      jnp.asarray(images, jnp.float32) / 127.5 - 1.0)
  kwargs = dict(steps=steps, guidance=guidance, shift=shift, seed=seed,
                guidance_max_t=guidance_max_t)
  out: dict[str, Any] = {"t0": [float(t) for t in t0s], "num": num, "steps": steps,
                         "guidance": guidance, "shift": shift}
  own = [denoise_from(pipeline, x0, t, [_caption(o) for o in objs], **kwargs) for t in t0s]
  for attribute in attributes:
    flipped = [_flipped(o, attribute) for o in objs]
    runs = [denoise_from(pipeline, x0, t, [_caption(o) for o in flipped], **kwargs)
            for t in t0s]
    out[attribute] = {
        "kept": [_reads(im, objs, attribute) for im in own],
        "follows_flip": [_reads(im, flipped, attribute) for im in runs],
        "keeps_original": [_reads(im, objs, attribute) for im in runs]}
  return out


def salience(pipeline: sample_lib.Pipeline, *, num: int = SALIENCE_SCENES, size: int | None = None,
             seed: int = 0) -> dict[str, dict[str, float]]:
  """How loud each attribute is to the diffusion loss: the mean squared L2 distance between a
  scene and its one-attribute-flipped twin, in pixels ([-1, 1]) and in the model's latents
  (normalised VAE posterior means, the x0 the MM-DiT regresses). An attribute whose change
  moves the latent little is a small part of the loss, and is learned late. Shape is also
  given per pair of shapes."""
  size = size or pipeline.default_size
  objs = scenes(num, seed)
  twins = {a: [_flipped(o, a) for o in objs] for a in ATTRIBUTES + ("size",)}
  for a, b in zip(shapes.SHAPES, shapes.SHAPES[1:] + shapes.SHAPES[:1]):
    twins[f"shape {a} / {b}"] = [dict(o, shape=a) for o in objs] + [dict(o, shape=b)
                                                                     for o in objs]
  encode = lambda x: np.asarray(pipeline.vae.encode_to_latents(  # noqa: E731
      pipeline.vae_params, jnp.asarray(x)))
  pixels = lambda objects: np.stack(  # noqa: E731
      [shapes.render([o], size, size, "white") for o in objects]).astype(np.float32) / 127.5 - 1
  base = pixels(objs)
  base_latents = encode(base)  # once, for every one-attribute twin
  sq = lambda u, v: float(np.mean(np.sum((u - v) ** 2, axis=(1, 2, 3))))  # noqa: E731
  out = {}
  for name, objects in twins.items():
    x = pixels(objects)
    z = encode(x)
    if len(objects) == 2 * num:  # a pair of shapes, both drawn here
      d_pixels, d_latents = sq(x[:num], x[num:]), sq(z[:num], z[num:])
    else:
      d_pixels, d_latents = sq(base, x), sq(base_latents, z)
    out[name] = {"pixels": d_pixels, "latents": d_latents,
                 "latents_per_pixel": d_latents / max(d_pixels, 1e-12)}
  return out


def plot(result: dict[str, Any], path: str) -> str:
  """follows_flip and kept against t0, one line per attribute."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for i, attribute in enumerate(a for a in ATTRIBUTES if a in result):
    color = f"C{i}"
    ax.plot(result["t0"], result[attribute]["follows_flip"], "o-", color=color,
            label=f"{attribute}: follows the changed caption")
    ax.plot(result["t0"], result[attribute]["kept"], "s--", color=color, alpha=0.5,
            label=f"{attribute}: kept under its own caption")
  ax.set_xlabel("noise level t0 the denoising starts from (1 = pure noise)")
  ax.set_ylabel("fraction of images")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left")
  ax.set_title(f"When the caption decides ({result['num']} scenes, CFG {result['guidance']:g})",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m sd3jax.evals.decision",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the job folder or its MM-DiT run")
  parser.add_argument("--num", type=int, default=48, help="scenes (default 48)")
  parser.add_argument("--t0", default=",".join(str(t) for t in DEFAULT_T0),
                      help="comma-separated noise levels")
  parser.add_argument("--cfg", type=float, default=None,
                      help="guidance scale (default: the run's own, config.eval.sample_cfg)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="", help="folder (default RUN/decision)")
  args = parser.parse_args(argv)
  run_dir = sample_lib.resolve_run_dir(args.workdir)
  config = sample_lib.run_config(None, run_dir)
  settings = sample_lib.run_sampling_settings(config)
  pipeline = sample_lib.pipeline_from_run(config, run_dir, shift=settings["shift"])
  t0s = [float(t) for t in args.t0.split(",") if t]
  guidance = settings["cfg"] if args.cfg is None else args.cfg
  result = caption_flip(pipeline, t0s=t0s, num=args.num, steps=settings["steps"],
                        guidance=guidance, shift=settings["shift"], seed=args.seed,
                        guidance_max_t=settings["cfg_max_t"])
  result["salience"] = salience(pipeline, seed=args.seed)
  out = args.out or os.path.join(run_dir, "decision")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "decision.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(out, "decision.png"))
  print("t0:                " + " ".join(f"{t:5.2f}" for t in result["t0"]))
  for attribute in ATTRIBUTES:
    r = result[attribute]
    print(f"{attribute:8s} kept:      " + " ".join(f"{v:5.2f}" for v in r["kept"]))
    print(f"{attribute:8s} follows:   " + " ".join(f"{v:5.2f}" for v in r["follows_flip"]))
  print(f"squared L2 between a scene and its one-attribute twin (mean of {SALIENCE_SCENES}):")
  for name, r in result["salience"].items():
    print(f"  {name:22s} pixels {r['pixels']:8.1f}   latents {r['latents']:8.1f}   "
          f"ratio {r['latents_per_pixel']:.2f}")
  print(f"wrote {out}/decision.json and decision.png")


if __name__ == "__main__":
  main()
