"""`gs://` paths given as they are: corpora read from a bucket, workdirs kept in one.

    remote.is_remote("gs://bucket/runs/a")                 # True for gs:// (the one scheme served)
    remote.check_bucket("gs://bucket/runs/a", write=True)  # UserError naming the fix, before work
    path = remote.local_copy("gs://bucket/corpus/a.txt")   # a cached local copy of one object
    remote.object_sizes("gs://bucket/corpus")              # {"a.txt": 812, ...}: one listing
    with remote.StagedWorkdir("gs://bucket/runs/a") as local_dir:
      stage.run(config, local_dir)                         # mirrored to the bucket as it runs
    remote.checkpoints_of(local_dir)                       # gs://bucket/runs/a/checkpoints
    remote.localize_inputs(config)                         # gs:// input files -> local copies
    remote.write_object(url, data, if_generation=0)        # create-if-absent (a bucket lock)

Files go through `etils.epath` (gcsfs underneath, the [gcs] extra). A gs:// workdir is a local
staging directory (R1JAX_STAGING_DIR, default ~/.cache/r1jax/staging/<bucket>/<path>) that is
filled from the bucket when the run starts (a rerun resumes from what the bucket holds) and copied
back to it every `R1JAX_SYNC_SECS` (default 60) seconds and when the run ends, by process 0. The
training loop's `checkpoints/` are not staged: Orbax writes them to the bucket itself
(tensorstore's GCS driver), so a lost machine loses at most the metrics since the last copy, never
a checkpoint (checkpoints a stage writes elsewhere in its workdir are copied as files). A corpus object
is downloaded once into R1JAX_CACHE_DIR (default ~/.cache/r1jax/gcs) and again when its size or
generation changes; the readers then use random access on the local file as on any other.
`localize_inputs` does this for every gs:// input of a stage config before the stage runs (main):
corpus-like specs (SPEC_KEYS) are left to `sources.expand_spec`, which copies what they match,
and to pretraining, which of tokenized shards in a bucket copies only the files its process's
rows read (`shards.TokenizedCorpus.fetch`, with `object_sizes` checking them all first);
an earlier run's workdir (`init_from`) is copied with only its newest checkpoint; any other file,
directory or list entry is copied as it is. The workdir lock of a gs:// workdir lives in the
bucket (`run_dir.BucketLock`, on `write_object`'s generation preconditions).

An emulator: STORAGE_EMULATOR_HOST=http://HOST:PORT points gcsfs at it, and this module points
tensorstore at the same address (TENSORSTORE_GCS_HTTP_URL) unless that is set.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging as py_logging
import os
import re
import socket
import threading
import time

from absl import logging
from etils import epath
import jax

from r1jax import errors

SCHEME = "gs://"
MARKER = ".remote.json"  # in a staging directory: {"url": the gs:// workdir it mirrors}
CHECKPOINTS = "checkpoints"
NOT_PUSHED = (MARKER, ".lock")  # top-level names a push leaves alone
NOT_PULLED = NOT_PUSHED + (CHECKPOINTS,)  # Orbax reads the bucket's checkpoints/ itself
# Config keys (last component) whose gs:// values localize_inputs leaves alone: input specs that
# sources.expand_spec reads (it copies the objects a file, directory or glob matches itself) ...
SPEC_KEYS = ("inputs", "corpus", "train", "dev", "test", "general", "domain", "domain_corpus",
             "quality_good", "quality_bad", "extra_inputs")
PASSED_ON = ("options",)  # ... and flags passed to another program (Beam's --temp_location=gs://)
WORKDIR_KEYS = ("init_from", "workdirs")  # earlier runs: copied with their newest checkpoint only
_URL = re.compile(r"gs://[^,\s]+")


def is_remote(path: str) -> bool:
  return isinstance(path, str) and "://" in path


def _split(url: str) -> tuple[str, str]:
  bucket, _, path = url[len(SCHEME):].partition("/")
  return bucket, path.strip("/")


def check_scheme(url: str, what: str) -> None:
  """Refuses a URL whose scheme r1jax cannot read or write, naming what can."""
  if not url.startswith(SCHEME) or not _split(url)[0]:
    raise errors.BadInput(
        f"{what} {url!r}: r1jax reads and writes gs://BUCKET/PATH URLs directly; for another "
        f"store, mount it (gcsfuse, s3fs, NFS) and pass the local path.")


def _prepare() -> None:
  """The emulator address for tensorstore too, gcsfs's and fsspec's chatter kept out of the log,
  and the [gcs] extra present."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator and "TENSORSTORE_GCS_HTTP_URL" not in os.environ:
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = (emulator if "://" in emulator
                                              else f"http://{emulator}")
  for name in ("gcsfs", "fsspec"):  # a bucket-type probe warning and a line per file read
    py_logging.getLogger(name).setLevel(py_logging.ERROR)
  try:
    importlib.import_module("gcsfs")  # epath's gs:// backend; only gs:// paths need it
  except ImportError as e:
    raise errors.missing_extra(e, extra="gcs", what="A gs:// path") from e


