"""Continual learning on the shared engine: a classifier updated on new data without forgetting.

The continual stage (`r1jax.stages.continual`) trains one `heads.Classifier` round after round. Its
engine's parameter tree is

    {"model": the classifier being trained,
     "previous": the classifier as it was when the round started (frozen),   # penalty / LwF only
     "importance": a diagonal Fisher estimate shaped like "previous" (frozen)}  # EWC only

"previous" and "importance" are frozen by `FREEZE_ANCHOR` (no optimizer state) and read through
`stop_gradient`; being parameters they are sharded like the model and saved in every checkpoint,
so a resumed round has them without recomputing. The loss (`continual_loss_fn`) per batch is

    CE(model, labels)
      + penalty_weight / 2 * sum_i w_i (theta_i - previous_i)^2      (w = importance: EWC; 1: L2-SP)
      + lwf_weight * T^2 * KL(previous_T || model_T) on the previous classes   (LwF)

New classes grow the head (`grow_params`): the output layers' kernels and biases get new columns,
and each old logit, which reads only its own column, is unchanged. The penalty and the LwF term
compare the grown model with the previous one on the old columns and classes only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax import run_dir
from r1jax.model import losses

FREEZE_ANCHOR = ((r"previous/.*", "frozen"), (r"importance/.*", "frozen"))


@dataclasses.dataclass(frozen=True)
class ContinualOptions:
  """The forgetting-control terms of `continual_loss_fn` (0 switches a term off)."""
  penalty_weight: float = 0.0   # EWC (with importance) or L2-SP (without) toward "previous"
  lwf_weight: float = 0.0       # distillation from "previous" on the batch's inputs
  temperature: float = 2.0      # LwF softmax temperature T > 0
  label_smoothing: float = 0.0  # on the hard-label term
  multi_label: bool = False

  def __post_init__(self):
    if self.penalty_weight < 0 or self.lwf_weight < 0:
      raise ValueError(f"penalty_weight={self.penalty_weight}, lwf_weight={self.lwf_weight}: "
                       "must be >= 0.")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature}: must be > 0.")

  @property
  def needs_previous(self) -> bool:
    return self.penalty_weight > 0 or self.lwf_weight > 0


def _overlap(param: jax.Array, like: Any) -> jax.Array:
  """`param` cut to `like`'s shape: the old columns of a grown head leaf, any other leaf whole."""
  return param[tuple(slice(0, n) for n in like.shape)]


def anchor_penalty(params: Any, anchor: Any, importance: Any = None) -> jax.Array:
  """sum over leaves of sum_i w_i (params_i - anchor_i)^2, a float32 scalar: 0 at the anchor.

  `params` may be a grown copy of `anchor` (head leaves with more columns): the new columns are
  free. `importance` (shaped like `anchor`) weights each coordinate (EWC); None weights all 1
  (L2-SP)."""
  def term(p, a, w=None):
    d = jnp.square(_overlap(p, a).astype(jnp.float32) - a.astype(jnp.float32))
    return jnp.sum(d if w is None else w.astype(jnp.float32) * d)
  terms = (jax.tree.map(term, params, anchor) if importance is None
           else jax.tree.map(term, params, anchor, importance))
  return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def continual_loss_fn(model: nn.Module, previous: nn.Module | None,
                      options: ContinualOptions) -> losses.LossFn:
  """The engine loss over {"model"[, "previous"[, "importance"]]} (module docstring); batch
  tokens/token_mask/label (+ example_mask on padded eval batches). Metrics: loss (the total, set by
  the engine), ce_loss, accuracy, and penalty / lwf_loss when those terms are on."""
  multi = options.multi_label

  def loss_fn(params, batch, extras, rng, deterministic):
    weights = batch.get("example_mask")
    weights = (jnp.ones(batch["tokens"].shape[:1], jnp.float32) if weights is None
               else weights.astype(jnp.float32))
    rows = jnp.maximum(weights.sum(), 1.0)
    logits = model.apply({"params": params["model"]}, batch["tokens"], batch["token_mask"],
                         deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng})[0]
    hard = losses.hard_loss(logits, batch["label"], multi_label=multi,
                            label_smoothing=options.label_smoothing)
    if multi:
      correct = jnp.all((logits >= 0) == (batch["label"] > 0.5), axis=-1).astype(jnp.float32)
    else:
      correct = losses.correct_predictions(logits, batch["label"])
    loss = (hard * weights).sum() / rows
    metrics = {"ce_loss": losses.metric((hard * weights).sum(), rows),
               "accuracy": losses.metric((jax.lax.stop_gradient(correct) * weights).sum(), rows)}
    if "previous" in params and options.needs_previous:
      anchor = jax.lax.stop_gradient(params["previous"])
      if options.penalty_weight:
        importance = params.get("importance")
        penalty = anchor_penalty(params["model"], anchor, None if importance is None
                                 else jax.lax.stop_gradient(importance))
        loss = loss + 0.5 * options.penalty_weight * penalty
        metrics["penalty"] = losses.metric(penalty)
      if options.lwf_weight:
        old = previous.apply({"params": anchor}, batch["tokens"], batch["token_mask"])[0]
        soft = losses.soft_loss(logits[:, :old.shape[-1]], old, options.temperature,
                                multi_label=multi)
        loss = loss + options.lwf_weight * (soft * weights).sum() / rows
        metrics["lwf_loss"] = losses.metric((soft * weights).sum(), rows)
    return loss, (metrics, extras)
  return loss_fn


