"""What deduplication remembers of the texts it has seen: in memory, or on disk in bounded memory.

`ExactDedup` and `NearDedup` (dedup.py) decide; an index only stores and finds. Two kinds give the
same answers, so the kept documents and the report do not depend on the choice:

  memory  Python dicts: the fastest, but every indexed text costs ~2.3 KB of RAM (a 12-byte key,
          a 256-byte signature, 16 band keys, its file and line, and the dicts around them):
          2.4 GB of heap at 1M documents (bench/NOTES_cleaning_scale.md).
  disk    an SQLite database in a scratch file: band keys as an indexed integer column,
          signatures as blobs. Resident memory is SQLite's page cache (CACHE_KIB) plus constant
          Python objects, whatever the corpus size; the data lives in the file (~0.7 KB per text).
          The file is unlinked as soon as it is open, so it disappears with the process, even one
          that is killed; nothing is left to clean up or to resume from (an interrupted stage
          starts over and rebuilds it).
  auto    memory up to AUTO_DISK_DOCS documents, disk above.

A band key on disk is Python's hash of (band, band bytes): 64 bits that two texts with the same
band always share; a collision (or another process's hash seed) can only add a candidate, and
candidates are checked against the band bytes themselves, so the candidates are exactly the memory
index's: the texts that share a band.
"""
import os
import sqlite3
import tempfile
from typing import Any, Sequence

from r1jax import errors

INDEXES = ("auto", "memory", "disk")
AUTO_DISK_DOCS = 200_000  # auto: documents above which the index goes to disk (~0.75 GB in memory)
CACHE_KIB = 64 * 1024  # SQLite page cache of one disk index
_COMMIT_EVERY = 4096  # texts per transaction (dirty pages are bounded by the cache either way)

Where = tuple[Any, Any]  # (file, line) of a text


def resolve(index: str, num_docs: int | None) -> str:
  """"auto" -> "memory" or "disk" by the number of documents (unknown: memory); others as given."""
  if index not in INDEXES:
    raise ValueError(f"clean.dedup_index={index!r} must be one of {', '.join(INDEXES)}.")
  if index == "auto":
    return "disk" if num_docs is not None and num_docs > AUTO_DISK_DOCS else "memory"
  return index


class MemoryKeys:
  """Exact-duplicate keys in a dict: key -> where of the first text with it."""

  def __init__(self):
    self._seen = {}

  def first(self, key: bytes, where: Where) -> Where | None:
    """Where the first text with `key` was, or None (and `where` is remembered) when this is it."""
    first = self._seen.get(key)
    if first is None:
      self._seen[key] = where
    return first


class MemoryBands:
  """Signatures and LSH band keys in Python lists and dicts."""

  def __init__(self, band_bytes: Sequence[tuple[int, int]]):
    self._band_bytes = band_bytes
    self._buckets = [dict() for _ in band_bytes]
    self._seen = []  # (signature bytes, where) of every text indexed, by doc id

  def add(self, sig: bytes, where: Where) -> list[tuple[bytes, Where]]:
    """Indexes a text; -> the earlier texts sharing a band with it, (signature, where) in order."""
    keys = [sig[a:b] for a, b in self._band_bytes]
    candidates = set()
    for bucket, key in zip(self._buckets, keys):
      hit = bucket.get(key)
      if hit is not None:
        if isinstance(hit, list):
          candidates.update(hit)
        else:
          candidates.add(hit)
    found = [self._seen[c] for c in sorted(candidates)]
    doc_id = len(self._seen)
    self._seen.append((sig, where))
    # A bucket holds the doc id of its only text, or a list once a second text shares the key:
    # almost every key is unique, and a list per key and band would cost more than the lookups
    # (allocation and garbage-collector traversal of 16 lists per text).
    for bucket, key in zip(self._buckets, keys):
      hit = bucket.setdefault(key, doc_id)
      if hit != doc_id:
        if isinstance(hit, list):
          hit.append(doc_id)
        else:
          bucket[key] = [hit, doc_id]
    return found


def _value(x):
  """A file or line as SQLite stores it, formatting (f"{x}") as the original does."""
  native = (str, int, float, type(None))  # exactly these: bool or numpy ints are formatted as str
  return x if type(x) in native else str(x)  # pylint: disable=unidiomatic-typecheck