def _fix(url: str) -> str:
  bucket = _split(url)[0]
  return (f"Check that bucket {bucket!r} exists (gcloud storage ls gs://{bucket}), and that this "
          f"machine's credentials may use it (gcloud auth application-default login, or the VM's "
          f"service account); or mount it with gcsfuse and pass the local path (launch/README.md).")


def check_bucket(url: str, *, write: bool) -> None:
  """Raises UserError unless `url`'s bucket can be listed (and, with `write`, written: a probe
  object is written and deleted under `url`)."""
  check_scheme(url, "Path")
  _prepare()
  bucket = _split(url)[0]
  try:
    epath.Path(f"{SCHEME}{bucket}").exists()
    next(iter(epath.Path(f"{SCHEME}{bucket}").iterdir()), None)
    if write:
      probe = epath.Path(url) / f".r1jax-write-check-{socket.gethostname()}-{os.getpid()}"
      probe.write_text("r1jax checks that it can write here; safe to delete\n")
      probe.unlink()
  except Exception as e:  # gcsfs raises OSError subclasses, HttpError and aiohttp's errors
    reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if isinstance(e, FileNotFoundError):
      reason = f"no such bucket or path ({reason})"
    elif isinstance(e, PermissionError):
      reason = f"access denied ({reason})"
    elif isinstance(e, OSError) and "connect" in str(e).lower():
      endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
      reason = f"cannot reach {endpoint} ({reason})"
    raise errors.InputNotFound(f"Cannot {'write to' if write else 'read'} {url}: {reason}. "
                               f"{_fix(url)}") from None


def _cache_root() -> str:
  return os.environ.get("R1JAX_CACHE_DIR") or os.path.expanduser("~/.cache/r1jax/gcs")


def local_copy(url: str) -> str:
  """A local copy of the object `url` under R1JAX_CACHE_DIR, downloaded when missing or changed
  (its size and time stamp are kept apart, under .stamps/, so a copied directory holds only the
  bucket's files)."""
  _prepare()
  bucket, path = _split(url)
  local = os.path.join(_cache_root(), bucket, path)
  src = epath.Path(url)
  info = src.stat()
  stamp = os.path.join(_cache_root(), ".stamps", bucket, path)
  version = json.dumps({"size": info.length, "mtime": info.mtime})
  if os.path.exists(local) and os.path.exists(stamp) and open(stamp).read() == version:
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  os.makedirs(os.path.dirname(stamp), exist_ok=True)
  partial = f"{local}.partial.{os.getpid()}"
  src.copy(epath.Path(partial), overwrite=True)
  os.replace(partial, local)
  with open(stamp, "w") as f:
    f.write(version)
  return local


def glob_objects(pattern: str) -> list[str]:
  """The objects matching a gs:// file, directory (its files, not hidden ones) or glob, sorted."""
  _prepare()
  path = epath.Path(pattern)
  if any(c in pattern for c in "*?["):
    bucket = _split(pattern)[0]
    rel = pattern[len(SCHEME) + len(bucket) + 1:]
    found = epath.Path(f"{SCHEME}{bucket}").glob(rel)
  elif path.is_dir():
    found = path.iterdir()
  else:
    found = [path] if path.exists() else []
  return sorted(str(p) for p in found if not p.name.startswith(".") and not p.is_dir())


def object_sizes(url: str) -> dict[str, int]:
  """{name relative to `url`: bytes} of every object under the gs:// prefix `url` (one listing)."""
  fs = _fs()
  bucket, path = _split(url)
  fs.invalidate_cache(f"{bucket}/{path}")
  start = len(f"{bucket}/{path}/")
  return {name[start:]: int(info["size"])
          for name, info in fs.find(f"{bucket}/{path}", detail=True).items()}


def _objects_under(url: str) -> list[str]:
  """The names (relative to `url`) of every object under the gs:// prefix `url`, sorted."""
  return sorted(object_sizes(url))


def is_object(url: str) -> bool:
  """Whether the gs:// URL `url` names an object (not a prefix, not nothing), asked afresh."""
  fs = _fs()
  fs.invalidate_cache(url[len(SCHEME):])
  return fs.isfile(url[len(SCHEME):])


