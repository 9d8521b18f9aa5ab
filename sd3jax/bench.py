"""`sd3jax bench`: steady-state speed of the real train step, optionally against diffusers.

  sd3jax bench --config experiments/scaling.py:depth=4,head_dim=64,qk_norm=rms_norm,\
image_size=256,batch=8 --config.conditioning.clip_tokens=32 \
--config.conditioning.t5_tokens=32 [--steps 10] [--vs-diffusers]

The step is `train.make_train_step` (forward, backward, clipping, AdamW, EMA, non-finite
guard) compiled for the config's mesh, fed one synthetic batch of the config's shapes.
Throughput uses the analytic FLOPs (`train.flops_per_step`, 3 x forward). MFU uses the
peak table on accelerators; on CPU the peak is *measured*: a 2048^3 float32 matmul,
repeated, in JAX (and in torch with --vs-diffusers), so "% of peak" is against what this
machine's cores actually deliver on a matmul.

With --vs-diffusers, diffusers' `SD3Transformer2DModel` of the same architecture runs in
the same process: eager PyTorch, the same rectified-flow loss (MSE of the velocity) on
the same batch shapes, `torch.optim.AdamW`, global-norm clipping and an EMA when the
config has them. Timing alternates blocks of steps between the two sides (the machine's
load changes over time; alternating exposes both sides to it equally) and reports
medians. torch gets as many threads as JAX's CPU client uses (the visible cores).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from sd3jax import config as config_lib


def cpu_threads() -> int:
  """Cores this process may run on: what XLA's CPU client sizes its thread pool to."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def measure_matmul_peak(n: int = 2048, reps: int = 5, repeats: int = 3) -> float:
  """FLOP/s of a float32 n^3 matmul in JAX on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / reps)
  return 2.0 * n ** 3 / best


def measure_torch_matmul_peak(n: int = 2048, reps: int = 5, repeats: int = 3) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(reps):
      a @ b
    best = min(best, (time.perf_counter() - t0) / reps)
  return 2.0 * n ** 3 / best


# ---------------------------------------------------------------------------
# The two train steps
# ---------------------------------------------------------------------------

def build_jax_step(config: ConfigDict, devices=None) -> dict[str, Any]:
  """The trainer's compiled step, its initial state and one batch. Returns a dict."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from sd3jax import optim, parallel, train  # pylint: disable=g-import-not-at-top

  devices = list(devices) if devices is not None else jax.devices()
  config = config_lib.validate(config, num_devices=len(devices))
  mesh = train.make_mesh(config, devices)
  rules = parallel.get_rules(config.sharding_rules)
  task = train.make_task(config, mesh, "")
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                 config.total_steps)
  init_fn = train.state_init_fn(task.init_params, task.tx)
  _, shardings = train.abstract_state(init_fn, mesh, rules, jax.random.PRNGKey(config.seed))
  state, _ = parallel.create_sharded(init_fn, mesh, rules, jax.random.PRNGKey(config.seed),
                                     shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = train.shard_batch(next(task.make_data(config)), mesh, train.batch_axes(rules))
    step_fn = jax.jit(train.make_train_step(config, task, schedule),
                      in_shardings=(shardings, None),
                      out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0,
                      compiler_options=task.compiler_options)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  return {"config": config, "compiled": compiled, "state": state, "batch": batch,
          "devices": devices, "compile_seconds": compile_s,
          "flops_per_step": task.flops_per_step}


class JaxRunner:
  """Runs k steps of the compiled trainer step, carrying the (donated) state."""

  def __init__(self, built: dict[str, Any]):
    self.compiled, self.state, self.batch = built["compiled"], built["state"], built["batch"]

  def __call__(self, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


class TorchRunner:
  """diffusers SD3Transformer2DModel + torch.optim.AdamW: the same step in PyTorch.

  On CUDA (when JAX runs on a GPU) it takes torch's fast path: float32 weights with bf16
  autocast when the config computes in bf16, SDPA attention (diffusers' default processor:
  flash on bf16), fused AdamW, and with `compile` torch.compile of the model.
  """

  def __init__(self, config: ConfigDict, threads: int, device: str = "cpu",
               compile: bool = False):  # pylint: disable=redefined-builtin
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import SD3Transformer2DModel  # pylint: disable=g-import-not-at-top
    from sd3jax.interop import diffusers as interop  # pylint: disable=g-import-not-at-top

    self.threads = threads
    self.torch = torch
    self.device = torch.device(device)
    cuda = self.device.type == "cuda"
    torch.manual_seed(config.seed)
    conf = interop.transformer_config_to_diffusers(config_lib.model_config(config))
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    self.model = SD3Transformer2DModel(**conf).train().to(self.device)
    self.forward = torch.compile(self.model) if compile else self.model
    self.autocast = config.model.dtype == "bfloat16"
    o = config.optimizer
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                 eps=o.eps, weight_decay=o.weight_decay,
                                 **({"fused": True} if cuda else {}))
    self.clip = float(o.grad_clip_norm)
    self.ema_decay = float(config.ema.decay)
    self.params = [p for p in self.model.parameters()]
    self.ema = [p.detach().clone() for p in self.params] if self.ema_decay > 0 else None
    b, lat, m = config.batch_size, config_lib.latent_size(config), config.model
    g = torch.Generator().manual_seed(0)
    on = lambda x: x.to(self.device)
    self.x0 = on(torch.randn(b, m.in_channels, lat, lat, generator=g))  # NCHW, as diffusers
    self.context = on(torch.randn(b, config_lib.text_len(config), m.joint_attention_dim,
                                  generator=g))
    self.pooled = on(torch.randn(b, m.pooled_projection_dim, generator=g))

  def step(self) -> None:
    torch = self.torch
    b = self.x0.shape[0]
    t = torch.sigmoid(torch.randn(b, device=self.device))   # logit-normal(0, 1)
    eps = torch.randn_like(self.x0)
    tb = t[:, None, None, None]
    z_t = (1 - tb) * self.x0 + tb * eps
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      pred = self.forward(z_t, self.context, self.pooled, t * 1000.0, return_dict=False)[0]
    loss = torch.mean(torch.square(pred.float() - (eps - self.x0)))
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    if self.ema is not None:
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access

  def __call__(self, k: int) -> float:
    self.torch.set_num_threads(self.threads)
    t0 = time.perf_counter()
    for _ in range(k):
      self.step()
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------

def _rates(seconds_per_step: float, flops: float, batch: int, num_devices: int,
           peak_flops: float | None) -> dict[str, float]:
  sps = 1.0 / seconds_per_step
  out = {"steps_per_sec": sps, "examples_per_sec": sps * batch,
         "tflops_per_sec_per_device": flops * sps / num_devices / 1e12,
         "gflops_per_sec_per_device": flops * sps / num_devices / 1e9}
  if peak_flops:
    out["mfu"] = flops * sps / num_devices / peak_flops
  return out


def share_accelerator_memory() -> None:
  """Lets JAX and torch share one accelerator in this process (`--vs-diffusers` on a GPU).

  By default JAX takes 75% of the GPU up front and keeps what it frees. On one H200 the
  SD3-medium bench (2B, batch 32) then ran torch out of memory, with and without
  preallocation; allocating on demand and returning freed memory fits both. Must run
  before JAX starts its GPU backend; a user's own settings win.
  """
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
  os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def bench_main(config: ConfigDict, *, steps: int = 10, warmup: int = 2,
               vs_diffusers: bool = False, blocks: int | None = None,
               torch_threads: tuple[int, ...] = (), peak_n: int = 2048, devices=None,
               torch_compile: bool = False, verbose: bool = True) -> dict[str, Any]:
  """Times the config's train step (and diffusers' with vs_diffusers); returns a summary.

  On a GPU, diffusers runs on CUDA (TorchRunner), and `torch_compile` adds a torch.compile
  run ("diffusers_compiled"). On CPU, torch runs with as many threads as JAX's CPU client
  (`cpu_threads()`); `torch_threads`
  adds diffusers runs with other thread counts ("diffusers_{n}t"), reported next to it (on
  an oversubscribed machine torch's OpenMP barriers can make 1 thread faster than 2).

  `steps` steady-state steps per side, in `blocks` alternating blocks (default: up to 5),
  after `warmup` untimed steps each. Rates are from the median seconds per step over blocks.
  """
  from sd3jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  if vs_diffusers and config.optimizer.get("name", "adamw") != "adamw":
    raise ValueError(f"--vs-diffusers times both sides with AdamW (torch.optim.AdamW), but "
                     f"config.optimizer.name={config.optimizer.name!r}; add "
                     "--config.optimizer.name=adamw.")
  built = build_jax_step(config, devices)
  config, devices = built["config"], built["devices"]
  flops = built["flops_per_step"]
  n = len(devices)
  platform = devices[0].platform
  threads = cpu_threads()
  result: dict[str, Any] = {
      "device_kind": devices[0].device_kind, "num_devices": n, "batch_size": config.batch_size,
      "flops_per_step": flops, "compile_seconds": built["compile_seconds"], "steps": steps}

  peak = None
  if platform == "cpu":
    peak = measure_matmul_peak(peak_n)
    result["peak_source"] = f"measured float32 {peak_n}^3 matmul (JAX)"
    result["threads"] = threads
  else:
    tflops = config.log.peak_tflops_per_device or metrics_lib.peak_tflops(devices[0].device_kind)
    peak = tflops * 1e12 if tflops else None
    result["peak_source"] = "peak table (dense bf16)"
  result["peak_gflops_per_sec"] = peak / 1e9 if peak else None

  runners = {"sd3jax": JaxRunner(built)}
  if vs_diffusers:
    device = "cuda" if platform == "gpu" else "cpu"
    runners["diffusers"] = TorchRunner(config, threads, device)
    if torch_compile:
      runners["diffusers_compiled"] = TorchRunner(config, threads, device, compile=True)
    for n_threads in torch_threads:
      if n_threads != threads:
        runners[f"diffusers_{n_threads}t"] = TorchRunner(config, n_threads)
    if platform == "cpu":
      result["torch_peak_gflops_per_sec"] = measure_torch_matmul_peak(peak_n) / 1e9
  for run in runners.values():
    if warmup:
      run(warmup)

  blocks = max(1, min(steps, blocks or 5))
  per_block = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
  times: dict[str, list[float]] = {k: [] for k in runners}
  for i, k in enumerate(per_block):
    order = list(runners) if i % 2 == 0 else list(runners)[::-1]
    for name in order:
      times[name].append(runners[name](k) / k)
      if verbose:
        print(f"  block {i + 1}/{blocks} {name}: {1 / times[name][-1]:.3f} steps/s", flush=True)
  for name, ts in times.items():
    side = _rates(statistics.median(ts), flops, config.batch_size,
                  n if name == "sd3jax" else 1, peak)
    side["seconds_per_step"] = ts
    result[name] = side
  if vs_diffusers:
    result["ratio"] = result["sd3jax"]["steps_per_sec"] / result["diffusers"]["steps_per_sec"]
    best = max(v["steps_per_sec"] for k, v in result.items() if k.startswith("diffusers"))
    result["ratio_vs_best_torch"] = result["sd3jax"]["steps_per_sec"] / best
    result["torch_side"] = f"{threads} torch threads" if platform == "cpu" else "CUDA"
  if verbose:
    print(format_result(result))
  return result


def format_result(r: dict[str, Any]) -> str:
  peak = r.get("peak_gflops_per_sec")
  head = (f"{r['num_devices']} x {r['device_kind']}, batch {r['batch_size']}, "
          f"{r['flops_per_step'] / 1e9:.2f} GFLOP/step (analytic), compile "
          f"{r['compile_seconds']:.1f} s")
  lines = [head]
  if peak:
    lines.append(f"  peak {peak:.1f} GFLOP/s per device ({r['peak_source']})"
                 + (f"; torch matmul {r['torch_peak_gflops_per_sec']:.1f} GFLOP/s"
                    if "torch_peak_gflops_per_sec" in r else ""))
  for name in [k for k in r if k == "sd3jax" or k.startswith("diffusers")]:
    if isinstance(r[name], dict):
      s = r[name]
      line = (f"  {name:12s} {s['steps_per_sec']:.3f} steps/s, {s['examples_per_sec']:.2f} "
              f"examples/s, {s['gflops_per_sec_per_device']:.1f} GFLOP/s per device")
      if "mfu" in s:
        line += f" ({s['mfu']:.0%} of peak)"
      lines.append(line)
  if "ratio" in r:
    lines.append(f"  sd3jax / diffusers ({r['torch_side']}): {r['ratio']:.2f}x "
                 f"steps/s; vs the fastest torch run: {r['ratio_vs_best_torch']:.2f}x")
  return "\n".join(lines)
