"""The hyperparameter search's space: `config.space` parsed and checked against the base config.

    params = tune_space.parse_space(config, v)          # [Param], problems collected in `v`
    values = {p.field: p.suggest(trial) for p in params}
    first = tune_space.parse_enqueue(config, params, v)  # the first trial's {field: value}

Each entry of `config.space` names a field of the base stage config (`field`, a dotted path such as
"train.learning_rate") and how to sample it (`type` float | int | pow2 | categorical | off, `low`,
`high`, `log`, `step`, `choices`). A field must exist in `base` with a matching type; a range must
be non-empty and, for log scales, positive. Every problem names the key and its fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Sequence

import ml_collections
import optuna

from r1jax import configlib

PARAM_TYPES = ("float", "int", "pow2", "categorical", "off")


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
  leaves = configlib.leaf_paths(base)
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
      typ = configlib.field_type(base, path)
    except (KeyError, AttributeError):
      close = difflib.get_close_matches(path, leaves, n=2, cutoff=0.8)
      v.add(f"{key}.field", f"{path!r} is not a field of the base {config.tune.stage} config"
            + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else
               "; fields look like 'train.learning_rate', 'model.dropout'."))
      continue
    if path in seen:
      v.add(f"{key}.field", f"{path!r} is already searched by space.{seen[path]}.")
      continue
    seen[path] = name
    low, high, log, step = entry.get("low"), entry.get("high"), entry.get("log"), entry.get("step")
    if kind == "categorical":
      texts = [c for c in str(entry.get("choices") or "").split(",") if c.strip()]
      if not texts:
        v.add(f"{key}.choices", "is empty; list the values comma-separated, e.g. '32,64'.")
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
        values[path] = _parse_choice(text, configlib.field_type(config.base, path))
      except ValueError as e:
        v.add("enqueue", f"{item!r}: {e}.")
  for p in params:  # the rest from base (a None placeholder: left to the sampler)
    if p.field not in values and configlib.get_path(config.base, p.field) is not None:
      values[p.field] = configlib.get_path(config.base, p.field)
  for path, value in values.items():
    p = by_field[path]
    if not p.contains(value):
      v.add("enqueue", f"the first trial's {path}={value!r} is outside space.{p.name} "
            f"({p.describe()}); widen the range, give another value "
            f"(--config.enqueue={path}=...), or --config.enqueue='' to enqueue nothing.")
  return values
