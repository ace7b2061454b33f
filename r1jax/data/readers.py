r"""The readers behind `sources.py`: one class per input format, and `RecordSource`, their
concatenation, built from an expanded list of inputs (`sources.expand_spec`).

`sources.py` is the interface (input specs, the record format, the errors: its docstring);
this module reads. It imports neither Grain nor `r1jax.remote` (which imports JAX), so a Beam
worker that reopens or unpickles a source imports neither: `sources.reopener` gives such a
worker a recipe that names this module only.
"""
import bisect
import collections
import csv
import gzip
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from r1jax import errors
from r1jax.data import builtin

FORMATS = ("auto", "text", "jsonl", "csv", "tsv", "parquet")
TEXT_MODES = ("lines", "paragraphs")
UNDECODABLE_POLICIES = ("repair", "drop")
MISSING_STRINGS = frozenset({"", "na", "n/a", "nan", "null", "none"})
_BINARY_PROBE = 8192
_SCAN_CHUNK = 1 << 24  # bytes per read when indexing a text or JSONL file
_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r\f\v]*\n\s*")


def _format_of(path: str, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  base = path[:-3] if path.endswith(".gz") else path
  ext = os.path.splitext(base)[1].lower()
  return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
          ".parquet": "parquet"}.get(ext, "text")


def _decode(raw: bytes):
  """-> (text, undecodable flag)."""
  try:
    return raw.decode("utf-8"), False
  except UnicodeDecodeError:
    return raw.decode("utf-8", errors="replace"), True


def _check_text_bytes(path: str, head: bytes, size: int):
  if size == 0:
    raise errors.BadInput(f"Input file {path} is empty (0 bytes); remove it from the inputs.")
  nul = head.find(b"\x00")
  if nul >= 0:
    raise errors.BadInput(f"Input file {path} does not look like text: NUL byte at offset {nul}. "
                          "Pass text, JSONL, CSV, Parquet or a TFDS dataset.")


_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _replace_surrogates(value):
  """-> (value with lone surrogates in its strings replaced by U+FFFD, whether any were)."""
  if isinstance(value, str):
    fixed = _SURROGATE_RE.sub("\ufffd", value)
    return fixed, fixed != value
  if isinstance(value, list):
    pairs = [_replace_surrogates(v) for v in value]
    return [v for v, _ in pairs], any(bad for _, bad in pairs)
  if isinstance(value, dict):
    out, found = {}, False
    for k, v in value.items():
      (k, bad_k), (v, bad_v) = _replace_surrogates(k), _replace_surrogates(v)
      out[k] = v
      found = found or bad_k or bad_v
    return out, found
  return value, False


def _is_missing(value) -> bool:
  if value is None:
    return True
  if isinstance(value, float) and math.isnan(value):
    return True
  return isinstance(value, str) and value.strip().lower() in MISSING_STRINGS


class _FileSource:
  """Records of one file; subclasses implement __len__ and record(i)."""

  def __init__(self, path: str, text_field: str, on_undecodable: str, max_chars: int):
    self.path = path
    self.text_field = text_field
    self.on_undecodable = on_undecodable
    self.max_chars = max_chars

  def _text_record(self, text, meta, line, undecodable=False):
    record = dict(meta)
    record["_file"] = self.path
    record["_line"] = line
    if _is_missing(text) and not (isinstance(text, str) and text.strip()):
      record.pop("text", None)
      record["_error"] = "missing_text"
      return record
    if not isinstance(text, str):
      record["_error"] = "bad_text_type"
      record["text"] = str(text)[:200]
      return record
    if len(text) > self.max_chars:
      record["_error"] = "too_long"
      record["text"] = text[:200]
      return record
    record["text"] = text
    if undecodable:
      if self.on_undecodable == "drop":
        record["_error"] = "undecodable"
      else:
        record["_undecodable"] = True
    return record


