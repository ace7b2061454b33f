"""Knowledge distillation of a finetuned classifier into a smaller student, on the shared engine.

This module builds the student (`student_config`, `layer_map`, `init_from_teacher`) and the params
tree (`init_params_fn`); the loss (soft teacher targets + hard labels + an optional hidden-state
term through a learned projection `hidden_proj`) is `r1jax.model.losses.distill_loss_fn`, with
its options `losses.DistillOptions`.

Engine wiring: the trainable tree is {"student", "teacher"[, "hidden_proj"]}. The teacher is frozen
by the optimizer rule ("teacher/.*", "frozen") (no optimizer state) and read through
`stop_gradient`, so it costs one forward pass per step; being in the params it is sharded by the
same logical rules as the student and saved in the checkpoints with it. Teacher and student see the
same batch (the same tokens; dropout only in the student).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax import errors
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl

LAYER_MAPS = ("uniform", "first", "last")
SIZE_FIELDS = ("n_layer", "d_model", "n_head", "d_head", "d_inner")


class StudentTooLarge(errors.UserError, ValueError):
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


def init_params_fn(student: heads.Classifier, teacher: heads.Classifier, *,
                   hidden_projection: bool, seq_len: int = 8):
  """rng -> boxed {"student", "teacher"[, "hidden_proj"]} (random; the stage loads real values)."""
  def init(rng):
    k_s, k_t, k_p = jax.random.split(rng, 3)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    tree = {"student": student.init({"params": k_s}, tokens)["params"],
            "teacher": teacher.init({"params": k_t}, tokens)["params"]}
    if hidden_projection:
      proj = losses.HiddenProjection(student.config, teacher.config.d_model)
      tree["hidden_proj"] = proj.init({"params": k_p},
                                      jnp.zeros((1, student.config.d_model)))["params"]
    return tree
  return init


FREEZE_TEACHER = (r"teacher/.*", "frozen")
