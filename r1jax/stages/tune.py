r"""Hyperparameter search: an optuna study whose trials are short runs of a training stage.

    python -m r1jax.main --config=configs/tune.py:variant=tiny --workdir=DIR
    python -m r1jax.main --config=DIR/best_config.py --workdir=BEST   # the winner, on its own

`run(config, workdir)`:
1. validates everything before any trial starts: the tune settings, the base stage config, every
   searched field (it must exist in `base` with a matching type; a range must be non-empty and,
   for log scales, positive; each end of each range must still give a valid stage config), the
   objective metric (it must be one the stage's evals report), the storage and the first trial;
2. opens (or creates) the study in its storage: `sqlite:///DIR/study.db` by default, a journal
   file, or any database URL several workers share;
3. runs trials until the study holds `n_trials` of them (over every worker and rerun): each trial
   samples `space`, builds the stage config (`base` + the sampled values) and calls
   `r1jax.stages.<stage>.run(trial_config, DIR/trials/<number>, on_eval=hook)`; the hook reports
   the objective metric at every eval (`trial.report`) and stops a trial the pruner rejects by
   raising `optuna.TrialPruned` from inside the training loop;
4. writes DIR/summary.json, DIR/report.md (trials table, history, intermediate values and
   parameter importance PNGs), DIR/best_config.py and DIR/best_config.json.

Sampling: TPE by default (`sampler.name=gp` for the Gaussian-process sampler, which needs torch),
with `n_startup_trials` random trials sized to the budget (max(2, n_trials // 4), not optuna's
fixed 10, which would turn a 10-trial budget into random search). A known good configuration (the
base config's own values by default) is enqueued as trial 0 of a new study.

A trial's value is the objective metric of the model the stage delivers, read from the trial's
DIR/trials/<n>/metrics.jsonl: finetuning keeps the best dev-loss checkpoint, so its value is the
metric at that eval step; pretraining delivers the last step. Pruned trials keep their last
reported value (optuna's rule) but never become the best trial.

Resuming and several workers. The budget is checked and the next trial is created while holding
an exclusive lock on DIR/study.lock, so workers sharing DIR (SQLite or journal file) never overrun
the budget; workers on other machines with their own DIR and a shared database URL can overrun it
by at most one trial per extra worker. Each trial records its worker (host, pid, process start
time). A trial left RUNNING by a killed worker is detected on this host at once (its process is
gone) and elsewhere by the database heartbeat (`heartbeat_secs`); it is marked FAILED (user attr
`fail_reason`) and re-queued as a new trial with the same parameters and user attr `retry_of`, which
takes over the killed trial's workdir and so resumes from its last checkpoint. Completed trials are
never rerun; a failed-and-requeued trial does not count towards the budget, its retry does.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import fcntl
import importlib
import inspect
import json
import math
import os
import shutil
import socket
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import optuna
from optuna.trial import TrialState

from r1jax import configlib
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import metrics as metrics_lib

STAGES = ("finetune", "pretrain")
SAMPLERS = ("tpe", "gp", "random")
PRUNERS = ("median", "hyperband", "none")
DIRECTIONS = ("maximize", "minimize")
KEEP_WORKDIRS = ("all", "best", "none")
PARAM_TYPES = ("float", "int", "pow2", "categorical", "off")
TRIALS_DIR = "trials"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# --------------------------------------------------------------------------------------------------
# Search space.


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched config field.

  kind: float | int (optionally log-scaled or on a `step` grid), pow2 (powers of two from `low`
  to `high`, sampled as the integer exponent `log2_<name>` so the sampler keeps their order), or
  categorical (`choices`, already converted to the field's type).
  """
  name: str
  field: str
  kind: str
  low: float = 0.0
  high: float = 0.0
  log: bool = False
  step: float = 0.0
  choices: tuple[Any, ...] = ()

  @property
  def optuna_name(self) -> str:
    return f"log2_{self.name}" if self.kind == "pow2" else self.name

  def suggest(self, trial: optuna.Trial) -> Any:
    """Samples the config value (pow2: 2 ** the sampled exponent)."""
    if self.kind == "float":
      return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step or None)
    if self.kind == "int":
      return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log,
                               step=int(self.step) or 1)
    if self.kind == "pow2":
      return 2 ** trial.suggest_int(self.optuna_name, int(math.log2(self.low)),
                                    int(math.log2(self.high)))
    return trial.suggest_categorical(self.name, list(self.choices))

  def to_optuna(self, value: Any) -> Any:
    return int(round(math.log2(value))) if self.kind == "pow2" else value

  def from_optuna(self, value: Any) -> Any:
    return 2 ** int(value) if self.kind == "pow2" else value

  def contains(self, value: Any) -> bool:
    if self.kind == "categorical":
      return value in self.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.kind == "pow2":
      return value >= 1 and value == 2 ** round(math.log2(value)) and self.low <= value <= self.high
    if self.kind == "int" and value != int(value):
      return False
    return self.low <= value <= self.high

  def extremes(self) -> list[Any]:
    """The values whose configs are checked before any trial: both ends, or every choice."""
    if self.kind == "categorical":
      return list(self.choices)
    if self.kind == "float":
      return [float(self.low), float(self.high)]
    return [int(self.low), int(self.high)]

  def describe(self) -> str:
    if self.kind == "categorical":
      return f"one of {list(self.choices)}"
    if self.kind == "pow2":
      return f"powers of two {int(self.low)}..{int(self.high)}"
    scale = "log-uniform" if self.log else "uniform"
    grid = f", step {self.step:g}" if self.step else ""
    return f"{self.kind} {scale} [{self.low:g}, {self.high:g}]{grid}"