class _OffsetFileSource(_FileSource):
  """Text or JSONL file indexed by the byte offsets of its lines (or paragraphs)."""

  def __init__(self, path, fmt, text_field, on_undecodable, max_chars, text_mode):
    super().__init__(path, text_field, on_undecodable, max_chars)
    self.fmt, self.text_mode = fmt, text_mode
    self._data = None  # the bytes of a gzip file; None: records are read with pread
    self._fd = None    # opened lazily (also in each worker process)
    gz = path.endswith(".gz")
    if gz or (fmt == "text" and text_mode == "paragraphs"):
      opener = gzip.open if gz else open
      with opener(path, "rb") as f:
        try:
          buf = f.read()
        except (OSError, EOFError) as e:
          raise errors.BadInput(f"Input file {path} is not readable (bad gzip?): {e}") from e
      _check_text_bytes(path, buf[:_BINARY_PROBE], len(buf))
      self._index_buffer(buf)
      if gz:
        self._data = buf
    else:
      self._index_lines_in_chunks(path)

  def _index_buffer(self, buf):
    """starts/ends/line numbers of the non-blank units of buf (a gzip file or paragraphs)."""
    arr = np.frombuffer(buf, np.uint8)
    newlines = np.flatnonzero(arr == 10)
    if self.fmt == "text" and self.text_mode == "paragraphs":
      line_starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
      units, pos = [], 0  # (start, end, line) of each paragraph
      for m in list(_PARAGRAPH_BREAK.finditer(buf)) + [None]:
        end = m.start() if m else len(buf)
        if buf[pos:end].strip():
          units.append((pos, end, int(np.searchsorted(line_starts, pos, side="right"))))
        if m:
          pos = m.end()
      self._starts, self._ends, self._lines = np.asarray(units, np.int64).reshape(-1, 3).T
      return
    self._set_lines(newlines, np.flatnonzero(arr == 13), len(arr))

  def _index_lines_in_chunks(self, path):
    """The line index of a plain file, scanned _SCAN_CHUNK bytes at a time: memory is the index
    (24 bytes per line) and one chunk, not the file (a 1.5 GB JSONL file once took 3 GB here)."""
    newlines, returns, size = [], [], 0
    with open(path, "rb") as f:
      head = f.read(_BINARY_PROBE)
      f.seek(0)
      while chunk := f.read(_SCAN_CHUNK):
        arr = np.frombuffer(chunk, np.uint8)
        newlines.append(np.flatnonzero(arr == 10) + size)
        returns.append(np.flatnonzero(arr == 13) + size)
        size += len(chunk)
    _check_text_bytes(path, head, size)
    self._set_lines(np.concatenate(newlines), np.concatenate(returns), size)

  def _set_lines(self, newlines, returns, size):
    """Lines from the positions of newlines and carriage returns: skip the empty ones (length 0,
    or a carriage return only); other blank lines come through and cleaning counts them short."""
    line_starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    line_ends = np.concatenate([newlines, [size]]).astype(np.int64)
    lengths = line_ends - line_starts
    keep = lengths > 0
    cr_only = np.flatnonzero(lengths == 1)
    keep[cr_only] = ~np.isin(line_starts[cr_only], returns)
    self._starts, self._ends = line_starts[keep], line_ends[keep]
    self._lines = np.flatnonzero(keep) + 1

  def __getstate__(self):
    return dict(self.__dict__, _fd=None)  # reopened lazily in the worker

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)

  def _bytes(self, start, end):
    if self._data is not None:
      return self._data[start:end]
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    return os.pread(self._fd, end - start, start)

  def describe(self) -> str:
    if self.fmt == "jsonl":
      return f"JSONL, the text in field {self.text_field!r}"
    if self.text_mode == "paragraphs":
      return "plain text, one document per blank-line separated paragraph"
    return "plain text, one document per line"

  def __len__(self):
    return len(self._starts)

  def record(self, i):
    start, end, line = int(self._starts[i]), int(self._ends[i]), int(self._lines[i])
    if end - start > 4 * self.max_chars:  # surely too long: do not decode megabytes
      return {"_file": self.path, "_line": line, "_error": "too_long",
              "text": self._bytes(start, start + 200).decode("utf-8", errors="replace")}
    raw = self._bytes(start, end).rstrip(b"\r")
    text, undecodable = _decode(raw)
    if self.fmt == "text":
      return self._text_record(text, {}, line, undecodable)
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      return {"_file": self.path, "_line": line, "_error": "malformed_json",
              "text": text[:200], "_detail": str(e)}
    if not isinstance(obj, dict):
      return {"_file": self.path, "_line": line, "_error": "malformed_json", "text": text[:200],
              "_detail": f"expected a JSON object, got {type(obj).__name__}"}
    if _SURROGATE_ESCAPE_RE.search(text):  # JSON escapes of lone surrogates decode to invalid str
      obj, bad = _replace_surrogates(obj)
      undecodable = undecodable or bad
    value = obj.pop(self.text_field, None)
    meta = {k: v for k, v in obj.items() if not k.startswith("_")}
    return self._text_record(value, meta, line, undecodable)


