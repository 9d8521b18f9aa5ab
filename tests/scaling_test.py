"""Scaling curves: FLOPs accounting, the run reader, the frontier, power-law fits, outputs,
and the depth-family experiment file."""
import json
import math
import os

import numpy as np
import pytest

from sd3jax import config as config_lib
from sd3jax import scaling
from sd3jax.models import mmdit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "scaling.py")


def _experiment(arg: str = ""):
  return config_lib.load(f"{EXPERIMENT}:{arg}" if arg else EXPERIMENT)


def _law(C, a, b, c):
  return a * np.asarray(C, dtype=np.float64) ** -b + c


# ---------------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------------

def test_fit_recovers_noise_free_parameters():
  a, b, c = 200.0, 0.2, 0.3          # L from ~1.1 at 1e12 FLOPs to ~0.35 at 1e18
  C = np.logspace(12, 18, 25)
  fit = scaling.fit_power_law(C, _law(C, a, b, c), n_bootstrap=20)
  for name, true in (("a", a), ("b", b), ("c", c)):
    assert fit[name] == pytest.approx(true, rel=1e-3), name
  assert fit["rmse_log"] < 1e-6
  ex = scaling.extrapolate(fit, 1e21)
  assert ex["val_loss"] == pytest.approx(float(_law(1e21, a, b, c)), rel=1e-4)

  # Loss versus parameters with few points: the two-parameter law (c = 0).
  n = np.array([1e5, 1e6, 1e7])
  fit2 = scaling.fit_power_law(n, _law(n, 3.0, 0.1, 0.0), free_c=False, n_bootstrap=0)
  assert (fit2["a"], fit2["b"], fit2["c"]) == (pytest.approx(3.0, rel=1e-6),
                                                pytest.approx(0.1, rel=1e-6), 0.0)


def test_fit_with_noise_is_inside_bootstrap_interval():
  a, b, c = 200.0, 0.2, 0.3
  C = np.logspace(12, 18, 40)
  noise = np.random.default_rng(1).normal(0.0, 0.005, C.shape)   # 0.5% multiplicative
  target = 1e20                                                   # 100x beyond the data
  fit = scaling.fit_power_law(C, _law(C, a, b, c) * np.exp(noise), n_bootstrap=300, seed=0,
                              target=target)
  bs = fit["bootstrap"]
  assert bs["n"] >= 290
  for name, true in (("a", a), ("b", b), ("c", c)):
    lo95, hi95 = bs[name]["95"]
    lo68, hi68 = bs[name]["68"]
    assert lo95 <= lo68 <= fit[name] <= hi68 <= hi95, name
    assert lo95 <= true <= hi95, (name, true, bs[name])
  ex = fit["extrapolation"]
  assert ex["95"][0] <= float(_law(target, a, b, c)) <= ex["95"][1]
  assert ex["95"][1] - ex["95"][0] < 0.05 * ex["val_loss"]


def test_fit_refuses_too_few_points():
  with pytest.raises(scaling.ScalingError, match="at least 3 distinct"):
    scaling.fit_power_law([1e9, 1e9, 2e9], [1.0, 1.0, 0.9])


# ---------------------------------------------------------------------------------------------
# Frontier
# ---------------------------------------------------------------------------------------------

def _rows(run, flops, losses, depth=1):
  return [dict(run=run, depth=depth, params=depth, params_non_embedding=depth, step=i + 1,
               flops=float(f), val_loss=float(l)) for i, (f, l) in enumerate(zip(flops, losses))]


def test_frontier_is_the_lower_envelope():
  rows = (_rows("A", [1, 2, 4, 8], [10, 8, 6.5, 6]) +
          _rows("B", [2, 4, 8, 16], [12, 7, 5, 4], depth=2) +
          _rows("C", [3], [7.0], depth=3))  # A at 3 (log-log) is 7.09, B 8.76: C is lowest
  frontier = scaling.compute_frontier(rows)
  assert [(r["run"], r["flops"]) for r in frontier] == [
      ("A", 1), ("A", 2), ("C", 3), ("A", 4), ("B", 8), ("B", 16)]

  # Property check on random crossing curves: kept <=> no other run is lower at that compute.
  rng = np.random.default_rng(0)
  rows = []
  for k in range(4):
    f = np.sort(rng.uniform(0, 6, 7)) + k
    rows += _rows(f"r{k}", 10 ** f, np.exp(rng.normal(0, 0.3)) * (10 ** f) ** -0.1, depth=k)
  kept = {(r["run"], r["step"]) for r in scaling.compute_frontier(rows)}
  for r in rows:
    lower = False
    for q in {q["run"] for q in rows} - {r["run"]}:
      qs = sorted((x for x in rows if x["run"] == q), key=lambda x: x["flops"])
      xs, ys = np.log([x["flops"] for x in qs]), np.log([x["val_loss"] for x in qs])
      lc = math.log(r["flops"])
      lower |= bool(xs[0] <= lc <= xs[-1] and np.interp(lc, xs, ys) < math.log(r["val_loss"]))
    assert ((r["run"], r["step"]) in kept) == (not lower)


