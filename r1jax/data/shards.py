r"""Tokenized pretraining shards: ArrayRecord files of token ids with a manifest, read by Grain.

    manifest = shards.write_shards(sources.expand_spec("DIR/data/clean"), "DIR/tokenizer.model",
                                   "DIR/data/tokenized")          # the data stage does this
    corpus = shards.TokenizedCorpus("DIR/data/tokenized")          # checks files against manifest
    ids = corpus.tokens(17)                                         # int32 [n]: document 17

The data stage writes DIR/data/tokenized/ next to the cleaned JSONL, one shard per JSONL file:
  part-NNNNN.array_record  one record per document, in the JSONL's order: its token ids
                           (`tokenizer.encode(text)`, no [CLS]/[SEP]) as little-endian `dtype`
                           bytes; written with group_size:1, so a random read decodes one record
  part-NNNNN.lengths.npy   uint32 [records]: each document's token count (epoch-length estimates
                           without reading the records)
  part-NNNNN.json          the shard's manifest entry, written last: a shard without it is unfinished
  tokenizer.model          the tokenizer the ids come from
  manifest.json            {"format": FORMAT, "version": 1, "dtype": "uint16" | "uint32",
                            "tokenizer": {"file", "sha256", "vocab_size"}, "record": "...",
                            "source": the cleaned corpus directory,
                            "shards": [{"file", "records", "tokens", "bytes", "skipped", "source",
                                        "source_sha256", "tokenizer_sha256"}],
                            "documents": N, "tokens": T}
Document i of the corpus is record i of the shards taken in order. A document is what
`pretraining.resolve_texts` keeps of the same files (`document_text`): both paths see the same
documents with the same ids, so pretraining gives bitwise the same batches from either.

Writing is parallel (one Grain worker process per shard at a time) and resumable: a shard whose
entry names the same source file content (sha256) and tokenizer is kept; the others are rewritten
under a temporary name and renamed. manifest.json is written last.

Reading: `TokenizedCorpus` opens the manifest, checks every shard against it (present, size,
record count from the ArrayRecord footer) and reads records through Grain's
`ArrayRecordDataSource`; a problem raises `errors.BadInput` naming the file and the fix. Resident
memory is the readers' footers and indices plus one shard's lengths at a time: it does not hold
the corpus. A tokenized directory in a bucket (gs://.../data/tokenized, or the gs://.../data/clean
beside it) is read without copying it whole: opening copies the manifest, tokenizer and lengths
to the cache (`remote.local_copy`) and checks that every shard object is there with its size;
`fetch(ranges)` copies only the shard files holding those records (`shard_files`; pretraining
passes what its rows read, `doc_order.records_read`), and a process with
`row_groups` a multiple of the process count reads only its contiguous 1/n of the records.
"""
import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Iterator, Sequence

from absl import logging
from array_record.python import array_record_module
import grain
import numpy as np
import tqdm

from r1jax import errors
from r1jax import remote
from r1jax.data import grain_ops
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib

FORMAT = "r1jax-tokenized-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
RECORD = "token ids of one document (tokenizer.encode(text), no [CLS]/[SEP]), little-endian dtype"
# Grain reads one record per random access only from files written with group_size:1.
WRITER_OPTIONS = "group_size:1,uncompressed"
_ENCODE_BATCH = 512  # documents per SentencePiece call


def document_text(record: dict[str, Any]) -> str | None:
  """The text a corpus record contributes as a document, or None: rows the source flags as bad
  and empty or whitespace-only texts are not documents (the one rule for both pretraining paths)."""
  if record.get("_error"):
    return None
  text = record.get("text")
  return text if isinstance(text, str) and text.strip() else None


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _write_json(path: str, data: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, ensure_ascii=False)
    f.write("\n")
  os.replace(tmp, path)


