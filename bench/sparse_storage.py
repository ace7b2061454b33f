r"""Bytes of a magnitude-pruned kernel in each sparse form, vs dense and vs zip of dense.

    python bench/sparse_storage.py                      # the small variant's feed-forward kernel
    python bench/sparse_storage.py --shape=64,256       # the tiny one's

For sparsities 0.3 ... 0.9 of a Gaussian [rows, cols] float32 matrix pruned by magnitude, prints the
bytes of: dense; the bitmask form `r1jax.compress.weights` writes (packbits mask + kept values,
measured through a real model.safetensors file); CSR with int32 and with int16 column indices; COO
with int32 indices; and np.savez_compressed of the dense matrix (zip). The bitmask is the form
artifacts use (see weights.py): the smallest of the index-free and indexed forms at every sparsity,
about as small as zip of dense, which a loader would have to inflate in full.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from r1jax.compress import weights  # pylint: disable=wrong-import-position


def forms(w: np.ndarray) -> dict[str, int]:
  rows, cols = w.shape
  nnz = int(np.count_nonzero(w))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "w.safetensors")
    stored = weights.save(path, {"w": w})["bytes_file"]
    dense_file = weights.save(path, {"w": np.zeros((0,), np.float32)})["bytes_file"]
  zipped = io.BytesIO()
  np.savez_compressed(zipped, w=w)
  return {"dense": w.nbytes, "bitmask (safetensors file)": stored - dense_file,
          "csr int32": nnz * 4 + nnz * 4 + (rows + 1) * 4,
          "csr int16 cols": nnz * 4 + nnz * 2 + (rows + 1) * 4,
          "coo int32": nnz * 4 + nnz * 2 * 4, "zip of dense": zipped.getbuffer().nbytes}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="256,1024", help="rows,cols of the kernel")
  args = parser.parse_args()
  shape = tuple(int(x) for x in args.shape.split(","))
  rng = np.random.default_rng(0)
  base = rng.standard_normal(shape).astype(np.float32) * 0.02
  print(f"kernel {shape} float32, bytes and % of dense")
  header = None
  for sparsity in (0.0, 0.3, 0.5, 0.7, 0.9):
    w = base.copy()
    if sparsity:
      w[np.abs(w) <= np.quantile(np.abs(w), sparsity)] = 0.0
    out = forms(w)
    if header is None:
      header = list(out)
      print("| sparsity | " + " | ".join(header) + " |")
      print("|---" * (len(header) + 1) + "|")
    print(f"| {sparsity:.0%} | " + " | ".join(
        f"{out[k]:,} ({100 * out[k] / out['dense']:.0f}%)" for k in header) + " |")


if __name__ == "__main__":
  main()