def _checkpoint_step(name: str) -> tuple[str, str] | None:
  """(the checkpoints/ directory, the entry under it) of an object in a step or temporary
  directory of any checkpoints/ of a workdir ("a/checkpoints/8/params/x" -> ("a/checkpoints",
  "8")); None for other objects (files directly in checkpoints/ included)."""
  parts = name.split("/")
  for i, part in enumerate(parts[:-2]):
    if part == CHECKPOINTS:
      return "/".join(parts[:i + 1]), parts[i + 1]
  return None


def local_tree(url: str, *, workdir: bool = False) -> str:
  """A local copy (as `local_copy`) of every object under the gs:// prefix `url`; with `workdir`,
  an earlier run's: its lock left out and of each checkpoints/ only the newest step (what a stage
  starting from it restores; the run should be finished), not Orbax's unfinished tmp steps."""
  url = url.rstrip("/")
  names = _objects_under(url)
  if not names:
    raise errors.InputNotFound(f"{url}: no object under it; name an existing gs:// "
                               f"{'workdir of an earlier run' if workdir else 'directory'}.")
  if workdir:
    newest: dict[str, int] = {}
    for directory, entry in filter(None, map(_checkpoint_step, names)):
      if entry.isdigit():
        newest[directory] = max(newest.get(directory, -1), int(entry))

    def keep(name: str) -> bool:
      step = _checkpoint_step(name)
      return step is None or step[1] == str(newest.get(step[0]))

    names = [n for n in names if n.split("/")[0] not in NOT_PUSHED and keep(n)]
  for name in names:
    local_copy(f"{url}/{name}")
  bucket, path = _split(url)
  return os.path.join(_cache_root(), bucket, path)


def localize_inputs(config) -> dict[str, str]:
  """Replaces every gs:// URL in `config`'s string values (any depth, in comma-separated lists
  and `name=URL` entries too) by a local copy: an object by `local_copy`, a prefix by `local_tree`
  (WORKDIR_KEYS: an earlier run's workdir); SPEC_KEYS and PASSED_ON are left as they are. Returns
  {dotted key: new value} of what changed. Raises InputNotFound naming a URL with no object."""
  changed = {}

  def localize(key: str, url: str) -> str:
    check_scheme(url, f"--config.{key}")
    if key.rsplit(".", 1)[-1] in WORKDIR_KEYS:
      return local_tree(url, workdir=True)
    if is_object(url):
      return local_copy(url)
    try:
      return local_tree(url)
    except errors.InputNotFound:
      raise errors.InputNotFound(f"--config.{key}: {url} is neither an object nor a directory "
                                 f"in the bucket; check the path (gcloud storage ls "
                                 f"{url}).") from None

  def walk(section, prefix: str) -> None:
    for name in list(section.keys()):
      value, key = section[name], prefix + name
      if hasattr(value, "keys"):
        walk(value, key + ".")
      elif (isinstance(value, str) and SCHEME in value and
            name not in SPEC_KEYS + PASSED_ON):
        section[name] = _URL.sub(lambda m, key=key: localize(key, m.group(0)), value)
        changed[key] = section[name]
        logging.info("--config.%s=%s is read from a local copy: %s", key, value, section[name])

  walk(config, "")
  return changed


def url_of(workdir: str) -> str | None:
  """The gs:// workdir a staging directory mirrors, or None for any other directory."""
  marker = os.path.join(workdir, MARKER)
  if not os.path.exists(marker):
    return None
  with open(marker) as f:
    return json.load(f)["url"].rstrip("/")


def checkpoints_of(workdir: str) -> str:
  """Where a workdir's checkpoints live: in the bucket for a staging directory, else DIR/checkpoints."""
  url = url_of(workdir)
  return f"{url}/{CHECKPOINTS}" if url else os.path.join(workdir, CHECKPOINTS)


# Objects with generation preconditions (what a lock in a bucket needs; the JSON API through
# gcsfs's session: a multipart upload, whose ifGenerationMatch fake-gcs-server honours too).


def _fs():
  _prepare()
  return importlib.import_module("gcsfs").GCSFileSystem()


def write_object(url: str, data: bytes, *, if_generation: int) -> int:
  """Writes `data` to the object `url` only if its generation is `if_generation` (0: only if it
  does not exist); returns the new generation. Raises FileExistsError when the precondition fails
  (GCS's 412)."""
  fs = _fs()
  bucket, name = _split(url)
  body = (b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n" +
          json.dumps({"name": name}).encode() +
          b"\n--==0==\nContent-Type: application/octet-stream\n\n" + data + b"\n--==0==--")
  out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{bucket}/o",  # pylint: disable=protected-access
                uploadType="multipart", ifGenerationMatch=str(if_generation), data=body,
                headers={"Content-Type": 'multipart/related; boundary="==0=="'}, json_out=True)
  return int(out["generation"])


