r"""Command line: flags and dispatch only.

    python -m r1jax.main --config=configs/pretrain.py:variant=tiny --workdir=/tmp/run \
        [--config.train.num_steps=100]
    r1jax --config=pretrain:variant=tiny --workdir=/tmp/run   # the same (console script, cli())

`--config` is a config file or the name of one shipped with r1jax (`configlib.resolve_config`), so
an installed wheel runs the stage configs from any directory.

`config.stage` names the module in `r1jax.stages` whose `run(config, workdir)` does the work; each
stage validates its own config before anything is compiled.
"""
import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from r1jax import configlib
from r1jax import console
from r1jax import distributed
from r1jax import errors
from r1jax import host_memory
from r1jax import remote

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config: a file (configs/pretrain.py:variant=tiny) or the name of one "
    "shipped with r1jax (pretrain:variant=tiny).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("data", "pretrain", "finetune", "distill", "quantize", "prune", "tune", "pipeline", "compare",
          "diagnose", "continual")


def _exit_with(error: Exception) -> None:
  """Ends the command with `error`'s message (it names the problem and its fix), no traceback."""
  print(f"r1jax: {error}", file=sys.stderr)
  sys.exit(errors.EXIT_CODE)


def _has_key(config, path: str) -> bool:
  try:
    configlib.get_path(config, path)
    return True
  except (KeyError, AttributeError, TypeError):
    return False


def _config_resolved(argv: list[str]) -> list[str]:
  """`argv` with the --config file resolved (`configlib.resolve_config`): a shipped config's name,
  or the clone's configs/ path, becomes the shipped file wherever the command runs."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--":  # the rest are positional arguments
      break
    for flag in ("--config", "-config"):
      if arg.startswith(flag + "="):
        out[i] = flag + "=" + configlib.resolve_config(arg[len(flag) + 1:])
      elif arg == flag and i + 1 < len(out):
        out[i + 1] = configlib.resolve_config(out[i + 1])
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, its errors ended like the stages' (one message, exit 2): a config file
  that is neither here nor shipped, a config file's get_config() refusing its argument (a
  UserError, e.g. an unknown variant) in its own words, not in the traceback ml_collections folds
  into the flag error (the innermost UserError of the chain is the original one), and an override
  of a key the config lacks by its flag."""
  try:
    argv = _config_resolved(argv)
  except errors.InputNotFound as e:
    _exit_with(e)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):  # ml_collections: an override of a key the config lacks
    unknown = [flag for flag in (a.split("=")[0] for a in argv if a.startswith("--config."))
               if not _has_key(flags.FLAGS["config"].value, flag[len("--config."):])]
    if not unknown:
      raise
    _exit_with(configlib.ConfigError(
        f"{', '.join(unknown)}: the config has no such key (its file lists the keys; unknown "
        "keys are refused rather than ignored)."))
  except flags.Error as e:  # a bad flag value, a missing flag, or a config file's own refusal
    cause, message = e, e
    while cause is not None:
      if isinstance(cause, errors.UserError):
        message = cause
      cause = cause.__cause__ or cause.__context__
    _exit_with(message)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]!r}. Use --config.key=value for overrides.")
  console.quiet_library_logs()  # before JAX starts its backends
  config = _CONFIG.value
  try:
    stage = config.get("stage")
  except OSError as e:  # ml_collections reports a config file it could not read on first use
    _exit_with(e.__cause__ or e)
  if stage not in STAGES:
    raise app.UsageError(f"config.stage={stage!r} is not a known stage; choose one of {STAGES}.")
  distributed.maybe_initialize()
  module = importlib.import_module(f"r1jax.stages.{stage}")
  workdir = _WORKDIR.value
  try:
    remote.localize_inputs(config)  # gs:// input files and earlier runs: read from local copies
    if remote.is_remote(workdir):  # gs://: staged locally, mirrored to the bucket (r1jax.remote)
      with remote.StagedWorkdir(workdir) as local:
        logging.info("Running stage %r in %s (staged in %s); host allocator: %s", stage, workdir,
                     local, host_memory.status())
        module.run(config, local)
    else:
      workdir = os.path.abspath(os.path.expanduser(workdir))
      logging.info("Running stage %r in %s; host allocator: %s", stage, workdir,
                   host_memory.status())
      module.run(config, workdir)
  except errors.UserError as e:
    # A bad config value, input file or path, or a missing extra: the message already names the
    # problem and its fix, so no traceback (configlib.ConfigError is one of these).
    _exit_with(e)


def cli():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
