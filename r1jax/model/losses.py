"""Every training loss: the engine's loss functions and the per-example losses they are made of.

A loss function has this signature (`LossFn`); `r1jax.train.steps.Engine` differentiates it and
reuses everything else:

    loss_fn(params, batch, extras, rng, deterministic) -> (loss, (metrics, new_extras))

- `batch`: dict of global arrays, leading axis = rows [B, ...];
- `extras`: carried per-stage state (e.g. {"memory": Memory}); `new_extras` replaces it;
- `metrics`: {name: (sum, count)} float32 scalars (`metric`); the host divides after summing over
  steps, so averages over steps, micro-batches and eval batches are exact;
- `loss`: the scalar to differentiate.

Loss functions: `pretrain_loss_fn` (MLM + NSP [+ knowledge]) and `causal_lm_loss_fn` (next token)
for `heads.PretrainModel`, `classification_loss_fn` for `heads.Classifier`, and
`distill_loss_fn` for a student `heads.Classifier` taught by a teacher one,
`multimodal_loss_fn` for a `vision.MultimodalClassifier`. Models are passed in
and only called (`apply`), so this module depends on the backbone only: `heads` imports it (for
`cross_entropy`), never the other way round.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from r1jax.model import axes
from r1jax.model import transformer_xl as txl

# loss_fn(params, batch, extras, rng, deterministic) -> (loss, (metrics, new_extras)).
LossFn = Callable[[Any, Mapping[str, jax.Array], Any, jax.Array, bool],
                  tuple[jax.Array, tuple[dict[str, tuple[jax.Array, jax.Array]], Any]]]


def metric(total: jax.Array, count: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
  """A (sum, count) pair of float32 scalars."""
  return (jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32))


# --------------------------------------------------------------------------------------------------
# Cross-entropy and classification sums.


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> tuple[jax.Array, jax.Array]:
  """Per-example (smoothed loss, plain nll) for logits [..., V] and int labels [...], in float32.

  nll = logsumexp(logits) - logits[label]. With smoothing s the target is (1 - s) one-hot
  + s uniform: loss = (1 - s) nll + s (logsumexp - mean(logits)) = (1 - s) nll + s mean(-log p).
  Written without log_softmax and without a gather: the backward pass then recomputes the softmax
  from the logits and the per-example logsumexp instead of keeping a [..., V] float32 log-softmax,
  and the label's gradient is a one-hot product rather than a scatter.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - _label_logit(logits, labels)
  if not label_smoothing:
    return nll, nll
  return (1.0 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(axis=-1)), nll


def _label_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """logits[..., labels] as a fused one-hot product (its transpose is elementwise, no scatter)."""
  hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return (hot * logits).sum(axis=-1)


