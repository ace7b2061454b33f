"""Optimizer: AdamW with warmup + decay, clipping, no decay on biases/LayerNorm, regex rules.

Rules pick parameters by regex over their "/"-joined path (e.g. `backbone/layer_3/ff/dense_1/kernel`),
first match wins:

    rules = [(r"backbone/(embed|layer_[0-5])/.*", "frozen"),    # no gradient step, no Adam state
             (r".*_head/.*", {"lr_mult": 10.0}),                 # its own learning rate
             (r"backbone/layer_11/.*", {"learning_rate": 1e-4, "weight_decay": 0.0})]
    tx = build_optimizer(config.train, params, rules=rules)

A rule that matches no parameter (including one shadowed by earlier rules) raises ValueError, since a
typo would otherwise silently train (or freeze) the wrong thing. Frozen leaves carry no optimizer state
(`optax.multi_transform` with `optax.set_to_zero()`), and their gradients are zeroed before clipping so
they do not count towards the global norm.

`build_optimizer(..., adjustable_lr=True)` adds a learning-rate factor to the optimizer state
(`LrFactorState`, 1.0 at the start) that multiplies each group's scheduled rate:
`scale_lr(opt_state, 0.3)` lowers the learning rate from the next step on (an on_eval hook's
`loop.EvalAction`), and since the factor is a leaf of the state it is checkpointed and restored
with it (a resumed run is bitwise the same).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

from flax.core import meta
import jax
import jax.numpy as jnp
import numpy as np
import optax

from r1jax import run_dir

Rule = tuple[str, Union[str, Mapping[str, float]]]
FROZEN = "frozen"
DEFAULT_GROUP = "default"
_RULE_KEYS = ("lr_mult", "learning_rate", "weight_decay")
# A parameter whose path has one of these components is a normalisation parameter (no weight decay).
_NORM_NAME = re.compile(r"(?i)^(.*layer_?norm.*|.*_ln|ln(_\w+)?|norm\w*|.*_norm)$")


def param_paths(params: Any) -> list[str]:
  return jax.tree.leaves(map_with_path(lambda path, _: path, params))


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """Maps fn(path, leaf) over a tree; `nn.LogicallyPartitioned` boxes count as (unboxed) leaves, so
  the result is shaped like the unboxed tree (a prefix of the boxed one, which optax masks accept)."""
  def one(p, x):
    return fn(run_dir.path_str(p), x.unbox() if isinstance(x, meta.AxisMetadata) else x)
  return jax.tree_util.tree_map_with_path(one, tree,
                                          is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def decays(path: str, leaf: Any) -> bool:
  """Weight decay applies to matrices, not to biases, LayerNorm parameters or other 1-d vectors."""
  parts = path.split("/")
  if parts[-1].endswith("bias") or any(_NORM_NAME.match(p) for p in parts[:-1]):
    return False
  return getattr(leaf, "ndim", 0) >= 2


def warmup_steps(train_cfg: Any, num_steps: int) -> int:
  """The warmup of a run of `num_steps`: `train.warmup_steps`, or `train.warmup_fraction` of the
  run when that is -1 or when it is not shorter than the run (a run shortened on the command line,
  e.g. --config.train.num_steps=60 on a config that warms up for 100, keeps a proportionate warmup
  instead of being refused; `warmup_clamped` says when). Always below num_steps."""
  warmup = int(train_cfg.warmup_steps)
  if warmup < 0 or warmup_clamped(train_cfg, num_steps):
    warmup = int(round(train_cfg.warmup_fraction * num_steps))
  return min(warmup, max(num_steps - 1, 0))


def warmup_clamped(train_cfg: Any, num_steps: int) -> bool:
  """True when an explicit `train.warmup_steps` is not shorter than the run (see warmup_steps)."""
  return 0 < num_steps <= int(train_cfg.warmup_steps)


def make_schedule(train_cfg: Any, num_steps: int, peak_lr: float | None = None) -> optax.Schedule:
  """Linear warmup to the peak (`warmup_steps`), then linear/cosine decay to `end_lr_fraction` of
  it, or constant."""
  peak = float(train_cfg.learning_rate if peak_lr is None else peak_lr)
  warmup = warmup_steps(train_cfg, num_steps)
  end = peak * float(train_cfg.end_lr_fraction)
  decay_steps = max(num_steps - warmup, 1)
  if train_cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif train_cfg.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif train_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  else:
    raise ValueError(f"train.schedule={train_cfg.schedule!r}; choose linear, cosine or constant.")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def assign_groups(params: Any, rules: Sequence[Rule] = ()) -> dict[str, Any]:
  """Labels every leaf with its group: "frozen", "rule_<i>" or "default" (first matching rule wins).

  Returns {"labels": tree of labels, "groups": {label: rule value}}; raises ValueError when a rule
  matches no parameter not already claimed by an earlier rule.
  """
  compiled = []
  for i, (pattern, value) in enumerate(rules):
    if isinstance(value, str):
      if value != FROZEN:
        raise ValueError(f"Optimizer rule {i} ({pattern!r}): {value!r} is not 'frozen' or a dict of "
                         f"{_RULE_KEYS}.")
    else:
      unknown = set(value) - set(_RULE_KEYS)
      if unknown:
        raise ValueError(f"Optimizer rule {i} ({pattern!r}): unknown keys {sorted(unknown)}; "
                         f"allowed: {_RULE_KEYS}.")
    compiled.append((re.compile(pattern), value))
  hits = [0] * len(compiled)

  def label(path: str, _):
    for i, (regex, value) in enumerate(compiled):
      if regex.fullmatch(path):
        hits[i] += 1
        return FROZEN if value == FROZEN else f"rule_{i}"
    return DEFAULT_GROUP

  labels = map_with_path(label, params)
  unmatched = [rules[i][0] for i, n in enumerate(hits) if n == 0]
  if unmatched:
    sample = param_paths(params)[:8]
    raise ValueError(f"Optimizer rule(s) {unmatched} matched no parameter (patterns must match the "
                     f"whole path, and earlier rules win). Parameter paths look like: {sample}.")
  groups = {DEFAULT_GROUP: {}}
  groups.update({f"rule_{i}": dict(v) for i, (_, v) in enumerate(rules) if v != FROZEN})
  return {"labels": labels, "groups": groups}


def _adamw(train_cfg: Any, schedule: optax.Schedule, weight_decay: float,
           adjustable_lr: bool = False) -> optax.GradientTransformation:
  def decay_mask(params):
    return map_with_path(decays, params)
  return optax.chain(
      optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      scale_by_lr_factor(schedule) if adjustable_lr else optax.scale_by_learning_rate(schedule),
  )


class LrFactorState(NamedTuple):
  """`scale_by_lr_factor`'s state: optax.scale_by_learning_rate's count, and the factor."""
  count: jax.Array   # int32 [] updates so far (the schedule's step)
  factor: jax.Array  # float32 [] the schedule's rate is multiplied by it (1.0: unchanged)


def scale_by_lr_factor(schedule: optax.Schedule) -> optax.GradientTransformation:
  """`optax.scale_by_learning_rate(schedule)` with the rate multiplied by a factor kept in the
  state (`scale_lr` changes it). The factor multiplies the scalar rate, not every update: at 1.0
  the rate is the schedule's to the bit and the updates are those of scale_by_learning_rate
  (multiplying each update by the factor after the rate changed XLA:CPU's rounding, and a
  pretraining's loss drifted from the fixed run's within 100 steps, bench/NOTES_auto_schedule.md)."""
  def init(params):
    del params
    return LrFactorState(jnp.zeros([], jnp.int32), jnp.ones([], jnp.float32))

  def update(updates, state, params=None):
    del params
    step_size = -1 * (schedule(state.count) * state.factor)
    updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
    return updates, LrFactorState(optax.safe_increment(state.count), state.factor)
  return optax.GradientTransformation(init, update)


def _is_factor(x: Any) -> bool:
  return isinstance(x, LrFactorState)


def lr_factor(opt_state: Any) -> Any:
  """The learning-rate factor in `opt_state` (a float32 [] array), or 1.0 if it has none."""
  found = [s.factor for s in jax.tree.leaves(opt_state, is_leaf=_is_factor) if _is_factor(s)]
  return found[0] if found else 1.0


def scale_lr(opt_state: Any, factor: float) -> Any:
  """`opt_state` with its learning-rate factor multiplied by `factor` (same sharding). Raises
  ValueError if the optimizer was built without one (`build_optimizer(adjustable_lr=False)`)."""
  if not any(_is_factor(s) for s in jax.tree.leaves(opt_state, is_leaf=_is_factor)):
    raise ValueError("The optimizer has no learning-rate factor to lower: build it with "
                     "optim.build_optimizer(..., adjustable_lr=True).")

  def one(s):
    if not _is_factor(s):
      return s
    return s._replace(factor=jax.device_put(s.factor * jnp.float32(factor), s.factor.sharding))
  return jax.tree.map(one, opt_state, is_leaf=_is_factor)


def build_optimizer(train_cfg: Any, params: Any, *, num_steps: int, rules: Sequence[Rule] = (),
                    adjustable_lr: bool = False) -> optax.GradientTransformation:
  """AdamW + schedule + clipping + per-group rules.

  Args:
    train_cfg: `config.train` (learning_rate, schedule, warmup_*, end_lr_fraction, weight_decay,
      b1, b2, eps, grad_clip_norm).
    params: the (possibly abstract or boxed) parameter tree, used for paths and shapes only.
    num_steps: optimizer steps, for the schedule.
    rules: (regex, "frozen" | {"lr_mult"|"learning_rate"|"weight_decay": float}) pairs.
    adjustable_lr: every group's rate through `scale_by_lr_factor` (a factor `scale_lr` lowers).
  """
  assigned = assign_groups(params, rules)
  labels = assigned["labels"]
  transforms = {FROZEN: optax.set_to_zero()}
  for name, value in assigned["groups"].items():
    peak = value.get("learning_rate", train_cfg.learning_rate * value.get("lr_mult", 1.0))
    wd = value.get("weight_decay", train_cfg.weight_decay)
    transforms[name] = _adamw(train_cfg, make_schedule(train_cfg, num_steps, peak), wd,
                              adjustable_lr)
  chain = []
  frozen_mask = jax.tree.map(lambda l: l == FROZEN, labels)
  if any(jax.tree.leaves(frozen_mask)):
    # Zero frozen gradients first so they do not count in the clipping norm.
    chain.append(optax.masked(optax.set_to_zero(), frozen_mask))
  if train_cfg.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain)


def count_params(params: Any, labels: Any | None = None) -> dict[str, int]:
  """{"total": n, "trainable": n} (trainable excludes leaves labelled frozen)."""
  sizes = jax.tree.leaves(map_with_path(lambda _, x: int(np.prod(x.shape)), params))
  out = {"total": sum(sizes), "trainable": sum(sizes)}
  if labels is not None:
    out["trainable"] -= sum(n for n, l in zip(sizes, jax.tree.leaves(labels)) if l == FROZEN)
  return out