def get_path(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  parent, _, leaf = path.rpartition(".")
  (get_path(config, parent) if parent else config)[leaf] = value


def field_type(base: ml_collections.ConfigDict, path: str) -> type:
  """The declared type of a leaf of `base` (placeholders keep theirs); KeyError if not a leaf."""
  parent, _, leaf = path.rpartition(".")
  node = get_path(base, parent) if parent else base
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise KeyError(path)
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise KeyError(path)
  return node.get_type(leaf)


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out += leaf_paths(value, path + ".")
    else:
      out.append(path)
  return out


def _parse_choice(text: str, typ: type) -> Any:
  text = text.strip()
  if typ is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{text!r} is not a bool (true/false)")
    return text.lower() in ("true", "1")
  if typ in (int, float):
    return typ(text)
  return text


def parse_space(config: ml_collections.ConfigDict, v: configlib.Validator) -> list[Param]:
  """The searched parameters of `config.space`; problems go to `v` (key space.<name>.<field>)."""
  base = config.base
  leaves = leaf_paths(base)
  params, seen = [], {}
  for name in config.space.keys():
    entry = config.space[name]
    key = f"space.{name}"
    if not isinstance(entry, ml_collections.ConfigDict):
      v.add(key, f"{entry!r} must be a section with field, type, low, high, log, step, choices.")
      continue
    kind = v.choice(f"{key}.type", PARAM_TYPES)
    if kind is None or kind == "off":
      continue
    path = v.string(f"{key}.field")
    if path is None:
      continue
    try:
      typ = field_type(base, path)
    except (KeyError, AttributeError):
      close = difflib.get_close_matches(path, leaves, n=2, cutoff=0.8)
      v.add(f"{key}.field", f"{path!r} is not a field of the base {config.tune.stage} config"
            + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else
               f"; fields look like 'train.learning_rate', 'model.dropout'."))
      continue
    if path in seen:
      v.add(f"{key}.field", f"{path!r} is already searched by space.{seen[path]}.")
      continue
    seen[path] = name
    low, high, log, step = entry.get("low"), entry.get("high"), entry.get("log"), entry.get("step")
    if kind == "categorical":
      texts = [c for c in str(entry.get("choices") or "").split(",") if c.strip()]
      if not texts:
        v.add(f"{key}.choices", f"is empty; list the values comma-separated, e.g. '32,64'.")
        continue
      try:
        choices = tuple(dict.fromkeys(_parse_choice(c, typ) for c in texts))
      except ValueError as e:
        v.add(f"{key}.choices", f"{entry.choices!r}: {e}; {path} has type {typ.__name__}.")
        continue
      params.append(Param(name, path, kind, choices=choices))
      continue
    want = float if kind == "float" else int
    if typ is not want:
      v.add(f"{key}.type", f"{kind!r} does not fit {path} (type {typ.__name__}); use "
            + ("type=float" if typ is float else "type=int or type=pow2" if typ is int else
               "type=categorical with choices") + ".")
      continue
    ok = True
    for what, value in (("low", low), ("high", high)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        v.add(f"{key}.{what}", f"{value!r} must be a finite number.")
        ok = False
    if not ok:
      continue
    if not low < high:
      v.add(f"{key}", f"the range [low={low:g}, high={high:g}] is "
            + ("empty" if low == high else "inverted") + "; set low < high "
            f"(--config.{key}.low=... --config.{key}.high=...), or type=off to fix the value.")
      continue
    if kind in ("int", "pow2") and (low != int(low) or high != int(high)):
      v.add(key, f"low={low:g} and high={high:g} must be whole numbers for type={kind}.")
      continue
    if kind == "pow2":
      bad = [x for x in (low, high) if x < 1 or 2 ** round(math.log2(x)) != x]
      if bad:
        v.add(key, f"type=pow2 needs low and high that are powers of two >= 1; {bad[0]:g} is not.")
        continue
    if log and low <= 0:
      v.add(f"{key}.low", f"{low:g}: a log scale needs low > 0.")
      continue
    if step and (step < 0 or log):
      v.add(f"{key}.step", f"{step:g}: " + ("must be >= 0." if step < 0 else
                                             "a log scale cannot have a step; set step=0."))
      continue
    if kind == "int" and step and step != int(step):
      v.add(f"{key}.step", f"{step:g} must be a whole number for type=int.")
      continue
    params.append(Param(name, path, kind, float(low), float(high), bool(log and kind != "pow2"),
                        float(step or 0.0)))
  if not params and not v.problems:
    v.add("space", "searches nothing (every entry is type=off); give at least one parameter.")
  return params


def eval_metrics(stage: str, base: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Names of the metrics each eval of `stage` reports (what the objective may name).

  Kept in step with the stages' loss functions (`finetune.classification_loss_fn`,
  `steps.pretrain_loss_fn` plus the engine's "loss"); tests/test_tune.py checks finetuning's.
  """
  if stage == "finetune":
    names = ["accuracy", "loss", "nll"]
    if base.task.get("multi_label"):
      names.append("micro_f1")
  else:
    names = ["loss", "mlm_accuracy", "mlm_loss"]
    if base.data.get("nsp"):
      names += ["nsp_accuracy", "nsp_loss"]
    if base.data.get("knowledge_file"):
      names += ["kg_accuracy", "kg_loss"]
  return tuple(names)


def parse_enqueue(config: ml_collections.ConfigDict, params: Sequence[Param],
                  v: configlib.Validator) -> dict[str, Any] | None:
  """{field: value} of the first trial to enqueue (None: none); problems go to `v`."""
  spec = config.enqueue
  if not spec:
    return None
  by_field = {p.field: p for p in params}
  values = {}
  if spec != "base":
    for item in spec.split(","):
      path, sep, text = item.partition("=")
      path = path.strip()
      if not sep or path not in by_field:
        v.add("enqueue", f"{item!r} is not field=value with a searched field "
              f"{sorted(by_field)}; or use 'base' or ''.")
        continue
      try:
        values[path] = _parse_choice(text, field_type(config.base, path))
      except ValueError as e:
        v.add("enqueue", f"{item!r}: {e}.")
  for p in params:  # the rest from base (a None placeholder: left to the sampler)
    if p.field not in values and get_path(config.base, p.field) is not None:
      values[p.field] = get_path(config.base, p.field)
  for path, value in values.items():
    p = by_field[path]
    if not p.contains(value):
      v.add("enqueue", f"the first trial's {path}={value!r} is outside space.{p.name} "
            f"({p.describe()}); widen the range, give another value "
            f"(--config.enqueue={path}=...), or --config.enqueue='' to enqueue nothing.")
  return values


# --------------------------------------------------------------------------------------------------
# Configs.


def stage_module(stage: str):
  return importlib.import_module(f"r1jax.stages.{stage}")


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy of `base` with the tune-level init_from applied (absolute path)."""
  cfg = copy.deepcopy(config.base)
  cfg.unlock()
  init_from = config.init_from or cfg.get("init_from", "")
  if init_from and "://" not in init_from:
    init_from = os.path.abspath(os.path.expanduser(init_from))
  cfg.init_from = init_from
  return cfg


def trial_config(config: ml_collections.ConfigDict, values: Mapping[str, Any]
                 ) -> ml_collections.ConfigDict:
  """`base` with `values` ({field path: value}) set; types checked by ml_collections."""
  cfg = base_config(config)
  for path, value in values.items():
    set_path(cfg, path, value)
  return cfg


def _literal(value: Any) -> str:
  if isinstance(value, float) and not math.isfinite(value):
    return f"float({str(value)!r})"
  if isinstance(value, (list, tuple)):
    inner = ", ".join(_literal(x) for x in value)
    return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
  return repr(value)


def render_config_py(cfg: ml_collections.ConfigDict, docstring: str) -> str:
  """A self-contained `configs/`-style Python file whose get_config() returns `cfg` (types and
  placeholders included, so --config.key=value overrides work on it as on the stage's config)."""
  lines = []

  def walk(node: ml_collections.ConfigDict, prefix: str) -> None:
    for key in node.keys():
      value = node[key]
      path = f"{prefix}.{key}"
      if isinstance(value, ml_collections.ConfigDict):
        lines.append(f"  {path} = ml_collections.ConfigDict()")
        walk(value, path)
      elif value is None and node.get_type(key) is not type(None):
        lines.append(f"  {path} = config_dict.placeholder({node.get_type(key).__name__})")
      else:
        lines.append(f"  {path} = {_literal(value)}")
  walk(cfg, "config")
  body = "\n".join(lines)
  return (f'r"""{docstring}\n"""\nimport ml_collections\nfrom ml_collections import config_dict\n'
          f"\n\ndef get_config(arg=None):  # pylint: disable=unused-argument\n"
          f"  config = ml_collections.ConfigDict()\n{body}\n  return config\n")


# --------------------------------------------------------------------------------------------------
# Validation.


def _check_stage_config(module: Any, cfg: ml_collections.ConfigDict, what: str, num_devices: int,
                        process_count: int) -> str | None:
  try:
    module.validate(cfg, num_devices=num_devices, process_count=process_count)
  except configlib.ConfigError as e:
    return f"{what}: {e}".replace("--config.", "--config.base.")
  return None


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Every check that needs no training; raises ConfigError naming each bad key and its fix."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  v = configlib.Validator(config)
  v.require(config.get("stage") == "tune", "stage",
            f"{config.get('stage')!r}; this stage runs configs with stage='tune'.")
  v.int_at_least("seed", 0)
  init_from = v.string("init_from")
  if init_from and "://" not in init_from:
    v.require(os.path.isdir(os.path.expanduser(init_from)), "init_from",
              f"{init_from!r} is not a directory; name the workdir of an earlier run, or ''.")
  stage = v.choice("tune.stage", STAGES)
  if stage and not (v.has("base.stage") and config.base.stage == stage):
    v.add("base.stage", f"{config.base.get('stage') if v.has('base') else None!r} does not match "
          f"tune.stage={stage!r}; build the config with configs/tune.py:stage={stage}.")
    stage = None
  v.positive_int("n_trials")
  v.number_in("timeout_secs", 0.0, 1e12)
  sampler = v.choice("sampler.name", SAMPLERS)
  v.int_at_least("sampler.startup_trials", 0, allow=(-1,))
  v.boolean("sampler.multivariate")
  if sampler == "gp":
    try:
      importlib.import_module("torch")
    except ImportError:
      v.add("sampler.name", "'gp' needs torch (pip install torch, or the project's 'reference' "
            "extra); or use sampler.name=tpe.")
  pruner = v.choice("pruner.name", PRUNERS)
  v.int_at_least("pruner.startup_trials", 0, allow=(-1,))
  v.int_at_least("pruner.warmup_steps", 0)
  v.int_at_least("pruner.min_resource", 1, allow=(-1,))
  v.int_at_least("pruner.max_resource", 1, allow=(-1,))
  v.int_at_least("pruner.reduction_factor", 2)
  storage = v.string("storage")
  if storage is not None:
    try:
      storage_spec(storage, "DIR")
    except ValueError as e:
      v.add("storage", str(e))
  name = v.string("study_name")
  v.require(bool(name), "study_name", "is empty; name the study, e.g. 'tune'.")
  v.int_at_least("heartbeat_secs", 0)
  v.string("enqueue")
  v.choice("keep_trial_workdirs", KEEP_WORKDIRS)
  v.choice("objective.direction", DIRECTIONS)
  metric = v.string("objective.metric")
  if process_count > 1:
    v.add("stage", f"tune runs its trials in one process per worker, but this job has "
          f"{process_count} processes; start several single-process workers on one study instead "
          f"(same --workdir or --config.storage=URL).")
  if stage is None:
    v.raise_if_any("tune config")
    return v

  module = stage_module(stage)
  reported = eval_metrics(stage, config.base)
  if metric is not None and metric not in reported:
    close = difflib.get_close_matches(metric, reported, n=1)
    v.add("objective.metric", f"{metric!r} is not reported by any {stage} eval; choose one of "
          f"{list(reported)}" + (f" (did you mean {close[0]!r}?)" if close else "") + ".")
  if metric and config.objective.get("direction") in DIRECTIONS:
    lower_better = "loss" in metric or metric == "nll"
    if lower_better != (config.objective.direction == "minimize"):
      logging.warning("objective %s with direction=%s: is that the intended direction?", metric,
                      config.objective.direction)
  params = parse_space(config, v)
  if not v.problems:
    parse_enqueue(config, params, v)
  v.raise_if_any("tune config")

  # The stage's own checks, on the base config and on each end of every range.
  problems = []
  base = base_config(config)
  problem = _check_stage_config(module, base, "base", num_devices, process_count)
  if problem:
    problems.append(problem)
  else:
    for p in params:
      for value in p.extremes():
        problem = _check_stage_config(module, trial_config(config, {p.field: value}),
                                      f"space.{p.name} at {p.field}={value!r}", num_devices,
                                      process_count)
        if problem:
          problems.append(problem)
  if problems:
    raise configlib.ConfigError(
        "Invalid tune config: the trial configs would fail the stage's checks (narrow the search "
        "range or fix base with --config.base.<key>=<value>):\n  " + "\n  ".join(problems))
  return v


# --------------------------------------------------------------------------------------------------
# Storage, budget lock, stale trials.


def storage_spec(storage: str, workdir: str) -> tuple[str, str]:
  """("rdb", URL) or ("journal", PATH) for config.storage; ValueError for anything else."""
  if not storage:
    return "rdb", f"sqlite:///{os.path.join(workdir, 'study.db')}"
  if storage == "journal":
    return "journal", os.path.join(workdir, "study.journal")
  if storage.startswith("journal:"):
    path = storage[len("journal:"):]
    if not path:
      raise ValueError("'journal:' needs a file path, e.g. journal:/shared/study.journal.")
    return "journal", os.path.abspath(os.path.expanduser(path))
  if "://" in storage:
    return "rdb", storage
  raise ValueError(f"{storage!r} is not '' (sqlite:///DIR/study.db), 'journal' (DIR/study.journal), "
                   f"'journal:PATH' or a database URL such as postgresql://user:pass@host/db or "
                   f"sqlite:///path/study.db.")


def make_storage(config: ml_collections.ConfigDict, workdir: str) -> optuna.storages.BaseStorage:
  kind, where = storage_spec(config.storage, workdir)
  if kind == "journal":
    os.makedirs(os.path.dirname(where), exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(where))
  if where.startswith("sqlite"):
    # Several processes on one SQLite file: wait for the write lock instead of failing with
    # "database is locked".
    engine_kwargs = {"connect_args": {"timeout": 600}}
  else:
    engine_kwargs = {"pool_pre_ping": True}
  beat = config.heartbeat_secs or None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RDBStorage(
        where, engine_kwargs=engine_kwargs, heartbeat_interval=beat,
        grace_period=3 * beat if beat else None,
        heartbeat_stale_trial_callback=requeue if beat else None)


class StudyLock:
  """An exclusive `fcntl` lock on DIR/study.lock, held while the budget is checked and the next
  trial is created (the objective releases it as soon as its trial is RUNNING)."""

  def __init__(self, path: str):
    self.path = path
    self._fd: int | None = None

  def acquire(self) -> "StudyLock":
    if self._fd is None:
      fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
      fcntl.flock(fd, fcntl.LOCK_EX)
      self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "StudyLock":
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial,
            reason: str = "its worker stopped sending heartbeats") -> None:
  """Re-queues a trial whose worker died: a WAITING copy (same parameters and intermediate values)
  with user attr retry_of=<its number>. Also optuna's failed_trial_callback for heartbeats."""
  attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "fail_reason")}
  attrs["retry_of"] = trial.number
  study.add_trial(optuna.trial.create_trial(
      state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
      user_attrs=attrs, intermediate_values=trial.intermediate_values))
  logging.warning("Trial %d failed because %s: re-queued with the same parameters (the retry "
                  "resumes from the trial's last checkpoint).", trial.number, reason)