def _dtype_for(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_sha256(tok: tokenizer_lib.Tokenizer) -> str:
  return hashlib.sha256(tok.model_proto).hexdigest()


# -------------------------------------------------------------------------------------------------
# Writing


class _TokenizeShard(grain.transforms.Map):
  """(index, source path, source sha256) -> that shard's manifest entry, its files written."""

  def __init__(self, tok: tokenizer_lib.Tokenizer, out_dir: str, dtype: str):
    self._tok = tok
    self._out_dir = out_dir
    self._dtype = np.dtype(dtype).newbyteorder("<")

  def map(self, element):
    index, source, source_sha = element
    name = f"part-{index:05d}"
    final = os.path.join(self._out_dir, f"{name}.array_record")
    tmp = f"{final}.tmp{os.getpid()}"
    records = sources.open_source(source)
    lengths, skipped = [], 0
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    try:
      for start in range(0, len(records), _ENCODE_BATCH):
        texts = []
        for i in range(start, min(start + _ENCODE_BATCH, len(records))):
          text = document_text(records[i])
          if text is None:
            skipped += 1
          else:
            texts.append(text)
        for ids in self._tok.encode_batch(texts):
          writer.write(np.asarray(ids, self._dtype).tobytes())
          lengths.append(len(ids))
    finally:
      writer.close()
    os.replace(tmp, final)
    lengths_path = os.path.join(self._out_dir, f"{name}.lengths.npy")
    with open(lengths_path + ".tmp", "wb") as f:
      np.save(f, np.asarray(lengths, np.uint32))
    os.replace(lengths_path + ".tmp", lengths_path)
    entry = {"file": os.path.basename(final), "records": len(lengths),
             "tokens": int(sum(lengths)), "bytes": os.path.getsize(final), "skipped": skipped,
             "source": os.path.abspath(source), "source_sha256": source_sha,
             "tokenizer_sha256": tokenizer_sha256(self._tok)}
    _write_json(os.path.join(self._out_dir, f"{name}.json"), entry)
    return entry


def _finished_entry(out_dir: str, index: int, source_sha: str, tok_sha: str) -> dict | None:
  """The entry of shard `index` if it was written from this source content and tokenizer and its
  file looks intact (size, the record count in its footer); else None."""
  path = os.path.join(out_dir, f"part-{index:05d}.json")
  try:
    with open(path, encoding="utf-8") as f:
      entry = json.load(f)
    file = os.path.join(out_dir, entry["file"])
    ok = (entry["source_sha256"] == source_sha and entry["tokenizer_sha256"] == tok_sha
          and os.path.getsize(file) == entry["bytes"]
          and _record_count(file) == entry["records"]
          and os.path.exists(os.path.join(out_dir, f"part-{index:05d}.lengths.npy")))
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return entry if ok else None


def write_shards(source_paths: Sequence[str], tokenizer_path: str, out_dir: str, *,
                 worker_count: int = -1, progress: bool = True) -> dict[str, Any]:
  """Tokenizes each of `source_paths` (cleaned corpus files) into a shard of `out_dir`.

  Resumable: shards already written from the same source content and tokenizer are kept.
  worker_count: Grain worker processes (-1: one per CPU core, at most one per shard to write;
  0 or 1: in this process). Returns the manifest (also written to out_dir/manifest.json).
  """
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  tok_sha = tokenizer_sha256(tok)
  dtype = _dtype_for(tok.vocab_size)
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # the directory is being rewritten: not a finished corpus until done
  tok_copy = os.path.join(out_dir, TOKENIZER_FILE)
  if os.path.abspath(tokenizer_path) != os.path.abspath(tok_copy):
    shutil.copyfile(tokenizer_path, tok_copy + ".tmp")
    os.replace(tok_copy + ".tmp", tok_copy)

  entries: list[dict | None] = []
  todo = []
  for i, path in enumerate(source_paths):
    sha = _sha256_file(path)
    entry = _finished_entry(out_dir, i, sha, tok_sha)
    entries.append(entry)
    if entry is None:
      todo.append((i, path, sha))
  if worker_count < 0:
    worker_count = os.cpu_count() or 1
  worker_count = min(worker_count, len(todo))
  total = sum(os.path.getsize(p) for _, p, _ in todo)
  ds = grain.MapDataset.source(todo).map(_TokenizeShard(tok, out_dir, dtype)).to_iter_dataset()
  if worker_count > 1:
    ds = grain_ops.worker_prefetch(ds, worker_count)
  with tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
                 smoothing=0.1, mininterval=0.5) as bar:
    for (i, path, _), entry in zip(todo, ds):
      entries[i] = entry
      bar.update(os.path.getsize(path))

  keep = {f"part-{i:05d}{ext}" for i in range(len(source_paths))
          for ext in (".array_record", ".lengths.npy", ".json")} | {TOKENIZER_FILE}
  for name in os.listdir(out_dir):
    if name not in keep:  # shards of a longer earlier corpus, temporaries of a killed run
      os.remove(os.path.join(out_dir, name))
  manifest = {
      "format": FORMAT, "version": VERSION, "dtype": dtype, "record": RECORD,
      "tokenizer": {"file": TOKENIZER_FILE, "sha256": tok_sha, "vocab_size": tok.vocab_size},
      "source": os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in source_paths]),
      "shards": entries, "documents": sum(e["records"] for e in entries),
      "tokens": sum(e["tokens"] for e in entries)}
  _write_json(manifest_path, manifest)
  return manifest


