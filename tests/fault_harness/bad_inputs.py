"""Bad inputs to a run: NaN / out-of-vocabulary batches, and invalid command-line overrides.

`nan_trial` injects a fault into one step's batch (`command.INJECT`): the run must stop naming that
step and the last good checkpoint, keep only checkpoints before it, and resume with
train.skip_nonfinite=True to completion with one skip counted. `config_trial` parses one invalid
`--config.*` override with the real flag parser and runs the stage: it must fail before anything is
compiled or written, with a message naming the key.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

from absl import flags
import jax
from ml_collections import config_flags

from r1jax.stages import pretrain

from fault_harness import command
from fault_harness import source


# --------------------------------------------------------------------------------------------------
# NaN injection.


def nan_trial(harness: command.Harness, reference: str, work_root: str, kind: str, at: int,
              skip_rerun: bool = True) -> list[str]:
  """Injects `kind` at step `at`; the run must stop naming it and the last good checkpoint, then
  resume with skip_nonfinite=True and finish with one skip."""
  workdir = os.path.join(work_root, f"nan_{kind}_{at}")
  shutil.rmtree(workdir, ignore_errors=True)
  code, text = harness.run(workdir, workdir + ".log", inject=f"{kind}@{at}")
  problems = []
  finalized, _ = command.checkpoint_entries(workdir)
  good = max(finalized) if finalized else None
  if code == 0:
    return [f"{kind}@{at}: the run did not stop"]
  if f"Non-finite loss or gradient at step {at} " not in text:
    problems.append(f"{kind}@{at}: the error does not name step {at}: {text[-800:]}")
  expected = (f"the last good checkpoint is step {good}" if good is not None else
              "no checkpoint was saved yet")
  if expected not in text:
    problems.append(f"{kind}@{at}: the error does not say '{expected}'")
  if any(s >= at for s in finalized):
    problems.append(f"{kind}@{at}: checkpoints at or after the NaN step: {finalized}")
  ref = [r for r in command.metrics_records(reference) if r["step"] < at]
  got = [r for r in command.metrics_records(workdir) if r["step"] < at]
  if got != ref:
    problems.append(f"{kind}@{at}: metrics before the NaN step differ from the reference")
  if not skip_rerun:
    return problems
  code, text = harness.run(workdir, workdir + ".skip.log", "--config.train.skip_nonfinite=True",
                           inject=f"{kind}@{at}")
  if code != 0:
    return problems + [f"{kind}@{at}: the skip_nonfinite rerun failed: {text[-800:]}"]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  if summary["nonfinite_skips"] != 1 or summary["resumed_from_step"] != good:
    problems.append(f"{kind}@{at}: skip rerun summary {summary['nonfinite_skips']} skips, resumed "
                    f"from {summary['resumed_from_step']} (expected 1, {good})")
  return problems


# --------------------------------------------------------------------------------------------------
# Invalid configs.

# (key, kind, arguments): kinds int_min (minimum, allowed values below it), float_range (low, high,
# low_open, high_open), choice, bool.
CONFIG_KEYS = (
    ("seed", "int_min", (0, ())), ("train.num_steps", "int_min", (1, (-1,))),
    ("train.batch_size", "int_min", (1, ())), ("train.grad_accum_steps", "int_min", (1, ())),
    ("train.log_every_steps", "int_min", (1, ())), ("train.warmup_steps", "int_min", (0, (-1,))),
    ("eval.every_steps", "int_min", (0, ())), ("eval.num_batches", "int_min", (1, ())),
    ("eval.early_stopping_patience", "int_min", (0, ())),
    ("checkpoint.every_steps", "int_min", (1, ())), ("checkpoint.max_to_keep", "int_min", (1, ())),
    ("checkpoint.keep_best", "int_min", (0, ())), ("data.seq_len", "int_min", (8, (-1,))),
    ("data.max_predictions", "int_min", (1, (-1,))), ("data.kg_seq_len", "int_min", (8, ())),
    ("data.eval_every_nth_doc", "int_min", (2, ())), ("data.worker_count", "int_min", (0, ())),
    ("mesh.data", "int_min", (1, (-1,))), ("mesh.fsdp", "int_min", (1, (-1,))),
    ("model.d_model", "int_min", (1, ())), ("model.n_layer", "int_min", (1, ())),
    ("model.n_head", "int_min", (1, ())), ("model.d_head", "int_min", (1, ())),
    ("model.d_inner", "int_min", (1, ())), ("model.mem_len", "int_min", (0, ())),
    ("train.learning_rate", "float_range", (0.0, 10.0, True, False)),
    ("train.warmup_fraction", "float_range", (0.0, 1.0, False, False)),
    ("train.weight_decay", "float_range", (0.0, 1.0, False, False)),
    ("train.b1", "float_range", (0.0, 1.0, False, True)),
    ("train.b2", "float_range", (0.0, 1.0, False, True)),
    ("train.eps", "float_range", (0.0, 1.0, True, False)),
    ("train.grad_clip_norm", "float_range", (0.0, 1e9, False, False)),
    ("train.label_smoothing", "float_range", (0.0, 1.0, False, True)),
    ("data.mlm_prob", "float_range", (0.0, 1.0, True, True)),
    ("data.kg_weight", "float_range", (0.0, 1e3, False, False)),
    ("checkpoint.sigterm_grace_secs", "float_range", (0.0, 1e6, True, False)),
    ("model.dropout", "float_range", (0.0, 1.0, False, True)),
    ("model.dropatt", "float_range", (0.0, 1.0, False, True)),
    ("train.schedule", "choice", ()), ("data.tokenizer_type", "choice", ()),
    ("model.attention", "choice", ()), ("model.activation", "choice", ()),
    ("model.dtype", "choice", ()),
    ("train.skip_nonfinite", "bool", ()), ("data.nsp", "bool", ()),
    ("checkpoint.async_save", "bool", ()),
)


def invalid_value(kind: str, args: tuple, rng: random.Random) -> str:
  """A command-line value that is invalid for a key of this kind."""
  if kind == "int_min":
    minimum, allowed = args
    choices = [str(v) for v in (minimum - rng.randint(1, 10**6), minimum - 1) if v not in allowed]
    return rng.choice(choices + ["abc", "1.5", "True", "", "1e3"])
  if kind == "float_range":
    low, high, low_open, high_open = args
    choices = ["nan", "inf", "-inf", "abc", repr(low - rng.uniform(1e-6, 1e6)),
               repr(high + rng.uniform(1e-6, 1e6))]
    if low_open:
      choices.append(repr(low))
    if high_open:
      choices.append(repr(high))
    return rng.choice(choices)
  if kind == "choice":
    return rng.choice(["", "linear ", "COSINE", "relu7", "float8", "sideways", "x" * 40, "none"])
  return rng.choice(["maybe", "2", "yes please", "-1", "nan"])


def parse_command_line(overrides: list[str]):
  """The config the real flag parser builds from configs/pretrain.py:variant=tiny + overrides."""
  argv = ["r1jax.main", f"--config={source.config_path()}:variant=tiny", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


_COMPILES: list[str] = []


def _compile_listener(name, *args, **kwargs):
  del args, kwargs
  if "compile" in name:
    _COMPILES.append(name)


def install_compile_listener() -> list[str]:
  if not getattr(install_compile_listener, "done", False):
    jax.monitoring.register_event_duration_secs_listener(_compile_listener)
    install_compile_listener.done = True
  return _COMPILES


def config_trial(key: str, value: str, workdir: str) -> str | None:
  """Runs the stage with one bad override; None if it failed well, else what went wrong."""
  compiles = install_compile_listener()
  before = len(compiles)
  override = f"--config.{key}={value}"
  try:
    config = parse_command_line([override])
    pretrain.run(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
  else:
    return f"{override}: accepted"
  problems = []
  field = key.split(".")[-1]
  named = (key in message or field in message or
           (key.startswith("model.") and f"TransformerXLConfig.{field}" in message))
  if not named:
    problems.append(f"message does not name {key}: {message[:200]!r}")
  if len(compiles) != before:
    problems.append(f"compiled {compiles[before:]} before failing")
  if os.path.exists(workdir):
    problems.append("wrote the workdir before failing")
  return f"{override}: " + "; ".join(problems) if problems else None


def run_config_campaign(trials: int, rng: random.Random, scratch: str) -> dict[str, Any]:
  problems = []
  for i in range(trials):
    key, kind, args = CONFIG_KEYS[i % len(CONFIG_KEYS)] if i < len(CONFIG_KEYS) else (
        rng.choice(CONFIG_KEYS))
    value = invalid_value(kind, args, rng)
    problem = config_trial(key, value, os.path.join(scratch, f"cfg{i}"))
    if problem:
      problems.append(problem)
  # Typos of real keys, and impossible combinations.
  extra = [("train.lerning_rate", "0.1"), ("model.d_modle", "64"), ("checkpoint.every", "5"),
           ("mesh.data", "16"), ("train.batch_size", "6"), ("data.worker_count", "3"),
           ("model.vocab_size", "10")]
  for key, value in extra:
    problem = config_trial(key, value, os.path.join(scratch, f"cfg_{key}"))
    if problem:
      problems.append(problem)
  tried = trials + len(extra)
  return {"tried": tried, "failed_well": tried - len(problems), "problems": problems}

