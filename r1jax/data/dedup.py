"""Deduplication steps: exact (a hash of the normalised text) and near (MinHash with LSH bands).

`DedupKey` and `MinHashSignature` are pure per-record work and run in the parallel part of the
cleaning pipeline (Grain or Beam workers when there are any); `ExactDedup` and `NearDedup` hold
the only cross-document state (in memory, or on disk in bounded memory: `dedup_index`) and run in
the main process, in record order. `r1jax.data.clean_beam` reuses the signatures and the decision
helpers (`lsh_bands`, `band_slices`, `best_match`) so both engines drop the same texts. The record
contract is `clean_steps`' (`_drop`, `_detail`), and so is the step type: plain classes, no Grain
(so no JAX) import in a Beam worker.
"""
import hashlib
import zlib
from typing import Any, Iterable

import numpy as np

from r1jax.data import clean_steps
from r1jax.data import dedup_index


def _dedup_key(text):
  return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=12).digest()


class DedupKey(clean_steps.Step):
  """Adds `_dedup_key`: a 12-byte hash of the lowercased, whitespace-collapsed text.

  Pure per-record work, so it runs in the parallel part of the pipeline (in Grain workers when
  there are any); ExactDedup in the main process then only looks the key up.
  """

  def map(self, record):
    if not record.get("_drop"):
      record["_dedup_key"] = _dedup_key(record["text"])
    return record


class ExactDedup(clean_steps.Step):
  """Drops a text identical (after lowercasing and whitespace collapsing) to an earlier one.

  Uses `_dedup_key` from DedupKey when present (and removes it), else hashes the text itself.
  `index`: where the keys are kept, "memory" or "disk" (dedup_index.py; same decisions), the disk
  one in a scratch file in `directory` (None: the temp dir), opened at the first text.
  """
  name = "duplicate"

  def __init__(self, index: str = "memory", directory: str | None = None):
    self.index = dedup_index.resolve(index, None)
    self.directory = directory
    self._seen = None

  def map(self, record):
    key = record.pop("_dedup_key", None)
    if record.get("_drop"):
      return record
    if key is None:
      key = _dedup_key(record["text"])
    if self._seen is None:
      self._seen = dedup_index.exact_index(self.index, self.directory)
    first = self._seen.first(key, (record.get("_file"), record.get("_line")))
    if first is not None:
      record["_drop"] = self.name
      record["_detail"] = exact_detail(*first)
    return record


_PRIME = np.uint64((1 << 31) - 1)  # a < p and h < p keep a * h + b below 2^63: no overflow


class MinHashSignature(clean_steps.Step):
  """Adds `_minhash`: MinHash of the text's shingles (n consecutive units), uint32 [num_perm] as bytes
  (bytes rather than an array, so Grain workers pass it back without a shared-memory block each).

  Units are lowercased Latin/digit words and single CJK characters, so the same code works for
  English and Chinese. Shingles are hashed with CRC32; permutations are (a * h + b) mod (2^31 - 1).
  Pure numpy; runs in the parallel part of the pipeline.
  """

  def __init__(self, num_perm: int = 64, shingle_size: int = 5, seed: int = 0):
    rng = np.random.default_rng([seed, 0x4D48])
    self.a = rng.integers(1, int(_PRIME), num_perm, dtype=np.uint64)
    self.b = rng.integers(0, int(_PRIME), num_perm, dtype=np.uint64)
    self.shingle_size = shingle_size

  def signature(self, text: str) -> np.ndarray:
    units = clean_steps.shingle_units(text.lower())
    n = self.shingle_size
    if len(units) < n:
      shingles = {" ".join(units)}
    else:
      shingles = {" ".join(units[i:i + n]) for i in range(len(units) - n + 1)}
    h = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), np.uint64, len(shingles))
    h %= _PRIME
    values = (self.a[:, None] * h[None, :] + self.b[:, None]) % _PRIME  # [num_perm, shingles]
    return values.min(axis=1).astype(np.uint32)

  def map(self, record):
    if not record.get("_drop"):
      record["_minhash"] = self.signature(record["text"]).tobytes()
    return record


class NearDedup(clean_steps.Step):
  """Drops a text whose MinHash estimate of Jaccard similarity with an earlier text is >= threshold.

  "Earlier" is any text that reached this step before (kept or itself a near duplicate), so the
  decision for a text depends only on the texts before it in source order, never on which of them
  were kept: a chain A ~ B ~ C keeps A and drops B and C, and the Beam pipeline
  (`clean_beam`), which sees the texts in no particular order, decides exactly the same from the
  similar pairs alone (each text against the earliest-best of its earlier partners).

  Locality-sensitive hashing with `bands` bands of num_perm / bands rows finds candidates; the
  signature agreement decides. Needs `_minhash` (bytes) from MinHashSignature. This step holds the
  only cross-document state, so it runs in the main process: it works on the signature's bytes
  directly (band keys are byte slices, no array per record) and decodes signatures to arrays only
  for the rare candidates. `index` and `directory`: where the signatures and band keys are kept,
  as in ExactDedup.
  """
  name = "near_duplicate"

  def __init__(self, threshold: float, num_perm: int = 64, index: str = "memory",
               directory: str | None = None):
    self.threshold = threshold
    self.bands = lsh_bands(threshold, num_perm)
    self.rows = num_perm // self.bands
    self._band_bytes = band_slices(num_perm, self.bands)
    self.index = dedup_index.resolve(index, None)
    self.directory = directory
    self._seen = None

  def map(self, record):
    sig = record.pop("_minhash", None)
    if record.get("_drop") or sig is None:
      return record
    if self._seen is None:
      self._seen = dedup_index.near_index(self.index, self._band_bytes, self.directory)
    candidates = self._seen.add(sig, (record.get("_file"), record.get("_line")))
    if candidates:
      best, where = best_match(sig, ((where, other) for other, where in candidates))
      if best >= self.threshold:
        record["_drop"] = self.name
        record["_detail"] = near_detail(best, where[0], where[1])
    return record


def lsh_bands(threshold: float, num_perm: int) -> int:
  """The fewest bands whose LSH S-curve midpoint (1/b)^(1/r) sits well below the threshold: pairs
  at the threshold are almost surely candidates, unrelated pairs rarely are."""
  fitting = [b for b in (2, 4, 8, 16, 32, 64) if num_perm % b == 0 and
             (1 / b) ** (b / num_perm) <= threshold - 0.1]
  return min(fitting) if fitting else num_perm


def band_slices(num_perm: int, bands: int) -> list[tuple[int, int]]:
  """Byte ranges of each LSH band in a uint32 signature's bytes."""
  rows = num_perm // bands
  return [(i * rows * 4, (i + 1) * rows * 4) for i in range(bands)]


def best_match(sig: bytes, candidates: Iterable[tuple[Any, bytes]]) -> tuple[float, Any]:
  """(highest signature agreement, its candidate id; the first one on ties) over (id, signature)."""
  mine = np.frombuffer(sig, np.uint32)
  best, best_id = 0.0, None
  for c, other in candidates:
    sim = float(np.mean(np.frombuffer(other, np.uint32) == mine))
    if sim > best:
      best, best_id = sim, c
  return best, best_id


def near_detail(similarity: float, file: Any, line: Any) -> str:
  return f"~{similarity:.2f} similar to {file}:{line}"


def exact_detail(file: Any, line: Any) -> str:
  return f"same as {file}:{line}"
