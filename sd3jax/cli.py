"""The `sd3jax` command.

  sd3jax COMMAND --config experiments/FILE.py[:ARG] [--config.KEY=VALUE ...] [--workdir DIR]

Commands are small functions registered with `@command`; each gets the loaded, locked
config, the workdir and the remaining positional arguments, and returns an exit code:

  @command("sample", "Text -> image grid from a workdir's latest EMA weights.")
  def _sample(config, workdir, args):
    from sd3jax import sample        # import inside: `sd3jax --help` stays fast
    sample.run(config, workdir)
    return 0

Exit codes: 0 done; 2 bad command line or config (the message names the key and the
fix); 75 (EX_TEMPFAIL) stopped by SIGTERM / SIGINT after saving a checkpoint, rerun
the same command to resume.
"""
from __future__ import annotations

import dataclasses
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


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *,
            needs_workdir: bool = True) -> Callable[[CommandFn], CommandFn]:
  """Registers `fn(config, workdir, args) -> exit code` as `sd3jax NAME`."""
  def register(fn: CommandFn) -> CommandFn:
    COMMANDS[name] = Command(fn, help, needs_workdir)
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


def usage() -> str:
  lines = ["usage: sd3jax COMMAND --config experiments/FILE.py[:ARG] [--config.KEY=VALUE ...] "
           "[--workdir DIR]", "", "commands:"]
  lines += [f"  {name:10s} {c.help}" for name, c in sorted(COMMANDS.items())]
  return "\n".join(lines)


def parse(argv: Sequence[str], flag_values: flags.FlagValues | None = None
          ) -> tuple[str, ConfigDict, str | None, list[str]]:
  """argv -> (command, config, workdir, extra positional args); raises UsageError."""
  fv = flags.FLAGS if flag_values is None else flag_values
  define_flags(fv, argv)
  try:
    rest = fv(list(argv))
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    raise UsageError(_explain_flag_error(argv, e)) from e
  if len(rest) < 2 or rest[1] not in COMMANDS:
    given = f"unknown command {rest[1]!r}\n" if len(rest) >= 2 else ""
    raise UsageError(given + usage())
  name = rest[1]
  config = fv["config"].value
  if config is None:
    raise UsageError(f"sd3jax {name}: --config experiments/FILE.py is required.\n" + usage())
  if COMMANDS[name].needs_workdir and not fv["workdir"].value:
    raise UsageError(f"sd3jax {name}: --workdir DIR is required.")
  return name, config, fv["workdir"].value, list(rest[2:])


def _explain_flag_error(argv: Sequence[str], error: Exception) -> str:
  """Turns config_flags' terse KeyError / AttributeError into a message naming the key."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
    path = argv[argv.index("--config") + 1]
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

@command("train", "Train (or resume) the MM-DiT of an experiment in --workdir.")
def _train(config: ConfigDict, workdir: str, args: Sequence[str]) -> int:
  from sd3jax import train
  result = train.train(config, workdir)
  if result.interrupted:
    logging.warning("Interrupted at step %d; checkpoint saved. Exit code %d: rerun to resume.",
                    result.step, train.EXIT_INTERRUPTED)
    return train.EXIT_INTERRUPTED
  return 0


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
  """Console-script entry point (`sd3jax` in setup.py)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  parsed = {}

  def flags_parser(args):
    try:
      parsed["value"] = parse(args)
    except UsageError as e:
      print(f"sd3jax: {e}", file=sys.stderr)
      sys.exit(2)
    return args

  def run(_):
    name, config, workdir, rest = parsed["value"]
    try:
      return COMMANDS[name].fn(config, workdir, rest)
    except config_lib.ConfigError as e:
      print(f"sd3jax {name}: config error: {e}", file=sys.stderr)
      return 2

  app.run(run, argv=argv, flags_parser=flags_parser)


if __name__ == "__main__":
  main()