class _Database:
  """A private SQLite database in an unlinked scratch file in `directory` (None: the temp dir)."""

  def __init__(self, directory: str | None, schema: str, cache_kib: int):
    if directory:
      os.makedirs(directory, exist_ok=True)
    self.directory = directory or tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="dedup-", suffix=".sqlite", dir=directory)
    os.close(fd)
    try:
      self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
      # No journal, no fsync: a scratch file that nobody reads after a crash. No mmap: pages read
      # into the process would count as its memory; the cache is the only resident copy.
      self.db.executescript(f"""
          PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA locking_mode=EXCLUSIVE;
          PRAGMA temp_store=FILE; PRAGMA mmap_size=0; PRAGMA cache_size=-{int(cache_kib)};
          {schema}""")
    finally:
      os.unlink(path)  # the open connection keeps the file; it goes with the process
    self.db.execute("BEGIN")
    self._pending = 0

  def wrote(self) -> None:
    self._pending += 1
    if self._pending >= _COMMIT_EVERY:
      self.db.execute("COMMIT")
      self.db.execute("BEGIN")
      self._pending = 0

  def check(self, error: sqlite3.OperationalError) -> None:
    """Raises a UserError naming the directory and the fix when `error` is a full disk."""
    if "full" in str(error):  # SQLITE_FULL: "database or disk is full"
      raise errors.UserError(
          f"The deduplication index on disk in {self.directory} ran out of space ({error}); it "
          "needs ~0.7 KB per document. Free space there, or set clean.dedup_index=memory (~2.3 KB "
          "of RAM per document).") from error

  def __del__(self):
    db = getattr(self, "db", None)
    if db is not None:
      db.close()


class DiskKeys:
  """Exact-duplicate keys in an SQLite table (key blob primary key -> file, line)."""

  def __init__(self, directory: str | None = None, cache_kib: int = CACHE_KIB):
    self._db = _Database(directory, "CREATE TABLE keys (key BLOB PRIMARY KEY, file, line) "
                         "WITHOUT ROWID;", cache_kib)

  def first(self, key: bytes, where: Where) -> Where | None:
    """Where the first text with `key` was, or None (and `where` is remembered) when this is it."""
    db = self._db.db
    try:
      if db.execute("INSERT OR IGNORE INTO keys VALUES (?, ?, ?)",
                    (key, _value(where[0]), _value(where[1]))).rowcount:
        self._db.wrote()
        return None
    except sqlite3.OperationalError as e:
      self._db.check(e)
      raise
    return db.execute("SELECT file, line FROM keys WHERE key = ?", (key,)).fetchone()


class DiskBands:
  """Signatures (blobs by doc id) and LSH band keys (an indexed integer column) in SQLite."""

  def __init__(self, band_bytes: Sequence[tuple[int, int]], directory: str | None = None,
               cache_kib: int = CACHE_KIB):
    self._band_bytes = tuple(band_bytes)
    self._db = _Database(directory, """
        CREATE TABLE docs (id INTEGER PRIMARY KEY, sig BLOB, file, line);
        CREATE TABLE bands (key INTEGER, doc INTEGER, PRIMARY KEY (key, doc)) WITHOUT ROWID;""",
                         cache_kib)
    marks = ",".join("?" * len(self._band_bytes))
    self._select = f"SELECT doc FROM bands WHERE key IN ({marks})"
    # One statement for all of a text's band keys: half the cost of executemany.
    self._insert = "INSERT OR IGNORE INTO bands VALUES " + ",".join(
        ["(?, ?)"] * len(self._band_bytes))
    self._count = 0

  def add(self, sig: bytes, where: Where) -> list[tuple[bytes, Where]]:
    """Indexes a text; -> the earlier texts sharing a band with it, (signature, where) in order."""
    db = self._db.db
    keys = [hash((band, sig[a:b])) for band, (a, b) in enumerate(self._band_bytes)]
    found = []
    # Most texts share no key: one lookup of all keys, then the rare candidates one by one (an
    # `id IN (subquery) ORDER BY id` in one statement cost 5x the lookup).
    for (doc,) in sorted(set(db.execute(self._select, keys))):
      other, file, line = db.execute("SELECT sig, file, line FROM docs WHERE id = ?",
                                     (doc,)).fetchone()
      if any(other[a:b] == sig[a:b] for a, b in self._band_bytes):
        found.append((other, (file, line)))
    try:
      db.execute("INSERT INTO docs VALUES (?, ?, ?, ?)",
                 (self._count, sig, _value(where[0]), _value(where[1])))
      db.execute(self._insert, [v for k in keys for v in (k, self._count)])
      self._db.wrote()
    except sqlite3.OperationalError as e:
      self._db.check(e)
      raise
    self._count += 1
    return found


def exact_index(kind: str, directory: str | None = None) -> MemoryKeys | DiskKeys:
  """An exact-duplicate index of `kind` ("memory" or "disk"; resolve "auto" first)."""
  return DiskKeys(directory) if kind == "disk" else MemoryKeys()


def near_index(kind: str, band_bytes: Sequence[tuple[int, int]],
               directory: str | None = None) -> MemoryBands | DiskBands:
  """A near-duplicate index of `kind` ("memory" or "disk"; resolve "auto" first)."""
  return DiskBands(band_bytes, directory) if kind == "disk" else MemoryBands(band_bytes)