# -------------------------------------------------------------------------------------------------
# Reading


def find_manifest(spec: Any) -> str | None:
  """The manifest.json that `spec` (a pretraining corpus spec) names, or None.

  A tokenized directory (DIR/data/tokenized) or its manifest.json names itself; the data stage's
  cleaned directory (DIR/data/clean) names its sibling DIR/data/tokenized when that is finished.
  """
  if not isinstance(spec, (str, os.PathLike)):
    return None
  path = os.path.expanduser(os.fspath(spec).strip().rstrip("/"))
  if "," in path:
    return None
  if remote.is_remote(path):
    if any(c in path for c in "*?[") or (os.path.basename(path) != MANIFEST and
                                         remote.is_object(path)):  # a glob, a file
      return None
    candidates = ([path] if os.path.basename(path) == MANIFEST else
                  [f"{path}/{MANIFEST}", f"{os.path.dirname(path)}/tokenized/{MANIFEST}"])
    return next((c for c in candidates if remote.is_object(c)), None)
  if os.path.basename(path) == MANIFEST and os.path.isfile(path):
    return path
  if os.path.isdir(path):
    for candidate in (os.path.join(path, MANIFEST),
                      os.path.join(os.path.dirname(path), "tokenized", MANIFEST)):
      if os.path.isfile(candidate):
        return candidate
  return None


def _local(path: str) -> str:
  """`path`, or the cached local copy of a gs:// object (`remote.local_copy`)."""
  return remote.local_copy(path) if remote.is_remote(path) else path


def tokenizer_file(manifest_path: str) -> str:
  """The (local) tokenizer.model of the shards a manifest describes."""
  if not remote.is_remote(manifest_path):
    manifest_path = os.path.abspath(manifest_path)
  return _local(f"{os.path.dirname(manifest_path)}/{TOKENIZER_FILE}")


def source_of(manifest_path: str) -> str:
  """The cleaned corpus directory a manifest's shards were tokenized from; for a manifest in a
  bucket, its namesake beside the tokenized directory there (the data stage's DIR/data/clean)."""
  try:
    with open(_local(manifest_path), encoding="utf-8") as f:
      source = json.load(f)["source"]
    if remote.is_remote(manifest_path):
      return f"{os.path.dirname(os.path.dirname(manifest_path))}/{os.path.basename(source)}"
    return source
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.BadInput(f"{manifest_path} is not a tokenized-corpus manifest ({e}). Rerun the "
                          "data stage on its workdir to rewrite it.") from e


class TokenizedDocuments:
  """What pretraining reads of a tokenized corpus (the corpus, or a subset of its documents).

  len(docs); docs.tokens(i) -> int32 [n]; docs.token_counts() -> uint32 arrays, one per shard,
  of the documents' lengths in order; docs.tokenizer_sha256; docs.source_dir (the texts)."""

  tokenizer_sha256: str
  tokenizer_path: str
  source_dir: str
  directory: str

  def __len__(self) -> int:
    raise NotImplementedError

  def tokens(self, i: int) -> np.ndarray:
    raise NotImplementedError

  def token_counts(self) -> Iterator[np.ndarray]:
    raise NotImplementedError

  def records(self, lo: int, hi: int) -> tuple[int, int]:
    """[lo', hi'): the corpus records that documents [lo, hi) of this view read (contiguous)."""
    raise NotImplementedError

  def check_tokenizer(self, tok: tokenizer_lib.Tokenizer, name: str) -> None:
    """Raises BadInput unless `tok` (named `name` in the message) is the shards' tokenizer."""
    if tokenizer_sha256(tok) != self.tokenizer_sha256:
      raise errors.BadInput(
          f"The tokenized shards in {self.directory} were made with {self.tokenizer_path}, not "
          f"with {name}: their ids mean other pieces. Use that tokenizer "
          f"(--config.data.tokenizer={self.tokenizer_path}), or read the cleaned text with "
          "--config.data.input=memory.")


def _record_count(path: str) -> int | str:
  """The record count in an ArrayRecord file's footer, or what is wrong with the file."""
  reader = array_record_module.ArrayRecordReader(path, options="readahead_buffer_size:0")
  try:
    count = reader.num_records()
    ok = reader.ok()
    reader.close()
  except RuntimeError as e:  # a damaged file raises at close (the footer's checksum)
    return str(e).split(";")[0]
  return count if ok else "no valid footer"


