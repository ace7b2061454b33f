"""Deployable classifier artifacts: float, distilled, pruned or int8, saved and loaded the same way.

Layout of an artifact directory:

    artifact.json    format/version, kind, the classifier spec (model config, class names, seq_len,
                     task), quantization recipe per leaf (op, axes with their own scales), static
                     activation scales, and free-form metadata (source, sparsity, ...)
    params.npz       one array per leaf, uncompressed: "<path>" for float leaves,
                     "<path>::qvalue" (int8) and "<path>::scale" (float32) for quantized ones
    tokenizer.model  the SentencePiece model the spec's token ids come from

Loading needs no float copy of the weights: the parameter tree is rebuilt from params.npz and the
recipe in artifact.json, checked against the shapes the spec's model expects, and run through the
qwix-quantized model (`quantize.quantized_model`) when the artifact is int8.

    artifact.save(dir, spec, params, kind="float")
    art = artifact.load(dir)
    logits = art.predict({"tokens": t, "token_mask": m})      # [B, C] float32
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from r1jax import run_dir
from r1jax.compress import quantize as quant_lib
from r1jax.compress import spec as spec_lib
from r1jax.model import heads

FORMAT = "r1jax.compress.artifact"
VERSION = 1
KINDS = ("float", "distilled", "pruned", "int8")
PARAMS_FILE = "params.npz"
SEP = "::"


def _flatten(params: Any) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(nn.unbox(params), sep="/",
                                         is_leaf=lambda _, x: quant_lib.is_quantized(x))


def to_arrays(params: Any) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
  """Params (float and/or quantized leaves) -> ({npz key: array}, {path: recipe} for int8 leaves)."""
  arrays, recipes = {}, {}
  for path, leaf in _flatten(params).items():
    if quant_lib.is_quantized(leaf):
      q = leaf.array
      if q.zero_point is not None:
        raise ValueError(f"{path}: asymmetric (zero-point) quantization is not supported.")
      arrays[path + SEP + "qvalue"] = np.asarray(jax.device_get(q.qvalue))
      arrays[path + SEP + "scale"] = np.asarray(jax.device_get(q.scale))
      recipes[path] = {"channelwise_axes": list(leaf.how.channelwise_axes),
                       "qtype": str(np.dtype(q.qvalue.dtype))}
    else:
      arrays[path] = np.asarray(jax.device_get(leaf))
  return arrays, recipes


def from_arrays(arrays: Mapping[str, np.ndarray], recipes: Mapping[str, Mapping[str, Any]]) -> Any:
  """Inverse of `to_arrays`: a parameter tree with QWeight leaves where a recipe says so."""
  flat: dict[str, Any] = {}
  for key, value in arrays.items():
    path, _, part = key.partition(SEP)
    if not part:
      flat[path] = jnp.asarray(value)
  for path, recipe in recipes.items():
    try:
      qvalue, scale = arrays[path + SEP + "qvalue"], arrays[path + SEP + "scale"]
    except KeyError:
      raise ValueError(f"{PARAMS_FILE} lacks the int8 values or scales of {path!r}.") from None
    leaf = quant_lib.LeafPlan("saved", tuple(recipe["channelwise_axes"]))
    qarray = qwix.QArray(qvalue=jnp.asarray(qvalue), scale=jnp.asarray(scale),
                         qtype=jnp.dtype(recipe.get("qtype", "int8")))
    flat[path] = quant_lib.QWeight(qarray, leaf.how())
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def count_params(params: Any) -> int:
  """Logical parameter count (an int8 leaf counts its values, not its scales)."""
  return int(sum(int(np.prod(x.array.shape if quant_lib.is_quantized(x) else x.shape))
                 for x in _flatten(params).values()))


def nonzero_params(params: Any) -> int:
  total = 0
  for x in _flatten(params).values():
    values = x.array.qvalue if quant_lib.is_quantized(x) else x
    total += int(np.count_nonzero(np.asarray(jax.device_get(values))))
  return total


@dataclasses.dataclass
class Artifact:
  """A loaded (or just built) classifier artifact."""
  spec: spec_lib.ClassifierSpec
  params: Any
  kind: str = "float"
  quantization: Mapping[str, Any] | None = None   # {"mode", "leaves", "act_scales"}
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  path: str = ""

  @property
  def kind_is_quantized(self) -> bool:
    return self.quantization is not None

  @functools.cached_property
  def model(self) -> nn.Module:
    model = heads.Classifier(self.spec.model, self.spec.num_classes, self.spec.multi_label)
    if self.quantization is None:
      return model
    return quant_lib.quantized_model(model, self.quantization["mode"],
                                     self.quantization.get("act_scales") or None)

  def logits(self, params: Any, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Pure: (params, tokens int [B, Q], token_mask bool [B, Q]) -> logits float32 [B, C]."""
    return self.model.apply({"params": params}, tokens, token_mask)[0]

  @functools.cached_property
  def _jitted(self):
    return jax.jit(self.logits)

  def predict(self, batch: Mapping[str, Any]) -> jax.Array:
    """batch {"tokens", "token_mask"} (numpy or jax) -> logits [B, C]."""
    return self._jitted(self.params, jnp.asarray(batch["tokens"]),
                        jnp.asarray(batch["token_mask"], bool))

  @property
  def num_params(self) -> int:
    return count_params(self.params)

  def file_bytes(self) -> int:
    """Bytes of the weights file on disk (0 if not saved)."""
    path = os.path.join(self.path, PARAMS_FILE)
    return os.path.getsize(path) if self.path and os.path.exists(path) else 0


