"""Structured pruning: whole attention heads and feed-forward units removed, so the matrices shrink.

    structured.check(cfg, heads_fraction=0.5, ffn_fraction=0.5)   # refuses emptying a layer
    scores = structured.importance(loss_fn, params, batches)   # Scores: heads [L][H], units [L][F]
    plan = structured.make_plan(cfg, scores, 0.5, 0.5, scope="layer")   # or "global"
    small_cfg = structured.pruned_config(cfg, plan)            # per-layer heads / d_inner
    small_params = structured.shrink(params, plan)             # fits heads.Classifier(small_cfg)

Importance is the first-order (Taylor) estimate of the loss change when a head or unit is cut,
the head-gate score of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"). A head h
of a layer reaches the rest of the network only through its slice W_o[h] [D, d] of the attention
output kernel, so with a gate xi_h on it, dL/dxi_h at xi = 1 equals sum(W_o[h] * dL/dW_o[h]): the
gradient x weight of that slice. The same holds for feed-forward unit j and its row of ff_out's
kernel [d]. The score of a head or unit is |that sum| on each training batch, added over batches;
no gate is added to the model.

With scope "layer" each layer keeps its `1 - fraction` highest-scoring heads and units (the count
rounded half up, the same in every layer of a uniform model); with "global" the lowest-scoring
`fraction` of all heads (units) go, scores divided by their layer's L2 norm to compare layers, and
every layer keeps at least one, so layers end up with different sizes (`layer_heads`,
`layer_d_inner` in the model config). Removing is slicing: the head axis of
attn/qkv [d, 3, H, D], attn/r_net [d, H, D], attn/out [H, D, d] and the untied biases r_w_bias,
r_r_bias [H, D]; the unit axis of ff_in's kernel [d, F] and bias [F] and ff_out's kernel [F, d].
Removing head h gives exactly the function of the full model with W_o[h] = 0 (and unit j that
of ff_out row j = 0); tests/test_compress_structured.py checks both.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import errors
from r1jax.model import transformer_xl as txl


SCOPES = ("layer", "global")


class StructuredPruningError(errors.UserError, ValueError):
  """A structured-pruning request that cannot work (e.g. it would empty a layer)."""


def _remove(fraction: float, n: int) -> int:
  return int(math.floor(fraction * n + 0.5))


def check_fraction(name: str, fraction: Any) -> float:
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0.0 <= fraction < 1.0):
    raise StructuredPruningError(f"prune.{name}={fraction!r}: must be in [0, 1) (the fraction of "
                                 f"each layer's {'heads' if 'head' in name else 'units'} removed).")
  return float(fraction)


def keep_counts(cfg: txl.TransformerXLConfig, heads_fraction: float, ffn_fraction: float
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(heads kept per layer, units kept per layer); raises before any work if a layer would lose
  all its heads or units."""
  heads_fraction = check_fraction("heads_fraction", heads_fraction)
  ffn_fraction = check_fraction("ffn_fraction", ffn_fraction)
  heads, units = [], []
  for i in range(cfg.n_layer):
    for name, fraction, n, out in (("heads_fraction", heads_fraction, cfg.heads_of(i), heads),
                                   ("ffn_fraction", ffn_fraction, cfg.d_inner_of(i), units)):
      gone = _remove(fraction, n)
      if gone >= n:
        what = "attention heads" if name == "heads_fraction" else "feed-forward units"
        most = (n - 0.5) / n - 1e-9
        raise StructuredPruningError(
            f"prune.{name}={fraction:g} would remove all {n} {what} of layer {i} "
            f"(round({fraction:g} x {n}) = {gone}); use prune.{name} < {most:.3f}.")
      out.append(n - gone)
  return tuple(heads), tuple(units)


@dataclasses.dataclass(frozen=True)
class Scores:
  """Importance per layer: heads[i] float [H_i], units[i] float [F_i]."""
  heads: tuple[np.ndarray, ...]
  units: tuple[np.ndarray, ...]


def _layer(params: Mapping[str, Any], i: int) -> Mapping[str, Any]:
  return params["backbone"][f"layer_{i}"]


def _n_layer(params: Mapping[str, Any]) -> int:
  return sum(1 for k in params["backbone"] if k.startswith("layer_"))


