"""The trainer: one readable loop, sharded, jit-compiled, resumable to the bit.

    sd3jax train --config experiments/tiny.py --workdir /tmp/tiny
    sd3jax train --config experiments/vae_f8.py:16 --workdir /tmp/vae16

config.task picks the `Task` (what differs between models: params init, loss, data
iterator, FLOPs estimate, built-in evals, export at the end): "mmdit" (defined here) or
"vae" (sd3jax.tasks). Everything else is one code path.

Sections, in the order a step needs them: setup (config, mesh, model), data, state, step,
checkpoint, loop (the eval hooks are sd3jax.evals.hooks). Everything that decides the
numbers (timestep density, formulation, text-encoder dropout, loss) lives in sd3jax.flow /
sd3jax.conditioning; this file only wires them together and keeps the run honest:

- the state is created in its shards (no full copy of the weights on one device);
- one compiled step with donated state does forward, backward over microbatches
  (lax.scan), clipping, AdamW and EMA; a step with non-finite gradients changes nothing
  but its counters, and N of them in a row stop the run with a clear error;
- with aspect-ratio buckets (config.data.buckets) there is one such step per bucket, all
  compiled before step 1 (sd3jax.compiled_steps), each with its bucket's timestep shift;
- the step's metrics are read from the device only after the next step is dispatched;
- checkpoints hold the state *and* the data iterator position, so 3 + 3 steps equal 6.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from sd3jax import checkpoint as ckpt_lib
from sd3jax import compiled_steps
from sd3jax import conditioning
from sd3jax import config as config_lib
from sd3jax import console
from sd3jax import metrics as metrics_lib
from sd3jax import optim
from sd3jax import parallel
from sd3jax import buckets as buckets_lib
from sd3jax.data import records
from sd3jax.data import synthetic
from sd3jax.evals import hooks
from sd3jax.evals.hooks import EvalFn
from sd3jax.models import mmdit

# A run stopped by SIGTERM / SIGINT after saving exits with this code (EX_TEMPFAIL:
# "try again"); rerunning the same command resumes. Finished runs exit 0.
EXIT_INTERRUPTED = 75


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # completed steps
  params: Any                  # float32
  opt_state: Any               # float32 AdamW moments + injected learning rate
  ema_params: Any
  rng: jax.Array               # base key; step s uses fold_in(rng, s)
  nonfinite_total: jax.Array   # steps skipped for non-finite gradients, ever
  nonfinite_streak: jax.Array  # ... in a row, up to now


# (params, batch, rng, step) -> (loss, metrics): a task's objective on one (micro)batch.
LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, jax.Array], tuple[jax.Array, dict]]
# (params, batch, rng, step) -> (loss, grads, metrics) on one global batch.
GradsFn = Callable[[Any, Mapping[str, jax.Array], jax.Array, jax.Array],
                   tuple[jax.Array, Any, dict]]


@dataclasses.dataclass
class Task:
  """What a model brings to the shared loop."""
  name: str
  init_params: Callable[[jax.Array], Any]     # rng -> logically boxed params
  loss_and_grads: GradsFn                     # see `grads_of` to build it from a LossFn
  make_data: Callable[[ConfigDict], Iterator]  # config -> iterator with get_state / set_state
  tx: optax.GradientTransformation             # its learning rate is injected (optim.py)
  flops_per_step: float                        # analytic training FLOPs, whole global batch
  make_evals: Callable[[], list]               # built-in EvalFns (run if eval.every_steps > 0)
  finish: Callable[[str, Any], None] | None = None  # (workdir, state) at the last step
  histograms: tuple[str, ...] = ()             # metrics logged as histograms, not means
  # Aspect-ratio buckets: the (h, w) of batch[spatial_key]'s dims 1-2 in each bucket; one
  # step is compiled per bucket before step 1. (): only the first batch's shape.
  buckets: Sequence[tuple[int, int]] = ()
  spatial_key: str = "latents"
  bucket_names: Sequence[str] = ()             # per bucket, for logs ("HxW" in pixels)
  compiler_options: dict[str, str] | None = None  # for the step (parallel.conv_compiler_options)


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  metrics: dict                # the last logged record
  history: list[dict]          # every logged record of this invocation
  interrupted: bool = False    # stopped by a signal (a checkpoint of `step` was written)
  compiles: list[dict] = dataclasses.field(default_factory=list)  # bucket, seconds, step


# =============================================================================================
# Setup: mesh, model, optimizer
# =============================================================================================

def make_mesh(config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  ici, dcn = config_lib.mesh_sizes(config)
  return parallel.make_mesh(ici, dcn, devices)


def input_shapes(config: ConfigDict, batch: int) -> dict[str, tuple[int, ...]]:
  """Shapes of the model inputs (x, t, context, pooled) for `batch` examples."""
  latent, m = config_lib.latent_size(config), config.model
  return {"x": (batch, latent, latent, m.in_channels), "t": (batch,),
          "context": (batch, config_lib.text_len(config), m.joint_attention_dim),
          "pooled": (batch, m.pooled_projection_dim)}


def flops_per_step(config: ConfigDict) -> float:
  """Analytic training FLOPs of one step: 3 x forward, whole global batch (the mean over
  the buckets, which hold about equal pixel counts)."""
  cfg, text = config_lib.model_config(config), config_lib.text_len(config)
  fwd = [mmdit.flops_per_forward(cfg, h, w, text) for h, w in buckets_lib.latent_buckets(config)]
  return 3.0 * float(np.mean(fwd)) * config.batch_size


# =============================================================================================
# Data
# =============================================================================================

def make_data(config: ConfigDict) -> Iterator[dict[str, np.ndarray]]:
  """This process's iterator of local batches; it has get_state() / set_state()."""
  if config.data.source == "synthetic":
    return synthetic.make_iterator(config, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  if config.data.source == "records":
    from sd3jax.data import latent_pipeline  # the grain pipeline over precomputed records
    return latent_pipeline.make_train_iterator(config)
  raise config_lib.ConfigError(f"config.data.source={config.data.source!r}; use 'synthetic' or "
                               "'records'.")


def batch_axes(rules) -> Any:
  """Mesh axes of the batch dimension: whatever the rules map `act_batch` to."""
  return dict(parallel.get_rules(rules)).get("act_batch", parallel.BATCH_AXES)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                axes: Any = parallel.BATCH_AXES) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays, leading axis split over `axes`."""
  def put(v):
    sharding = NamedSharding(mesh, P(axes, *([None] * (np.ndim(v) - 1))))
    return jax.make_array_from_process_local_data(sharding, np.asarray(v))
  return {k: put(v) for k, v in batch.items()}


def text_conditioning(rng: jax.Array, batch: Mapping[str, jax.Array], drop_prob: float,
                      t5_width: int) -> tuple[jax.Array, jax.Array]:
  """Per-encoder embeddings -> each encoder dropped (zeros) independently -> (context, pooled)."""
  embeddings = {k: batch[k].astype(jnp.float32) for k in conditioning.EMBEDDING_KEYS if k in batch}
  if drop_prob > 0:
    embeddings = conditioning.drop_encoders(rng, embeddings, drop_prob)
  return conditioning.assemble(embeddings["clip_l"], embeddings["clip_g"], embeddings.get("t5"),
                               embeddings["clip_l_pooled"], embeddings["clip_g_pooled"],
                               t5_length=0, t5_width=t5_width)


# =============================================================================================
# State
# =============================================================================================

def make_init_fn(config: ConfigDict, model: nn.Module, tx: optax.GradientTransformation,
                 batch_shards: int) -> Callable[[jax.Array], TrainState]:
  """The MM-DiT's rng -> TrainState with logically boxed leaves."""
  return state_init_fn(mmdit_init_params(config, model, batch_shards), tx)