def _bad(path: str, problem: str, directory: str) -> errors.BadInput:
  fix = ("Rerun the data stage on its workdir (it rewrites damaged or missing shards from the "
         "cleaned JSONL and keeps the good ones)")
  if remote.is_remote(directory):
    fix = (f"Copy the data stage's DIR/data/tokenized to {directory} again (gcloud storage rsync "
           f"-r DIR/data/tokenized {directory}), after rerunning the data stage if it is damaged")
  return errors.BadInput(f"Tokenized shard {path}: {problem}. {fix}, or read the cleaned text "
                         f"instead with --config.data.input=memory ({directory}).")


def shard_files(record_counts: Sequence[int], ranges: Iterable[tuple[int, int]]) -> list[int]:
  """The shards (record_counts[k] records each, records numbered on across them in order) that
  hold a record of any [lo, hi) range of `ranges`, ascending; shards without records never."""
  offsets = np.cumsum([0] + list(record_counts))
  needed: set[int] = set()
  for lo, hi in ranges:
    if hi > lo:
      first, last = np.searchsorted(offsets, [lo, hi - 1], side="right") - 1
      needed.update(k for k in range(int(first), int(last) + 1) if record_counts[k])
  return sorted(needed)


class TokenizedCorpus(TokenizedDocuments):
  """The documents of a tokenized directory (see module docstring), checked against its manifest.

  `path`: the directory or its manifest.json, local or gs://. A local corpus is read as it is. Of
  a corpus in a bucket, opening copies the manifest, tokenizer and per-shard lengths to the cache
  and checks that every shard object is there with its size; `fetch(ranges)` then copies the
  shard files holding those records (and only them), and reading any other record raises."""

  def __init__(self, path: str):
    self.remote = remote.is_remote(path)
    path = path.rstrip("/") if self.remote else os.path.abspath(os.path.expanduser(path))
    manifest_path = path if path.endswith(MANIFEST) else f"{path}/{MANIFEST}"
    self.directory = os.path.dirname(manifest_path)
    self.path = manifest_path
    try:
      with open(_local(manifest_path), encoding="utf-8") as f:
        manifest = json.load(f)
      if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                         f"expected {FORMAT!r} version {VERSION}")
      self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
      shard_entries = list(manifest["shards"])
      self._names = [entry["file"] for entry in shard_entries]
      self._bytes = [int(entry["bytes"]) for entry in shard_entries]
      self._counts = [int(entry["records"]) for entry in shard_entries]
      self.tokenizer_sha256 = manifest["tokenizer"]["sha256"]
      tokenizer_name = manifest["tokenizer"]["file"]
      self.source_dir = manifest["source"]
      self.num_tokens = int(manifest["tokens"])
      documents = int(manifest["documents"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise errors.BadInput(f"{manifest_path} is not a tokenized-corpus manifest ({e}). Rerun the "
                            "data stage on its workdir to rewrite it.") from e
    self._offsets = np.cumsum([0] + self._counts)
    self._files: list[str | None] = [None] * len(self._names)  # local copies, by shard
    if self.remote:
      present = remote.object_sizes(self.directory)
      for name, size in zip(self._names, self._bytes):
        for other in (tokenizer_name, self._lengths_name(name)):
          if other not in present:
            raise _bad(f"{self.directory}/{other}", "missing in the bucket", self.directory)
        if present.get(name) != size:
          problem = ("missing in the bucket" if name not in present else
                     f"{present[name]} bytes in the bucket, the manifest says {size}")
          raise _bad(f"{self.directory}/{name}", problem, self.directory)
    else:
      for k in range(len(self._names)):
        self._files[k] = self._checked(k, os.path.join(self.directory, self._names[k]))
    if sum(self._counts) != documents:
      raise errors.BadInput(f"{manifest_path} lists {sum(self._counts)} records in its shards but "
                            f"{documents} documents; rerun the data stage on its workdir.")
    self.tokenizer_path = _local(f"{self.directory}/{tokenizer_name}")
    self._open()

  @staticmethod
  def _lengths_name(name: str) -> str:
    return name[:-len(".array_record")] + ".lengths.npy"

  def _checked(self, k: int, file: str) -> str:
    """`file` (shard k's local copy) after checking it against the manifest."""
    where = f"{self.directory}/{self._names[k]}" if self.remote else file
    if not os.path.isfile(file):
      raise _bad(where, "missing", self.directory)
    if os.path.getsize(file) != self._bytes[k]:
      raise _bad(where, f"{os.path.getsize(file)} bytes, the manifest says {self._bytes[k]} "
                 "(truncated or replaced)", self.directory)
    found = _record_count(file)
    if found != self._counts[k]:
      raise _bad(where, f"not a readable ArrayRecord file with {self._counts[k]} records "
                 f"(reads {found})", self.directory)
    return file

  def _open(self) -> None:
    """Grain's source over the local shards (read instructions with the counts: the source does
    not reopen every file to count it); `_first[k]`: shard k's first record in it."""
    have = [k for k, f in enumerate(self._files) if f is not None]
    self._source = grain.sources.ArrayRecordDataSource(
        [f"{self._files[k]}[0:{self._counts[k]}]" for k in have]) if have else None
    self._first = {k: int(start) for k, start in
                   zip(have, np.cumsum([0] + [self._counts[k] for k in have]))}

  def fetch(self, ranges: Iterable[tuple[int, int]], who: str = "this process") -> None:
    """Makes the records of `ranges` ([lo, hi) pairs) readable: of a corpus in a bucket, copies
    the shard files that hold them (`shard_files`), and no other, into the cache
    (`remote.local_copy`: again only when an object changed), checks them, and logs how many
    files and bytes of the corpus that is. A local corpus has every file already."""
    if not self.remote:
      return
    needed = shard_files(self._counts, ranges)
    for k in needed:
      if self._files[k] is None:
        self._files[k] = self._checked(k, remote.local_copy(f"{self.directory}/{self._names[k]}"))
    self._open()
    logging.info("Tokenized shards %s: %s reads %d of %d shard files (%d of %d bytes), copied to "
                 "%s.", self.directory, who, len(needed), len(self._names),
                 sum(self._bytes[k] for k in needed), sum(self._bytes), os.path.dirname(
                     self._files[needed[0]]) if needed else "nothing")

  def records(self, lo: int, hi: int) -> tuple[int, int]:
    return lo, hi

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def tokens(self, i: int) -> np.ndarray:
    if not 0 <= i < len(self):
      raise IndexError(i)
    shard = int(np.searchsorted(self._offsets, i, side="right")) - 1
    if self._files[shard] is None:
      raise ValueError(f"Record {i} is in {self.directory}/{self._names[shard]}, which this "
                       "process has not fetched (TokenizedCorpus.fetch with the records it reads).")
    record = i - int(self._offsets[shard])
    try:
      data = self._source[self._first[shard] + record]
    except RuntimeError as e:
      raise _bad(self._files[shard], f"record {record} unreadable ({e})", self.directory) from e
    if len(data) % self.dtype.itemsize:
      raise _bad(self._files[shard], f"record {record} has {len(data)} bytes, not whole "
                 f"{self.dtype} ids", self.directory)
    return np.frombuffer(data, self.dtype).astype(np.int32)

  def token_counts(self) -> Iterator[np.ndarray]:
    for name, n in zip(self._names, self._counts):
      path = f"{self.directory}/{self._lengths_name(name)}"
      try:
        lengths = np.load(_local(path))
      except (OSError, ValueError) as e:
        raise _bad(path, f"unreadable ({e})", self.directory) from e
      if lengths.shape != (n,):
        raise _bad(path, f"{lengths.shape[0]} lengths for {n} records", self.directory)
      yield lengths

  def __str__(self) -> str:
    return f"TokenizedCorpus({self.directory}, shards={len(self._names)}, documents={len(self)})"


class EveryNth(TokenizedDocuments):
  """The training (held_out=False) or held-out documents of a tokenized corpus under
  `pretraining.split_documents`' rule, as an index map: document j of the split is document
  `index(j)` of the corpus."""

  def __init__(self, docs: TokenizedDocuments, every_nth: int, held_out: bool):
    self._docs, self._n, self._held = docs, every_nth, held_out
    for name in ("tokenizer_sha256", "tokenizer_path", "source_dir", "directory"):
      setattr(self, name, getattr(docs, name))
    held = len(docs) // every_nth
    self._len = held if held_out else len(docs) - held

  def index(self, j: int) -> int:
    if self._held:
      return j * self._n + self._n - 1
    return j + j // (self._n - 1)

  def __len__(self) -> int:
    return self._len

  def tokens(self, i: int) -> np.ndarray:
    if not 0 <= i < self._len:
      raise IndexError(i)
    return self._docs.tokens(self.index(i))

  def records(self, lo: int, hi: int) -> tuple[int, int]:
    return self._docs.records(*((self.index(lo), self.index(hi - 1) + 1) if hi > lo else (0, 0)))

  def token_counts(self):
    start = 0
    for counts in self._docs.token_counts():
      held = (np.arange(start, start + len(counts)) % self._n) == self._n - 1
      yield counts[held if self._held else ~held]
      start += len(counts)