def gate_gradients(grads: Any, params: Any) -> tuple[list[jax.Array], list[jax.Array]]:
  """dL/d(gate) of every head [H_i] and unit [F_i] per layer, from the gradients of the output
  kernels (see the module docstring)."""
  heads, units = [], []
  for i in range(_n_layer(params)):
    g, p = _layer(grads, i), _layer(params, i)
    heads.append(jnp.sum(g["attn"]["out"]["kernel"] * p["attn"]["out"]["kernel"], axis=(1, 2)))
    units.append(jnp.sum(g["ff_out"]["kernel"] * p["ff_out"]["kernel"], axis=1))
  return heads, units


def importance(loss_fn: Callable[..., Any], params: Any, batches: Iterable[Mapping[str, Any]]
               ) -> Scores:
  """Scores from `loss_fn(params, batch, extras, rng, deterministic) -> (loss, aux)` (the engine's
  loss functions) on `batches`: sum over batches of |gate gradient|."""
  def one(p, batch):
    grads = jax.grad(lambda q: loss_fn(q, batch, {}, jax.random.PRNGKey(0), True)[0])(p)
    heads, units = gate_gradients(grads, p)
    return [jnp.abs(h) for h in heads], [jnp.abs(u) for u in units]
  step = jax.jit(one)
  heads = units = None
  count = 0
  for batch in batches:
    h, u = step(params, {k: jnp.asarray(v) for k, v in batch.items()})
    heads = h if heads is None else [a + b for a, b in zip(heads, h)]
    units = u if units is None else [a + b for a, b in zip(units, u)]
    count += 1
  if not count:
    raise ValueError("importance() got no batches to score on.")
  return Scores(tuple(np.asarray(h) for h in heads), tuple(np.asarray(u) for u in units))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which heads and units each layer keeps (sorted indices into the unpruned layer)."""
  heads: tuple[tuple[int, ...], ...]
  units: tuple[tuple[int, ...], ...]

  def to_json(self) -> dict[str, Any]:
    return {"heads": [list(h) for h in self.heads], "units": [list(u) for u in self.units]}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "Plan":
    return cls(tuple(tuple(int(x) for x in h) for h in data["heads"]),
               tuple(tuple(int(x) for x in u) for u in data["units"]))

  @classmethod
  def identity(cls, cfg: txl.TransformerXLConfig) -> "Plan":
    """Keeps everything."""
    return cls(tuple(tuple(range(cfg.heads_of(i))) for i in range(cfg.n_layer)),
               tuple(tuple(range(cfg.d_inner_of(i))) for i in range(cfg.n_layer)))

  def summary(self, cfg: txl.TransformerXLConfig) -> dict[str, Any]:
    heads = sum(cfg.heads_of(i) for i in range(cfg.n_layer))
    units = sum(cfg.d_inner_of(i) for i in range(cfg.n_layer))
    return {"heads_kept": [len(h) for h in self.heads], "units_kept": [len(u) for u in self.units],
            "heads_removed": heads - sum(len(h) for h in self.heads),
            "units_removed": units - sum(len(u) for u in self.units),
            "heads_total": heads, "units_total": units, **self.to_json()}

  def dumps(self) -> str:
    return json.dumps(self.to_json())


def _top(scores: np.ndarray, keep: int) -> tuple[int, ...]:
  """Indices of the `keep` highest scores, ascending (ties: the lower index is kept)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  return tuple(sorted(int(i) for i in order[:keep]))


def check(cfg: txl.TransformerXLConfig, heads_fraction: float, ffn_fraction: float,
          scope: str = "layer") -> None:
  """Raises StructuredPruningError (one line) if the request cannot work: run before any work."""
  if scope not in SCOPES:
    raise StructuredPruningError(f"prune.structured_scope={scope!r}: allowed values are "
                                 f"{', '.join(SCOPES)}.")
  if scope == "layer":
    keep_counts(cfg, heads_fraction, ffn_fraction)
    return
  for name, fraction, sizes, what in (
      ("heads_fraction", heads_fraction, [cfg.heads_of(i) for i in range(cfg.n_layer)],
       "attention heads"),
      ("ffn_fraction", ffn_fraction, [cfg.d_inner_of(i) for i in range(cfg.n_layer)],
       "feed-forward units")):
    fraction = check_fraction(name, fraction)
    total, gone = sum(sizes), _remove(fraction, sum(sizes))
    if gone > total - cfg.n_layer:
      raise StructuredPruningError(
          f"prune.{name}={fraction:g} would remove {gone} of the {total} {what}, leaving a layer "
          f"with none (each of the {cfg.n_layer} layers keeps at least one); use prune.{name} "
          f"<= {(total - cfg.n_layer) / total:.3f}.")


