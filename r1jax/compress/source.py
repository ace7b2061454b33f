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
  stage derives from its task section (`finetune.load_task`);
- DIR/tokenizer.model.

A checkpoint without a classification head (pretraining: mlm_head/nsp_head) is refused with an error
that names the heads found and the stage to run first.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from r1jax.model import transformer_xl as txl
from r1jax.train import checkpoint as ckpt_lib

TOKENIZER_FILE = "tokenizer.model"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.json"
ARTIFACT_FILE = "artifact.json"
ARTIFACT_SUBDIR = "artifact"
# The task section of a finetuning config (configs/finetune.py), with these defaults when absent.
TASK_DEFAULTS = {"train": "builtin:task:train", "dev": "builtin:task:dev",
                 "test": "builtin:task:test", "text_field": "text", "label_field": "label",
                 "multi_label": False, "label_delimiter": ",", "labels": "",
                 "unknown_label": "error", "threshold": 0.5}


class WrongCheckpointKind(ValueError):
  """The checkpoint is not a classifier (e.g. a pretraining run without a classification head)."""


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
  """Everything about a classifier except its weights."""
  model: txl.TransformerXLConfig
  num_classes: int
  label_names: tuple[str, ...]
  seq_len: int
  multi_label: bool = False
  tokenizer: str = ""                       # path of the SentencePiece model
  task: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(TASK_DEFAULTS))

  def __post_init__(self):
    if len(self.label_names) != self.num_classes:
      raise ValueError(f"{len(self.label_names)} label names for a head with {self.num_classes} "
                       f"outputs: {list(self.label_names)[:12]}")
    if self.seq_len < 3:
      raise ValueError(f"seq_len={self.seq_len}: a classifier needs [CLS] text [SEP] (>= 3).")

  def to_json(self) -> dict[str, Any]:
    model = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)}
    model["dtype"] = str(np.dtype(model["dtype"]))
    model["param_dtype"] = str(np.dtype(model["param_dtype"]))
    return {"model": model, "num_classes": self.num_classes, "label_names": list(self.label_names),
            "seq_len": self.seq_len, "multi_label": self.multi_label, "task": dict(self.task)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any], tokenizer: str = "") -> "ClassifierSpec":
    return cls(model=txl.TransformerXLConfig(**data["model"]), num_classes=int(data["num_classes"]),
               label_names=tuple(data["label_names"]), seq_len=int(data["seq_len"]),
               multi_label=bool(data.get("multi_label", False)), tokenizer=tokenizer,
               task=dict(TASK_DEFAULTS, **dict(data.get("task") or {})))

  def replace(self, **changes: Any) -> "ClassifierSpec":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Source:
  """A loaded float classifier: its spec, its parameters (plain arrays) and where it came from."""
  spec: ClassifierSpec
  params: Any
  path: str
  kind: str            # "checkpoint" or "artifact"
  step: int | None = None


# --------------------------------------------------------------------------------------------------
# Checkpoint inspection.


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _config_fields(data: Mapping[str, Any] | None) -> dict[str, Any]:
  fields = {f.name for f in dataclasses.fields(txl.TransformerXLConfig)}
  return {k: v for k, v in dict(data or {}).items() if k in fields and v is not None}


def infer_model_config(shapes: Mapping[str, tuple], config: Mapping[str, Any], *,
                       prefix: str = "") -> txl.TransformerXLConfig:
  """The backbone config: sizes from the parameter shapes, other fields from the run's config."""
  resolved = config.get("resolved") or {}
  model_section = dict(config.get("model") or {})
  variant = model_section.get("variant", "tiny")
  fields = dict(txl.VARIANTS.get(variant, txl.VARIANTS["tiny"]))
  fields.update(_config_fields(model_section))
  fields.update(_config_fields(resolved.get("model") if isinstance(resolved.get("model"), Mapping)
                               else None))
  b = f"{prefix}backbone/"
  vocab, d_model = shapes[b + "word_emb/embedding"]
  layers = sorted({int(p[len(b) + 6:].split("/")[0]) for p in shapes
                   if p.startswith(b + "layer_")})
  if layers != list(range(len(layers))) or not layers:
    raise ValueError(f"checkpoint backbone layers {layers} are not layer_0..layer_{{n-1}}.")
  _, _, n_head, d_head = shapes[b + "layer_0/attn/qkv/kernel"]
  fields.update(vocab_size=vocab, d_model=d_model, n_layer=len(layers), n_head=n_head,
                d_head=d_head, d_inner=shapes[b + "layer_0/ff_in/kernel"][1],
                untie_r=(b + "layer_0/attn/r_w_bias") in shapes,
                n_token_types=shapes[b + "type_emb/embedding"][0]
                if (b + "type_emb/embedding") in shapes else 0)
  return txl.TransformerXLConfig(**fields)


