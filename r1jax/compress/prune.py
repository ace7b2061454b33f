"""Magnitude pruning of kernels with element masks kept in the optax chain.

    selected = prune.select(params, include=prune.DEFAULT_INCLUDE)          # {path: bool}
    masks = prune.compute_masks(params, selected, sparsity=0.5, scope="layer")
    tx = optax.chain(base_tx, prune.masked_pruning(selected, schedule))     # recovery finetuning
    prune.sparsity_report(params, selected)

* `scope="layer"`: every selected kernel loses the `sparsity` fraction of its smallest-|w| entries;
  `scope="global"`: one |w| threshold over all selected kernels together (layers with smaller
  weights lose more).
* Schedules: `one_shot` prunes to the target before the first step and keeps the mask; `gradual`
  raises sparsity along s_t = s * (1 - (1 - t / ramp)^3) (Zhu & Gupta 2017), recomputing the masks
  every `update_every` steps until step `ramp`, then keeps them.
* `masked_pruning` goes last in the optax chain. Its state holds the masks (bool, shaped and
  sharded like the params, so they are checkpointed and resumed with everything else) and the step
  count; its update returns `where(mask, p + u, 0) - p`, so after `apply_updates` a pruned weight is
  `p - p`, exactly 0.0, whatever the optimizer (Adam moments, weight decay) proposed for it.
  `optax.masked` would not do: it masks whole leaves, not elements.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from r1jax.train import optim

SCOPES = ("layer", "global")
SCHEDULES = ("one_shot", "gradual")
# The matmul kernels of the backbone layers (attention q/k/v, position, output; feed-forward).
DEFAULT_INCLUDE = r"backbone/layer_\d+/.*kernel"


def check_sparsity(sparsity: float) -> float:
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
      0.0 <= sparsity < 1.0):
    raise ValueError(f"target sparsity={sparsity!r}: must be in [0, 1) (the fraction of the "
                     f"selected weights set to zero, e.g. 0.5).")
  return float(sparsity)


def select(params: Any, include: str = DEFAULT_INCLUDE, exclude: str = "") -> Any:
  """A tree like params (unboxed structure) of bools: True for leaves to prune (>= 2-d, path
  fully matching `include` and not `exclude`). Raises if nothing matches."""
  inc = re.compile(include)
  exc = re.compile(exclude) if exclude else None

  def pick(path, leaf):
    return bool(getattr(leaf, "ndim", 0) >= 2 and inc.fullmatch(path)
                and not (exc and exc.fullmatch(path)))
  selected = optim.map_with_path(pick, params)
  if not any(jax.tree.leaves(selected)):
    raise ValueError(f"prune.include={include!r} (exclude={exclude!r}) selects no >= 2-d "
                     f"parameter; paths look like {optim.param_paths(params)[:6]}.")
  return selected


def _threshold(values: jax.Array, sparsity: jax.Array | float) -> jax.Array:
  """The |w| value at or below which a `sparsity` fraction of `values` (1-d, >= 0) lies."""
  n = values.shape[0]
  k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
  ordered = jnp.sort(values)
  return jnp.where(k > 0, ordered[jnp.maximum(k - 1, 0)], -1.0)


def compute_masks(params: Any, selected: Any, sparsity: jax.Array | float,
                  scope: str = "layer") -> Any:
  """Bool masks shaped like params (True = kept); unselected leaves are all True. Jittable."""
  if scope not in SCOPES:
    raise ValueError(f"prune.scope={scope!r}: allowed values are {', '.join(SCOPES)}.")
  leaves, treedef = jax.tree.flatten(params)
  flags = jax.tree.leaves(selected)
  if len(flags) != len(leaves):
    raise ValueError("selected does not match the params tree.")
  mags = [jnp.abs(x.astype(jnp.float32)) for x in leaves]
  if scope == "global":
    pool = jnp.concatenate([m.reshape(-1) for m, f in zip(mags, flags) if f])
    cut = _threshold(pool, sparsity)
    cuts = [cut if f else None for f in flags]
  else:
    cuts = [_threshold(m.reshape(-1), sparsity) if f else None for m, f in zip(mags, flags)]
  masks = [m > c if c is not None else jnp.ones(m.shape, bool) for m, c in zip(mags, cuts)]
  return jax.tree.unflatten(treedef, masks)


def apply_masks(params: Any, masks: Any) -> Any:
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Target sparsity over optimizer steps."""
  sparsity: float
  kind: str = "one_shot"     # one_shot | gradual
  ramp_steps: int = 0        # gradual: steps until the final sparsity
  update_every: int = 10     # gradual: steps between mask updates
  scope: str = "layer"       # layer | global

  def __post_init__(self):
    check_sparsity(self.sparsity)
    if self.kind not in SCHEDULES:
      raise ValueError(f"prune.schedule={self.kind!r}: allowed values are {', '.join(SCHEDULES)}.")
    if self.scope not in SCOPES:
      raise ValueError(f"prune.scope={self.scope!r}: allowed values are {', '.join(SCOPES)}.")
    if self.kind == "gradual" and (self.ramp_steps < 1 or self.update_every < 1):
      raise ValueError(f"gradual pruning needs ramp_steps >= 1 and update_every >= 1, got "
                       f"{self.ramp_steps} and {self.update_every}.")

  def target(self, step: jax.Array) -> jax.Array:
    """Sparsity the masks are recomputed to at `step` (float32 scalar)."""
    if self.kind == "one_shot":
      return jnp.asarray(self.sparsity, jnp.float32)
    frac = jnp.clip(step.astype(jnp.float32) / self.ramp_steps, 0.0, 1.0)
    return self.sparsity * (1.0 - (1.0 - frac) ** 3)

  def updates_masks(self, step: jax.Array) -> jax.Array:
    """Whether the masks are recomputed before the update of `step`."""
    if self.kind == "one_shot":
      return step == 0
    stepped = (step % self.update_every == 0) | (step == self.ramp_steps)
    return stepped & (step <= self.ramp_steps)