def correct_predictions(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where the label's logit is the largest (argmax(logits) == labels), else 0.0 ([...]).

  Differs from argmax only on exact ties for the top logit, which count as correct here (argmax
  would pick the lowest tied index); with real-valued logits from random-initialised weights
  such ties do not occur in practice. Written as label logit >= max: XLA:CPU lowers argmax's
  (value, index) reduction to a slow scalar loop (bench/NOTES.md 'Kernel notes'), while the max
  is a plain reduction that the loss's logsumexp already computes.
  """
  logits = logits.astype(jnp.float32)
  return (_label_logit(logits, labels) >= logits.max(axis=-1)).astype(jnp.float32)


def weighted_classification(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                            label_smoothing: float = 0.0) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Sums for a (masked) classification: {"loss", "nll", "accuracy"} as (sum, sum of weights)."""
  weights = weights.astype(jnp.float32)
  loss, nll = cross_entropy(logits, labels, label_smoothing)
  correct = jax.lax.stop_gradient(correct_predictions(logits, labels))
  denom = weights.sum()
  return {"loss": metric((loss * weights).sum(), denom),
          "nll": metric((nll * weights).sum(), denom),
          "accuracy": metric((correct * weights).sum(), denom)}


# --------------------------------------------------------------------------------------------------
# Pretraining (the PretrainModel's heads).


def pretrain_loss_fn(model: Any, *, label_smoothing: float = 0.0, kg_weight: float = 1.0,
                     nsp: bool = True) -> LossFn:
  """MLM + NSP (+ knowledge) loss for `r1jax.model.heads.PretrainModel` with memory in extras.

  batch: tokens/token_mask/token_types [B, Q], mlm_positions/mlm_ids/mlm_weights [B, P],
  nsp_label [B], reset_memory [B]; optional kg_tokens/kg_token_mask [B, T], kg_label [B].
  Loss = mean MLM cross-entropy over masked positions (sum(w * ce) / sum(w)) + mean NSP
  cross-entropy (nsp=False: none, for rows without segment pairs) (+ kg_weight * mean knowledge
  cross-entropy). token_types reach the model only when it has a type embedding.
  """
  def loss_fn(params, batch, extras, rng, deterministic):
    memory = extras["memory"].reset(batch["reset_memory"])  # rows starting a new document
    rngs = {"dropout": rng}
    types = batch["token_types"] if model.config.n_token_types else None
    outputs, new_memory = model.apply(
        {"params": params}, batch["tokens"], memory=memory, token_mask=batch["token_mask"],
        token_types=types, mlm_positions=batch["mlm_positions"],
        deterministic=deterministic, rngs=rngs)
    mlm = weighted_classification(outputs["mlm_logits"], batch["mlm_ids"], batch["mlm_weights"],
                                  label_smoothing)
    rows = jnp.ones(batch["nsp_label"].shape, jnp.float32)
    loss = mlm["loss"][0] / (mlm["loss"][1] + 1e-5)
    metrics = {"mlm_loss": mlm["nll"], "mlm_accuracy": mlm["accuracy"]}
    if nsp:
      pairs = weighted_classification(outputs["nsp_logits"], batch["nsp_label"], rows,
                                      label_smoothing)
      loss = loss + pairs["loss"][0] / pairs["loss"][1]
      metrics.update(nsp_loss=pairs["nll"], nsp_accuracy=pairs["accuracy"])
    if "kg_tokens" in batch:
      kg_logits = model.apply({"params": params}, batch["kg_tokens"], batch["kg_token_mask"],
                              deterministic=deterministic, rngs=rngs, method="kg_logits")
      kg = weighted_classification(kg_logits, batch["kg_label"], rows, label_smoothing)
      loss = loss + kg_weight * kg["loss"][0] / kg["loss"][1]
      metrics.update(kg_loss=kg["nll"], kg_accuracy=kg["accuracy"])
    return loss, (metrics, {"memory": new_memory})
  return loss_fn


def causal_lm_loss_fn(model: Any, *, chunk_size: int = 0) -> LossFn:
  """Next-token LM loss for `r1jax.model.heads.PretrainModel` in causal mode, memory in extras.

  batch: tokens [B, Q], labels [B, Q] (the token after each position), reset_memory [B], optional
  token_mask [B, Q] (False rows are neither attended nor scored). Every position is predicted over
  the full vocabulary by the tied MLM head, `chunk_size` positions at a time (`MLMHead.nll`:
  the [B, Q, V] logits never exist at once; 0 = unchunked). Loss = mean nll over scored tokens.
  """
  def loss_fn(params, batch, extras, rng, deterministic):
    memory = extras["memory"].reset(batch["reset_memory"])
    mask = batch.get("token_mask")
    nll, new_memory = model.apply(
        {"params": params}, batch["tokens"], batch["labels"], memory, mask,
        chunk_size=chunk_size, deterministic=deterministic, rngs={"dropout": rng},
        method=type(model).lm_nll)
    weights = (jnp.ones(nll.shape, jnp.float32) if mask is None
               else jnp.asarray(mask, jnp.float32))
    total, count = (nll * weights).sum(), weights.sum()
    return total / jnp.maximum(count, 1.0), ({"lm_loss": metric(total, count)},
                                             {"memory": new_memory})
  return loss_fn


# --------------------------------------------------------------------------------------------------
# Classification (finetuning).


def classification_loss_fn(model: nn.Module, *, multi_label: bool, label_smoothing: float = 0.0,
                           frozen: Any = None) -> LossFn:
  """Loss for a `heads.Classifier` on classification batches (no carried extras).

  batch: tokens/token_mask [B, Q], label int32 [B] (multi-label: float32 multi-hot [B, C]), and
  for padded evaluation batches example_mask bool [B] (rows weighted 0 are ignored).
  Multi-class: label-smoothed cross-entropy; metrics loss, nll, accuracy. Multi-label: mean
  sigmoid cross-entropy over labels (targets smoothed towards 0.5); metrics loss, nll, micro_f1
  (2TP / (2TP + FP + FN), a ratio of sums) and exact-match accuracy.
  `frozen`: a bool tree like params; True leaves get `stop_gradient`, so XLA drops the backward
  pass through them (the optimizer would ignore their gradients anyway).
  """
  use_types = model.config.n_token_types > 0

  def loss_fn(params, batch, extras, rng, deterministic):
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    tokens = batch["tokens"]
    logits, _ = model.apply({"params": params}, tokens, batch["token_mask"],
                            jnp.zeros_like(tokens) if use_types else None,
                            deterministic=deterministic, rngs={"dropout": rng})
    weights = batch.get("example_mask", jnp.ones(tokens.shape[:1], bool)).astype(jnp.float32)
    rows = jnp.maximum(weights.sum(), 1.0)
    if not multi_label:
      metrics = weighted_classification(logits, batch["label"], weights, label_smoothing)
      return metrics["loss"][0] / rows, (metrics, extras)
    targets = batch["label"].astype(jnp.float32)
    smoothed = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    loss = optax.sigmoid_binary_cross_entropy(logits, smoothed).mean(-1)
    nll = optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)
    predicted = (logits >= 0).astype(jnp.float32)
    w = weights[:, None]
    tp = (predicted * targets * w).sum()
    fp = (predicted * (1 - targets) * w).sum()
    fn = ((1 - predicted) * targets * w).sum()
    exact = jnp.all(predicted == targets, axis=-1).astype(jnp.float32)
    metrics = {"loss": metric((loss * weights).sum(), weights.sum()),
               "nll": metric((nll * weights).sum(), weights.sum()),
               "micro_f1": metric(2 * tp, 2 * tp + fp + fn),
               "accuracy": metric((exact * weights).sum(), weights.sum())}
    return (loss * weights).sum() / rows, (metrics, extras)
  return loss_fn


