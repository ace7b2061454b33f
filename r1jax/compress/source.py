"""The classifier a compression stage starts from: a finetuning workdir, or a saved float artifact.

    src = source.load("/tmp/ft_tiny")        # finetune / prune / distill workdir, or artifact dir
    src.spec.model, src.spec.num_classes, src.spec.label_names, src.spec.seq_len, src.params

What is read from a training workdir:
- the parameters of the newest checkpoint in DIR/checkpoints (a distillation workdir keeps teacher
  and student side by side; its `student` is used);
- the architecture: sizes come from the checkpoint's parameter shapes (authoritative), the other
  fields (attention kind, LayerNorm placement, activation, ...) from DIR/config.json
  (`resolved.model` if the stage recorded the full model config there, else `model` = variant +
  overrides);
- the task (train/dev/test specs, fields, multi_label, ...) from `resolved.task` in DIR/config.json
  (compression stages record it there) or its `task` section (finetuning);
- the class names in id order: DIR/labels.txt, else `resolved.labels`, else what the finetuning
  stage derives from its task section (`r1jax.data.task.load_task`);
- DIR/tokenizer.model.

A checkpoint without a classification head (pretraining: mlm_head/nsp_head) is refused with an error
that names the heads found and the stage to run first.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import ml_collections

from r1jax import errors
from r1jax import run_dir
from r1jax.compress import artifact
from r1jax.compress import spec as spec_lib
from r1jax.data import task as task_lib
from r1jax.model import transformer_xl as txl
from r1jax.model import vision
from r1jax.train import checkpoint as ckpt_lib


class WrongCheckpointKind(errors.UserError, ValueError):
  """The checkpoint is not a classifier (e.g. a pretraining run without a classification head)."""


@dataclasses.dataclass
class Source:
  """A loaded float classifier: its spec, its parameters (plain arrays) and where it came from."""
  spec: spec_lib.ClassifierSpec
  params: Any
  path: str
  kind: str            # "checkpoint" or "artifact"
  step: int | None = None


# --------------------------------------------------------------------------------------------------
# Checkpoint inspection.


def check_classifier_shapes(shapes: Mapping[str, tuple], workdir: str, prefix: str = "") -> int:
  """Returns num_classes, or raises WrongCheckpointKind for a checkpoint without cls_head."""
  key = f"{prefix}cls_head/out/kernel"
  if key not in shapes and f"{prefix}text_head/out/kernel" in shapes:
    key = f"{prefix}text_head/out/kernel"   # a late-fusion multimodal classifier: a head each
  if key not in shapes:
    tops = sorted({p[len(prefix):].split("/")[0] for p in shapes if p.startswith(prefix)})
    heads = [t for t in tops if t != "backbone"] or ["none"]
    what = ("a pretraining checkpoint" if any(h in ("mlm_head", "nsp_head") for h in heads)
            else "not a classifier checkpoint")
    raise WrongCheckpointKind(
        f"init_from={workdir!r} is {what}: its parameters have the heads {heads} but no "
        f"'cls_head'. Compression starts from a finetuned classifier: run "
        f"configs/finetune.py with --config.init_from={workdir} first and pass that workdir.")
  return int(shapes[key][1])


# --------------------------------------------------------------------------------------------------
# Task, labels, sequence length.


def _task(config: Mapping[str, Any]) -> dict[str, Any]:
  resolved = config.get("resolved") or {}
  section = resolved.get("task") if isinstance(resolved.get("task"), Mapping) else (
      config.get("task") or {})
  return {k: section.get(k, v) if section.get(k) is not None else v
          for k, v in spec_lib.TASK_DEFAULTS.items()}


def _label_names(workdir: str, config: Mapping[str, Any], task: Mapping[str, Any],
                 num_classes: int) -> tuple[str, ...]:
  path = os.path.join(workdir, run_dir.LABELS_FILE)
  if os.path.exists(path):
    return task_lib.LabelVocab.load(path).names
  resolved = config.get("resolved") or {}
  for key in ("labels", "label_names"):
    if isinstance(resolved.get(key), (list, tuple)) and resolved[key]:
      return tuple(str(x) for x in resolved[key])
  # The finetuning stage's own rule (task.labels, the embedded task's order, or sorted labels).
  names = task_lib.load_task(ml_collections.ConfigDict(dict(task))).labels.names
  if len(names) != num_classes:
    raise ValueError(f"{workdir} has no {run_dir.LABELS_FILE}, and the {len(names)} labels of its training "
                     f"split {task['train']!r} do not match the head's {num_classes} outputs.")
  return names


def _image_path(shapes: Mapping[str, tuple], config: Mapping[str, Any], prefix: str
                ) -> tuple[vision.ImageConfig | None, tuple[str, ...]]:
  """(image config, modalities) of a multimodal classifier checkpoint (it has a patch embedding),
  else (None, ("text",)). The image size comes from the config, the patch size and channels from
  the patch projection's shape [P * P * C, d] and the position table's [N, d]."""
  kernel = shapes.get(f"{prefix}patch_embed/proj/kernel")
  if kernel is None:
    return None, ("text",)
  num_patches = int(shapes[f"{prefix}patch_embed/pos_emb"][0])
  section = config.get("multimodal") or {}
  size = int(section.get("image_size", 32))
  patch = size // max(1, int(round(num_patches ** 0.5)))
  late = f"{prefix}text_head/out/kernel" in shapes   # late fusion: a head per modality
  image = vision.ImageConfig(image_size=size, patch_size=patch,
                             channels=int(kernel[0]) // (patch * patch),
                             fusion="late" if late else "joint")
  models = (config.get("resolved") or {}).get("models") or [
      m.strip() for m in str(section.get("models", "fused")).split(",") if m.strip()]
  modalities = vision.MODELS.get(models[0] if models else "fused", ("text", "image"))
  return image, modalities


def _seq_len(config: Mapping[str, Any], variant: str) -> int:
  resolved = config.get("resolved") or {}
  for value in (resolved.get("seq_len"), (config.get("task") or {}).get("seq_len"),
                (config.get("data") or {}).get("seq_len")):
    if isinstance(value, int) and value > 0:
      return value
  return txl.SEGMENT_LEN.get(variant, 64)


# --------------------------------------------------------------------------------------------------
# Loading.


def is_artifact_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, spec_lib.ARTIFACT_FILE))


def model_config(path: str) -> txl.TransformerXLConfig:
  """The model `load(path)` would return, from parameter shapes / artifact.json only (no weights
  read): what a stage checks its settings against before doing any work."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, run_dir.CHECKPOINTS_DIR)):
    shapes, _ = run_dir.saved_param_shapes(path)
    prefix = "student/" if any(p.startswith("student/") for p in shapes) else ""
    return run_dir.model_config_of(path, shapes=shapes, prefix=prefix)
  for candidate in (path, os.path.join(path, spec_lib.ARTIFACT_SUBDIR)):
    if is_artifact_dir(candidate):
      return spec_lib.ClassifierSpec.from_json(artifact.read_meta(candidate)["spec"]).model
  return load(path).spec.model   # raises the loader's own error


