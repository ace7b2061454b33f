"""What a compressed (or compressible) classifier is, apart from its weights: `ClassifierSpec`.

    spec = ClassifierSpec(model=txl_config, num_classes=10, label_names=names, seq_len=64)
    spec.to_json() / ClassifierSpec.from_json(data, tokenizer=path)   # artifact.json's "spec"
    abstract_params(spec)                                              # ShapeDtypeStructs
    classifier_module(spec); apply_logits(model, spec, params, *inputs)  # inputs: spec.input_names

A spec with `image` set is a `vision.MultimodalClassifier` (the finetune stage's multimodal mode)
reading `modalities`; its inputs are tokens int32 [B, Q] + token_mask bool [B, Q] for "text" and
images uint8 [B, S, S, C] for "image", in that order. Without `image` it is a `heads.Classifier`
(tokens, token_mask), and its JSON is what it was before multimodal specs existed.

Both ways a compression stage gets a classifier use it: `source.load` (a finetuning workdir or a
float artifact) and `artifact.load` (an artifact directory), so it lives below both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

import jax.numpy as jnp

from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.model import vision

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
  image: vision.ImageConfig | None = None    # set: a multimodal classifier (patch embedding)
  modalities: tuple[str, ...] = ("text",)    # what the classifier reads: text and/or image

  def __post_init__(self):
    bad = sorted(set(self.modalities) - set(vision.MODALITIES))
    if bad or not self.modalities or ("image" in self.modalities and self.image is None):
      raise ValueError(f"modalities={self.modalities}: some of {vision.MODALITIES}, and 'image' "
                       "only with an image config.")
    if len(self.label_names) != self.num_classes:
      raise ValueError(f"{len(self.label_names)} label names for a head with {self.num_classes} "
                       f"outputs: {list(self.label_names)[:12]}")
    if self.seq_len < 3:
      raise ValueError(f"seq_len={self.seq_len}: a classifier needs [CLS] text [SEP] (>= 3).")

  def to_json(self) -> dict[str, Any]:
    model = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(self.model)}
    model["dtype"] = str(np.dtype(model["dtype"]))
    model["param_dtype"] = str(np.dtype(model["param_dtype"]))
    out = {"model": model, "num_classes": self.num_classes, "label_names": list(self.label_names),
           "seq_len": self.seq_len, "multi_label": self.multi_label, "task": dict(self.task)}
    if self.multimodal:
      out["image"] = dataclasses.asdict(self.image)
      out["modalities"] = list(self.modalities)
    return out

  @classmethod
  def from_json(cls, data: Mapping[str, Any], tokenizer: str = "") -> "ClassifierSpec":
    return cls(model=txl.TransformerXLConfig(**data["model"]), num_classes=int(data["num_classes"]),
               label_names=tuple(data["label_names"]), seq_len=int(data["seq_len"]),
               multi_label=bool(data.get("multi_label", False)), tokenizer=tokenizer,
               task=dict(TASK_DEFAULTS, **dict(data.get("task") or {})),
               image=vision.ImageConfig(**data["image"]) if data.get("image") else None,
               modalities=tuple(data.get("modalities") or ("text",)))

  def replace(self, **changes: Any) -> "ClassifierSpec":
    return dataclasses.replace(self, **changes)

  @property
  def multimodal(self) -> bool:
    return self.image is not None

  @property
  def kind(self) -> str:
    """"text" for a text classifier, else the modalities read: "text+image" or "image"."""
    return "+".join(self.modalities) if self.multimodal else "text"

  @property
  def input_names(self) -> tuple[str, ...]:
    """The inputs of `apply_logits` (and of exported models), in order."""
    names = ("tokens", "token_mask") if "text" in self.modalities else ()
    return names + (("images",) if "image" in self.modalities else ())

  def input_specs(self, batch: Any) -> list[jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of the inputs for a batch size (an int or a symbolic dimension)."""
    specs = {"tokens": ((batch, self.seq_len), np.int32),
             "token_mask": ((batch, self.seq_len), np.bool_)}
    if self.image is not None:
      s = self.image.image_size
      specs["images"] = ((batch, s, s, self.image.channels), np.uint8)
    return [jax.ShapeDtypeStruct(*specs[n]) for n in self.input_names]

  def inputs_of(self, batch: Mapping[str, Any]) -> list[Any]:
    """A batch dict's inputs in `input_names` order."""
    missing = [n for n in self.input_names if n not in batch]
    if missing:
      raise ValueError(f"this {self.kind} classifier reads {list(self.input_names)}; the batch "
                       f"lacks {missing}.")
    return [batch[n] for n in self.input_names]


def classifier_module(spec: ClassifierSpec, config: txl.TransformerXLConfig | None = None
                      ) -> nn.Module:
  """The flax module of `spec` (with `config` in place of spec.model when given)."""
  config = config or spec.model
  if spec.multimodal:
    return vision.MultimodalClassifier(config, spec.image, spec.num_classes, spec.multi_label)
  return heads.Classifier(config, spec.num_classes, spec.multi_label)


def model_inputs(spec: ClassifierSpec, *inputs: Any) -> dict[str, Any]:
  """The keyword arguments of `classifier_module(spec)` for inputs in `spec.input_names` order; a
  multimodal model with a token-type table gets type 0 for its text, as in training."""
  kwargs = dict(zip(spec.input_names, inputs))
  if spec.multimodal and spec.model.n_token_types and "tokens" in kwargs:
    kwargs["token_types"] = jnp.zeros_like(kwargs["tokens"])
  return kwargs


def apply_logits(model: nn.Module, spec: ClassifierSpec, params: Any, *inputs: Any) -> jax.Array:
  """Pure: logits float32 [B, C] of `model` (`classifier_module(spec)`, possibly quantized)."""
  return model.apply({"params": params}, **model_inputs(spec, *inputs))[0]


def abstract_params(spec: ClassifierSpec) -> Any:
  """ShapeDtypeStructs of the classifier's parameters for `spec` (nothing allocated)."""
  model = classifier_module(spec)
  tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