def read_object(url: str) -> tuple[bytes, int, float] | None:
  """(bytes, generation, seconds since it was last written by the bucket's clock against this
  machine's) of the object `url`, or None when there is none."""
  fs = _fs()
  bucket, name = _split(url)
  for _ in range(5):
    try:
      meta = fs.call("GET", "b/{}/o/{}", bucket, name, json_out=True)
      _, data = fs.call("GET", "b/{}/o/{}", bucket, name, alt="media",
                        generation=meta["generation"])
    except FileNotFoundError:  # absent, or replaced between the two requests
      fs.invalidate_cache(f"{bucket}/{name}")
      if not fs.exists(f"{bucket}/{name}"):
        return None
      continue
    updated = datetime.datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
    return data, int(meta["generation"]), time.time() - updated.timestamp()
  return None


def delete_object(url: str, *, if_generation: int) -> None:
  """Deletes the object `url` if its generation is still `if_generation` (else leaves it)."""
  fs = _fs()
  bucket, name = _split(url)
  try:
    fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(if_generation))
  except (FileNotFoundError, FileExistsError):
    pass


@dataclasses.dataclass
class StagedWorkdir:
  """A gs:// workdir as a local staging directory (see the module docstring); a context manager
  whose value is the local path."""
  url: str
  sync_secs: float = dataclasses.field(
      default_factory=lambda: float(os.environ.get("R1JAX_SYNC_SECS", "60")))

  def __post_init__(self):
    self.url = self.url.rstrip("/")
    check_scheme(self.url, "--workdir")
    bucket, path = _split(self.url)
    root = os.environ.get("R1JAX_STAGING_DIR") or os.path.expanduser("~/.cache/r1jax/staging")
    self.local = os.path.join(root, bucket, path)
    self._pushed: dict[str, tuple[int, int]] = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._push_lock = threading.Lock()

  def _remote_files(self, directory: epath.Path, top: bool = True):
    for p in directory.iterdir():
      if top and p.name in NOT_PULLED:
        continue
      if p.is_dir():
        yield from self._remote_files(p, top=False)
      else:
        yield p

  def pull(self) -> int:
    """Copies the bucket's files (all but checkpoints/) into the staging directory; returns how
    many. A file the bucket holds replaces the local one: the bucket is the run's state."""
    n, root = 0, epath.Path(self.url)
    if root.exists():
      for p in self._remote_files(root):
        rel = str(p)[len(self.url) + 1:]
        target = os.path.join(self.local, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        p.copy(epath.Path(target), overwrite=True)
        st = os.stat(target)
        self._pushed[rel] = (st.st_size, st.st_mtime_ns)
        n += 1
    return n

  def push(self) -> int:
    """Copies new and changed local files to the bucket; returns how many. (A stage whose Orbax
    checkpoints go to the bucket itself has no local checkpoints/; a stage that writes one, e.g.
    finetuning's final copy, has it copied as files.)"""
    n = 0
    with self._push_lock:
      for dirpath, dirnames, filenames in os.walk(self.local):
        if dirpath == self.local:
          dirnames[:] = [d for d in dirnames if d not in NOT_PUSHED]
        for name in filenames:
          path = os.path.join(dirpath, name)
          rel = os.path.relpath(path, self.local)
          if rel in NOT_PUSHED or ".tmp" in name:
            continue
          try:
            st = os.stat(path)
            if self._pushed.get(rel) == (st.st_size, st.st_mtime_ns):
              continue
            epath.Path(path).copy(epath.Path(f"{self.url}/{rel}"), overwrite=True)
          except FileNotFoundError:  # replaced (atomic write) or deleted meanwhile
            continue
          self._pushed[rel] = (st.st_size, st.st_mtime_ns)
          n += 1
    return n

  def _sync_loop(self) -> None:
    while not self._stop.wait(self.sync_secs):
      try:
        self.push()
      except Exception as e:  # pylint: disable=broad-except  # the final push reports it
        logging.warning("Copying %s to %s failed (retried in %g s): %s", self.local, self.url,
                        self.sync_secs, e)

  def __enter__(self) -> str:
    check_bucket(self.url, write=jax.process_index() == 0)
    os.makedirs(self.local, exist_ok=True)
    pulled = self.pull()
    with open(os.path.join(self.local, MARKER), "w") as f:
      json.dump({"url": self.url}, f)
    logging.info("Workdir %s staged in %s (%d file(s) from the bucket; checkpoints go to %s).",
                 self.url, self.local, pulled, checkpoints_of(self.local))
    if jax.process_index() == 0:
      self._thread = threading.Thread(target=self._sync_loop, name="r1jax-workdir-sync",
                                      daemon=True)
      self._thread.start()
    return self.local

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      started = time.monotonic()
      n = self.push()
      logging.info("Copied %d file(s) of %s to %s in %.1f s.", n, self.local, self.url,
                   time.monotonic() - started)
