"""Config helpers shared by every stage: common sections, `arg` parsing and up-front validation.

Configs are `ml_collections.ConfigDict`s built by `configs/<stage>.py:get_config(arg)`; the files
ship in the package (`r1jax/configs/`, `CONFIG_DIR`), and `resolve_config` is the one place that
turns what a user wrote (`configs/pretrain.py`, `pretrain`, a path of their own) into a file, for
the command line and `load_config` alike. The command line locks them, so unknown keys and wrong
types are already rejected by `ml_collections`; this module checks values and combinations (ranges,
choices, mesh vs device count, batch vs data-parallel size) before anything is compiled, and reports
every problem at once with the key and the fix:

    problems = Validator(config)
    problems.positive_int("train.batch_size")
    problems.raise_if_any()   # ConfigError listing all problems

Sections built here (`mesh_section`, `train_section`, ...) keep the key names that scripts rely on
(`train.num_steps`, `train.batch_size`, `checkpoint.every_steps`, `init_from`) identical across stages.

The config tree by dotted path (`get_path`, `set_path`, `field_type`, `leaf_paths`) and
`render_config_py` (a config back to a `configs/`-style file) serve the stages that build configs of
other stages (the hyperparameter search).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
from ml_collections import config_dict

from r1jax import errors
from r1jax import remote
from r1jax import run_dir
from r1jax.model import axes
from r1jax.model import transformer_xl

SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16")


def _config_type(annotation: Any) -> type:
  """The config type of a TransformerXLConfig field: int / float / bool / tuple (per-layer sizes),
  else str (dtypes are given by name in configs). Annotations are strings under
  `from __future__ import annotations`."""
  name = getattr(annotation, "__name__", str(annotation))
  if name.startswith("tuple"):
    return tuple
  return {"int": int, "float": float, "bool": bool}.get(name, str)


# Every field of `r1jax.model.transformer_xl.TransformerXLConfig`, which a config may override, with
# its config type. `None` (the placeholder default) means "the variant's value".
MODEL_OVERRIDES = {f.name: _config_type(f.type)
                   for f in dataclasses.fields(transformer_xl.TransformerXLConfig)}


class ConfigError(errors.UserError, ValueError):
  """A config value or combination that cannot work; the message names each key and its fix."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `get_config`'s argument "variant=tiny,foo=1" into a ConfigDict over `defaults`.

  Each key must appear in `defaults`; the value is converted to the default's type.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ConfigError(f"Config argument {item!r} is not of the form key=value with key in "
                        f"{sorted(defaults)}; e.g. configs/pretrain.py:variant=tiny.")
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.strip().lower() in ("1", "true", "yes")
    elif default is None or isinstance(default, str):
      out[key] = value.strip()
    else:
      out[key] = type(default)(value)
  return ml_collections.ConfigDict(out)


# The stage configs shipped in the package; a clone's `configs` links to this folder.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# The folders a config name may carry and still mean the shipped file when no such file exists
# here: "configs/pretrain.py", the docs' spelling in a clone, runs from anywhere with a wheel.
_SHIPPED_FOLDERS = ("", "configs", os.path.join("r1jax", "configs"))


def shipped_configs() -> list[str]:
  """The names of the configs shipped with r1jax: ["compare", "data", ..., "tune"]."""
  return sorted(name[:-3] for name in os.listdir(CONFIG_DIR)
                if name.endswith(".py") and not name.startswith("_"))


def resolve_config(spec: str) -> str:
  """The config file that `spec` ("PATH[:arg]", what `--config=` takes) names, as "file[:arg]".

  PATH itself when that file exists (relative to the current directory, or absolute); else the
  shipped config PATH names: "pretrain", "pretrain.py" and "configs/pretrain.py" all mean
  r1jax/configs/pretrain.py. Raises InputNotFound, listing the shipped names, when neither exists.
  """
  path, sep, arg = spec.partition(":")
  if os.path.isfile(os.path.expanduser(path)):
    return os.path.expanduser(path) + sep + arg
  folder, name = os.path.split(os.path.normpath(path))
  name = name[:-3] if name.endswith(".py") else name
  if folder in _SHIPPED_FOLDERS and name in shipped_configs():
    return os.path.join(CONFIG_DIR, f"{name}.py") + sep + arg
  raise errors.InputNotFound(
      f"{path}: no such config file here ({os.getcwd()}), nor a config shipped with r1jax "
      f"({', '.join(shipped_configs())}); e.g. --config=pretrain:variant=tiny.")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads "configs/pretrain.py[:arg]" (or "pretrain[:arg]", any `resolve_config` spelling) like
  `--config=` does (for tests and notebooks)."""
  path, _, arg = resolve_config(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location(
      f"r1jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


# --------------------------------------------------------------------------------------------------
# Common sections.


def mesh_section(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Device mesh axes; -1 on one axis means "all remaining devices"."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def check_variant(variant: str) -> None:
  if variant not in transformer_xl.VARIANTS:
    raise ConfigError(f"variant={variant!r} is not one of {tuple(transformer_xl.VARIANTS)}; e.g. "
                      f"configs/pretrain.py:variant=tiny.")


def variant_vocab_size(variant: str) -> int:
  """The vocabulary of model variant `variant`: what a tokenizer trained for that model needs."""
  return transformer_xl.get_variant(variant).vocab_size


def model_section(variant: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`model.variant` plus one typed placeholder per TransformerXLConfig field (None = variant's)."""
  section = ml_collections.ConfigDict()
  section.variant = variant
  for name, typ in MODEL_OVERRIDES.items():
    value = overrides.pop(name, None)
    section[name] = config_dict.placeholder(typ) if value is None else value
  if overrides:
    raise ConfigError(f"model_section: unknown model fields {sorted(overrides)}; "
                      f"choose from {sorted(MODEL_OVERRIDES)}.")
  return section


