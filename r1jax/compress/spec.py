"""What a compressed (or compressible) classifier is, apart from its weights: `ClassifierSpec`.

    spec = ClassifierSpec(model=txl_config, num_classes=10, label_names=names, seq_len=64)
    spec.to_json() / ClassifierSpec.from_json(data, tokenizer=path)   # artifact.json's "spec"
    abstract_params(spec)                                              # ShapeDtypeStructs

Both ways a compression stage gets a classifier use it: `source.load` (a finetuning workdir or a
float artifact) and `artifact.load` (an artifact directory), so it lives below both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from r1jax.model import heads
from r1jax.model import transformer_xl as txl

ARTIFACT_FILE = "artifact.json"
ARTIFACT_SUBDIR = "artifact"
# The task section of a finetuning config (configs/finetune.py), with these defaults when absent.
TASK_DEFAULTS = {"train": "builtin:task:train", "dev": "builtin:task:dev",
                 "test": "builtin:task:test", "text_field": "text", "label_field": "label",
                 "multi_label": False, "label_delimiter": ",", "labels": "",
                 "unknown_label": "error", "threshold": 0.5}


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


def abstract_params(spec: ClassifierSpec) -> Any:
  """ShapeDtypeStructs of a `heads.Classifier` for `spec` (nothing allocated)."""
  model = heads.Classifier(spec.model, spec.num_classes, spec.multi_label)
  tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