def load(path: str, *, target_sharding: Any = None) -> Source:
  """Loads a float classifier from a training workdir or a float artifact directory.

  Args:
    path: a finetuning (or prune/distill) workdir with checkpoints/, a workdir with a float
      artifact/ but no checkpoints, or an artifact directory itself.
    target_sharding: optional function ShapeDtypeStruct tree -> same with shardings, for restoring
      straight into a mesh; default: every leaf on the first device.
  Raises:
    FileNotFoundError: nothing loadable at `path`.
    WrongCheckpointKind: a checkpoint without a classification head.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise errors.InputNotFound(f"init_from={path!r} is not a directory; name a finetuning workdir.")
  has_ckpt = os.path.isdir(os.path.join(path, run_dir.CHECKPOINTS_DIR))
  if not has_ckpt:
    for candidate in (path, os.path.join(path, spec_lib.ARTIFACT_SUBDIR)):
      if is_artifact_dir(candidate):
        art = artifact.load(candidate)
        if art.kind_is_quantized:
          raise WrongCheckpointKind(f"{candidate} is an int8 artifact; compression stages start "
                                    "from a float classifier (the finetuning workdir).")
        return Source(art.spec, art.params, candidate, "artifact")
    raise errors.InputNotFound(f"init_from={path!r} has no checkpoints/ and no "
                               f"{spec_lib.ARTIFACT_FILE}: name a finished finetuning workdir.")
  shapes, step = run_dir.saved_param_shapes(path)
  config = run_dir.read_json(os.path.join(path, run_dir.CONFIG_FILE)) or {}
  prefix = "student/" if any(p.startswith("student/") for p in shapes) else ""
  num_classes = check_classifier_shapes(shapes, path, prefix)
  model = run_dir.model_config_of(path, shapes=shapes, prefix=prefix)
  task = _task(config)
  variant = (config.get("model") or {}).get("variant", "tiny")
  tokenizer = run_dir.tokenizer_of(path)
  image, modalities = _image_path(shapes, config, prefix)
  if image is not None:   # finetune's multimodal mode: the image task's own fields and no n-grams
    model = dataclasses.replace(model, ngram_buckets=0)
    section = (config.get("resolved") or {}).get("task") or config.get("task") or {}
    task["image_field"] = section.get("image_field", "image")
  spec = spec_lib.ClassifierSpec(model=model, num_classes=num_classes,
                        label_names=_label_names(path, config, task, num_classes),
                        seq_len=_seq_len(config, variant), multi_label=bool(task["multi_label"]),
                        tokenizer=tokenizer, task=task, image=image, modalities=modalities)
  abstract = spec_lib.abstract_params(spec)
  target = target_sharding(abstract) if target_sharding else ckpt_lib.on_one_device(abstract)
  if prefix:
    params, step = ckpt_lib.restore_params(path, {"student": target})
    params = params["student"]
  else:
    params, step = ckpt_lib.restore_params(path, target)
  return Source(spec, params, path, "checkpoint", step)