def _global_keep(scores: Sequence[np.ndarray], fraction: float) -> tuple[tuple[int, ...], ...]:
  """Kept indices per layer when the lowest `fraction` of all items go, ranked across layers by
  their score over their layer's L2 norm (Michel et al.'s normalisation), each layer keeping at
  least one."""
  ranked = sorted((float(s[j]) / (float(np.linalg.norm(s)) or 1.0), i, j)
                  for i, s in enumerate(scores) for j in range(len(s)))
  left = [len(s) for s in scores]
  gone: set[tuple[int, int]] = set()
  todo = _remove(fraction, sum(left))
  for _, i, j in ranked:
    if len(gone) == todo:
      break
    if left[i] > 1:
      left[i] -= 1
      gone.add((i, j))
  return tuple(tuple(j for j in range(len(s)) if (i, j) not in gone) for i, s in enumerate(scores))


def make_plan(cfg: txl.TransformerXLConfig, scores: Scores, heads_fraction: float,
              ffn_fraction: float, scope: str = "layer") -> Plan:
  """Layer scope: each layer keeps its best `1 - fraction`; global: the worst `fraction` of all
  heads (units) go wherever they are, so layers end up with different sizes."""
  check(cfg, heads_fraction, ffn_fraction, scope)
  if scope == "global":
    return Plan(_global_keep(scores.heads, heads_fraction),
                _global_keep(scores.units, ffn_fraction))
  heads, units = keep_counts(cfg, heads_fraction, ffn_fraction)
  return Plan(tuple(_top(s, k) for s, k in zip(scores.heads, heads)),
              tuple(_top(s, k) for s, k in zip(scores.units, units)))


def pruned_config(cfg: txl.TransformerXLConfig, plan: Plan) -> txl.TransformerXLConfig:
  """`cfg` with each layer's heads and feed-forward width as `plan` leaves them."""
  return cfg.with_layer_sizes([len(h) for h in plan.heads], [len(u) for u in plan.units])


def shrink(params: Any, plan: Plan) -> Any:
  """A classifier's (or backbone holder's) params with the plan's heads and units sliced out.

  Leaves outside the backbone layers are shared with `params` (not copied)."""
  take = lambda x, idx, axis: jnp.take(jnp.asarray(x), jnp.asarray(idx, jnp.int32), axis=axis)
  backbone = dict(params["backbone"])
  for i, (h, u) in enumerate(zip(plan.heads, plan.units)):
    layer = {k: dict(v) if isinstance(v, Mapping) else v for k, v in backbone[f"layer_{i}"].items()}
    attn = dict(layer["attn"])
    attn["qkv"] = {"kernel": take(attn["qkv"]["kernel"], h, 2)}       # [d, 3, H', D]
    attn["r_net"] = {"kernel": take(attn["r_net"]["kernel"], h, 1)}   # [d, H', D]
    attn["out"] = {"kernel": take(attn["out"]["kernel"], h, 0)}       # [H', D, d]
    for bias in ("r_w_bias", "r_r_bias"):                             # [H', D]
      if bias in attn:
        attn[bias] = take(attn[bias], h, 0)
    layer["attn"] = attn
    layer["ff_in"] = {"kernel": take(layer["ff_in"]["kernel"], u, 1),  # [d, F']
                      **({"bias": take(layer["ff_in"]["bias"], u, 0)}  # [F']
                         if "bias" in layer["ff_in"] else {})}
    layer["ff_out"] = dict(layer["ff_out"], kernel=take(layer["ff_out"]["kernel"], u, 0))  # [F', d]
    backbone[f"layer_{i}"] = layer
  return dict(params, backbone=backbone)
