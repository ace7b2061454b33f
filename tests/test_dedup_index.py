"""Tests for r1jax.data.dedup_index: the disk index decides exactly as the memory one, and its
memory does not grow with the documents it holds."""
import ctypes
import os
import random
import tracemalloc

import numpy as np
import pytest

from r1jax import errors
from r1jax.data import clean
from r1jax.data import clean_grain
from r1jax.data import dedup
from r1jax.data import dedup_index

WORDS = [f"w{i}" for i in range(3000)] + [chr(0x4E00 + 3 * i) for i in range(300)]


def _corpus(n=400, seed=0):
  """Random texts with exact duplicates (other case and spacing), near duplicates (one or two
  words replaced, of an original or of an earlier near duplicate: chains) and short texts that
  share a band with others by chance."""
  rng = random.Random(seed)
  texts = []
  for i in range(n):
    roll = rng.random()
    if texts and roll < 0.15:
      texts.append("  ".join(rng.choice(texts).upper().split()))
    elif texts and roll < 0.4:
      words = rng.choice(texts).split()
      for _ in range(rng.randint(1, 2)):
        words[rng.randrange(len(words))] = f"new{i}"
      texts.append(" ".join(words))
    else:
      texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80))))
  return texts


@pytest.mark.parametrize("threshold", [0.8, 0.5])
def test_disk_and_memory_indexes_drop_the_same_texts(threshold, tmp_path):
  texts = _corpus()
  results = {}
  for index in ("memory", "disk"):
    config = clean.CleanConfig(near_dup_threshold=threshold, dedup_index=index, min_chars=None,
                               max_repetition=None, meaningless_replies=())
    records = [{"text": t, "_file": f"part-{i % 3}.jsonl", "_line": i // 3 + 1}
               for i, t in enumerate(texts)]
    report = clean.CleaningReport(clean.rule_names(config), max_samples=1000)
    out = [report.add(r) for r in clean_grain.cleaning_dataset(records, config,
                                                              index_dir=str(tmp_path / index))]
    results[index] = ([(r["text"], r.get("_drop"), r.get("_detail")) for r in out],
                      report.to_dict())
  assert results["memory"] == results["disk"]
  dropped = results["disk"][1]["dropped"]
  assert dropped["duplicate"] > 30 and dropped["near_duplicate"] > 20
  # Scratch files are unlinked as soon as they are open: nothing is left behind.
  assert os.listdir(tmp_path / "disk") == []


def test_disk_index_keeps_chains_ties_and_shared_buckets_as_memory():
  rows = 64 // dedup.lsh_bands(0.8, 64)
  base = np.arange(64, dtype=np.uint32)
  other = base + 1000
  other[:rows] = base[:rows]  # shares only band 0 with base: similarity 1/bands, kept
  tie = base.copy()
  tie[-8:] += 5000  # 0.875 similar to base and to its copy: the earlier one is named
  sigs = [base, other, other, base.copy(), tie]
  for index in ("memory", "disk"):
    near = dedup.NearDedup(0.8, 64, index)
    out = [near.map({"text": "t", "_minhash": s.tobytes(), "_line": i, "_file": None})
           for i, s in enumerate(sigs)]
    assert [r.get("_drop") for r in out] == [None, None, "near_duplicate", "near_duplicate",
                                             "near_duplicate"], index
    assert [r.get("_detail") for r in out[2:]] == ["~1.00 similar to None:1",
                                                   "~1.00 similar to None:0",
                                                   "~0.88 similar to None:0"], index


def _sqlite_memory_used():
  """Bytes SQLite has allocated in this process (sqlite3_memory_used of the library the sqlite3
  module uses), or None where that library does not export it."""
  try:
    import _sqlite3  # pylint: disable=g-import-not-at-top
    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
  except (ImportError, OSError, AttributeError):
    return None
  used.restype = ctypes.c_int64
  return used()


def _add(near, exact, sigs, start, stop):
  for i in range(start, stop):
    where = ("corpus.jsonl", i)
    near.add(sigs[i].tobytes(), where)
    exact.first(sigs[i][:3].tobytes(), where)


def test_disk_index_memory_stays_flat_as_documents_are_added():
  sigs = np.random.default_rng(0).integers(0, 2**31, (10000, 64), dtype=np.uint32)
  bands = dedup.band_slices(64, 16)
  growth = {}
  for kind in ("memory", "disk"):
    near, exact = dedup_index.near_index(kind, bands), dedup_index.exact_index(kind)
    if kind == "disk":  # a small cache, so the database outgrows it many times over
      near, exact = dedup_index.DiskBands(bands, cache_kib=256), dedup_index.DiskKeys(cache_kib=256)
    _add(near, exact, sigs, 0, 2000)  # caches and statements warm
    tracemalloc.start()
    sqlite_before = _sqlite_memory_used()
    before = tracemalloc.get_traced_memory()[0]
    _add(near, exact, sigs, 2000, 10000)
    growth[kind] = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    if kind == "disk":
      db = near._db.db  # pylint: disable=protected-access
      on_disk = db.execute("PRAGMA page_count").fetchone()[0] * db.execute(
          "PRAGMA page_size").fetchone()[0]
      assert on_disk > 4_000_000  # the 10,000 signatures and their band keys are in the file
      # ... and not in SQLite's memory: its cache stays at 256 KiB (where the library tells).
      if sqlite_before is not None:
        assert _sqlite_memory_used() - sqlite_before < 300_000
  # 8,000 more documents: the memory index holds them (~15 MB of Python objects, ~1.9 KB each),
  # the disk one's Python side none of them (what moves is a few statement objects: +-30 KB).
  assert growth["memory"] > 8_000_000
  assert growth["disk"] < 50_000, growth


def test_auto_index_and_bad_values():
  assert dedup_index.resolve("auto", 1000) == "memory"
  assert dedup_index.resolve("auto", None) == "memory"
  assert dedup_index.resolve("auto", dedup_index.AUTO_DISK_DOCS + 1) == "disk"
  assert dedup_index.resolve("memory", 10**9) == "memory"
  with pytest.raises(ValueError, match="clean.dedup_index='ssd' must be one of auto, memory, disk"):
    clean.CleanConfig(dedup_index="ssd").validate()


def test_a_full_disk_is_a_one_line_error_naming_the_fix(tmp_path):
  near = dedup_index.DiskBands(dedup.band_slices(64, 16), str(tmp_path))
  sigs = np.random.default_rng(1).integers(0, 2**31, (2000, 64), dtype=np.uint32)
  near.add(sigs[0].tobytes(), ("a", 1))
  db = near._db.db  # pylint: disable=protected-access
  # SQLite's own limit on the file's size gives the error a full disk gives (SQLITE_FULL).
  db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0] + 2}")
  with pytest.raises(errors.UserError, match=f"in {tmp_path} ran out of space .*dedup_index=memory"):
    for i, sig in enumerate(sigs[1:]):
      near.add(sig.tobytes(), ("a", i + 2))