def check_classifier_shapes(shapes: Mapping[str, tuple], workdir: str, prefix: str = "") -> int:
  """Returns num_classes, or raises WrongCheckpointKind for a checkpoint without cls_head."""
  key = f"{prefix}cls_head/out/kernel"
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
          for k, v in TASK_DEFAULTS.items()}


def _label_names(workdir: str, config: Mapping[str, Any], task: Mapping[str, Any],
                 num_classes: int) -> tuple[str, ...]:
  path = os.path.join(workdir, LABELS_FILE)
  if os.path.exists(path):
    from r1jax.data import examples  # pylint: disable=g-import-not-at-top
    return examples.LabelVocab.load(path).names
  resolved = config.get("resolved") or {}
  for key in ("labels", "label_names"):
    if isinstance(resolved.get(key), (list, tuple)) and resolved[key]:
      return tuple(str(x) for x in resolved[key])
  # The finetuning stage's own rule (task.labels, the embedded task's order, or sorted labels).
  import ml_collections  # pylint: disable=g-import-not-at-top
  from r1jax.stages import finetune  # pylint: disable=g-import-not-at-top
  names = finetune.load_task(ml_collections.ConfigDict(dict(task))).labels.names
  if len(names) != num_classes:
    raise ValueError(f"{workdir} has no {LABELS_FILE}, and the {len(names)} labels of its training "
                     f"split {task['train']!r} do not match the head's {num_classes} outputs.")
  return names


def _seq_len(config: Mapping[str, Any], variant: str) -> int:
  resolved = config.get("resolved") or {}
  for value in (resolved.get("seq_len"), (config.get("task") or {}).get("seq_len"),
                (config.get("data") or {}).get("seq_len")):
    if isinstance(value, int) and value > 0:
      return value
  return txl.SEGMENT_LEN.get(variant, 64)


# --------------------------------------------------------------------------------------------------
# Loading.


def _replicated_target(shapes_tree: Any) -> Any:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes_tree)


def abstract_params(spec: ClassifierSpec) -> Any:
  """ShapeDtypeStructs of a `heads.Classifier` for `spec` (nothing allocated)."""
  from r1jax.model import heads  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = heads.Classifier(spec.model, spec.num_classes, spec.multi_label)
  tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])


def is_artifact_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, ARTIFACT_FILE))


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
    raise FileNotFoundError(f"init_from={path!r} is not a directory; name a finetuning workdir.")
  has_ckpt = os.path.isdir(os.path.join(path, "checkpoints"))
  if not has_ckpt:
    for candidate in (path, os.path.join(path, ARTIFACT_SUBDIR)):
      if is_artifact_dir(candidate):
        from r1jax.compress import artifact  # pylint: disable=g-import-not-at-top
        art = artifact.load(candidate)
        if art.kind_is_quantized:
          raise WrongCheckpointKind(f"{candidate} is an int8 artifact; compression stages start "
                                    "from a float classifier (the finetuning workdir).")
        return Source(art.spec, art.params, candidate, "artifact")
    raise FileNotFoundError(f"init_from={path!r} has no checkpoints/ and no {ARTIFACT_FILE}: "
                            "name a finished finetuning workdir.")
  shapes, step = ckpt_lib.saved_param_shapes(path)
  config = _read_json(os.path.join(path, CONFIG_FILE))
  prefix = "student/" if any(p.startswith("student/") for p in shapes) else ""
  num_classes = check_classifier_shapes(shapes, path, prefix)
  model = infer_model_config(shapes, config, prefix=prefix)
  task = _task(config)
  variant = (config.get("model") or {}).get("variant", "tiny")
  tokenizer = os.path.join(path, TOKENIZER_FILE)
  if not os.path.exists(tokenizer):
    raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE}; it must be a finished training "
                            "workdir.")
  spec = ClassifierSpec(model=model, num_classes=num_classes,
                        label_names=_label_names(path, config, task, num_classes),
                        seq_len=_seq_len(config, variant), multi_label=bool(task["multi_label"]),
                        tokenizer=tokenizer, task=task)
  abstract = abstract_params(spec)
  target = target_sharding(abstract) if target_sharding else _replicated_target(abstract)
  if prefix:
    params, step = ckpt_lib.restore_params(path, {"student": target})
    params = params["student"]
  else:
    params, step = ckpt_lib.restore_params(path, target)
  return Source(spec, params, path, "checkpoint", step)