def mmdit_init_params(config: ConfigDict, model: nn.Module,
                      batch_shards: int) -> Callable[[jax.Array], Any]:
  shapes = input_shapes(config, batch_shards)

  def init_params(rng):
    dummy = [jnp.zeros(shapes[k]) for k in ("x", "t", "context", "pooled")]
    return model.init(rng, *dummy)["params"]
  return init_params


def state_init_fn(init_params: Callable[[jax.Array], Any],
                  tx: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState with logically boxed leaves (for eval_shape / create_sharded)."""
  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), rng=state_rng,
                      nonfinite_total=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32))
  return init


def abstract_state(init_fn: Callable, mesh: Mesh, rules, rng: jax.Array) -> tuple[Any, Any]:
  """(ShapeDtypeStructs carrying the target shardings, shardings) of the train state."""
  boxed = jax.eval_shape(init_fn, rng)
  shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


# =============================================================================================
# Step
# =============================================================================================

def make_loss_and_grads(config: ConfigDict, model: nn.Module, mesh: Mesh):
  """(params, batch, rng) -> (loss, grads, t): one global batch, split into microbatches."""
  from sd3jax import flow
  fcfg = config.flow
  formulation = flow.get_formulation(fcfg.formulation)
  density_kw = {"logit_normal": {"m": fcfg.logit_mean, "s": fcfg.logit_std},
                "mode": {"s": fcfg.mode_scale}}.get(fcfg.density, {})
  density = flow.get_density(fcfg.density, **density_kw)
  k = int(config.microbatches)
  axes = batch_axes(config.sharding_rules)
  t5_width, drop = config.model.joint_attention_dim, float(config.conditioning.drop_prob)
  edit_drop = float(config.conditioning.get("edit_drop_prob", 0.05))
  factor = int(config.data.vae_factor)

  def loss_fn(params, mb):
    pred = model.apply({"params": params}, mb["z_t"], mb["t"], mb["context"], mb["pooled"])
    return flow.loss(pred.astype(jnp.float32), mb["target"], mb["weight"])

  def split(x):  # (B, ...) -> (k, B / k, ...); microbatch j holds examples j, j + k, ...
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, axes, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def loss_and_grads(params, batch, rng):
    flow_rng, drop_rng = jax.random.split(rng)
    x0 = batch["latents"].astype(jnp.float32)
    # The bucket's shift (config.flow.shift_rule): the latent shape is static, so each
    # bucket's compiled step has its own constant.
    shift = buckets_lib.train_shift(config, x0.shape[1] * factor, x0.shape[2] * factor)
    z_t, t, target, weight = flow.training_inputs(flow_rng, x0, formulation, density,
                                                  shift=shift)
    context, pooled = text_conditioning(drop_rng, batch, drop, t5_width)
    if "source_latents" in batch:  # an editing model: the source latent joins the channels
      context, pooled, source = conditioning.drop_edit_conditions(
          jax.random.fold_in(drop_rng, 1), context, pooled,
          batch["source_latents"].astype(jnp.float32), edit_drop)
      z_t = jnp.concatenate([z_t, source], axis=-1)
    weight = jnp.broadcast_to(jnp.asarray(weight, jnp.float32), t.shape)
    inputs = {"z_t": z_t, "t": t, "context": context, "pooled": pooled, "target": target,
              "weight": weight}
    grad_fn = jax.value_and_grad(loss_fn)
    if k == 1:
      loss, grads = grad_fn(params, inputs)
      return loss, grads, t

    def body(carry, mb):
      loss, grads = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros, jax.tree.map(split, inputs))
    return loss / k, jax.tree.map(lambda g: g / k, grads), t
  return loss_and_grads


def grads_of(loss_fn: LossFn, microbatches: int, mesh: Mesh,
             axes: Any = parallel.BATCH_AXES) -> GradsFn:
  """A task's LossFn -> GradsFn over one global batch split into `microbatches`.

  Microbatch j holds examples j, j + k, ... and its rng is fold_in(rng, j); losses,
  gradients and metrics are averaged over microbatches.
  """
  k = int(microbatches)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, axes, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def loss_and_grads(params, batch, rng, step):
    if k == 1:
      (loss, metrics), grads = grad_fn(params, batch, rng, step)
      return loss, grads, metrics

    def body(carry, xs):
      j, mb = xs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, j), step)
      return jax.tree.map(jnp.add, carry, (loss, grads, metrics)), None
    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[:x.shape[0] // k], batch),
                            rng, step)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[1],
                                                                 shapes[0][1]))
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), jax.tree.map(split, dict(batch))))
    return jax.tree.map(lambda x: x / k, total)
  return loss_and_grads


def mmdit_task(config: ConfigDict, mesh: Mesh, workdir: str = "") -> Task:
  """config.task = "mmdit": rectified-flow training of the MM-DiT on latents + text."""
  model = mmdit.MMDiT(config_lib.model_config(config))
  loss_and_grads = make_loss_and_grads(config, model, mesh)

  def grads(params, batch, rng, step):
    del step
    loss, g, t = loss_and_grads(params, batch, rng)
    return loss, g, {"t": t}
  shards = mesh.shape["data"] * mesh.shape["fsdp"]

  def make_evals() -> list[EvalFn]:
    evals = [hooks.make_validation_loss(config, model, mesh)]
    if config_lib.evals_sample(config):  # Else no way from latents to pixels.
      evals.append(hooks.make_prompt_following(config, model, mesh, workdir))
    return evals
  return Task(name="mmdit", init_params=mmdit_init_params(config, model, shards),
              loss_and_grads=grads, make_data=make_data,
              tx=optim.make_optimizer(config.optimizer), flops_per_step=flops_per_step(config),
              make_evals=make_evals, histograms=("t",),
              buckets=buckets_lib.latent_buckets(config), spatial_key="latents",
              bucket_names=[buckets_lib.name(*b) for b in buckets_lib.pixel_buckets(config)])


def make_task(config: ConfigDict, mesh: Mesh, workdir: str) -> Task:
  if config.task == "mmdit":
    return mmdit_task(config, mesh, workdir)
  if config.task == "vae":
    from sd3jax import tasks  # pylint: disable=g-import-not-at-top (tasks imports train)
    return tasks.vae_task(config, mesh, workdir)
  raise config_lib.ConfigError(f"config.task={config.task!r}; use 'mmdit' or 'vae'.")


def make_train_step(config: ConfigDict, task: Task, schedule: optim.Schedule):
  """(state, batch) -> (state, metrics). Jit it with the state donated."""
  loss_and_grads, tx = task.loss_and_grads, task.tx
  ema_decay, ema_every = float(config.ema.decay), int(config.ema.every_steps)
  ema_warmup = bool(config.ema.get("warmup", False))

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads, aux = loss_and_grads(state.params, batch, rng, state.step)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    lr = schedule(state.step)
    opt_state = optim.with_learning_rate(state.opt_state, lr)
    updates, opt_state = tx.update(grads, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params, state.step + 1, ema_decay, ema_every,
                           ema_warmup)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params),
        rng=state.rng, nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        nonfinite_streak=streak.astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
               "param_norm": optax.tree.norm(new_state.params), "finite": finite,
               "nonfinite_total": new_state.nonfinite_total, "nonfinite_streak": streak,
               "aux": aux}
    return new_state, metrics
  return train_step


# =============================================================================================
# Checkpoint
# =============================================================================================

def restore_or_init(config: ConfigDict, ckpt: ckpt_lib.Checkpointer, init_fn: Callable,
                    abstract: TrainState, shardings: Any, mesh: Mesh, rules,
                    data: Iterator) -> TrainState:
  """The workdir's latest checkpoint (and data position); else a fresh state in its shards,
  with config.init_from's weights if set. A checkpoint that cannot be read raises."""
  restored = ckpt.restore_latest(abstract)
  if restored is not None:
    if restored.data_state is not None and hasattr(data, "set_state"):
      data.set_state(ckpt_lib.data_state_of_this_process(restored.data_state))
    console.say(f"Resumed from step {restored.step} ({ckpt.directory}).", every_process=True)
    return restored.state
  state, _ = parallel.create_sharded(init_fn, mesh, rules, jax.random.PRNGKey(config.seed),
                                     shardings=shardings)
  if config.init_from:
    if int(config.get("init_from_in_channels", 0) or config.model.in_channels) != int(
        config.model.in_channels):  # an editing model from a text-to-image run
      from sd3jax.edit import model as edit_model
      params = edit_model.load_widened_weights(config, abstract.params)
    else:
      params = ckpt_lib.load_weights(config.init_from, abstract.params, config,
                                     use_ema=config.init_from_ema)
    state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
  return state


# =============================================================================================
# The loop
# =============================================================================================

def train(config: ConfigDict, workdir: str, *, data: Iterator | None = None,
          devices: Sequence[jax.Device] | None = None,
          eval_fns: Sequence[EvalFn] = ()) -> TrainResult:
  """Trains (or resumes) the run in `workdir` up to config.total_steps.

  `data` replaces the configured source (an iterator with get_state / set_state);
  `devices` restricts the mesh to a subset (tests); `eval_fns` run every
  config.eval.every_steps next to the built-in validation loss.
  """
  # -- setup --------------------------------------------------------------------------------
  devices = list(devices) if devices is not None else jax.devices()
  config = config_lib.with_absolute_paths(config_lib.validate(config, num_devices=len(devices)))
  config_json = config_lib.for_task(config_lib.to_json(config))
  logging.info("Effective config (the settings this run reads):\n%s", ConfigDict(config_json))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_json, f, indent=1, sort_keys=True)
  if config.compilation_cache_dir:  # effective only before this process's first compile
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  mesh = make_mesh(config, devices)
  rules = parallel.get_rules(config.sharding_rules)
  task = make_task(config, mesh, workdir)
  tx = task.tx
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                 config.total_steps)

  # -- data ---------------------------------------------------------------------------------
  data = task.make_data(config) if data is None else data

  # -- state: resume > init_from > fresh ----------------------------------------------------
  init_fn = state_init_fn(task.init_params, tx)
  abstract, shardings = abstract_state(init_fn, mesh, rules, jax.random.PRNGKey(config.seed))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep_last=config.checkpoint.keep_last,
                               keep_every=config.checkpoint.keep_every,
                               async_save=config.checkpoint.async_save)
  try:
    state = restore_or_init(config, ckpt, init_fn, abstract, shardings, mesh, rules, data)
  except BaseException:
    ckpt.close()
    raise
  step = int(jax.device_get(state.step))
  if config.task == "mmdit" and len(buckets_lib.pixel_buckets(config)) > 1:
    logging.info("Buckets: %s.", buckets_lib.describe(config))
  logging.info("Mesh %s; %d parameters; starting at step %d.", dict(mesh.shape),
               sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params)), step)

  # -- step: compiled once, ahead of time -----------------------------------------------------
  writer = metrics_lib.MetricsWriter(workdir, total_steps=config.total_steps, start_step=step,
                                     tensorboard=config.log.tensorboard,
                                     progress_bar=config.log.progress_bar,
                                     desc=f"train {config.task}")
  eval_fns = list(eval_fns)
  if config.eval.every_steps > 0:
    eval_fns[:0] = task.make_evals()
  stop = ckpt_lib.StopRequest()
  history: list[dict] = []
  interrupted = False
  peak = config.log.peak_tflops_per_device or metrics_lib.peak_tflops(devices[0].device_kind)
  speed = metrics_lib.Throughput(task.flops_per_step, config.batch_size, len(devices), peak)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      step_fn = jax.jit(make_train_step(config, task, schedule),
                        in_shardings=(shardings, None),  # metrics replicated: every
                        out_shardings=(shardings, parallel.replicated(mesh)),  # host reads
                        donate_argnums=0, compiler_options=task.compiler_options)
      compiled: dict[tuple, Any] = {}  # batch shapes -> executable (one per bucket)
      compiles: list[dict[str, Any]] = []
      hist_log: dict[str, list] = {}
      bad_records, max_bad = 0, int(config.data.get("max_bad_records", 0))
      pending = None  # (step, metrics on device, bucket) of the last dispatched step
      last_log: dict[str, list] = {}

      def handle(done_step: int, device_metrics: dict, bucket: str) -> None:
        """Reads a finished step's metrics (the next one already runs) and acts on them."""
        m = jax.device_get(device_metrics)
        if not m["finite"]:
          logging.warning("Step %d: non-finite loss/gradients (loss=%s, grad_norm=%s); update "
                          "skipped (%d in a row).", done_step, m["loss"], m["grad_norm"],
                          m["nonfinite_streak"])
          if m["nonfinite_streak"] >= config.optimizer.max_nonfinite_steps:
            raise NonFiniteError(
                f"{int(m['nonfinite_streak'])} consecutive steps up to step {done_step} had a "
                f"non-finite loss or gradient; their updates were skipped. Check the data, lower "
                f"config.optimizer.learning_rate, or raise config.optimizer.max_nonfinite_steps "
                f"(now {config.optimizer.max_nonfinite_steps}).")
        scalars = ["loss", "grad_norm"] + sorted(k for k in m["aux"] if k not in task.histograms)
        if m["finite"]:  # skipped steps are counted in nonfinite_total, not averaged in
          for key in scalars:
            last_log.setdefault(key, []).append(float(m["aux"].get(key, m.get(key))))
          if bucket:
            last_log.setdefault(f"loss/{bucket}", []).append(float(m["loss"]))
        for k in task.histograms:  # per bucket: t is shifted per bucket
          name = ("timesteps" if k == "t" else k) + (f"/{bucket}" if bucket else "")
          hist_log.setdefault(name, []).append(np.asarray(m["aux"][k]).reshape(-1))
        if (done_step % config.log.every_steps and done_step != config.total_steps
            and not interrupted):
          return
        record = {k: float(np.mean(last_log[k])) if last_log.get(k) else float("nan")
                  for k in scalars}
        record.update({k: float(np.mean(v)) for k, v in sorted(last_log.items())
                       if k.startswith("loss/")})
        last_log.clear()
        record.update(learning_rate=float(m["learning_rate"]), param_norm=float(m["param_norm"]),
                      nonfinite_total=int(m["nonfinite_total"]), **speed.update(done_step))
        if max_bad:
          record["data/bad_records"] = bad_records  # this process, since this start
        writer.write(done_step, record,
                     histograms={k: np.concatenate(v) for k, v in hist_log.items()})
        hist_log.clear()
        history.append({"step": done_step, **record})

      name_of = lambda b: compiled_steps.bucket_name(b, task.buckets, task.bucket_names,
                                                     task.spatial_key)
      speed.start(step)
      while step < config.total_steps:
        host_batch = dict(next(data))
        bad = host_batch.pop("bad_records", None)  # slots refilled by the pipeline
        if bad is not None and np.any(bad):
          bad_records += int(np.sum(bad))
          if bad_records > max_bad:
            raise records.DataError(
                f"{bad_records} unreadable training records by step {step + 1}, more than "
                f"config.data.max_bad_records={max_bad}; each is named in a warning above. "
                "Rewrite those shards, or raise the limit.")
        batch = shard_batch(host_batch, mesh, batch_axes(rules))
        data_state = data.get_state() if hasattr(data, "get_state") else None
        if not compiled:  # before this invocation's first step: every bucket at once
          compiled, compiles = compiled_steps.compile_buckets(
              step_fn, state, batch, mesh, step, task.buckets, task.bucket_names,
              task.spatial_key)
          if jax.process_index() == 0:
            with open(os.path.join(workdir, "compiles.jsonl"), "a") as f:
              f.writelines(json.dumps(c) + "\n" for c in compiles)
          speed.start(step)
        shapes = compiled_steps.shapes_key(batch)
        if shapes not in compiled:  # a data source with a shape outside config.data.buckets
          logging.warning("Step %d: batch shapes %s are not one of the compiled buckets; "
                          "compiling now (list every shape in config.data.buckets).",
                          step + 1, shapes)
          t0 = time.perf_counter()
          compiled[shapes] = compiled_steps.compile_step(step_fn, state, batch, mesh)
          compiles.append({"bucket": name_of(batch) or "unplanned",
                           "seconds": round(time.perf_counter() - t0, 2), "step": step})
          speed.start(step)
        state, metrics = compiled[shapes](state, batch)
        step += 1
        if pending is not None:
          handle(*pending)
        pending = (step, metrics, name_of(batch))

        # -- eval hook ---------------------------------------------------------------------
        if eval_fns and config.eval.every_steps > 0 and step % config.eval.every_steps == 0:
          handle(*pending)
          pending = None
          hooks.run_evals(step, state, eval_fns, workdir, writer)
          speed.start(step)

        # -- checkpoint --------------------------------------------------------------------
        interrupted = stop.requested()
        if interrupted or step % config.checkpoint.every_steps == 0 or step == config.total_steps:
          ckpt.save(step, state, ckpt_lib.gather_data_state(data_state), config_json)
        if interrupted:
          logging.warning("Stopped at step %d after a signal; checkpoint saved. Rerun to resume.",
                          step)
          break
      if pending is not None:
        handle(*pending)
      if bad_records:
        logging.warning("Skipped %d unreadable training records (config.data.max_bad_records=%d); "
                        "each is named in a warning above.", bad_records, max_bad)
      # -- finish (e.g. export) ------------------------------------------------------------
      if task.finish is not None and step == config.total_steps and not interrupted:
        task.finish(workdir, state)
  finally:
    try:  # waits for the last checkpoint; a signal meanwhile only sets the stop flag
      ckpt.close()
      writer.close()
    finally:
      # A signal after the last step still stops the caller (e.g. `sd3jax run`, which would
      # otherwise go on to its next stage); the run itself is complete and saved. This
      # process's flag only: no collective here, another process may be raising.
      interrupted = interrupted or stop.signum is not None
      stop.restore()
  return TrainResult(state=state, step=step, metrics=history[-1] if history else {},
                     history=history, interrupted=interrupted, compiles=compiles)