# --------------------------------------------------------------------------------------------------
# Growing the head, and the diagonal Fisher.


def grow_params(params: Any, target: Any, rng: jax.Array) -> tuple[Any, list[str]]:
  """`params` (host arrays) reshaped to `target` (arrays or ShapeDtypeStructs of the same tree):
  a leaf whose shape differs only in its last axis, larger in `target` (a head's output layer for
  more classes), keeps its values in the first columns; its new columns are drawn like the old
  ones (a kernel: normal with the old columns' standard deviation; a bias: the old mean), so a new
  class starts near the old ones without changing any old logit. Returns (params, grown paths).
  Raises ValueError naming a leaf that differs otherwise."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  targets = jax.tree.leaves(target)
  if len(targets) != len(flat):
    raise ValueError(f"grow_params: {len(flat)} leaves do not match the target's {len(targets)}.")
  out, grown = [], []
  keys = jax.random.split(rng, len(flat))
  for (path, value), want, key in zip(flat, targets, keys):
    value = np.asarray(value)
    shape = tuple(want.shape)
    if value.shape == shape:
      out.append(value)
      continue
    name = run_dir.path_str(path)
    if value.shape[:-1] != shape[:-1] or shape[-1] < value.shape[-1]:
      raise ValueError(f"grow_params: {name} has shape {value.shape}; only a head's last axis can "
                       f"grow, not to {shape}.")
    extra = shape[-1] - value.shape[-1]
    if value.ndim == 1:
      new = np.full((extra,), value.mean() if value.size else 0.0, value.dtype)
    else:
      std = float(value.std()) if value.size else 0.02
      new = np.asarray(jax.random.normal(key, shape[:-1] + (extra,)) * std).astype(value.dtype)
    out.append(np.concatenate([value, new], axis=-1))
    grown.append(name)
  return jax.tree_util.tree_unflatten(treedef, out), grown


def fisher_diagonal(model: nn.Module, params: Any, batches: Iterable[Mapping[str, np.ndarray]], *,
                    multi_label: bool, max_examples: int) -> tuple[Any, int]:
  """(the empirical diagonal Fisher of `params`, examples used): the mean over up to
  `max_examples` real rows of `batches` of the squared gradient of each row's own loss against its
  label, normalised to mean 1 over all coordinates (so an EWC weight reads like an L2-SP one: the
  importance reshapes the penalty, the weight sets its size). Per-row gradients are taken
  `jax.vmap`-ed over each batch on one device."""
  def row_loss(p, tokens, mask, label):
    logits = model.apply({"params": p}, tokens[None], mask[None])[0]
    return losses.hard_loss(logits, label[None], multi_label=multi_label)[0]

  def batch_sum(p, tokens, mask, label, weight):
    grads = jax.vmap(jax.grad(row_loss), in_axes=(None, 0, 0, 0))(p, tokens, mask, label)
    return jax.tree.map(lambda g: jnp.tensordot(weight, jnp.square(g), axes=1), grads)

  step = jax.jit(batch_sum)
  total, count = jax.tree.map(jnp.zeros_like, params), 0
  for batch in batches:
    weight = np.asarray(batch.get("example_mask", np.ones(len(batch["tokens"]), bool)), np.float32)
    weight[np.cumsum(weight) > max_examples - count] = 0.0
    if not weight.any():
      break
    sums = step(params, batch["tokens"], batch["token_mask"], batch["label"], weight)
    total = jax.tree.map(jnp.add, total, sums)
    count += int(weight.sum())
  if not count:
    raise ValueError("fisher_diagonal got no examples.")
  mean = sum(float(jnp.sum(x)) for x in jax.tree.leaves(total)) / sum(
      x.size for x in jax.tree.leaves(total))
  # total / count is the Fisher; divided by its mean that is total / (mean of total).
  return jax.tree.map(lambda x: np.asarray(x / mean if mean > 0 else x, np.float32), total), count