class PruneState(NamedTuple):
  count: jax.Array   # int32 [] updates done
  masks: Any         # bool, shaped like the params (True = kept)


def masked_pruning(selected: Any, schedule: Schedule) -> optax.GradientTransformation:
  """The last link of an optax chain: prune per `schedule`, keep pruned weights exactly zero.

  Needs `params` in `update` (the engine passes them). With "one_shot", a stage that prunes before
  training starts (`initial_state`) gives the masks here, and step 0 recomputes the same masks.
  """
  def init_fn(params):
    return PruneState(count=jnp.zeros((), jnp.int32),
                      masks=jax.tree.map(lambda p: jnp.ones(p.shape, bool), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("masked_pruning needs params in update() to compute magnitude masks.")
    masks = jax.lax.cond(
        schedule.updates_masks(state.count),
        lambda: compute_masks(params, selected, schedule.target(state.count), schedule.scope),
        lambda: state.masks)
    new = jax.tree.map(lambda u, p, m: jnp.where(m, p + u, jnp.zeros_like(p)) - p,
                       updates, params, masks)
    return new, PruneState(count=state.count + 1, masks=masks)

  return optax.GradientTransformation(init_fn, update_fn)


def initial_state(params: Any, selected: Any, schedule: Schedule) -> tuple[Any, PruneState]:
  """(params pruned for step 0, PruneState with those masks): for "one_shot" the first gradient
  is then taken on the pruned network; for "gradual" the target at step 0 is 0 (nothing pruned)."""
  masks = jax.jit(lambda p: compute_masks(p, selected, schedule.target(jnp.zeros((), jnp.int32)),
                                          schedule.scope))(params)
  return apply_masks(params, masks), PruneState(count=jnp.zeros((), jnp.int32), masks=masks)


def sparsity_report(params: Any, selected: Any) -> dict[str, Any]:
  """Zero fraction of every selected leaf, of all selected weights, and of the whole model."""
  flat = {}

  def one(path, leaf):
    flat[path] = np.asarray(jax.device_get(leaf))
    return None
  optim.map_with_path(one, params)
  chosen = {p for p, f in zip(optim.param_paths(selected), jax.tree.leaves(selected)) if f}
  layers = {p: float(np.mean(flat[p] == 0)) for p in sorted(chosen)}
  pruned_zero = sum(int(np.sum(flat[p] == 0)) for p in chosen)
  pruned_size = sum(flat[p].size for p in chosen)
  all_zero = sum(int(np.sum(v == 0)) for v in flat.values())
  all_size = sum(v.size for v in flat.values())
  return {"per_layer": layers, "selected_sparsity": pruned_zero / max(pruned_size, 1),
          "selected_params": int(pruned_size), "model_sparsity": all_zero / max(all_size, 1),
          "model_params": int(all_size), "nonzero_params": int(all_size - all_zero)}


def find_state(opt_state: Any) -> PruneState:
  """The PruneState inside an optax chain's state."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
           if isinstance(s, PruneState)]
  if len(found) != 1:
    raise ValueError(f"expected one PruneState in the optimizer state, found {len(found)}.")
  return found[0]


def replace_state(opt_state: Any, new: PruneState) -> Any:
  """opt_state with its PruneState replaced by `new`."""
  return jax.tree.map(lambda x: new if isinstance(x, PruneState) else x, opt_state,
                      is_leaf=lambda x: isinstance(x, PruneState))


def masks_from_selected(selected: Any) -> Mapping[str, bool]:
  return dict(zip(optim.param_paths(selected), jax.tree.leaves(selected)))