def multimodal_inputs(batch: Mapping[str, Any], modalities: Sequence[str],
                      n_token_types: int) -> dict[str, Any]:
  """The keyword arguments of a `vision.MultimodalClassifier` call that reads `modalities` of a
  batch: tokens / token_mask (+ zero token_types when the model has a type table) for "text",
  images for "image"."""
  unknown = sorted(set(modalities) - {"text", "image"})
  if unknown or not modalities:
    raise ValueError(f"modalities={tuple(modalities)}: choose text, image or both.")
  inputs = {}
  if "text" in modalities and "tokens" in batch:
    tokens = batch["tokens"]
    inputs.update(tokens=tokens, token_mask=batch["token_mask"],
                  token_types=jnp.zeros_like(tokens) if n_token_types else None)
  if "image" in modalities and "images" in batch:
    inputs["images"] = batch["images"]
  return inputs


def multimodal_loss_fn(model: nn.Module, *, modalities: Sequence[str],
                       label_smoothing: float = 0.0, modality_dropout: float = 0.0,
                       aux_weight: float = 0.0) -> LossFn:
  """Single-label loss for a `vision.MultimodalClassifier` reading `modalities` of the batch.

  batch: tokens/token_mask [B, Q] (read when "text" is in `modalities`), images [B, S, S, C]
  (when "image" is), label int32 [B], optional example_mask bool [B]. The same batches train a
  text-only, an image-only and a fused model, so the three are compared on the same rows.
  Metrics: loss, nll, accuracy. `modality_dropout` (training, text and image read): the share
  of rows whose image is hidden (`image_mask` False) at each step, so the model also learns to
  classify from the text alone instead of leaning on the weaker modality. `aux_weight`
  (training, a model that returns per-modality logits: late fusion): the loss adds
  aux_weight * (mean CE of the text branch + mean CE of the image branch, over the rows that have
  an image), so each branch learns to classify on its own and one cannot starve the other.
  """
  multimodal_inputs({}, modalities, 0)  # refuses unknown modalities now, not when traced
  if not 0.0 <= modality_dropout < 1.0:
    raise ValueError(f"modality_dropout={modality_dropout}: must be in [0, 1).")
  if not aux_weight >= 0.0:
    raise ValueError(f"aux_weight={aux_weight}: must be >= 0.")
  drops_images = modality_dropout > 0 and set(modalities) == {"text", "image"}

  def loss_fn(params, batch, extras, rng, deterministic):
    inputs = multimodal_inputs(batch, modalities, model.config.n_token_types)
    if drops_images and not deterministic:
      rng, key = jax.random.split(rng)
      inputs["image_mask"] = jax.random.uniform(key, batch["label"].shape[:1]) >= modality_dropout
    logits, aux = model.apply({"params": params}, **inputs, deterministic=deterministic,
                              rngs={"dropout": rng})
    weights = batch.get("example_mask", jnp.ones(logits.shape[:1], bool))
    metrics = weighted_classification(logits, batch["label"], weights, label_smoothing)
    loss = metrics["loss"][0] / jnp.maximum(metrics["loss"][1], 1.0)
    if aux_weight and not deterministic and "text_logits" in aux:
      image_rows = jnp.logical_and(weights, inputs.get("image_mask", True))
      for key, rows in (("text_logits", weights), ("image_logits", image_rows)):
        branch = weighted_classification(aux[key], batch["label"], rows, label_smoothing)
        loss = loss + aux_weight * branch["loss"][0] / jnp.maximum(branch["loss"][1], 1.0)
    return loss, (metrics, extras)
  return loss_fn


