"""Serialized StableHLO of an artifact's inference function (`jax.export`), servable without r1jax.

The exported function is `(tokens int32 [B, Q], token_mask bool [B, Q]) -> logits float32 [B, C]`
(a multimodal artifact's takes its spec's inputs: + images uint8 [B, S, S, C]) with the weights
embedded as constants (int8 ones stay int8) and a symbolic batch size B, so one
file serves batch 1 and batched requests. Any JAX installation can run it:

    exported = jax.export.deserialize(open("DIR/model.stablehlo", "rb").read())
    logits = exported.call(tokens, token_mask)

`export.load(path)` does exactly that and checks the input shapes. `save_multimodal` exports a
`vision.MultimodalClassifier` the same way, its inputs those of the modalities it reads.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EXPORT_FILE = "model.stablehlo"
SIGNATURE_FILE = "model.signature.json"


def export(art, *, platforms: Sequence[str] = ("cpu",),
           batch_size: int | None = None) -> jax.export.Exported:
  """`jax.export` of `art.logits` with its params closed over (`art`: an `artifact.Artifact`).

  Args:
    art: the artifact.
    platforms: lowering platforms ("cpu", "cuda", "rocm", "tpu"); one file can hold several.
    batch_size: a fixed batch size, or None for a symbolic one.
  """
  (b,) = jax.export.symbolic_shape("b") if batch_size is None else (batch_size,)
  params = art.params

  def serve(*inputs):
    return art.logits(params, *inputs)

  specs = art.spec.input_specs(b)   # tokens, token_mask (+ images uint8 for a multimodal model)
  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(*specs)


def save(art, directory: str, *, platforms: Sequence[str] = ("cpu",)) -> str:
  """Writes DIR/model.stablehlo (serialized) and DIR/model.signature.json; returns the path."""
  exported = export(art, platforms=platforms)
  path = os.path.join(directory, EXPORT_FILE)
  with open(path + ".tmp", "wb") as f:
    f.write(exported.serialize())
  os.replace(path + ".tmp", path)
  signature = {"inputs": {n: ["batch", *s.shape[1:], str(s.dtype)] for n, s in
                          zip(art.spec.input_names, art.spec.input_specs(1))},
               "outputs": {"logits": ["batch", art.spec.num_classes, "float32"]},
               "label_names": list(art.spec.label_names), "platforms": list(platforms),
               "kind": art.kind, "tokenizer": "tokenizer.model ([CLS] text [SEP], pad id 0)"}
  if art.spec.multimodal:
    signature["modalities"] = list(art.spec.modalities)
  with open(os.path.join(directory, SIGNATURE_FILE), "w") as f:
    json.dump(signature, f, indent=2)
  return path


def save_multimodal(model, params, directory: str, *, seq_len: int, modalities: Sequence[str],
                    label_names: Sequence[str], platforms: Sequence[str] = ("cpu",)) -> str:
  """DIR/model.stablehlo and DIR/model.signature.json of a `vision.MultimodalClassifier`.

  The function takes, in this order, what `modalities` read: tokens int32 [B, Q] and token_mask
  bool [B, Q] for "text", images uint8 [B, S, S, C] (pixel values 0..255) for "image"; it returns
  logits float32 [B, C], with a symbolic batch size B and the weights embedded.
  """
  (b,) = jax.export.symbolic_shape("b")
  image = model.image
  names, specs = [], []
  if "text" in modalities:
    names += ["tokens", "token_mask"]
    specs += [jax.ShapeDtypeStruct((b, seq_len), jnp.int32),
              jax.ShapeDtypeStruct((b, seq_len), jnp.bool_)]
  if "image" in modalities:
    names.append("images")
    specs.append(jax.ShapeDtypeStruct((b, image.image_size, image.image_size, image.channels),
                                      jnp.uint8))
  use_types = model.config.n_token_types > 0

  def serve(*inputs):
    kwargs = dict(zip(names, inputs))
    if use_types and "tokens" in kwargs:
      kwargs["token_types"] = jnp.zeros_like(kwargs["tokens"])
    return model.apply({"params": params}, **kwargs, deterministic=True)[0]

  exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(*specs)
  path = os.path.join(directory, EXPORT_FILE)
  with open(path + ".tmp", "wb") as f:
    f.write(exported.serialize())
  os.replace(path + ".tmp", path)
  signature = {"inputs": {n: ["batch", *s.shape[1:], str(s.dtype)] for n, s in zip(names, specs)},
               "outputs": {"logits": ["batch", len(label_names), "float32"]},
               "label_names": list(label_names), "platforms": list(platforms),
               "kind": "multimodal", "modalities": list(modalities),
               "tokenizer": "tokenizer.model ([CLS] text [SEP], pad id 0)"}
  with open(os.path.join(directory, SIGNATURE_FILE), "w") as f:
    json.dump(signature, f, indent=2)
  return path


def load(path: str) -> Callable[[np.ndarray, np.ndarray], jax.Array]:
  """The deserialized function of a model.stablehlo file: (tokens, token_mask) -> logits."""
  if os.path.isdir(path):
    path = os.path.join(path, EXPORT_FILE)
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  if len(exported.in_avals) != 2:
    raise ValueError(f"{path} takes {len(exported.in_avals)} inputs (a multimodal export: "
                     "call jax.export.deserialize(...).call(tokens, token_mask, images)); "
                     "export.load reads text classifiers.")
  seq_len = exported.in_avals[0].shape[1]

  def call(tokens, token_mask):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] != seq_len:
      raise ValueError(f"tokens must be [batch, {seq_len}] for this export, got {tokens.shape}.")
    return exported.call(tokens, jnp.asarray(token_mask, bool))
  return call