def _worker_info() -> dict[str, Any]:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid,
          "start_time": ckpt_lib._proc_start_time(pid)}  # pylint: disable=protected-access


def recover_trials(study: optuna.Study) -> list[int]:
  """Marks FAILED and re-queues the RUNNING trials of dead processes on this host (SIGKILL, a
  crash, SIGTERM's SystemExit), and re-queues interrupted (Ctrl-C) ones; returns their numbers."""
  host, failed = socket.gethostname(), []
  storage = study._storage  # pylint: disable=protected-access
  study_id = storage.get_study_id_from_name(study.study_name)
  trials = study.get_trials(deepcopy=False)
  retried = {t.user_attrs.get("retry_of") for t in trials}
  for t in trials:
    if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
      requeue(study, t, "it was interrupted")
      failed.append(t.number)
  for t in trials:
    if t.state != TrialState.RUNNING:
      continue
    worker = t.user_attrs.get("worker") or {}
    if worker.get("host") != host or worker.get("pid") == os.getpid():
      continue
    if ckpt_lib._proc_alive(int(worker["pid"]), worker.get("start_time")):  # pylint: disable=protected-access
      continue
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
    try:
      storage.set_trial_user_attr(trial_id, "fail_reason",
                                  f"worker pid {worker['pid']} on {host} died")
      storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
      continue  # finished meanwhile
    requeue(study, t, f"its worker (pid {worker['pid']}) is gone")
    failed.append(t.number)
  return failed


