"""The `sd3jax` command.

  sd3jax COMMAND --config experiments/FILE.py[:ARG] [--config.KEY=VALUE ...] [--workdir DIR]

Commands are small functions registered with `@command`; each gets the loaded, locked
config, the workdir and the remaining positional arguments, and returns an exit code:

  @command("steps", "Print the run's configured number of steps.")
  def _steps(config, workdir, args):
    from sd3jax import train         # heavy imports inside: `sd3jax --help` stays fast
    print(config.total_steps)
    return 0

Exit codes: 0 done; 2 a user error: bad command line, config, path or data, one line that
names the problem and the fix; 3 the run stopped itself (non-finite losses, no checkpoint
it can restore), with its message; 75 (EX_TEMPFAIL) stopped by SIGTERM / SIGINT after
saving a checkpoint, rerun the same command to resume. Anything else is a bug and keeps
its traceback (exit 1).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging
from ml_collections import ConfigDict
from ml_collections import config_flags

from sd3jax import config as config_lib

CommandFn = Callable[[ConfigDict, str, Sequence[str]], int]


@dataclasses.dataclass
class Command:
  fn: CommandFn
  help: str
  needs_workdir: bool = True
  needs_config: bool = True  # False: the command can work without --config (e.g. --pipeline)
  flags: tuple[str, ...] = ()     # the command's own flags, shown by `sd3jax NAME --help`
  examples: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *,
            needs_workdir: bool = True,
            needs_config: bool = True,
            flags: Sequence[str] = (),
            examples: Sequence[str] = ()) -> Callable[[CommandFn], CommandFn]:
  """Registers `fn(config, workdir, args) -> exit code` as `sd3jax NAME`."""
  def register(fn: CommandFn) -> CommandFn:
    COMMANDS[name] = Command(fn, help, needs_workdir, needs_config, tuple(flags),
                             tuple(examples))
    return fn
  return register


class UsageError(Exception):
  """A bad command line; printed without a traceback, exit code 2."""


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
  """--config (with --config.KEY=VALUE overrides, found in `argv`) and --workdir."""
  if "config" in flag_values:
    return
  config_flags.DEFINE_config_file(
      "config", None, "Experiment file, experiments/FILE.py[:ARG].", flag_values=flag_values,
      lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Run folder: config.json, metrics.jsonl, checkpoints/, ...",
                      flag_values=flag_values)
  # Multi-process runs (sd3jax.distributed); TPU pods and SLURM need none of these.
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process; "
                      "env SD3JAX_COORDINATOR).", flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Processes in the job (env SD3JAX_NUM_PROCESSES).",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1 (env "
                       "SD3JAX_PROCESS_ID).", flag_values=flag_values)
  # sample / evaluate / export (sd3jax.sample, sd3jax.evals.run).
  flags.DEFINE_multi_string("prompt", [], "sample: a prompt (repeatable).", flag_values=flag_values)
  flags.DEFINE_string("prompts", None, "sample: a file of prompts, one a line.",
                      flag_values=flag_values)
  flags.DEFINE_string("negative", None, "sample: the negative prompt.", flag_values=flag_values)
  flags.DEFINE_integer("steps", None, "sample: denoising steps (default: the run's "
                       "config.eval.sample_steps, edit: its edit_eval.steps, 14 in shapes_edit; "
                       "28 for --pipeline).", flag_values=flag_values)
  flags.DEFINE_float("cfg", None, "sample: guidance scale, > 1 guides (default: the run's "
                     "config.eval.sample_cfg; 5.0 for --pipeline).", flag_values=flag_values)
  flags.DEFINE_float("cfg-max-t", None, "sample: guide only the steps at t <= this, 1 = "
                     "every step (default: the run's config.eval.sample_cfg_max_t; 1 for "
                     "--pipeline).", flag_values=flag_values)
  flags.DEFINE_float("autoguidance", None, "sample: autoguidance scale above --cfg-max-t with "
                     "the run's weak model, 1 = none (default: the run's "
                     "config.eval.sample_autoguidance; 1 for --pipeline).",
                     flag_values=flag_values)
  flags.DEFINE_float("shift", None, "sample: sampling shift of t (default: the run's "
                     "config.eval.sample_shift; the scheduler's for --pipeline).",
                     flag_values=flag_values)
  flags.DEFINE_integer("height", None, "sample: image height in pixels (default: the run's "
                       "config.data.image_size; any bucket size works).", flag_values=flag_values)
  flags.DEFINE_integer("width", None, "sample: image width in pixels (default: the height).",
                       flag_values=flag_values)
  flags.DEFINE_enum("sampler", "euler", ["euler", "heun", "dpmpp_2m"], "sample: ODE sampler.",
                    flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "sample: noise seed (image i: fold_in(seed, i)).",
                       flag_values=flag_values)
  flags.DEFINE_bool("no_t5", False, "sample: T5 replaced by zeros.", flag_values=flag_values)
  flags.DEFINE_bool("ema", True, "sample / evaluate / export: EMA weights (--noema: raw).",
                    flag_values=flag_values)
  flags.DEFINE_string("out", None, "sample / edit: image folder (default WORKDIR/generated; "
                      "edit: RUN/edited); export: the diffusers folder.", flag_values=flag_values)
  flags.DEFINE_string("pipeline", None, "sample: a diffusers SD3 pipeline folder instead of a "
                      "run.", flag_values=flag_values)
  flags.DEFINE_integer("step", None, "sample / evaluate / export: this checkpoint step "
                       "(default: the latest).", flag_values=flag_values)
  flags.DEFINE_bool("all_steps", False, "evaluate: every checkpoint.", flag_values=flag_values)
  # edit (sd3jax.edit.sampling).
  flags.DEFINE_multi_string("image", [], "edit: an image to edit (repeatable).",
                            flag_values=flag_values)
  flags.DEFINE_string("instruction", None, 'edit: what to change, e.g. "make the red circle '
                      'blue".', flag_values=flag_values)
  flags.DEFINE_float("image-cfg", None, "edit: image guidance scale (default: the run's; 2.5 "
                     "in shapes_edit).", flag_values=flag_values)
  flags.DEFINE_float("text-cfg", None, "edit: text guidance scale (default: the run's; 4 in "
                     "shapes_edit).", flag_values=flag_values)
  # bench / compile / scaling (sd3jax.bench, sd3jax.compile, sd3jax.scaling).
  flags.DEFINE_bool("vs-diffusers", False, "bench: also time diffusers + torch AdamW, same run.",
                    flag_values=flag_values)
  flags.DEFINE_bool("torch-compile", False, "bench --vs-diffusers on a GPU: also time "
                    "torch.compile of diffusers' model.", flag_values=flag_values)
  flags.DEFINE_string("topology", None, "compile: TPU slice, e.g. v5p:4x4x4 or v6e-16.",
                      flag_values=flag_values)
  flags.DEFINE_bool("search", False, "compile: try attention kernels x remat policies x "
                    "microbatch counts; print what fits and the fastest.", flag_values=flag_values)
  flags.DEFINE_bool("eval-checkpoints", False, "scaling: evaluate every saved checkpoint.",
                    flag_values=flag_values)
  flags.DEFINE_float("target-flops", None, "scaling: extrapolate the fit to this compute.",
                     flag_values=flag_values)
  # ingest (sd3jax.data.ingest).
  flags.DEFINE_integer("examples_per_shard", 1000, "ingest: a folder's names per unit (one "
                       "shard each); tars are one unit each.", flag_values=flag_values)
  flags.DEFINE_string("caption_encoding", None, "ingest: encoding of the .txt captions "
                      "(default UTF-8; captions invalid in it are skipped).",
                      flag_values=flag_values)
  # dedup (sd3jax.dedup).
  flags.DEFINE_string("descriptor", None, "dedup: a CopyNet folder (dedup train / demo), "
                      "sscd:FILE, thumbnail, or FILE.py:factory.", flag_values=flag_values)
  flags.DEFINE_float("threshold", None, "dedup: copy threshold, cosine similarity, normalised "
                     "when the descriptor has a background (default: the one measured for the "
                     "descriptor).", flag_values=flag_values)
  flags.DEFINE_string("background", None, "dedup cluster: descriptors (dedup embed, same "
                      "descriptor) of images that are not copies of the source: scores are "
                      "normalised against them, as SSCD's (default: the descriptor's own, if "
                      "any).", flag_values=flag_values)
  flags.DEFINE_string("source", None, "dedup cluster: the embedded source (for the keep rule, "
                      "the pairs grid and verification).", flag_values=flag_values)
  flags.DEFINE_boolean("verify", None, "dedup cluster: verify candidate pairs on the pixels "
                       "(default: when the descriptor carries measured verification settings, "
                       "as the demo's CopyNet does; --noverify: off).", flag_values=flag_values)
  flags.DEFINE_float("verify_threshold", None, "dedup cluster: the largest verification score "
                     "(worst-window RMS colour difference after alignment) of a duplicate "
                     "pair; turns verification on.", flag_values=flag_values)
  flags.DEFINE_string("embeddings", None, "dedup memorisation: descriptors of the run's "
                      "training images (default: embedded now, into RUN/memorisation).",
                      flag_values=flag_values)
  flags.DEFINE_enum("storage_dtype", "float16", ["float16", "bfloat16", "float32"],
                    "dedup embed: how descriptors are stored.", flag_values=flag_values)
  flags.DEFINE_integer("part_size", 8192, "dedup embed: examples per part file (the unit of "
                       "work, of ownership by process and of resuming).", flag_values=flag_values)
  flags.DEFINE_integer("neighbours", 10, "dedup cluster: nearest neighbours searched per image.",
                       flag_values=flag_values)
  flags.DEFINE_integer("num", 64, "dedup memorisation: images generated from training "
                       "captions.", flag_values=flag_values)


def usage() -> str:
  lines = ["usage: sd3jax COMMAND --config experiments/FILE.py[:ARG] [--config.KEY=VALUE ...] "
           "[--workdir DIR]", "", "commands:"]
  lines += [f"  {name:10s} {c.help}" for name, c in sorted(COMMANDS.items())]
  lines += ["", "sd3jax COMMAND --help: that command's flags and examples. -v: every library's "
            "log lines (quiet by default)."]
  return "\n".join(lines)


def command_help(name: str) -> str:
  """`sd3jax NAME --help`: what the command does, its flags, examples."""
  fv = flags.FlagValues()
  define_flags(fv, [])
  c = COMMANDS[name]
  config = "--config experiments/FILE.py[:ARG]" if c.needs_config else "[--config FILE]"
  workdir = "--workdir DIR" if c.needs_workdir else "[--workdir DIR]"
  lines = [f"usage: sd3jax {name} {config} {workdir} [flags]", "", c.help, "", "flags:"]
  names = (("config", "workdir") if name not in ("scaling", "ingest", "dedup") else ()) + c.flags
  for flag in dict.fromkeys(names):
    f = fv[flag]
    text = re.sub(r"^[a-z /]+: ", "", f.help.splitlines()[0].rstrip(";"))  # "sample: ..."
    default = "" if f.default in (None, "", [], False) else f" (default {f.default})"
    spelling = f"--{flag}" if f.flag_type() == "bool" else f"--{flag} VALUE"
    lines.append(f"  {spelling:24s} {text}{default}")
  lines.append(f"  {'--config.KEY=VALUE':24s} override one setting of the experiment file (without "
               "--config: of the run's config.json)")
  lines.append(f"  {'-v':24s} show every library's log lines (quiet by default)")
  if c.examples:
    lines += ["", "examples:"] + [f"  {e}" for e in c.examples]
  return "\n".join(lines)


# Dashed spellings of flags (absl names use underscores): --no-t5, --all-steps; a bare -v
# is absl's --verbosity=0 (INFO).
_DASHED = {"--no-t5": "--no_t5", "--all-steps": "--all_steps", "-v": "--verbosity=0"}


def parse(argv: Sequence[str], flag_values: flags.FlagValues | None = None
          ) -> tuple[str, ConfigDict, str | None, list[str]]:
  """argv -> (command, config, workdir, extra positional args); raises UsageError."""
  fv = flags.FLAGS if flag_values is None else flag_values
  argv = [_DASHED.get(a.partition("=")[0], a.partition("=")[0]) + a.partition("=")[1]
          + a.partition("=")[2] for a in argv]
  define_flags(fv, argv)
  path = _config_path(argv)
  if path and not os.path.isfile(path.split(":", 1)[0]):
    raise UsageError(f"--config {path}: no such file {path.split(':', 1)[0]!r} (from "
                     f"{os.getcwd()}); give an experiment file, e.g. experiments/shapes.py.")
  # Without --config, --config.KEY=VALUE overrides the run's own config.json (`sd3jax
  # evaluate --workdir RUN --config.eval.seed=1`): config_flags only knows them with a file.
  run_overrides = [] if path else [a for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if a not in run_overrides]
  try:
    rest = fv(list(argv))
  except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as e:
    raise UsageError(_explain_flag_error(argv, e)) from e
  if len(rest) < 2 or rest[1] not in COMMANDS:
    given = f"unknown command {rest[1]!r}\n" if len(rest) >= 2 else ""
    raise UsageError(given + usage())
  name = rest[1]
  config = fv["config"].value
  if run_overrides and COMMANDS[name].needs_config:
    raise UsageError(f"sd3jax {name}: --config experiments/FILE.py is required; the "
                     f"--config.KEY=VALUE overrides apply to it.")
  if run_overrides:
    config = _run_config_with_overrides(fv["workdir"].value, run_overrides)
  if config is None and COMMANDS[name].needs_config:
    raise UsageError(f"sd3jax {name}: --config experiments/FILE.py is required.\n" + usage())
  if COMMANDS[name].needs_workdir and not fv["workdir"].value:
    raise UsageError(f"sd3jax {name}: --workdir DIR is required.")
  return name, config, fv["workdir"].value, list(rest[2:])


def _run_config_with_overrides(workdir: str | None, overrides: Sequence[str]) -> ConfigDict:
  """The run's own config (sample.run_config of the run behind `workdir`) with
  `--config.KEY=VALUE` overrides applied (types kept)."""
  from sd3jax import sample
  try:
    run_dir = sample.resolve_run_dir(workdir)
  except (FileNotFoundError, NotADirectoryError) as e:
    raise UsageError(f"{overrides[0].partition('=')[0]} needs --config experiments/FILE.py, "
                     f"or a --workdir with a run: {e}") from e
  config = sample.run_config(None, run_dir)
  for item in overrides:
    key, sep, value = item[len("--config."):].partition("=")
    if not sep:
      raise UsageError(f"{item}: write --config.KEY=VALUE.")
    try:
      config_lib.set_key(config, key, value)
    except (config_lib.ConfigError, TypeError, ValueError) as e:
      raise UsageError(f"--config.{key} on {run_dir}/config.json: {e}") from e
  return config


def _config_path(argv: Sequence[str]) -> str | None:
  """The --config value in argv (FILE.py[:ARG]), if any."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
    path = argv[argv.index("--config") + 1]
  return path