def _infer_column(values):
  """Strings from CSV -> int/float/str values with None for missing (pandas-like inference)."""
  present = [v for v in values if not _is_missing(v)]
  for cast in (int, float):
    try:
      converted = [cast(v) for v in present]
    except (TypeError, ValueError):
      continue
    del converted
    return [None if _is_missing(v) else cast(v) for v in values]
  return [None if _is_missing(v) else v for v in values]


class _CsvSource(_FileSource):
  """CSV/TSV with a header row; ragged rows become error records."""

  def __init__(self, path, delimiter, text_field, on_undecodable, max_chars):
    super().__init__(path, text_field, on_undecodable, max_chars)
    self.delimiter = delimiter
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      raw = f.read()
    _check_text_bytes(path, raw[:_BINARY_PROBE], len(raw))
    bad_lines = set()
    lines = []
    for n, raw_line in enumerate(raw.splitlines(keepends=True), 1):
      text, undecodable = _decode(raw_line)
      if undecodable:
        bad_lines.add(n)
      lines.append(text)
    csv.field_size_limit(max(4 * max_chars, 1 << 20))
    reader = csv.reader(lines, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      raise errors.BadInput(f"CSV file {path} has no header row.") from None
    except csv.Error as e:
      raise errors.BadInput(f"CSV file {path}:1: cannot parse the header: {e}") from e
    header = [h.strip() for h in header]
    if text_field not in header:
      raise errors.BadInput(f"CSV file {path} has no column {text_field!r} (columns: {header}); "
                            "set the text field (config.data.text_field) to one of them.")
    self._rows, self._errors = [], {}
    first_line = reader.line_num + 1
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:  # e.g. a field larger than the limit or a NUL
        self._errors[len(self._rows)] = ("too_long" if "larger" in str(e) else "ragged_row")
        self._rows.append((first_line, None, False))
        first_line = reader.line_num + 1
        continue
      undecodable = any(n in bad_lines for n in range(first_line, reader.line_num + 1))
      if not any(cell.strip() for cell in row):
        first_line = reader.line_num + 1
        continue  # blank line
      if len(row) != len(header):
        self._errors[len(self._rows)] = "ragged_row"
        self._rows.append((first_line, row, undecodable))
      else:
        self._rows.append((first_line, row, undecodable))
      first_line = reader.line_num + 1
    # Column types from the well-formed rows only.
    good = [r for i, (_, r, _) in enumerate(self._rows) if i not in self._errors]
    columns = {}
    for c, name in enumerate(header):
      if name == text_field:
        continue
      columns[name] = iter(_infer_column([r[c] for r in good]))
    self._meta = []
    for i, (_, row, _) in enumerate(self._rows):
      if i in self._errors:
        self._meta.append(None)
      else:
        self._meta.append({name: next(values) for name, values in columns.items()})
    self._text_col = header.index(text_field)

  def describe(self) -> str:
    return f"{'TSV' if self.delimiter == chr(9) else 'CSV'}, the text in column {self.text_field!r}"

  def __len__(self):
    return len(self._rows)

  def record(self, i):
    line, row, undecodable = self._rows[i]
    if i in self._errors:
      text = "" if row is None else ",".join(row)
      return {"_file": self.path, "_line": line, "_error": self._errors[i], "text": text[:200]}
    return self._text_record(row[self._text_col], self._meta[i], line, undecodable)


class _ParquetSource(_FileSource):
  """Parquet file held in memory as columns."""

  def __init__(self, path, text_field, on_undecodable, max_chars):
    super().__init__(path, text_field, on_undecodable, max_chars)
    try:
      # Lazy: pyarrow is heavy and only Parquet inputs need it (the [parquet] extra).
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise errors.missing_extra(e, extra="parquet", what=f"Parquet input {path}") from e
    if os.path.getsize(path) == 0:
      raise errors.BadInput(f"Input file {path} is empty (0 bytes); remove it from the inputs.")
    try:
      table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
      raise errors.BadInput(f"Input file {path} is not a readable Parquet file: {e}") from e
    if text_field not in table.column_names:
      raise errors.BadInput(f"Parquet file {path} has no column {text_field!r} (columns: "
                            f"{table.column_names}); set the text field to one of them.")
    self._columns = {name: table.column(name).to_pylist() for name in table.column_names}
    self._n = table.num_rows

  def describe(self) -> str:
    return f"Parquet, the text in column {self.text_field!r}"

  def __len__(self):
    return self._n

  def record(self, i):
    meta = {k: v[i] for k, v in self._columns.items() if k != self.text_field}
    meta = {k: (None if _is_missing(v) else v) for k, v in meta.items()}
    return self._text_record(self._columns[self.text_field][i], meta, i + 1)


class _TfdsSource(_FileSource):
  """A prepared TFDS dataset through `tfds.data_source` (ArrayRecord, random access)."""

  def __init__(self, spec, text_field, on_undecodable, max_chars):
    super().__init__(spec, text_field, on_undecodable, max_chars)
    m = re.fullmatch(r"tfds:([^/@:]+(?:/[^/@:]+)?)(?::([\d.]+))?/([^@]+)(?:@(.+))?", spec)
    if not m:
      raise errors.BadInput(f"Bad TFDS spec {spec!r}; expected tfds:NAME[:VERSION]/SPLIT"
                            "[@DATA_DIR], e.g. tfds:imdb_reviews/train@/data/tfds.")
    name, version, split, data_dir = m.groups()
    try:
      # Lazy: tensorflow_datasets is heavy and only tfds: specs need it (the [tfds] extra).
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise errors.missing_extra(e, extra="tfds", what=f"The TFDS input {spec!r}") from e
    full_name = f"{name}:{version}" if version else name
    try:
      self._ds = tfds.data_source(full_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises a variety of errors for missing data
      raise errors.BadInput(f"Cannot open TFDS dataset {spec!r} (nothing is downloaded; prepare "
                            f"it in DATA_DIR first): {e}") from e
    features = self._ds.dataset_info.features
    if text_field not in features:
      raise errors.BadInput(f"TFDS dataset {spec!r} has no feature {text_field!r} (features: "
                            f"{list(features.keys())}).")
    self._class_names = {k: f.names for k, f in features.items()
                         if isinstance(f, tfds.features.ClassLabel)}

  def describe(self) -> str:
    return f"a TFDS dataset, the text in feature {self.text_field!r}"

  def __len__(self):
    return len(self._ds)

  def record(self, i):
    example = dict(self._ds[i])
    undecodable = False
    text = example.pop(self.text_field, None)
    if isinstance(text, bytes):
      text, undecodable = _decode(text)
    meta = {}
    for k, v in example.items():
      if k in self._class_names and v is not None and 0 <= int(v) < len(self._class_names[k]):
        v = self._class_names[k][int(v)]
      elif isinstance(v, bytes):
        v = v.decode("utf-8", errors="replace")
      elif isinstance(v, np.generic):
        v = v.item()
      elif isinstance(v, np.ndarray):
        v = v.tolist()
      meta[k] = v
    return self._text_record(text, meta, i, undecodable)


class _BuiltinSource(_FileSource):
  """One of the embedded corpora."""

  def __init__(self, spec, text_field, on_undecodable, max_chars):
    super().__init__(spec, text_field, on_undecodable, max_chars)
    parts = spec.split(":")
    if len(parts) not in (2, 3):
      raise errors.BadInput(f"Bad builtin spec {spec!r}; use builtin:general, builtin:domain or "
                            "builtin:task:train|dev|test.")
    self._records = builtin.load(parts[1], parts[2] if len(parts) == 3 else None)

  def describe(self) -> str:
    return "the embedded corpus"

  def __len__(self):
    return len(self._records)

  def record(self, i):
    meta = dict(self._records[i])
    return self._text_record(meta.pop("text"), meta, i + 1)


class RecordSource:
  """All records of a list of inputs, concatenated in order (a Grain random-access source).

  `items`: files, builtin: and tfds: items, as `sources.expand_spec` returns them (use
  `sources.open_source` to open a spec); `spec`: what to call them in messages (default: items).
  """

  def __init__(self, items: Sequence[str], *, spec=None, text_field: str = "text", format: str = "auto",  # pylint: disable=redefined-builtin
               text_mode: str = "lines", on_undecodable: str = "repair",
               max_chars: int = 1_000_000, csv_delimiter: str = ","):
    if format not in FORMATS:
      raise ValueError(f"format={format!r}; choose one of {FORMATS}.")
    if text_mode not in TEXT_MODES:
      raise ValueError(f"text_mode={text_mode!r}; choose one of {TEXT_MODES}.")
    if on_undecodable not in UNDECODABLE_POLICIES:
      raise ValueError(f"on_undecodable={on_undecodable!r}; choose one of {UNDECODABLE_POLICIES}.")
    self.spec = list(items) if spec is None else spec
    self.files = []
    for item in items:
      args = (text_field, on_undecodable, max_chars)
      if item.startswith("builtin:"):
        src = _BuiltinSource(item, *args)
      elif item.startswith("tfds:"):
        src = _TfdsSource(item, *args)
      else:
        fmt = _format_of(item, format)
        if fmt == "parquet":
          src = _ParquetSource(item, *args)
        elif fmt in ("csv", "tsv"):
          src = _CsvSource(item, "\t" if fmt == "tsv" else csv_delimiter, *args)
        else:
          src = _OffsetFileSource(item, fmt, text_field, on_undecodable, max_chars, text_mode)
      self.files.append(src)
    self._offsets = np.cumsum([0] + [len(f) for f in self.files]).tolist()

  def __len__(self) -> int:
    return self._offsets[-1]

  def describe(self) -> str:
    """How the inputs are read: "plain text, one document per line", "2 files of JSONL, ...";
    several kinds joined with "; "."""
    kinds = collections.Counter(f.describe() for f in self.files)
    return "; ".join(kind if n == 1 else f"{n} files of {kind}" for kind, n in kinds.items())

  @property
  def tabular_files(self) -> list[Any]:
    """The CSV and Parquet inputs (the ones with columns for missing-value imputation)."""
    return [f for f in self.files if isinstance(f, (_CsvSource, _ParquetSource))]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._offsets, index) - 1
    return self.files[f].record(index - self._offsets[f])

  def __repr__(self):
    return f"RecordSource({self.spec!r}, files={len(self.files)}, records={len(self)})"


def public_fields(record: dict[str, Any]) -> dict[str, Any]:
  """The record without bookkeeping keys (those starting with '_')."""
  return {k: v for k, v in record.items() if not k.startswith("_")}