def budget_used(trials: Iterable[optuna.trial.FrozenTrial]) -> int:
  """Trials that count towards n_trials: finished or running, except failures that were requeued
  (their retry counts instead). WAITING trials count once they run."""
  trials = list(trials)
  retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
  return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED,
                                              TrialState.RUNNING)
             or (t.state == TrialState.FAIL and t.number not in retried))


# --------------------------------------------------------------------------------------------------
# Sampler and pruner.


def startup_trials(config: ml_collections.ConfigDict) -> int:
  n = config.sampler.startup_trials
  return max(2, config.n_trials // 4) if n == -1 else n


def make_sampler(config: ml_collections.ConfigDict, seed: int) -> optuna.samplers.BaseSampler:
  n = startup_trials(config)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    if config.sampler.name == "tpe":
      return optuna.samplers.TPESampler(n_startup_trials=n, seed=seed,
                                        multivariate=config.sampler.multivariate)
    if config.sampler.name == "gp":
      return optuna.samplers.GPSampler(n_startup_trials=n, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(config: ml_collections.ConfigDict) -> optuna.pruners.BasePruner:
  p, base = config.pruner, config.base
  if p.name == "median":
    startup = max(2, config.n_trials // 5) if p.startup_trials == -1 else p.startup_trials
    return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=p.warmup_steps)
  if p.name == "hyperband":
    min_resource = base.eval.every_steps if p.min_resource == -1 else p.min_resource
    max_resource: int | str = p.max_resource
    if max_resource == -1:
      max_resource = base.train.num_steps if base.train.num_steps > 0 else "auto"
    return optuna.pruners.HyperbandPruner(min_resource=max(1, min_resource),
                                          max_resource=max_resource,
                                          reduction_factor=p.reduction_factor)
  return optuna.pruners.NopPruner()


def describe_search(config: ml_collections.ConfigDict, pruner: optuna.pruners.BasePruner) -> str:
  s = config.sampler
  if s.name == "random":
    text = "random sampler"
  else:
    rule = "max(2, n_trials // 4)" if s.startup_trials == -1 else "sampler.startup_trials"
    text = (f"{s.name.upper()} sampler: {startup_trials(config)} random startup trials of "
            f"{config.n_trials} (n_startup_trials = {rule}), then model-based")
  if isinstance(pruner, optuna.pruners.MedianPruner):
    text += (f"; median pruner after {pruner._n_startup_trials} finished trial(s), from step "  # pylint: disable=protected-access
             f"{pruner._n_warmup_steps}")  # pylint: disable=protected-access
  elif isinstance(pruner, optuna.pruners.HyperbandPruner):
    text += (f"; Hyperband pruner (min_resource {pruner._min_resource}, max_resource "  # pylint: disable=protected-access
             f"{pruner._max_resource}, reduction factor {pruner._reduction_factor})")  # pylint: disable=protected-access
  else:
    text += "; no pruning"
  return text


# --------------------------------------------------------------------------------------------------
# Trials.


def trial_dir(workdir: str, number: int) -> str:
  return os.path.join(workdir, TRIALS_DIR, str(number))


def read_evals(workdir: str) -> dict[int, dict[str, Any]]:
  """{step: eval record} from DIR/metrics.jsonl (the last record of a step wins)."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if record.get("split") == "eval":
          out[int(record["step"])] = record
  return out


def trial_value(stage: str, summary: Mapping[str, Any], workdir: str, metric: str
                ) -> tuple[float, int]:
  """(value, step): `metric` at the eval of the model the stage delivers."""
  if stage == "finetune":
    step = summary["best_step"]
    record = read_evals(workdir).get(step)
  else:
    record = summary.get("final_eval") or {}
    step = record.get("step", summary.get("step"))
  if not record or metric not in record:
    raise ValueError(f"The {stage} run in {workdir} has no eval of {metric!r} at step {step} "
                     f"(eval record: {record}); objective.metric must be one its evals report.")
  return float(record[metric]), int(step)


class PruningHook:
  """`on_eval(step, metrics)` for the training loop: reports the objective metric to the trial and
  raises optuna.TrialPruned when the pruner says so (this stops the whole stage run)."""

  def __init__(self, trial: optuna.Trial, metric: str, reported: Iterable[int] = ()):
    self.trial = trial
    self.metric = metric
    self.reported = set(reported)

  def __call__(self, step: int, metrics: Mapping[str, Any]) -> bool:
    if self.metric not in metrics:
      raise ValueError(f"objective.metric={self.metric!r} is not among this run's eval metrics "
                       f"{sorted(metrics)}.")
    value = float(metrics[self.metric])
    if step not in self.reported:
      self.trial.report(value, step)
      self.reported.add(step)
    if self.trial.should_prune():
      self.trial.set_user_attr("pruned_at_step", int(step))
      raise optuna.TrialPruned(f"pruned at step {step} ({self.metric}={value:.4g}).")
    return False


@dataclasses.dataclass
class _Search:
  """What every trial of one worker shares."""
  config: ml_collections.ConfigDict
  workdir: str
  params: list[Param]
  module: Any
  lock: StudyLock

  @property
  def stage(self) -> str:
    return self.config.tune.stage

  def values_of(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {p.field: p.from_optuna(trial.params[p.optuna_name]) for p in self.params
            if p.optuna_name in trial.params}


def _adopt_workdir(study: optuna.Study, trial: optuna.Trial, tdir: str) -> list[int]:
  """A retry takes over the killed trial's workdir (to resume from its checkpoint); returns the
  steps already reported there."""
  retry_of = trial.user_attrs.get("retry_of")
  if retry_of is None:
    return []
  old = trial_dir(os.path.dirname(os.path.dirname(tdir)), retry_of)
  if os.path.isdir(old) and not os.path.exists(tdir):
    os.rename(old, tdir)
    logging.info("Trial %d continues trial %d's run (moved %s -> %s).", trial.number, retry_of,
                 old, tdir)
  previous = {t.number: t for t in study.get_trials(deepcopy=False)}
  return list(previous[retry_of].intermediate_values) if retry_of in previous else []


def _objective(search: _Search, study: optuna.Study, trial: optuna.Trial) -> float:
  try:
    trial.set_user_attr("worker", _worker_info())
  finally:
    search.lock.release()  # the trial is RUNNING and recorded: other workers may go on
  values = {p.field: p.suggest(trial) for p in search.params}
  trial.set_user_attr("config_values", values)
  tdir = trial_dir(search.workdir, trial.number)
  reported = _adopt_workdir(study, trial, tdir)
  cfg = trial_config(search.config, values)
  logging.info("Trial %d: %s -> %s", trial.number,
               ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in values.items()), tdir)
  kwargs = {}
  if "on_eval" in inspect.signature(search.module.run).parameters:  # report even with no pruner
    kwargs["on_eval"] = PruningHook(trial, search.config.objective.metric, reported)
  try:
    summary = search.module.run(cfg, tdir, **kwargs)
  except loop_lib.NonFiniteError as e:
    trial.set_user_attr("fail_reason", f"non-finite loss: {e}")
    raise
  except KeyboardInterrupt:  # optuna marks it FAILED; the next run re-queues it
    trial.set_user_attr("fail_reason", "interrupted (KeyboardInterrupt)")
    trial.set_user_attr("interrupted", True)
    raise
  value, step = trial_value(search.stage, summary, tdir, search.config.objective.metric)
  trial.set_user_attr("result", {"step": step, "steps_trained": summary.get("step"),
                                 "status": summary.get("status")})
  return value


def _cleanup(search: _Search, study: optuna.Study) -> None:
  """Deletes finished trials' workdirs per keep_trial_workdirs (a requeued trial's is kept for its
  retry; the best complete trial's is kept under 'best')."""
  keep = search.config.keep_trial_workdirs
  if keep == "all":
    return
  trials = study.get_trials(deepcopy=False)
  best = _best_trial(study)
  pending_retry = {t.user_attrs.get("retry_of") for t in trials
                   if t.state in (TrialState.WAITING, TrialState.RUNNING)}
  for t in trials:
    if t.state not in FINISHED or t.number in pending_retry:
      continue
    if keep == "best" and best is not None and t.number == best.number:
      continue
    tdir = trial_dir(search.workdir, t.number)
    if os.path.isdir(tdir):
      shutil.rmtree(tdir, ignore_errors=True)


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
  try:
    return study.best_trial
  except ValueError:  # no complete trial yet
    return None


def _after_trial(search: _Search, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
  _cleanup(search, study)
  jax.clear_caches()  # each trial compiles its own steps; do not keep them all
  counts = {s.name: n for s, n in _state_counts(study.get_trials(deepcopy=False)).items() if n}
  logging.info("Trial %d %s%s; study now %s.", trial.number, trial.state.name,
               f" value={trial.value:.4g}" if trial.value is not None else "", counts)


def _state_counts(trials: Iterable[optuna.trial.FrozenTrial]) -> dict[TrialState, int]:
  counts = {s: 0 for s in TrialState}
  for t in trials:
    counts[t.state] += 1
  return counts


# --------------------------------------------------------------------------------------------------
# Report.


def _trial_rows(search: _Search, trials: Sequence[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
  rows = []
  retries = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
  for t in trials:
    result = t.user_attrs.get("result") or {}
    last_step = max(t.intermediate_values) if t.intermediate_values else None
    notes = []
    if "retry_of" in t.user_attrs:
      notes.append(f"retry of {t.user_attrs['retry_of']}")
    if t.user_attrs.get("enqueued"):
      notes.append(f"enqueued ({t.user_attrs['enqueued']})")
    if t.user_attrs.get("fail_reason"):
      notes.append(t.user_attrs["fail_reason"][:120])
    if t.number in retries:
      notes.append(f"re-queued as {retries[t.number]}")
    rows.append({
        "number": t.number, "state": t.state.name, "value": t.value,
        "values": search.values_of(t), "params": dict(t.params),
        "steps": (t.user_attrs.get("pruned_at_step") if t.state == TrialState.PRUNED
                  else result.get("steps_trained", last_step)),
        "value_step": result.get("step"),
        "intermediate": {int(k): v for k, v in sorted(t.intermediate_values.items())},
        "secs": t.duration.total_seconds() if t.duration else None,
        "workdir": trial_dir(search.workdir, t.number), "notes": "; ".join(notes),
    })
  return rows


def _plot_history(rows: Sequence[Mapping[str, Any]], path: str, metric: str,
                  maximize: bool) -> str | None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top,unused-import
  done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
  pruned = [r for r in rows if r["state"] == "PRUNED" and r["value"] is not None]
  if not done and not pruned:
    return None
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.scatter([r["number"] for r in done], [r["value"] for r in done], label="complete", zorder=3)
  ax1.scatter([r["number"] for r in pruned], [r["value"] for r in pruned], marker="x",
              color="gray", label="pruned (last reported)", zorder=3)
  best, xs, ys = None, [], []
  for r in sorted(done, key=lambda r: r["number"]):
    if best is None or (r["value"] > best if maximize else r["value"] < best):
      best = r["value"]
    xs.append(r["number"])
    ys.append(best)
  if xs:
    ax1.step(xs, ys, where="post", color="C3", label="best so far")
  ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax1.set_xlabel("trial")
  ax1.set_ylabel(metric)
  ax1.set_title("Optimisation history")
  ax1.legend(fontsize=8)
  for r in rows:
    if r["intermediate"]:
      steps, vals = zip(*sorted(r["intermediate"].items()))
      ax2.plot(steps, vals, "--" if r["state"] == "PRUNED" else "-", marker=".", alpha=0.8,
               label=f"{r['number']} {r['state'].lower()}")
  ax2.set_xlabel("training step")
  ax2.set_ylabel(f"eval {metric}")
  ax2.set_title("Reported at each eval (dashed: pruned)")
  if 0 < len(rows) <= 12 and any(r["intermediate"] for r in rows):
    ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
  """({param: importance}, method): fANOVA (optuna's default; needs scikit-learn), else PED-ANOVA
  (no extra dependency; coarse with few trials)."""
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if len(complete) < 2:
    return None, f"needs 2 complete trials, the study has {len(complete)}"
  try:
    importlib.import_module("sklearn")
    evaluator, method = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
  except ImportError:
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    method = "PED-ANOVA (install scikit-learn for fANOVA)"
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), method
  except (ValueError, RuntimeError, ZeroDivisionError) as e:
    return None, f"{method} failed: {type(e).__name__}: {e}"


def _plot_importances(importances: Mapping[str, float], path: str, method: str) -> str | None:
  if not importances:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(importances)[::-1]
  fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
  ax.barh(names, [importances[n] for n in names])
  ax.set_xlabel("importance")
  ax.set_title(f"Parameter importances ({method.split(' (')[0]})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def _write_report(path: str, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
  from r1jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  s = summary
  lines = [f"# Hyperparameter search: study `{s['study_name']}`", ""]
  lines.append(f"- trials run `{s['trial_stage']}` ({s['variant']}) from `base`; objective: "
               f"{s['direction']} eval `{s['metric']}` (at the model the stage delivers)")
  lines.append(f"- budget {s['n_trials']} trials; states: " +
               ", ".join(f"{k.lower()} {v}" for k, v in s["states"].items() if v))
  lines.append(f"- {s['search']}")
  lines.append(f"- storage: `{s['storage']}`")
  lines.append("- search space: " + "; ".join(f"`{f}` {d}" for f, d in s["space"].items()))
  best = s.get("best")
  if best:
    values = ", ".join(f"`{k}`={_fmt(v)}" for k, v in best["config_values"].items())
    lines += ["", "## Best trial", "",
              f"Trial {best['number']}: {s['metric']} = {best['value']:.4f} with {values}.", "",
              "Run it on its own (the same config, a fresh workdir):", "", "```",
              f"python -m r1jax.main --config={s['best_config_py']} --workdir=BEST_RUN", "```"]
  else:
    lines += ["", "No trial has completed yet."]
  fields = list(s["space"])
  lines += ["", "## Trials", ""]
  lines.append(eval_lib.markdown_table(
      ["#", "state", s["metric"]] + fields + ["steps", "secs", "notes"],
      [[r["number"], r["state"].lower(), r["value"]] + [r["values"].get(f) for f in fields]
       + [r["steps"], r["secs"], r["notes"]] for r in rows]))
  lines.append("Pruned trials show the last value they reported; `steps` is where they stopped.")
  if s.get("history_png"):
    lines += ["", "## Optimisation history", "", f"![history]({os.path.basename(s['history_png'])})"]
  lines += ["", "## Parameter importances", ""]
  if s.get("importances"):
    lines.append(f"Method: {s['importances_method']}, over the complete trials.\n")
    lines.append(eval_lib.markdown_table(("parameter", "importance"),
                                         list(s["importances"].items())))
    if s.get("importances_png"):
      lines.append(f"![importances]({os.path.basename(s['importances_png'])})")
  else:
    lines.append(f"Not available: {s['importances_method']}.")
  text = "\n".join(lines) + "\n"
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write_outputs(search: _Search, study: optuna.Study, *, storage_desc: str, search_desc: str,
                  wall_secs: float, ran: int) -> dict[str, Any]:
  """DIR/summary.json, report.md, history/importances PNGs and, once a trial completed,
  best_config.py/.json."""
  config, workdir = search.config, search.workdir
  trials = study.get_trials(deepcopy=False)
  rows = _trial_rows(search, trials)
  metric, maximize = config.objective.metric, config.objective.direction == "maximize"
  best = _best_trial(study)
  summary: dict[str, Any] = {
      "stage": "tune", "study_name": config.study_name, "storage": storage_desc,
      "variant": config.base.model.variant, "trial_stage": search.stage,
      "metric": metric, "direction": config.objective.direction, "n_trials": config.n_trials,
      "budget_used": budget_used(trials),
      "states": {s.name: n for s, n in _state_counts(trials).items()},
      "search": search_desc, "sampler": config.sampler.name, "pruner": config.pruner.name,
      "n_startup_trials": startup_trials(config),
      "space": {p.field: p.describe() for p in search.params},
      "trials_run_by_this_worker": ran, "wall_secs": wall_secs,
      "trials": rows,
  }
  if best is not None:
    values = search.values_of(best)
    cfg = trial_config(config, values)
    json_path = os.path.join(workdir, "best_config.json")
    py_path = os.path.join(workdir, "best_config.py")
    doc = (f"Best trial {best.number} of study {config.study_name!r} ({metric} = {best.value:.6g}, "
           f"{config.objective.direction}); written by r1jax.stages.tune.\n\n"
           f"    python -m r1jax.main --config={py_path} --workdir=BEST_RUN\n\n"
           f"Searched values: {json.dumps(values)}")
    metrics_lib.write_json(json_path, configlib.to_dict(cfg))
    with open(py_path + ".tmp", "w") as f:
      f.write(render_config_py(cfg, doc))
    os.replace(py_path + ".tmp", py_path)
    summary["best"] = {"number": best.number, "value": best.value, "params": dict(best.params),
                       "config_values": values, "workdir": trial_dir(workdir, best.number),
                       "result": best.user_attrs.get("result")}
    summary["best_config_py"] = py_path
    summary["best_config_json"] = json_path
    summary["best_command"] = f"python -m r1jax.main --config={py_path} --workdir=BEST_RUN"
  importances, method = _importances(study)
  summary["importances"] = importances
  summary["importances_method"] = method
  summary["importances_png"] = _plot_importances(importances or {},
                                                 os.path.join(workdir, "importances.png"), method)
  summary["history_png"] = _plot_history(rows, os.path.join(workdir, "history.png"), metric,
                                         maximize)
  _write_report(os.path.join(workdir, "report.md"), summary, rows)
  summary["report"] = os.path.join(workdir, "report.md")
  metrics_lib.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


# --------------------------------------------------------------------------------------------------
# Entry point.


def _open_study(config: ml_collections.ConfigDict, storage: optuna.storages.BaseStorage,
                params: Sequence[Param], pruner: optuna.pruners.BasePruner) -> optuna.Study:
  """Loads or creates the study (call with the study lock held). A new study gets the first trial
  enqueued; the sampler seed is config.seed + the number of trials already there, so a rerun or
  a second worker does not replay the first one's random startup trials."""
  try:
    existing = optuna.load_study(study_name=config.study_name, storage=storage)
    n_existing = len(existing.get_trials(deepcopy=False))
    existing_direction = existing.direction.name.lower()
    if existing_direction != config.objective.direction:
      raise configlib.ConfigError(
          f"objective.direction={config.objective.direction!r} but study {config.study_name!r} in "
          f"this storage was created with {existing_direction!r}; use another --workdir or "
          f"--config.study_name.")
  except KeyError:
    n_existing = 0
  study = optuna.create_study(
      study_name=config.study_name, storage=storage, load_if_exists=True,
      direction=config.objective.direction, pruner=pruner,
      sampler=make_sampler(config, config.seed + n_existing))
  if n_existing == 0:
    study.set_user_attr("metric", config.objective.metric)
    study.set_user_attr("trial_stage", config.tune.stage)
    first = parse_enqueue(config, params, configlib.Validator(config))
    if first:
      by_field = {p.field: p for p in params}
      study.enqueue_trial({by_field[f].optuna_name: by_field[f].to_optuna(v)
                           for f, v in first.items()},
                          user_attrs={"enqueued": config.enqueue})
      logging.info("Enqueued the first trial (%s): %s", config.enqueue, first)
  else:
    saved = study.user_attrs.get("metric")
    if saved and saved != config.objective.metric:
      raise configlib.ConfigError(
          f"objective.metric={config.objective.metric!r} but study {config.study_name!r} holds "
          f"values of {saved!r}; use another --workdir or --config.study_name.")
  return study


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or continues, or only reports a finished) search; returns DIR/summary.json's dict."""
  validate(config)
  module = stage_module(config.tune.stage)
  if config.pruner.name != "none" and "on_eval" not in inspect.signature(module.run).parameters:
    raise configlib.ConfigError(
        f"pruner.name={config.pruner.name!r}: r1jax.stages.{config.tune.stage}.run does not accept "
        f"on_eval, so trials cannot report to a pruner; set --config.pruner.name=none.")
  os.makedirs(os.path.join(workdir, TRIALS_DIR), exist_ok=True)
  params = parse_space(config, configlib.Validator(config))
  configlib.write_config_json(config, workdir, space={p.field: p.describe() for p in params},
                              metrics=list(eval_metrics(config.tune.stage, config.base)))
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  kind, where = storage_spec(config.storage, workdir)
  storage_desc = where if kind == "rdb" else f"journal:{where}"
  pruner = make_pruner(config)
  lock = StudyLock(os.path.join(workdir, "study.lock"))
  search = _Search(config=config, workdir=workdir, params=params, module=module, lock=lock)
  with lock:  # workers starting together must not create the tables or the study twice
    storage = make_storage(config, workdir)
    study = _open_study(config, storage, params, pruner)
    failed = recover_trials(study)
    trials = study.get_trials(deepcopy=False)
  search_desc = describe_search(config, pruner)
  logging.info("Study %r in %s: %d trial(s) so far (%d counted of the budget of %d)%s. %s.",
               config.study_name, storage_desc, len(trials), budget_used(trials), config.n_trials,
               f"; re-queued the killed trial(s) {failed}" if failed else "", search_desc)
  started, ran = time.time(), 0
  while True:
    if config.timeout_secs and time.time() - started > config.timeout_secs:
      logging.info("timeout_secs=%g reached; starting no more trials.", config.timeout_secs)
      break
    lock.acquire()
    try:
      recover_trials(study)
      used = budget_used(study.get_trials(deepcopy=False))
      if used >= config.n_trials:
        break
      study.optimize(lambda t: _objective(search, study, t), n_trials=1,
                     catch=(loop_lib.NonFiniteError,), gc_after_trial=True,
                     callbacks=[lambda s, t: _after_trial(search, s, t)])
      ran += 1
    finally:
      lock.release()
  with lock:
    summary = write_outputs(search, study, storage_desc=storage_desc, search_desc=search_desc,
                            wall_secs=time.time() - started, ran=ran)
  best = summary.get("best")
  logging.info("Search done: %d trial(s) here, study %s. Best: %s. Report: %s", ran,
               {k: v for k, v in summary["states"].items() if v},
               f"trial {best['number']} {config.objective.metric}={best['value']:.4f}; run it with "
               f"`{summary['best_command']}`" if best else "none complete",
               summary["report"])
  return summary
