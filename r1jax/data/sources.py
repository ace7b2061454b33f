r"""Input sources: text, JSONL, CSV, Parquet and TFDS as random-access Grain data sources.

This module is the interface (specs, records, errors); the readers themselves are in `readers.py`.

    src = sources.open_source("corpus/*.jsonl,notes.txt,builtin:domain", text_field="body")
    ds = grain.MapDataset.source(src)[process_index::process_count]
    for record in sources.read_records("data.csv"): ...

An input spec is a comma-separated list of items:
  PATH | GLOB | DIRECTORY     files; the format comes from the extension (after an optional .gz):
                              .jsonl/.json -> JSONL, .csv -> CSV, .tsv -> tab CSV, .parquet ->
                              Parquet, anything else -> plain text; `format=` overrides it.
                              A directory means the supported files directly inside it.
  builtin:general | builtin:domain | builtin:task:SPLIT   the embedded corpus (r1jax.data.builtin)
  tfds:NAME[:VERSION]/SPLIT[@DATA_DIR]   a prepared TFDS dataset read through `tfds.data_source`
                              (ArrayRecord), never downloaded; SPLIT may be a slice ("train[:10%]").

Every record is a dict: `{"text": str, <metadata fields>, "_file": str, "_line": int}` (for TFDS
"_line" is the example index). Keys starting with "_" are bookkeeping and are not written out. A bad
row inside a good file is not dropped here: it comes through with `"_error": reason` (and "text"
possibly missing) so the cleaning pipeline can count it with its location, and
documents_in = documents_out + sum(dropped) holds. Reasons raised here:
  malformed_json      a JSONL line that is not a JSON object
  missing_text        the text field is absent, null or empty in a JSONL/CSV/Parquet/TFDS row
  bad_text_type       the text field is not a string (a number, a list)
  ragged_row          a CSV row with a different number of fields than the header
  too_long            a row longer than `max_chars` (default 1,000,000) characters
  undecodable         invalid UTF-8 when `on_undecodable="drop"`
With `on_undecodable="repair"` (default) invalid bytes become U+FFFD and the record carries
`"_undecodable": True`; the cleaning step removes them and counts the repair. A JSONL string that
spells a lone UTF-16 surrogate ("\\ud800") is invalid in the same way: no UTF-8 writer accepts it.

Whole-file problems raise at open time, naming the file: a missing path or a glob matching
nothing (`errors.InputNotFound`, a FileNotFoundError), an empty file, a file that is not text (NUL
bytes in its first 8 KiB), a CSV/Parquet file without the text column, an unreadable Parquet/TFDS
input (`errors.BadInput`, a ValueError); a Parquet or TFDS input without its optional package
installed (`errors.MissingExtra`, naming the `[parquet]` / `[tfds]` extra).

Plain text: one document per line (`text_mode="lines"`, default) or per blank-line separated
paragraph (`text_mode="paragraphs"`). Text and JSONL files are indexed by byte offsets in one pass
(scanned in chunks: memory holds the index, not the file) and read lazily with pread, so
none of the file stays resident; CSV, Parquet and gzip files are held in memory.
"""
import functools
import glob as glob_lib
import os
from typing import Any, Callable, Iterator, Sequence

from r1jax import errors
from r1jax import remote
from r1jax.data import readers

_SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".text")


def expand_spec(spec: str | Sequence[str]) -> list[str]:
  """Comma-separated spec (or list of specs) -> list of files / builtin: / tfds: items.

  Raises FileNotFoundError naming an item that matches nothing.
  """
  items = [spec] if isinstance(spec, str) else list(spec)
  out = []
  for item in items:
    for part in item.split(","):
      part = part.strip()
      if not part:
        continue
      if part.startswith(("builtin:", "tfds:")):
        out.append(part)
      elif remote.is_remote(part):  # gs:// objects, read through a local copy
        remote.check_scheme(part, "Input")
        objects = remote.glob_objects(part)
        if objects != [part] and not any(c in part for c in "*?["):  # a directory's files
          objects = [o for o in objects
                     if o.lower().replace(".gz", "").endswith(_SUPPORTED_EXTENSIONS)]
        if not objects:
          raise errors.InputNotFound(f"Input {part!r} matches no object (of "
                                     f"{_SUPPORTED_EXTENSIONS} for a directory).")
        out.extend(remote.local_copy(o) for o in objects)
      elif os.path.isdir(part):
        files = sorted(os.path.join(part, f) for f in os.listdir(part)
                       if not f.startswith(".") and os.path.isfile(os.path.join(part, f))
                       and f.lower().replace(".gz", "").endswith(_SUPPORTED_EXTENSIONS))
        if not files:
          raise errors.InputNotFound(
              f"Input directory {part} has no {_SUPPORTED_EXTENSIONS} files.")
        out.extend(files)
      elif any(c in part for c in "*?["):
        files = sorted(f for f in glob_lib.glob(part, recursive=True) if os.path.isfile(f))
        if not files:
          raise errors.InputNotFound(f"Input glob {part!r} matches no file.")
        out.extend(files)
      elif os.path.isfile(part):
        out.append(part)
      else:
        raise errors.InputNotFound(f"Input path {part!r} does not exist.")
  if not out:
    raise errors.InputNotFound(f"Input spec {spec!r} names no input.")
  return out


def open_source(spec, **kwargs) -> readers.RecordSource:
  """All records of `spec`: see the module docstring for specs and options (`kwargs`)."""
  return readers.RecordSource(expand_spec(spec), spec=spec, **kwargs)


def reopener(spec, **kwargs) -> Callable[[], readers.RecordSource]:
  """A picklable recipe that opens `spec` again (in a Beam worker: `clean_beam`'s `reopen`).

  For local inputs it holds the expanded items and names only `readers`, so the worker that runs
  it imports neither this module nor `r1jax.remote` (and JAX, which that imports); a spec with
  gs:// objects stays a spec, which a worker on another machine copies for itself.
  """
  parts = [spec] if isinstance(spec, str) else list(spec)
  if any(remote.is_remote(p.strip()) for item in parts for p in item.split(",")):
    return functools.partial(open_source, spec, **kwargs)
  return functools.partial(readers.RecordSource, expand_spec(spec), spec=spec, **kwargs)


def read_records(spec, *, process_index: int = 0, process_count: int = 1,
                 **kwargs) -> Iterator[dict[str, Any]]:
  """Iterates the records of a spec (this process's share: every process_count-th record)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  src = open_source(spec, **kwargs)
  for i in range(process_index, len(src), process_count):
    yield src[i]