# --------------------------------------------------------------------------------------------------
# Knowledge distillation of a classifier into a smaller student (`r1jax.compress.distill` builds
# the student and the params tree). Loss per example (Hinton et al. 2015; the T^2 keeps the
# soft-target gradients on the scale of the hard ones when T changes):
#
#     alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
#         + (1 - alpha) * CE(student, hard label)
#         + hidden_weight * mean over matched layers of MSE(proj(student_h_l), teacher_h_map[l])
#
# Multi-label heads use per-label Bernoulli distributions (sigmoid) in place of the softmax. The
# hidden term compares each student layer's output with the teacher layer it was initialised from
# (mean squared error over real tokens); a learned linear map `hidden_proj` [d_student, d_teacher]
# bridges different widths (TinyBERT), and is dropped after training.


def hard_loss(logits: jax.Array, labels: jax.Array, *, multi_label: bool,
              label_smoothing: float = 0.0) -> jax.Array:
  """Per-example supervised loss [B]: softmax CE (multi-class) or mean sigmoid BCE (multi-label)."""
  logits = logits.astype(jnp.float32)
  if multi_label:
    targets = labels.astype(jnp.float32)
    if label_smoothing:
      targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return jnp.mean(jnp.logaddexp(0.0, logits) - logits * targets, axis=-1)
  return cross_entropy(logits, labels, label_smoothing)[0]


def soft_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float, *,
              multi_label: bool) -> jax.Array:
  """Per-example T^2 * KL(teacher_T || student_T) [B] (exactly 0 when the logits are equal)."""
  s = student_logits.astype(jnp.float32) / temperature
  t = teacher_logits.astype(jnp.float32) / temperature
  if multi_label:
    # Sum over labels of KL between Bernoulli(sigmoid(t)) and Bernoulli(sigmoid(s)), averaged.
    log_pt, log_1mpt = jax.nn.log_sigmoid(t), jax.nn.log_sigmoid(-t)
    log_ps, log_1mps = jax.nn.log_sigmoid(s), jax.nn.log_sigmoid(-s)
    pt = jnp.exp(log_pt)
    kl = pt * (log_pt - log_ps) + (1.0 - pt) * (log_1mpt - log_1mps)
    return temperature ** 2 * jnp.mean(kl, axis=-1)
  log_pt = jax.nn.log_softmax(t, axis=-1)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  return temperature ** 2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def _accuracy(logits: jax.Array, labels: jax.Array, multi_label: bool) -> jax.Array:
  """Per-example 1.0 / 0.0 [B]: argmax == label, or (multi-label) every label's sign right."""
  if multi_label:
    return jnp.all((logits >= 0) == (labels > 0.5), axis=-1).astype(jnp.float32)
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DistillOptions:
  """The weights and temperature of `distill_loss_fn` (config section `distill`)."""
  alpha: float = 0.5            # weight of the soft (teacher) term; 1 - alpha on the hard labels
  temperature: float = 2.0      # T > 0
  hidden_weight: float = 0.0    # weight of the hidden-state MSE (0 = off)
  label_smoothing: float = 0.0  # on the hard-label term
  multi_label: bool = False

  def __post_init__(self):
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"distill.alpha={self.alpha}: must be in [0, 1].")
    if not self.temperature > 0:
      raise ValueError(f"distill.temperature={self.temperature}: must be > 0.")
    if self.hidden_weight < 0:
      raise ValueError(f"distill.hidden_weight={self.hidden_weight}: must be >= 0.")


