"""Knowledge distillation of a finetuned classifier into a smaller student, on the shared engine.

Loss per example (Hinton et al. 2015; the T^2 keeps the soft-target gradients on the scale of the
hard ones when T changes):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
        + (1 - alpha) * CE(student, hard label)
        + hidden_weight * mean over matched layers of MSE(proj(student_h_l), teacher_h_map[l])

Multi-label heads use per-label Bernoulli distributions (sigmoid) in place of the softmax. The hidden
term compares each student layer's output with the teacher layer it was initialised from (mean
squared error over real tokens); a learned linear map `hidden_proj` [d_student, d_teacher] bridges
different widths (TinyBERT), and is dropped after training.

Engine wiring: the trainable tree is {"student", "teacher"[, "hidden_proj"]}. The teacher is frozen
by the optimizer rule ("teacher/.*", "frozen") (no optimizer state) and read through
`stop_gradient`, so it costs one forward pass per step; being in the params it is sharded by the same
logical rules as the student and saved in the checkpoints with it. Teacher and student see the same
batch (the same tokens; dropout only in the student).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import axes
from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.train import steps as steps_lib

LAYER_MAPS = ("uniform", "first", "last")
SIZE_FIELDS = ("n_layer", "d_model", "n_head", "d_head", "d_inner")


class StudentTooLarge(ValueError):
  """The student would be larger than its teacher."""


def student_config(teacher: txl.TransformerXLConfig, *, n_layer: int = -1, d_model: int = -1,
                   n_head: int = -1, d_head: int = -1, d_inner: int = -1,
                   dropout: float | None = None) -> txl.TransformerXLConfig:
  """The teacher's config with the given sizes (-1 keeps the teacher's; n_layer -1 = a third).

  Raises StudentTooLarge if any size exceeds the teacher's, or if the student would have more
  parameters than the teacher.
  """
  sizes = {"n_layer": n_layer if n_layer != -1 else max(1, teacher.n_layer // 3),
           "d_model": d_model, "n_head": n_head, "d_head": d_head, "d_inner": d_inner}
  sizes = {k: (getattr(teacher, k) if v == -1 else v) for k, v in sizes.items()}
  for k, v in sizes.items():
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"student.{k}={v!r}: must be a positive integer (or -1 for the default).")
  larger = {k: (v, getattr(teacher, k)) for k, v in sizes.items() if v > getattr(teacher, k)}
  if larger:
    detail = ", ".join(f"{k}={v} > teacher's {t}" for k, (v, t) in larger.items())
    raise StudentTooLarge(f"The student is larger than the teacher ({detail}); distillation "
                          "compresses: choose student sizes <= the teacher's (or -1).")
  changes = dict(sizes)
  if dropout is not None:
    changes["dropout"] = dropout
  return dataclasses.replace(teacher, **changes)


def layer_map(n_student: int, n_teacher: int, how: str | Sequence[int] = "uniform") -> list[int]:
  """Which teacher layer each student layer is initialised from (and matched to).

  "uniform" spreads the student over the teacher and always keeps the teacher's last layer (e.g.
  2 of 6 -> [2, 5]); "first" / "last" take the bottom / top n_student layers; or an explicit list of
  increasing teacher layer indices.
  """
  if n_student > n_teacher:
    raise StudentTooLarge(f"student n_layer={n_student} > teacher n_layer={n_teacher}.")
  if isinstance(how, str):
    if how not in LAYER_MAPS:
      raise ValueError(f"layer map {how!r}: allowed values are {', '.join(LAYER_MAPS)}, or a list "
                       "of teacher layer indices.")
    if how == "first":
      return list(range(n_student))
    if how == "last":
      return list(range(n_teacher - n_student, n_teacher))
    step = n_teacher / n_student
    return [int(round((i + 1) * step)) - 1 for i in range(n_student)]
  mapping = [int(i) for i in how]
  if len(mapping) != n_student or any(not 0 <= i < n_teacher for i in mapping) or (
      sorted(set(mapping)) != mapping):
    raise ValueError(f"layer map {mapping}: need {n_student} increasing teacher layer indices in "
                     f"[0, {n_teacher}).")
  return mapping


def init_from_teacher(student_params: Any, teacher_params: Any, mapping: Sequence[int]
                      ) -> tuple[Any, dict[str, Any]]:
  """Copies every teacher leaf whose shape fits into the student (layer i <- teacher mapping[i]).

  Returns (params, {"copied": [paths], "kept_random": [paths]}).
  """
  teacher_flat = flax.traverse_util.flatten_dict(nn.unbox(teacher_params), sep="/")
  out, copied, kept = {}, [], []
  for path, value in flax.traverse_util.flatten_dict(nn.unbox(student_params), sep="/").items():
    parts = path.split("/")
    if len(parts) > 1 and parts[0] == "backbone" and parts[1].startswith("layer_"):
      parts[1] = f"layer_{mapping[int(parts[1][6:])]}"
    source = teacher_flat.get("/".join(parts))
    if source is not None and tuple(source.shape) == tuple(value.shape):
      out[path] = jnp.asarray(source, value.dtype)
      copied.append(path)
    else:
      out[path] = value
      kept.append(path)
  return flax.traverse_util.unflatten_dict(out, sep="/"), {"copied": copied, "kept_random": kept}


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


def forward_with_layers(model: heads.Classifier, params: Any, batch: Mapping[str, jax.Array], *,
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


def hard_loss(logits: jax.Array, labels: jax.Array, *, multi_label: bool,
              label_smoothing: float = 0.0) -> jax.Array:
  """Per-example supervised loss [B]: softmax CE (multi-class) or mean sigmoid BCE (multi-label)."""
  logits = logits.astype(jnp.float32)
  if multi_label:
    targets = labels.astype(jnp.float32)
    if label_smoothing:
      targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return jnp.mean(jnp.logaddexp(0.0, logits) - logits * targets, axis=-1)
  return steps_lib.cross_entropy(logits, labels, label_smoothing)[0]


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
  if multi_label:
    return jnp.all((logits >= 0) == (labels > 0.5), axis=-1).astype(jnp.float32)
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DistillOptions:
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


def distill_loss_fn(student: heads.Classifier, teacher: heads.Classifier,
                    options: DistillOptions, mapping: Sequence[int]) -> steps_lib.LossFn:
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
    metrics = {"kd_loss": steps_lib.metric((soft * weights).sum(), denom),
               "ce_loss": steps_lib.metric((hard * weights).sum(), denom),
               "accuracy": steps_lib.metric(
                   (_accuracy(s_logits, batch["label"], options.multi_label) * weights).sum(),
                   denom),
               "teacher_accuracy": steps_lib.metric(
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
      metrics["hidden_mse"] = steps_lib.metric(mse)
    return loss, (metrics, extras)
  return loss_fn


def init_params_fn(student: heads.Classifier, teacher: heads.Classifier, *,
                   hidden_projection: bool, seq_len: int = 8):
  """rng -> boxed {"student", "teacher"[, "hidden_proj"]} (random; the stage loads real values)."""
  def init(rng):
    k_s, k_t, k_p = jax.random.split(rng, 3)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    tree = {"student": student.init({"params": k_s}, tokens)["params"],
            "teacher": teacher.init({"params": k_t}, tokens)["params"]}
    if hidden_projection:
      proj = HiddenProjection(student.config, teacher.config.d_model)
      tree["hidden_proj"] = proj.init({"params": k_p},
                                      jnp.zeros((1, student.config.d_model)))["params"]
    return tree
  return init


FREEZE_TEACHER = (r"teacher/.*", "frozen")