def _explain_flag_error(argv: Sequence[str], error: Exception) -> str:
  """Turns config_flags' terse KeyError / AttributeError into a message naming the key, and
  an experiment file's own error (a traceback inside the flag error) into its last line."""
  path = _config_path(argv)
  text = str(error)
  if "Traceback" in text:  # get_config(ARG) raised: its message says what ARG accepts
    last = [line for line in text.splitlines() if line.strip()][-1]
    return f"--config {path}: {last}"
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if path and overrides:
    try:
      config = config_lib.load(path)
    except Exception as load_error:  # noqa: BLE001 -- report the file's own error instead
      return f"Cannot load --config {path}: {load_error!r}"
    for key in overrides:
      try:
        config_lib.check_key_exists(config, key)
      except config_lib.ConfigError as e:
        return f"--config.{key}: {e}"
  return f"Bad command line: {error}"


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

@command("train", "Train (or resume) the experiment's model (MM-DiT or VAE) in --workdir.",
         flags=("coordinator_address", "num_processes", "process_id"),
         examples=("sd3jax train --config experiments/sd3_medium.py --workdir /ckpt/run1",
                   "sd3jax train --config experiments/vae_f8.py:16 --workdir runs/vae "
                   "--config.total_steps=2000"))
def _train(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import train
  result = train.train(config, workdir)
  if result.interrupted:
    logging.warning("Interrupted at step %d; checkpoint saved. Exit code %d: rerun to resume.",
                    result.step, train.EXIT_INTERRUPTED)
    return train.EXIT_INTERRUPTED
  return 0


@command("run", "The experiment's whole job (data, VAE, precompute, MM-DiT, sample, "
         "evaluate) in --workdir; reruns resume.",
         flags=("coordinator_address", "num_processes", "process_id"),
         examples=("sd3jax run --config experiments/shapes.py --workdir runs/shapes",
                   "sd3jax run --config experiments/shapes.py:smoke --workdir /tmp/smoke",
                   "sd3jax run --config experiments/shapes.py --workdir runs/s2 "
                   "--config.total_steps=2000"))
def _run(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import job
  return job.run_main(config, workdir)


@command("precompute", "VAE moments + text embeddings of config.precompute.source -> records "
         "in --workdir.", flags=("coordinator_address", "num_processes", "process_id"),
         examples=("sd3jax precompute --config experiments/sd3_medium.py --workdir "
                   "/data/records/train --config.precompute.source=/data/ingested",))
def _precompute(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax.data import precompute
  return precompute.precompute_main(config, workdir) or 0


@command("sample", "Text -> PNGs + grid from --workdir's weights (a job's or a trainer's "
         "run folder) or a --pipeline DIR.", needs_workdir=False, needs_config=False,
         flags=("prompt", "prompts", "negative", "steps", "cfg", "cfg-max-t", "shift", "height",
                "width", "sampler", "seed", "no_t5", "ema", "step", "out", "pipeline"),
         examples=('sd3jax sample --workdir runs/shapes --prompt "a red circle in the top left"',
                   "sd3jax sample --workdir runs/shapes --prompts prompts.txt --cfg 7 --out /tmp/s",
                   'sd3jax sample --workdir runs/shapes_aspect --height 48 --width 80 '
                   '--prompt "a red circle on the left"',
                   'sd3jax sample --pipeline /data/sd3 --prompt "a photo of a cat"'))
def _sample(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import sample
  fv = flags.FLAGS
  if not fv.pipeline and not workdir:
    raise config_lib.ConfigError("sd3jax sample needs --workdir RUN or --pipeline DIR.")
  paths = sample.sample_main(
      config, workdir, sample.read_prompts(fv.prompt, fv.prompts), negative=fv.negative,
      steps=fv.steps, cfg=fv.cfg, cfg_max_t=fv["cfg-max-t"].value,
      autoguidance=fv.autoguidance, shift=fv.shift,
      sampler=fv.sampler, seed=fv.seed, no_t5=fv.no_t5, use_ema=fv.ema, out=fv.out,
      pipeline=fv.pipeline, step=fv.step, height=fv.height, width=fv.width)
  print(f"wrote {len(paths) - 1} images and {paths[-1]}")
  return 0


@command("edit", "Edit --image by --instruction with an editing run (experiments/"
         "shapes_edit.py); PNGs of (input | result).", needs_config=False,
         flags=("image", "instruction", "image-cfg", "text-cfg", "steps", "shift", "seed", "ema",
                "step", "out"),
         examples=('sd3jax edit --workdir runs/shapes --image in.png --instruction "make the red '
                   'circle blue"',
                   'sd3jax edit --workdir runs/shapes --image a.png --image b.png --instruction '
                   '"remove the blue square" --image-cfg 1.5 --text-cfg 5 --out /tmp/edits'))
def _edit(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax.edit import sampling
  fv = flags.FLAGS
  paths = sampling.edit_main(
      config, workdir, fv.image, fv.instruction, image_cfg=fv["image-cfg"].value,
      text_cfg=fv["text-cfg"].value, steps=fv.steps, shift=fv.shift, seed=fv.seed, out=fv.out,
      use_ema=fv.ema, step=fv.step)
  print(f"wrote {len(paths) - 1} edited images and {paths[-1]}")
  return 0


@command("evaluate", "Validation loss (+ prompt following) of checkpoints into eval/*.json.",
         needs_config=False, flags=("step", "all_steps", "ema"),
         examples=("sd3jax evaluate --workdir runs/shapes",
                   "sd3jax evaluate --workdir runs/shapes --all_steps",
                   "sd3jax evaluate --workdir runs/shapes --config.eval.prompts_per_category=200 "
                   "--config.eval.seed=201   # 1,000 other prompts"))
def _evaluate(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax.evals import run
  fv = flags.FLAGS
  run.evaluate_main(config, workdir, step=fv.step, all_steps=fv.all_steps, use_ema=fv.ema)
  return 0


@command("export", "Write --workdir's weights as a diffusers SD3 pipeline folder --out.",
         needs_config=False, flags=("out", "step", "ema"),
         examples=("sd3jax export --workdir runs/shapes --out /tmp/shapes_pipeline",))
def _export(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import sample
  fv = flags.FLAGS
  if not fv.out:
    raise config_lib.ConfigError("sd3jax export needs --out DIR.")
  print(sample.export_main(config, workdir, fv.out, use_ema=fv.ema, step=fv.step))
  return 0


@command("bench", "Steady-state train-step speed [--steps N] [--vs-diffusers].",
         needs_workdir=False, flags=("steps", "vs-diffusers", "torch-compile"),
         examples=("sd3jax bench --config experiments/shapes.py --steps 20 --vs-diffusers",
                   "sd3jax bench --config experiments/scaling.py:preset=paper,depth=24,batch=32 "
                   "--steps 20 --vs-diffusers --torch-compile   # on one GPU"))
def _bench(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import bench
  fv = flags.FLAGS
  if fv["vs-diffusers"].value:
    bench.share_accelerator_memory()
  steps = fv["steps"].value if fv["steps"].present else 10  # --steps is shared with sample
  bench.bench_main(config, steps=steps, vs_diffusers=fv["vs-diffusers"].value,
                   torch_compile=fv["torch-compile"].value)
  return 0


@command("compile", "AOT-compile the train step for --topology: memory, fit, FLOPs, time.",
         needs_workdir=False, flags=("topology", "search"),
         examples=("JAX_PLATFORMS=cpu sd3jax compile --config experiments/sd3_medium.py "
                   "--topology v5p:4x4x4 --search",
                   "JAX_PLATFORMS=cpu sd3jax compile --config experiments/sd3_medium.py "
                   "--topology v5p:4x4x4",))
def _compile(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import compile as compile_lib
  if not flags.FLAGS.topology:
    raise config_lib.ConfigError("sd3jax compile needs --topology, e.g. v5p:4x4x4.")
  if flags.FLAGS.search:
    return 0 if compile_lib.search(config, flags.FLAGS.topology)["best"] else 1
  report = compile_lib.compile_main(config, flags.FLAGS.topology)
  return 0 if report.get("fits", True) else 1


@command("scaling", "Scaling curves of RUN_DIR... into --out [--eval-checkpoints] "
         "[--target-flops X].", needs_workdir=False, needs_config=False,
         flags=("out", "eval-checkpoints", "target-flops"),
         examples=("sd3jax scaling runs/scaling/* --out runs/scaling_report",))
def _scaling(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import scaling
  fv = flags.FLAGS
  if not args or not fv.out:
    raise config_lib.ConfigError("usage: sd3jax scaling RUN_DIR... --out DIR.")
  try:
    scaling.scaling_main(list(args), fv.out, eval_checkpoints=fv["eval-checkpoints"].value,
                         target_flops=fv["target-flops"].value)
  except scaling.ScalingError as e:
    print(f"sd3jax scaling: {e}", file=sys.stderr)
    return 2
  return 0


@command("ingest", "Image folders / webdataset tars SOURCE... -> image_text records in "
         "OUT_DIR; every process of a job writes its share, reruns resume.",
         needs_workdir=False, needs_config=False,
         flags=("examples_per_shard", "caption_encoding", "coordinator_address",
                "num_processes", "process_id"),
         examples=("sd3jax ingest /data/images /data/train_records",
                   "sd3jax ingest /data/laion/ /data/train_records   # on every host of a "
                   "SLURM / TPU job",
                   "python3 -m sd3jax.data.ingest /data/laion/ /data/train_records "
                   "--process_index 3 --process_count 8   # hosts without a coordinator"))
def _ingest(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax.data import ingest
  fv = flags.FLAGS
  if len(args) < 2 or fv.examples_per_shard < 1:
    raise config_lib.ConfigError("usage: sd3jax ingest SOURCE... OUT_DIR [--examples_per_shard "
                                 "N >= 1] [--caption_encoding ENCODING].")
  source = args[0] if len(args) == 2 else list(args[:-1])
  # The process layout is JAX's when the launch started jax.distributed, else one process.
  ingest.print_summary(ingest.ingest(source, args[-1], examples_per_shard=fv.examples_per_shard,
                                     caption_encoding=fv.caption_encoding))
  return 0


@command("dedup", "Near-duplicate removal and memorisation checks with copy-detection "
         "descriptors: embed, cluster, train, memorisation, demo.",
         needs_workdir=False, needs_config=False,
         flags=("descriptor", "threshold", "background", "source", "verify", "verify_threshold",
                "storage_dtype", "part_size", "neighbours", "workdir",
                "embeddings", "num", "steps", "seed", "coordinator_address", "num_processes",
                "process_id"),
         examples=(
             "sd3jax dedup demo /tmp/dedup_demo   # shapes + injected copies, scored (minutes)",
             "sd3jax dedup train /data/train_records /data/copy_net   # a descriptor, no "
             "downloads",
             "sd3jax dedup embed /data/train_records /data/dedup --descriptor /data/copy_net",
             "sd3jax dedup cluster /data/dedup/descriptors-XXXX /data/dedup/filter --source "
             "/data/train_records",
             "sd3jax dedup memorisation --workdir runs/shapes --descriptor /data/copy_net"))
def _dedup(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  import json as json_lib
  usage_text = ("usage: sd3jax dedup embed SOURCE OUT --descriptor D | cluster DESCRIPTORS OUT "
                "[--source SOURCE] [--threshold T] [--background BG] [--[no]verify] "
                "[--verify_threshold V] | train SOURCE OUT | memorisation --workdir RUN "
                "--descriptor D | demo OUT")
  sub, rest = (args[0], list(args[1:])) if args else ("", [])
  want = {"embed": 2, "cluster": 2, "train": 2, "memorisation": 0, "demo": 1}
  if sub not in want or len(rest) != want[sub]:
    raise config_lib.ConfigError(usage_text)
  result = _dedup_run(sub, rest, config, workdir, flags.FLAGS)
  print(json_lib.dumps(result, indent=2))
  return 0


def _dedup_run(sub: str, rest: list[str], config, workdir, fv) -> dict:
  from sd3jax.data.producer import open_source
  from sd3jax.dedup import descriptors as descriptors_lib
  if sub == "embed":
    from sd3jax.dedup import embed
    result = embed.embed(open_source(rest[0]), rest[1],
                         descriptors_lib.load_descriptor(fv.descriptor or ""),
                         storage_dtype=fv.storage_dtype, part_size=fv.part_size)
  elif sub == "cluster":
    from sd3jax.dedup import cluster
    result = cluster.cluster(rest[0], rest[1], threshold=fv.threshold, k=fv.neighbours,
                             source=open_source(fv.source) if fv.source else None,
                             background=fv.background, verify=fv.verify,
                             verify_threshold=fv.verify_threshold)
  elif sub == "train":
    from sd3jax.dedup import copy_net
    result = copy_net.train_on_source(open_source(rest[0]), rest[1], seed=fv.seed)
  elif sub == "memorisation":
    from sd3jax.dedup import memorisation
    if not workdir:
      raise config_lib.ConfigError("sd3jax dedup memorisation needs --workdir RUN.")
    result = memorisation.memorisation(config, workdir, fv.descriptor or "", num=fv.num,
                                       threshold=fv.threshold, seed=fv.seed,
                                       embeddings=fv.embeddings, steps=fv.steps)
    result = {k: v for k, v in result.items() if k != "generations"}
  else:
    from sd3jax.dedup import demo
    result = demo.run_demo(rest[0])
    result = {k: v for k, v in result.items() if not k.endswith("curve")}
  return result


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

EXIT_USER_ERROR = 2   # bad command line, config, path or data: the message says what to fix
EXIT_STOPPED = 3      # a run stopped on purpose: non-finite losses, no usable checkpoint
# A user's mistake, not sd3jax's: one line, no traceback. Anything else is a bug and keeps it.
_USER_ERRORS = (config_lib.ConfigError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError, FileExistsError, PermissionError)


def _data_errors() -> tuple[type[BaseException], ...]:
  from sd3jax.data.records import DataError
  return (DataError,)


def _stopped_errors() -> tuple[type[BaseException], ...]:
  from sd3jax.checkpoint import CheckpointError
  from sd3jax.train import NonFiniteError
  return CheckpointError, NonFiniteError


def run_command(name: str, config: ConfigDict, workdir: str | None, rest: Sequence[str]) -> int:
  """Runs one command; maps the errors a user can fix to exit codes and a short message."""
  try:
    if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
      raise NotADirectoryError(f"--workdir {workdir} is a file; give a folder (it is created "
                               "if missing).")
    return COMMANDS[name].fn(config, workdir, rest)
  except _USER_ERRORS as e:
    kind = "config error: " if isinstance(e, config_lib.ConfigError) else ""
    print(f"sd3jax {name}: {kind}{e}", file=sys.stderr)
    return EXIT_USER_ERROR
  except Exception as e:  # noqa: BLE001 -- re-raised unless it is a deliberate stop
    cause, depth = e, 0
    while cause is not None and not isinstance(cause, _data_errors()) and depth < 16:
      cause, depth = cause.__cause__ or cause.__context__, depth + 1  # grain re-raises it
    cause = cause if isinstance(cause, _data_errors()) else None
    if cause is not None:
      print(f"sd3jax {name}: data error: {cause}", file=sys.stderr)
      return EXIT_USER_ERROR
    if isinstance(e, _stopped_errors()):
      print(f"sd3jax {name}: stopped: {e}", file=sys.stderr)
      return EXIT_STOPPED
    raise


def main(argv: Sequence[str] | None = None) -> None:
  """Console-script entry point (`sd3jax` in setup.py)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  if argv[1] in COMMANDS and any(a in ("-h", "--help") for a in argv[2:]):
    print(command_help(argv[1]))
    sys.exit(0)
  parsed = {}

  def flags_parser(args):
    try:
      parsed["value"] = parse(args)
    except UsageError as e:
      print(f"sd3jax: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    return args

  def run(_):
    from sd3jax import console
    console.quiet(verbose=flags.FLAGS["verbosity"].present)
    name, config, workdir, rest = parsed["value"]
    from sd3jax import distributed  # before any JAX backend use
    fv = flags.FLAGS
    try:
      distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    except ValueError as e:
      print(f"sd3jax {name}: {e}", file=sys.stderr)
      return EXIT_USER_ERROR
    return run_command(name, config, workdir, rest)

  app.run(run, argv=argv, flags_parser=flags_parser)


if __name__ == "__main__":
  main()
