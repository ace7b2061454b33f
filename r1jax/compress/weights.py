"""An artifact's weights file: named arrays in safetensors, mostly-zero arrays stored sparse.

    weights.save(path, {"backbone/layer_0/ff_in/kernel": w, "...::qvalue": q, ...})
    arrays = weights.load(path)            # the same dict back, bit for bit
    weights.load_any(directory)            # model.safetensors, or an old artifact's params.npz

Layout of `model.safetensors` (https://github.com/huggingface/safetensors): every array whose
stored form is dense is one tensor under its own name (float leaves as they are; int8 leaves as
"<path>::qvalue" int8 plus "<path>::scale" float32). An array with enough zero entries (magnitude
pruning) is stored as a bitmask and its kept values instead:

    "<name>::nz_mask"    uint8 [ceil(N / 8)]   np.packbits of the flattened "bits are not zero" mask
    "<name>::nz_values"  dtype [K]             the K entries whose bits are not zero, in C order

and the header's metadata entry "r1jax.sparse" (JSON) gives each such name's shape and dtype. The
mask tests the bit pattern, not the value, so -0.0 and NaN are kept as values and the round trip is
bit-exact. A bitmask costs 1/8 byte per entry beside the values, against 4-8 bytes per kept entry
for CSR/COO indices: at 50% sparsity a float32 matrix takes 53% of its dense bytes this way and
100-150% with int32 indices (bench/sparse_storage.py measures the forms), so the bitmask is the
form used, for any array it makes at least `MIN_SAVING` smaller.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
import safetensors
from safetensors import numpy as st_numpy

FILE = "model.safetensors"
LEGACY_FILE = "params.npz"     # artifacts written before safetensors (format version 1)
SPARSE_KEY = "r1jax.sparse"
MASK, VALUES = "::nz_mask", "::nz_values"
MIN_SAVING = 0.1               # store sparse only when that saves >= 10% of the array's bytes


def bits_nonzero(array: np.ndarray) -> np.ndarray:
  """bool, shaped like `array`: True where the entry's bit pattern is not all zeros."""
  if array.dtype == bool:
    return array
  return array.view(np.dtype(f"u{array.dtype.itemsize}")) != 0


def sparse_bytes(array: np.ndarray) -> int:
  """Bytes of the bitmask form of `array` (mask + kept values)."""
  return (array.size + 7) // 8 + int(np.count_nonzero(bits_nonzero(array))) * array.itemsize


def encode(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """{name: array} -> (tensors to write, safetensors metadata), sparse where that pays."""
  tensors, sparse = {}, {}
  for name, value in arrays.items():
    value = np.ascontiguousarray(value)
    if value.size >= 64 and sparse_bytes(value) <= (1 - MIN_SAVING) * value.nbytes:
      keep = bits_nonzero(value).reshape(-1)
      tensors[name + MASK] = np.packbits(keep)
      tensors[name + VALUES] = np.ascontiguousarray(value.reshape(-1)[keep])
      sparse[name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
    else:
      tensors[name] = value
  return tensors, {SPARSE_KEY: json.dumps(sparse, sort_keys=True)}


def decode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> dict[str, np.ndarray]:
  """Inverse of `encode`."""
  sparse = json.loads((metadata or {}).get(SPARSE_KEY) or "{}")
  out = {k: v for k, v in tensors.items() if not k.endswith((MASK, VALUES))}
  for name, info in sparse.items():
    shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
    size = int(np.prod(shape))
    keep = np.unpackbits(tensors[name + MASK], count=size).astype(bool)
    dense = np.zeros(size, dtype)
    dense[keep] = tensors[name + VALUES]
    out[name] = dense.reshape(shape)
  return out


def save(path: str, arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Writes `arrays` to `path`; returns {"sparse_arrays", "bytes_file", "bytes_dense"}."""
  tensors, metadata = encode(arrays)
  st_numpy.save_file(tensors, path, metadata=metadata)
  return {"sparse_arrays": len(json.loads(metadata[SPARSE_KEY])),
          "bytes_file": os.path.getsize(path),
          "bytes_dense": int(sum(np.asarray(a).nbytes for a in arrays.values()))}


def load(path: str) -> dict[str, np.ndarray]:
  with safetensors.safe_open(path, framework="numpy") as f:
    return decode({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {})


def load_any(directory: str, file: str | None = None) -> dict[str, np.ndarray]:
  """The arrays of an artifact directory: `file` (default model.safetensors, else params.npz)."""
  path = os.path.join(directory, file or FILE)
  if file is None and not os.path.exists(path):
    path = os.path.join(directory, LEGACY_FILE)
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  return load(path)