class HiddenProjection(nn.Module):
  """[..., d_student] -> [..., d_teacher], only used by the hidden-state loss."""
  config: txl.TransformerXLConfig
  features: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return txl.make_dense(self.config, self.features, (axes.EMBED, axes.MLP), "dense")(h)


def _is_layer(module: nn.Module, method_name: str) -> bool:
  return (method_name == "__call__" and isinstance(module.name, str)
          and module.name.startswith("layer_") and len(module.path) == 2
          and module.path[0] == "backbone")


def forward_with_layers(model: nn.Module, params: Any, batch: Mapping[str, jax.Array], *,
                        deterministic: bool, rng: jax.Array | None = None
                        ) -> tuple[jax.Array, list[jax.Array]]:
  """(logits [B, C], [hidden [B, Q, d] after each backbone layer])."""
  rngs = None if deterministic else {"dropout": rng}
  (logits, _), state = model.apply(
      {"params": params}, batch["tokens"], batch["token_mask"], deterministic=deterministic,
      rngs=rngs, capture_intermediates=_is_layer, mutable=["intermediates"])
  layers = state["intermediates"]["backbone"]
  hidden = [layers[f"layer_{i}"]["__call__"][0] for i in range(model.config.n_layer)]
  return logits, hidden


def distill_loss_fn(student: nn.Module, teacher: nn.Module, options: DistillOptions,
                    mapping: Sequence[int]) -> LossFn:
  """The engine loss: params {"student", "teacher"[, "hidden_proj"]}; batch tokens/token_mask/
  label (+ example_mask on padded eval batches)."""
  mapping = list(mapping)
  proj = (HiddenProjection(student.config, teacher.config.d_model)
          if student.config.d_model != teacher.config.d_model else None)

  def loss_fn(params, batch, extras, rng, deterministic):
    weights = batch.get("example_mask")
    weights = (jnp.ones(batch["tokens"].shape[:1], jnp.float32) if weights is None
               else weights.astype(jnp.float32))
    denom = jnp.maximum(weights.sum(), 1.0)
    teacher_params = jax.lax.stop_gradient(params["teacher"])
    want_hidden = options.hidden_weight > 0
    if want_hidden:
      t_logits, t_hidden = forward_with_layers(teacher, teacher_params, batch, deterministic=True)
      s_logits, s_hidden = forward_with_layers(student, params["student"], batch,
                                               deterministic=deterministic, rng=rng)
    else:
      t_logits = teacher.apply({"params": teacher_params}, batch["tokens"], batch["token_mask"])[0]
      s_logits = student.apply({"params": params["student"]}, batch["tokens"],
                               batch["token_mask"], deterministic=deterministic,
                               rngs=None if deterministic else {"dropout": rng})[0]
    soft = soft_loss(s_logits, t_logits, options.temperature, multi_label=options.multi_label)
    hard = hard_loss(s_logits, batch["label"], multi_label=options.multi_label,
                     label_smoothing=options.label_smoothing)
    per_example = options.alpha * soft + (1.0 - options.alpha) * hard
    metrics = {"kd_loss": metric((soft * weights).sum(), denom),
               "ce_loss": metric((hard * weights).sum(), denom),
               "accuracy": metric(
                   (_accuracy(s_logits, batch["label"], options.multi_label) * weights).sum(),
                   denom),
               "teacher_accuracy": metric(
                   (_accuracy(t_logits, batch["label"], options.multi_label) * weights).sum(),
                   denom)}
    loss = (per_example * weights).sum() / denom
    if want_hidden:
      tokens = batch["token_mask"].astype(jnp.float32) * weights[:, None]     # [B, Q]
      mse = 0.0
      for i, j in enumerate(mapping):
        h = s_hidden[i].astype(jnp.float32)
        if proj is not None:
          h = proj.apply({"params": params["hidden_proj"]}, h)
        err = jnp.mean((h - t_hidden[j].astype(jnp.float32)) ** 2, axis=-1)   # [B, Q]
        mse = mse + (err * tokens).sum() / jnp.maximum(tokens.sum(), 1.0)
      mse = mse / len(mapping)
      loss = loss + options.hidden_weight * mse
      metrics["hidden_mse"] = metric(mse)
    return loss, (metrics, extras)
  return loss_fn