def test_loss_vs_params_at_fixed_compute():
  # Four runs; at C = 1e12 each run's loss is 2.0 N^-0.25 + 0.5 (interpolated mid-segment).
  rows = []
  for n in (1e4, 1e5, 1e6, 1e7):
    target = float(_law(n, 2.0, 0.25, 0.5))
    flops = [1e11, 1e13]
    losses = [target * 1.1, target / 1.1]  # log-log midpoint at 1e12 is `target`
    rows += [dict(r, params=int(n), params_non_embedding=int(n))
             for r in _rows(f"n{int(n)}", flops, losses, depth=int(math.log10(n)))]
  out = scaling.fit_loss_vs_params_at_fixed_compute(rows, 1e12, n_bootstrap=10)
  assert [p["run"] for p in out["points"]] == ["n10000", "n100000", "n1000000", "n10000000"]
  assert out["fit"]["b"] == pytest.approx(0.25, rel=1e-3)
  assert out["fit"]["c"] == pytest.approx(0.5, rel=1e-3)
  assert scaling.common_flops(rows) == pytest.approx(1e13)
  assert scaling.fit_loss_vs_params_at_fixed_compute(rows, 1e14) is None  # nobody reaches it


# ---------------------------------------------------------------------------------------------
# FLOPs and parameters
# ---------------------------------------------------------------------------------------------

def test_training_flops_matches_the_formula():
  config = config_lib.complete(_experiment("depth=3,head_dim=16,batch=8,steps=50"))
  cfg = mmdit.preset(3, hidden_size=48, num_heads=3, joint_attention_dim=256,
                     pooled_projection_dim=192, pos_embed_max_size=12, sample_size=8)
  per_example = mmdit.flops_per_forward(cfg, 8, 8, 77 + 77)  # 64 px / 8; 77 CLIP + 77 T5
  expected = 3 * per_example * 8 * 50
  assert scaling.training_flops(config, 50) == pytest.approx(expected, rel=1e-12)
  # The same from config.json (a plain dict, as a workdir holds it) and as the trainer counts.
  as_json = config_lib.to_json(config)
  assert scaling.training_flops(as_json, 50) == pytest.approx(expected, rel=1e-12)
  from sd3jax import train
  assert train.flops_per_step(config) * 50 == pytest.approx(expected, rel=1e-12)


def test_params_total_and_non_embedding():
  for depth in (1, 2, 3):
    config = config_lib.complete(_experiment(f"depth={depth}"))
    h = 16 * depth
    # A joint block, per stream: adaLN Dense h -> 6h, QKV h -> 3h, out h -> h, MLP h -> 4h -> h
    # (all with bias, LayerNorms without affine) = 18 h^2 + 15 h. The last block's text
    # stream is pre-only: modulation h -> 2h and QKV only = 5 h^2 + 5 h.
    stream = 18 * h * h + 15 * h
    blocks = (depth - 1) * 2 * stream + stream + 5 * h * h + 5 * h
    assert scaling.params(config, non_embedding=True) == blocks
    assert scaling.params(config) == mmdit.count_params(scaling.model_config(config)) > blocks


# ---------------------------------------------------------------------------------------------
# Reading workdirs, outputs
# ---------------------------------------------------------------------------------------------