def model_overrides(model_cfg: ml_collections.ConfigDict,
                    pretrained: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The model fields a config sets explicitly (not None), for `get_variant(variant, **overrides)`,
  plus the architecture fields `pretrained` ({field: value} of the init_from run,
  `run_dir.architecture_of`) sets and the config does not: a run that starts from another one's
  weights gets its shapes whatever variant it names."""
  out = {k: model_cfg[k] for k in MODEL_OVERRIDES if k in model_cfg and model_cfg[k] is not None}
  for name, value in (pretrained or {}).items():
    if name in run_dir.ARCHITECTURE_FIELDS and name not in out and value is not None:
      out[name] = value
  return out


def train_section(**values: Any) -> ml_collections.ConfigDict:
  """Optimisation and loop settings shared by every training stage (defaults can be overridden)."""
  section = ml_collections.ConfigDict(dict(
      num_steps=-1,            # optimizer steps; -1 derives them from num_epochs and the data size
      num_epochs=1.0,          # used only when num_steps == -1
      batch_size=32,           # global batch (rows) per optimizer step, across all processes
      learning_rate=1e-4,      # peak learning rate
      schedule="linear",       # decay after warmup: linear | cosine | constant
      warmup_steps=-1,         # -1 (or not shorter than the run): warmup_fraction of num_steps
      warmup_fraction=0.1,
      end_lr_fraction=0.0,     # final learning rate as a fraction of the peak
      weight_decay=0.01,       # AdamW decoupled decay (not on biases, LayerNorm, 1-d params)
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip_norm=1.0,      # global-norm clipping; 0 disables
      label_smoothing=0.0,
      grad_accum_steps=1,      # micro-batches per optimizer step (batch_size must divide evenly)
      steps_per_call=0,        # optimizer steps per jitted call (lax.scan); 0 = auto (CPU: <= 16)
      skip_nonfinite=False,    # False: stop at a NaN/inf step; True: skip it and count skips
      log_every_steps=10,
      peak_flops=0.0,          # accelerator peak FLOP/s for MFU (all devices); 0 = table/measure
      progress_bar=True,
      time_budget_minutes=0.0,  # > 0: fewer steps when the step rate measured at the start says
                                # num_steps would not fit (evals included); training also stops,
                                # checkpointed, at 1.25x this. 0 = no budget
  ))
  section.update(values)
  return section


def eval_section(**values: Any) -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict(dict(
      every_steps=100,              # 0 disables periodic eval (the final eval still runs)
      num_batches=8,                # held-out batches per eval
      early_stopping_patience=3,    # evals without improvement before stopping; 0 disables
      early_stopping_min_delta=0.0,  # least gain (metric units, e.g. 0.005 accuracy) that resets
                                    # the patience; the best checkpoint still takes any gain
      best_metric="loss",           # eval metric that picks the best checkpoint and drives the
                                    # patience: loss/nll lower is better, accuracy/F1 higher
  ))
  section.update(values)
  return section


def checkpoint_section(**values: Any) -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict(dict(
      every_steps=500,          # periodic save; the final step is always saved
      max_to_keep=2,            # last N periodic checkpoints kept ...
      keep_best=1,              # ... plus the best N by eval loss
      async_save=True,          # write in a background thread while training continues
      sigterm_grace_secs=60.0,  # on SIGTERM: save and exit within this time
  ))
  section.update(values)
  return section


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-ready plain dict of a (resolved) config."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def write_config_json(config: ml_collections.ConfigDict, workdir: str, **resolved: Any) -> str:
  """Writes DIR/config.json: the config plus values resolved at run time (e.g. derived num_steps)."""
  data = to_dict(config)
  if resolved:
    data["resolved"] = resolved
  return run_dir.write_text(os.path.join(workdir, run_dir.CONFIG_FILE),
                            json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# The config tree by dotted path, and a config back to a configs/-style file.


def get_path(config: ml_collections.ConfigDict, path: str) -> Any:
  """`config.a.b.c` for path "a.b.c"; KeyError (or AttributeError below a leaf) if absent."""
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def set_path(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """`config.a.b.c = value` for path "a.b.c" (type-checked by ml_collections)."""
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
  """The dotted paths of every leaf (non-section) field of `config`, in key order."""
  out = []
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out += leaf_paths(value, path + ".")
    else:
      out.append(path)
  return out


def _literal(value: Any) -> str:
  """Python source for a config value (non-finite floats and 1-tuples included)."""
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


def resolve_mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes with -1 resolved; raises ConfigError naming the fix."""
  sizes = [mesh_cfg[a] for a in axes.MESH_AXES]
  for axis, size in zip(axes.MESH_AXES, sizes):
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis}={size!r} must be a positive int or -1 (= the remaining "
                        f"devices).")
  free = [a for a, s in zip(axes.MESH_AXES, sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh axes {free} are all -1; at most one axis may be -1 (set the others to "
                      f"explicit sizes).")
  fixed = math.prod(s for s in sizes if s != -1)
  shape_str = "x".join(str(s) for s in sizes)
  if fixed > num_devices:
    raise ConfigError(f"mesh {shape_str} (data x fsdp x tensor) needs {fixed} devices but "
                      f"{num_devices} are available; make the product of the fixed axes at most "
                      f"{num_devices}.")
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh {shape_str} (data x fsdp x tensor): the fixed axes use {fixed} devices, "
                        f"which does not divide the {num_devices} devices available; choose sizes "
                        f"whose product divides {num_devices}.")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  elif fixed != num_devices:
    raise ConfigError(f"mesh {shape_str} (data x fsdp x tensor) needs {fixed} devices but "
                      f"{num_devices} are available; set one axis to -1 or make the product "
                      f"{num_devices}.")
  return tuple(sizes)


@dataclasses.dataclass
class Validator:
  """Collects config problems (key, message) and raises them together as one ConfigError.

  `num_devices` / `process_count`: the job the config is checked for (`validate_training` sets
  them), for checks that depend on it (e.g. the per-process batch).
  """
  config: ml_collections.ConfigDict
  problems: list[str] = dataclasses.field(default_factory=list)
  num_devices: int = 1
  process_count: int = 1

  def get(self, key: str) -> Any:
    return get_path(self.config, key)

  def has(self, key: str) -> bool:
    try:
      self.get(key)
      return True
    except (KeyError, AttributeError):
      return False

  def add(self, key: str, message: str) -> None:
    self.problems.append(f"{key}: {message}")

  def require(self, condition: bool, key: str, message: str) -> bool:
    if not condition:
      self.add(key, message)
    return bool(condition)

  def _typed(self, key: str, types: tuple[type, ...], what: str) -> Any:
    if not self.has(key):
      self.add(key, "missing; every training config must define it.")
      return None
    value = self.get(key)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
      self.add(key, f"{value!r} is a {type(value).__name__}; expected {what}.")
      return None
    return value

  def int_at_least(self, key: str, minimum: int, *, allow: Sequence[int] = ()) -> int | None:
    value = self._typed(key, (int,), "an int")
    if value is not None and value < minimum and value not in allow:
      extra = f" (or one of {list(allow)})" if allow else ""
      self.add(key, f"{value} must be >= {minimum}{extra}.")
      return None
    return value

  def positive_int(self, key: str, **kw: Any) -> int | None:
    return self.int_at_least(key, 1, **kw)

  def number_in(self, key: str, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> float | None:
    value = self._typed(key, (int, float), "a number")
    if value is None:
      return None
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high and math.isfinite(value)):
      lo = "(" if low_open else "["
      hi = ")" if high_open else "]"
      self.add(key, f"{value!r} is outside {lo}{low}, {high}{hi}.")
      return None
    return float(value)

  def choice(self, key: str, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if not self.has(key):
      self.add(key, f"missing; choose one of {choices}.")
      return None
    value = self.get(key)
    if value not in choices:
      self.add(key, f"{value!r} is not one of {choices}.")
      return None
    return value

  def boolean(self, key: str) -> bool | None:
    return self._typed(key, (bool,), "True or False")

  def string(self, key: str) -> str | None:
    return self._typed(key, (str,), "a string")

  def stage(self, name: str) -> None:
    """`stage` must be `name`: a config of another stage was given to this one."""
    self.require(self.config.get("stage") == name, "stage",
                 f"{self.config.get('stage')!r}; this stage runs configs with stage={name!r}.")

  def init_from(self, what: str, *, url_ok: bool = False) -> str | None:
    """`init_from`: "" or an existing directory (or with `url_ok` a URL, checked where it is
    used); `what` names what it should be (the fix)."""
    value = self.string("init_from")
    if value and value.startswith(remote.SCHEME) and not url_ok:
      self.add("init_from", f"{value!r}: a gs:// run is read from a local copy, which "
               f"r1jax.main makes; from Python, call r1jax.remote.localize_inputs(config) first "
               f"({what}).")
    elif value and not (url_ok and "://" in value):
      self.require(os.path.isdir(os.path.expanduser(value)), "init_from",
                   f"{value!r} is not a directory; {what}.")
    return value

  def raise_if_any(self, what: str = "config") -> None:
    if self.problems:
      lines = "\n  ".join(self.problems)
      raise ConfigError(f"Invalid {what} ({len(self.problems)} problem(s)); fix with "
                        f"--config.<key>=<value>:\n  {lines}")


def validate_training(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                      process_count: int | None = None,
                      extra: Callable[[Validator], None] | None = None) -> Validator:
  """Checks the sections every training stage shares; `extra` adds stage-specific checks.

  `num_devices` / `process_count` default to this job's (`jax.device_count()`,
  `jax.process_count()`). Raises ConfigError listing every problem; returns the Validator.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  v = Validator(config, num_devices=num_devices, process_count=process_count)
  v.string("stage")
  v.int_at_least("seed", 0)
  v.init_from("name the workdir of an earlier run, or '' to start from scratch")

  # Training loop.
  num_steps = v.int_at_least("train.num_steps", 1, allow=(-1,))
  if num_steps == -1:
    v.number_in("train.num_epochs", 0, 1e6, low_open=True)
  batch = v.positive_int("train.batch_size")
  v.number_in("train.learning_rate", 0.0, 10.0, low_open=True)
  v.choice("train.schedule", SCHEDULES)
  # A warmup_steps not shorter than the run becomes warmup_fraction of it (optim.warmup_steps).
  v.int_at_least("train.warmup_steps", 0, allow=(-1,))
  v.number_in("train.warmup_fraction", 0.0, 1.0)
  v.number_in("train.end_lr_fraction", 0.0, 1.0)
  v.number_in("train.weight_decay", 0.0, 1.0)
  v.number_in("train.b1", 0.0, 1.0, high_open=True)
  v.number_in("train.b2", 0.0, 1.0, high_open=True)
  v.number_in("train.eps", 0.0, 1.0, low_open=True)
  v.number_in("train.grad_clip_norm", 0.0, 1e9)
  v.number_in("train.label_smoothing", 0.0, 1.0, high_open=True)
  accum = v.positive_int("train.grad_accum_steps")
  v.boolean("train.skip_nonfinite")
  v.positive_int("train.log_every_steps")
  v.number_in("train.peak_flops", 0.0, 1e30)
  v.boolean("train.progress_bar")
  if "time_budget_minutes" in config.get("train", {}):
    v.number_in("train.time_budget_minutes", 0.0, 1e6)

  # Mesh vs devices and batch vs data parallelism.
  mesh_shape = None
  try:
    mesh_shape = resolve_mesh_shape(config.mesh, num_devices)
  except ConfigError as e:
    v.add("mesh", str(e))
  except (KeyError, AttributeError):
    v.add("mesh", "missing; add mesh.data, mesh.fsdp, mesh.tensor (-1 = the rest).")
  if mesh_shape and batch and accum:
    dp = mesh_shape[0] * mesh_shape[1]
    if batch % (dp * accum):
      good = dp * accum * max(1, round(batch / (dp * accum)))
      v.add("train.batch_size", f"{batch} is not divisible by data-parallel size (mesh.data x "
            f"mesh.fsdp = {dp}) x train.grad_accum_steps ({accum}) = {dp * accum}; use e.g. "
            f"{good}, or change the mesh.")
  if batch and batch % process_count:
    v.add("train.batch_size", f"{batch} is not divisible by the {process_count} processes.")

  # Eval and checkpoints.
  v.int_at_least("eval.every_steps", 0)
  v.positive_int("eval.num_batches")
  v.int_at_least("eval.early_stopping_patience", 0)
  if "early_stopping_min_delta" in config.get("eval", {}):
    v.number_in("eval.early_stopping_min_delta", 0.0, 1e6)
  v.int_at_least("checkpoint.every_steps", 1)
  v.positive_int("checkpoint.max_to_keep")
  v.int_at_least("checkpoint.keep_best", 0)
  v.boolean("checkpoint.async_save")
  v.number_in("checkpoint.sigterm_grace_secs", 0.0, 1e6, low_open=True)

  # Model: the model package validates its own fields; report its message under model.*.
  v.string("model.variant")
  if extra is not None:
    extra(v)
  v.raise_if_any(f"{config.get('stage', 'training')} config")
  return v