def save(directory: str, spec: spec_lib.ClassifierSpec, params: Any, *, kind: str = "float",
         quantization: Mapping[str, Any] | None = None,
         metadata: Mapping[str, Any] | None = None) -> Artifact:
  """Writes an artifact directory (atomically: a temporary directory renamed at the end)."""
  if kind not in KINDS:
    raise ValueError(f"artifact kind {kind!r}: allowed values are {', '.join(KINDS)}.")
  arrays, recipes = to_arrays(params)
  if bool(recipes) != (quantization is not None):
    raise ValueError("quantized leaves and the quantization recipe must come together (pass "
                     "quantization= for int8 params, and only then).")
  directory = os.path.abspath(directory)
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, PARAMS_FILE), "wb") as f:
    np.savez(f, **arrays)
  compressed = io.BytesIO()
  np.savez_compressed(compressed, **arrays)
  quant_json = None
  if quantization is not None:
    quant_json = {"mode": quantization["mode"], "leaves": recipes,
                  "act_scales": dict(quantization.get("act_scales") or {}),
                  **{k: v for k, v in quantization.items()
                     if k not in ("mode", "leaves", "act_scales")}}
  if spec.tokenizer and os.path.exists(spec.tokenizer):
    shutil.copyfile(spec.tokenizer, os.path.join(tmp, run_dir.TOKENIZER_FILE))
  meta = {"format": FORMAT, "version": VERSION, "kind": kind, "spec": spec.to_json(),
          "quantization": quant_json, "num_params": count_params(params),
          "bytes_params_file": os.path.getsize(os.path.join(tmp, PARAMS_FILE)),
          "bytes_params_compressed": compressed.getbuffer().nbytes,
          "metadata": dict(metadata or {})}
  with open(os.path.join(tmp, spec_lib.ARTIFACT_FILE), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
  return load(directory)


def read_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, spec_lib.ARTIFACT_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not an artifact directory (no "
                            f"{spec_lib.ARTIFACT_FILE}).")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                     f"this code reads {FORMAT!r} version {VERSION}.")
  return meta


def _check_tree(params: Any, spec: spec_lib.ClassifierSpec, directory: str) -> None:
  expected = {"/".join(k): tuple(v.shape) for k, v in
              flax.traverse_util.flatten_dict(spec_lib.abstract_params(spec)).items()}
  got = {p: tuple(x.array.shape if quant_lib.is_quantized(x) else x.shape)
         for p, x in _flatten(params).items()}
  missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
  if missing or extra:
    raise ValueError(f"{directory}: the saved parameters do not fit the model in "
                     f"{spec_lib.ARTIFACT_FILE} (missing {missing[:4]}, unexpected {extra[:4]}).")
  bad = [(p, got[p], expected[p]) for p in expected if got[p] != expected[p]]
  if bad:
    raise ValueError(f"{directory}: shape mismatch (path, saved, expected): {bad[:4]}")


def load(directory: str) -> Artifact:
  """Loads an artifact directory; int8 artifacts come back int8 (no float weights are made)."""
  directory = os.path.abspath(directory)
  meta = read_meta(directory)
  tokenizer = os.path.join(directory, run_dir.TOKENIZER_FILE)
  spec = spec_lib.ClassifierSpec.from_json(meta["spec"],
                                             tokenizer if os.path.exists(tokenizer) else "")
  with np.load(os.path.join(directory, PARAMS_FILE)) as data:
    arrays = {k: data[k] for k in data.files}
  quantization = meta.get("quantization")
  params = from_arrays(arrays, (quantization or {}).get("leaves", {}))
  _check_tree(params, spec, directory)
  return Artifact(spec=spec, params=params, kind=meta["kind"], quantization=quantization,
                  metadata=dict(meta.get("metadata") or {}), path=directory)