def _workdir(root, name, depth, losses, *, metrics_only=(), standalone=(), checkpoints=()):
  """A fake run: config.json, metrics.jsonl, eval/step_N.json; losses = {step: val_loss}."""
  path = os.path.join(root, name)
  os.makedirs(os.path.join(path, "eval"), exist_ok=True)
  config = config_lib.complete(_experiment(f"depth={depth},steps=100,batch=4"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_lib.to_json(config), f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in range(1, 101):
      rec = {"step": step, "loss": 1.0, "learning_rate": 1e-3}
      if step in metrics_only:
        rec["eval/val_loss"] = metrics_only[step]
      f.write(json.dumps(rec) + "\n")
    f.write('{"step": 101, "lo')  # a line cut short by a kill
  for step, v in losses.items():
    with open(os.path.join(path, "eval", f"step_{step}.json"), "w") as f:
      json.dump({"step": step, "val_loss": v}, f)
  for step, v in dict(standalone).items():
    with open(os.path.join(path, "eval", f"val_loss_step_{step}.json"), "w") as f:
      json.dump({"step": step, "val_loss": {"mean": v}, "per_t": {"0.5": v}}, f)
  for step in checkpoints:
    os.makedirs(os.path.join(path, "checkpoints", str(step)))
  return path, config


def test_collect_reads_eval_files_metrics_and_checkpoints(tmp_path):
  run, config = _workdir(str(tmp_path), "d2", 2, {25: 1.5, 50: 1.2},
                         metrics_only={10: 1.9, 50: 9.9}, standalone={50: 1.1},
                         checkpoints=(25, 50, 75))
  calls = []

  def evaluate(run_dir, step):
    calls.append((run_dir, step))
    return {"val_loss": 1.0 + step / 1000, "per_t": {"0.5": 0.3}}

  rows = scaling.collect([run], eval_checkpoints=True, evaluate_fn=evaluate)
  assert calls == [(run, 75)]  # only the checkpoint without a result
  assert [(r["step"], r["val_loss"], r["source"]) for r in rows] == [
      (10, 1.9, "metrics.jsonl"),
      (25, 1.5, "eval/step_25.json"),
      (50, 1.1, "eval/val_loss_step_50.json"),   # standalone eval > in-training > metrics
      (75, 1.075, "eval/val_loss_step_75.json")]
  per_step = scaling.flops_per_step(config)
  n = mmdit.count_params(scaling.model_config(config))
  for r in rows:
    assert (r["run"], r["depth"], r["params"]) == ("d2", 2, n)
    assert r["flops"] == pytest.approx(per_step * r["step"])
    assert r["examples"] == 4 * r["step"]
  # The evaluated checkpoint was stored, so a second pass evaluates nothing.
  assert scaling.collect([run], eval_checkpoints=True, evaluate_fn=evaluate) == rows
  assert len(calls) == 1
  with pytest.raises(scaling.ScalingError, match="evaluate_fn"):
    scaling.collect([run], eval_checkpoints=True)


def test_plot_and_scaling_main_write_outputs(tmp_path, capsys):
  runs = []
  for depth, (scale, floor) in zip((1, 2, 3), ((2.0, 0.9), (2.0, 0.7), (2.0, 0.55))):
    losses = {s: floor + scale * s ** -0.5 for s in (10, 20, 40, 80, 100)}
    runs.append(_workdir(str(tmp_path), f"d{depth}", depth, losses)[0])
  out = str(tmp_path / "report")
  summary = scaling.scaling_main(runs, out, target_flops=1e13, n_bootstrap=30)
  assert "L(C) = a C^-b + c" in capsys.readouterr().out
  for path in summary["paths"].values():
    assert os.path.getsize(path) > 0
  with open(summary["paths"]["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(summary["paths"]["json"]) as f:
    table = json.load(f)
  assert len(table["rows"]) == 15 and table["fit"]["b"] > 0
  assert table["extrapolation"]["flops"] == 1e13 and "95" in table["extrapolation"]
  with open(summary["paths"]["rows_csv"]) as f:
    assert len(f.read().strip().splitlines()) == 1 + 15

  # plot() on its own, without a fit.
  png = scaling.plot(scaling.collect(runs), None, str(tmp_path / "only_runs.png"))
  assert os.path.getsize(png) > 1000


# ---------------------------------------------------------------------------------------------
# The experiment file and the sweep
# ---------------------------------------------------------------------------------------------

def test_experiment_parses_args_and_rejects_unknown_ones():
  c = _experiment("depth=3,head_dim=16,steps=120,batch=8,eval_every=20,lr=3e-4")
  assert (c.model.depth, c.model.hidden_size, c.model.num_heads) == (3, 48, 3)
  assert (c.total_steps, c.batch_size, c.optimizer.learning_rate) == (120, 8, 3e-4)
  assert c.eval.every_steps == c.checkpoint.every_steps == c.checkpoint.keep_every == 20
  config_lib.validate(c, num_devices=1)  # the trainer's own checks pass
  paper = _experiment("preset=paper,depth=15")
  assert (paper.model.hidden_size, paper.model.num_heads) == (64 * 15, 15)
  # Equal data across the family: only the model changes with depth.
  a, b = config_lib.to_json(_experiment("depth=1")), config_lib.to_json(_experiment("depth=4"))
  a.pop("model"), b.pop("model")
  assert a == b
  with pytest.raises(ValueError, match="unknown argument 'stpes'. Did you mean 'steps'"):
    _experiment("depth=2,stpes=10")
  with pytest.raises(ValueError, match="depth='two' is not a valid int"):
    _experiment("depth=two")
  with pytest.raises(ValueError, match="KEY=VALUE"):
    _experiment("depth")
  with pytest.raises(ValueError, match="divisible by 4"):
    _experiment("depth=1,head_dim=2")


def test_sweep_dry_run_plans_equal_data_and_records_flops(tmp_path, capsys):
  plans = scaling.sweep([1, 2], str(tmp_path), experiment=EXPERIMENT, arg="steps=40,batch=4",
                        overrides=["config.seed=3"], dry_run=True)
  assert [p["depth"] for p in plans] == [1, 2]
  assert {p["total_steps"] * p["batch_size"] for p in plans} == {160}
  for p in plans:
    config = config_lib.complete(config_lib.load(p["config"], p["overrides"]))
    assert config.seed == 3
    assert p["planned_training_flops"] == pytest.approx(scaling.training_flops(config, 40))
    assert "--config.seed=3" in p["command"]
    assert f"--workdir={tmp_path}/d{p['depth']}" in p["command"]
  assert plans[0]["planned_training_flops"] < plans[1]["planned_training_flops"]
  assert "training FLOPs planned" in capsys.readouterr().out
