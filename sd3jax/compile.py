"""`sd3jax compile`: the real train step, compiled ahead of time for a TPU topology.

  sd3jax compile --config experiments/scaling.py:preset=paper,depth=24 --topology v5p:4x4x4

No TPU is needed: libtpu compiles for any slice on this machine (`aot.topology_devices`).
The step is `train.make_train_step` (forward, backward over microbatches, clipping,
AdamW, EMA, non-finite guard) with the state created abstractly by `train.abstract_state`
in the shardings of the config's mesh and rules, and the batch split over the data axes,
exactly as `sd3jax train` would compile it. Printed: per-device memory (arguments,
temporaries, outputs), whether it fits the chip's HBM, XLA's FLOPs with scan loops
counted per iteration, and a roofline step time / MFU (`aot.compile_report`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from sd3jax import aot
from sd3jax import config as config_lib


def compile_main(config: ConfigDict, topology: str, *, num_slices: int = 1,
                 hbm_fraction: float = 0.9, verbose: bool = True) -> dict[str, Any]:
  """compile_report of the config's train step on `topology` (e.g. 'v5p:4x4x4'); prints it."""
  from sd3jax import optim, parallel, train  # pylint: disable=g-import-not-at-top
  from sd3jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from sd3jax.models import mmdit  # pylint: disable=g-import-not-at-top

  devices = aot.topology_devices(topology, num_slices=num_slices)
  config = config_lib.validate(config, num_devices=len(devices))
  mesh = train.make_mesh(config, devices)
  rules = parallel.get_rules(config.sharding_rules)
  model_cfg = config_lib.model_config(config)
  task = train.make_task(config, mesh, "")
  schedule = optim.make_schedule(config.schedule, config.optimizer.learning_rate,
                                 config.total_steps)
  init_fn = train.state_init_fn(task.init_params, task.tx)
  state, shardings = train.abstract_state(init_fn, mesh, rules, jax.random.PRNGKey(config.seed))
  axes = train.batch_axes(rules)
  batch = {k: jax.ShapeDtypeStruct(s, jnp.float32,
                                   sharding=NamedSharding(mesh, P(axes, *([None] * (len(s) - 1)))))
           for k, s in synthetic.batch_shapes(config, config.batch_size).items()}
  batch_shardings = {k: v.sharding for k, v in batch.items()}
  step = train.make_train_step(config, task, schedule)
  report = aot.compile_report(step, (state, batch), in_shardings=(shardings, batch_shardings),
                              out_shardings=(shardings, parallel.replicated(mesh)),
                              donate_argnums=0, model_flops=task.flops_per_step, mesh=mesh,
                              rules=rules, hbm_fraction=hbm_fraction)
  report.update(topology=topology, mesh=dict(mesh.shape), rules=config.sharding_rules,
                remat_policy=model_cfg.remat_policy, scan_layers=model_cfg.scan_layers,
                dtype=model_cfg.dtype, batch_size=config.batch_size,
                microbatches=config.microbatches, params=mmdit.count_params(model_cfg),
                latent=config_lib.latent_size(config))
  if verbose:
    print(format_compile(report))
  return report


def format_compile(r: dict[str, Any]) -> str:
  head = (f"{r['topology']}: mesh {r['mesh']}, rules {r['rules']}, remat {r['remat_policy']}, "
          f"{r['params'] / 1e6:,.1f}M params, batch {r['batch_size']} "
          f"({r['microbatches']} microbatches), latent {r['latent']}, {r['dtype']}")
  return head + "\n" + aot.format_report(r)
