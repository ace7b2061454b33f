"""A classification task: its splits, its label vocabulary, and its batches as a Grain pipeline.

    data = task.load_task(config.task)   # the task section of configs/finetune.py (any attributes)
    data.labels.names, data.train.records, data.dev.counts
    it = task.classification_batches(task.public_records(data.train.records), tok,
                                     labels=data.labels, seq_len=128, batch_size=32, seed=0)
    batch = next(it)

`load_task` reads the train/dev/test splits (any input `r1jax.data.sources.read_records` reads),
keeps rows with a text and a label and counts the others by reason, builds the label vocabulary
(task.labels, the embedded task's class order, or the sorted training labels) and applies the
unknown-label policy to dev/test. A row's label value becomes label names with `label_names_of`
(one rule for the task splits and for `LabelVocab`).

Batches (B = batch_size // process_count rows on this process, Q = seq_len, C = classes):
  tokens       int32 [B, Q]  [CLS] text [SEP] [PAD]..., the text truncated to Q - 2 tokens
  token_mask   bool  [B, Q]  True on real tokens
  label        int32 [B]     the class id (float32 [B, C] multi-hot with multi_label=True)
  example_mask bool  [B]     only with pad_final_batch=True (evaluation): False on padding rows
"""
import dataclasses
import math
import os
from typing import Any, Iterable, Sequence

from absl import logging
import grain
import numpy as np

from r1jax import errors
from r1jax.data import augment as augment_lib
from r1jax.data import builtin
from r1jax.data import grain_ops
from r1jax.data import readers
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib


# -------------------------------------------------------------------------------------------------
# Labels


def label_names_of(value: Any, multi_label: bool, delimiter: str = ",") -> list[str]:
  """A row's label value -> its label names ([] = missing). Lists stay lists; a multi-label string
  is split on `delimiter`; numbers become strings ("3")."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return []
  if isinstance(value, (list, tuple, np.ndarray)):
    names = [str(v).strip() for v in value if v is not None]
  elif multi_label and isinstance(value, str):
    names = [v.strip() for v in value.split(delimiter)]
  else:
    names = [str(value).strip()]
  names = [n for n in names if n and n.lower() not in readers.MISSING_STRINGS]
  return list(dict.fromkeys(names))  # drop repeats, keep order


@dataclasses.dataclass(frozen=True)
class LabelVocab:
  """Class names <-> ids. Single-label: one name per record; multi-label: a list of names (or a
  comma-separated string) per record; a record's value is read by `label_names_of`."""
  names: tuple[str, ...]

  def __post_init__(self):
    if not self.names:
      raise ValueError("LabelVocab needs at least one class name.")
    if len(set(self.names)) != len(self.names):
      raise ValueError(f"Duplicate class names in {self.names}.")

  @classmethod
  def from_names(cls, names: Iterable[str]) -> "LabelVocab":
    return cls(tuple(str(n) for n in names))

  @classmethod
  def from_records(cls, records, label_field: str = "label",
                   multi_label: bool = False) -> "LabelVocab":
    """Sorted set of the labels found in the records."""
    found = set()
    for r in records:
      found.update(label_names_of(r.get(label_field), multi_label))
    return cls(tuple(sorted(found)))

  @classmethod
  def load(cls, path: str) -> "LabelVocab":
    with open(path, encoding="utf-8") as f:
      return cls(tuple(line.rstrip("\n") for line in f if line.strip()))

  def save(self, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(n + "\n" for n in self.names))
    return path

  def __len__(self):
    return len(self.names)

  def index(self, name) -> int:
    try:
      return self.names.index(str(name))
    except ValueError:
      raise ValueError(f"Unknown label {name!r}; known labels: {list(self.names)}.") from None

  def encode(self, value, multi_label: bool = False):
    """A record's label value -> int32 id, or float32 [C] multi-hot."""
    names = label_names_of(value, multi_label)
    if multi_label:
      out = np.zeros(len(self.names), np.float32)
      for n in names:
        out[self.index(n)] = 1.0
      return out
    if len(names) != 1:
      raise ValueError(f"Single-label classification needs exactly one label, got {value!r}.")
    return np.int32(self.index(names[0]))


# -------------------------------------------------------------------------------------------------
# Task splits


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's usable records ({"text", "label"}, label a str or a list for multi-label) and
  what happened to the rest (counts by reason)."""
  name: str
  records: list[dict[str, Any]]
  counts: dict[str, int]


@dataclasses.dataclass(frozen=True)
class TaskData:
  labels: LabelVocab
  multi_label: bool
  train: Split
  dev: Split
  test: Split


def read_split(spec: str, name: str, task: Any) -> Split:
  """Reads `spec`, keeping rows with a text and a label; counts the others by reason."""
  counts = {"rows": 0, "used": 0, "skipped_missing_label": 0, "skipped_bad_text": 0,
            "skipped_multiple_labels": 0}
  records = []
  first_problem = {}
  for record in sources.read_records(spec, text_field=task.text_field):
    counts["rows"] += 1
    where = f"{record.get('_file', spec)}:{record.get('_line', '?')}"
    if record.get("_error"):
      counts["skipped_bad_text"] += 1
      first_problem.setdefault("bad_text", f"{where} ({record['_error']})")
      continue
    names = label_names_of(record.get(task.label_field), task.multi_label, task.label_delimiter)
    if not names:
      counts["skipped_missing_label"] += 1
      first_problem.setdefault("missing_label", where)
      continue
    if not task.multi_label and len(names) != 1:
      counts["skipped_multiple_labels"] += 1
      first_problem.setdefault("multiple_labels", where)
      continue
    records.append({"text": record["text"], "label": names if task.multi_label else names[0],
                    "_where": where})
  counts["used"] = len(records)
  skipped = counts["rows"] - counts["used"]
  if skipped:
    logging.warning("%s split (%s): skipped %d of %d rows (%s); first at %s.", name, spec, skipped,
                    counts["rows"], {k: v for k, v in counts.items() if k.startswith("skipped")
                                     and v}, first_problem)
  if not records:
    raise errors.BadInput(f"task.{name}={spec!r}: none of its {counts['rows']} rows has both a "
                          f"text in field {task.text_field!r} and a label in field "
                          f"{task.label_field!r} ({counts}); check task.text_field / "
                          "task.label_field.")
  return Split(name, records, counts)


def _check_known(split: Split, vocab: LabelVocab, policy: str, multi_label: bool) -> Split:
  """Applies the unknown-label policy to a split whose labels may not all be in `vocab`."""
  known = set(vocab.names)
  unknown: dict[str, list[str]] = {}
  kept = []
  dropped_codes = 0
  for r in split.records:
    names = r["label"] if multi_label else [r["label"]]
    bad = [n for n in names if n not in known]
    for n in bad:
      unknown.setdefault(n, []).append(r["_where"])
    if not bad:
      kept.append(r)
    elif multi_label and policy == "skip":  # keep the row, drop the unknown codes
      dropped_codes += len(bad)
      kept.append(dict(r, label=[n for n in names if n in known]))
  if not unknown:
    return split
  detail = ", ".join(f"{n!r} ({len(w)} rows, first at {w[0]})"
                     for n, w in sorted(unknown.items())[:10])
  if policy == "error":
    raise errors.BadInput(
        f"task.{split.name} has label(s) never seen in the training data: {detail}. Known labels: "
        f"{list(vocab.names)[:50]}. Fix the data, list every class in task.labels, or set "
        f"--config.task.unknown_label=skip to drop those rows (multi-label: those labels).")
  counts = dict(split.counts, skipped_unknown_label=len(split.records) - len(kept),
                dropped_unknown_codes=dropped_codes, used=len(kept))
  logging.warning("%s split: labels never seen in training: %s; skipped %d rows%s "
                  "(task.unknown_label=skip).", split.name, detail, len(split.records) - len(kept),
                  f" and dropped {dropped_codes} labels" if dropped_codes else "")
  if not kept:
    raise errors.BadInput(f"task.{split.name}: every row has a label never seen in training "
                          f"({detail}).")
  return Split(split.name, kept, counts)


def load_task(task: Any) -> TaskData:
  """Reads and checks the three splits; the label vocabulary comes from `task.labels`, the
  embedded task's class order, or the sorted training labels."""
  train = read_split(task.train, "train", task)
  if task.dev:
    dev = read_split(task.dev, "dev", task)
  else:  # carve a deterministic dev set out of train
    held = [r for i, r in enumerate(train.records) if i % 10 == 9]
    rest = [r for i, r in enumerate(train.records) if i % 10 != 9]
    logging.warning("task.dev is empty: using every 10th training row (%d rows) as dev.", len(held))
    train = Split("train", rest, dict(train.counts, used=len(rest), moved_to_dev=len(held)))
    dev = Split("dev", held, {"rows": len(held), "used": len(held)})
  if task.test:
    test = read_split(task.test, "test", task)
  else:
    logging.warning("task.test is empty: the report's test metrics are computed on dev.")
    test = Split("test", dev.records, dict(dev.counts, same_as_dev=1))
  if task.labels:
    vocab = LabelVocab.from_names(n.strip() for n in task.labels.split(",") if n.strip())
    train = _check_known(train, vocab, "error", task.multi_label)
  elif task.train.startswith("builtin:task"):
    vocab = LabelVocab.from_names(builtin.labels())
  else:
    vocab = LabelVocab.from_records(train.records, "label", task.multi_label)
  if not task.multi_label and len(vocab) < 2:
    raise errors.BadInput(f"task.train has a single class {list(vocab.names)}; a classifier needs "
                          "at least 2 (or set task.multi_label=True for label sets).")
  dev = _check_known(dev, vocab, task.unknown_label, task.multi_label)
  test = _check_known(test, vocab, task.unknown_label, task.multi_label)
  return TaskData(labels=vocab, multi_label=task.multi_label, train=train, dev=dev, test=test)


def public_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Split records without their bookkeeping (`_where`): {"text", "label"} each."""
  return [{"text": r["text"], "label": r["label"]} for r in records]



# -------------------------------------------------------------------------------------------------
# Sequence length from the data

# Row widths are multiples of this (the length buckets' widths are seq_len / N).
SEQ_LEN_MULTIPLE = 32


def text_lengths(records: Sequence[dict[str, Any]], tokenizer, *, limit: int = 10_000,
                 seed: int = 0) -> np.ndarray:
  """Token counts (without [CLS]/[SEP]) int64 [n] of the records' texts, n = min(len, limit):
  a fixed random sample when there are more than `limit` (shares are estimated from it)."""
  idx = np.arange(len(records))
  if len(idx) > limit:
    idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
  return np.array([len(tokenizer.encode(records[i]["text"])) for i in idx], np.int64)


def choose_seq_len(lengths: np.ndarray, *, cover: float, cap: int) -> int:
  """The smallest multiple of SEQ_LEN_MULTIPLE whose rows hold `cover` (0-1] of the texts whole
  (each text plus [CLS] and [SEP]), at most `cap` (itself rounded down to a multiple)."""
  cap = max(SEQ_LEN_MULTIPLE, cap // SEQ_LEN_MULTIPLE * SEQ_LEN_MULTIPLE)
  if not len(lengths):
    return cap
  need = float(np.quantile(np.asarray(lengths) + 2, cover, method="higher"))
  return int(min(cap, max(SEQ_LEN_MULTIPLE, math.ceil(need / SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE)))


def truncated_share(lengths: np.ndarray, seq_len: int) -> float:
  """Share of the texts (token counts without [CLS]/[SEP]) that rows of `seq_len` cut."""
  return float(np.mean(np.asarray(lengths) > seq_len - 2)) if len(lengths) else 0.0

# -------------------------------------------------------------------------------------------------
# Classification batches


class EncodeClassification(grain.transforms.Map):
  """Record -> {tokens [Q], token_mask [Q], label [] or [C], example_mask []}: [CLS] text [SEP],
  truncated, padded; a padding record ({"_padding": True}) gives example_mask False."""

  def __init__(self, tokenizer, labels: LabelVocab, seq_len: int, text_field: str,
               label_field: str, multi_label: bool):
    self._tokenizer = tokenizer
    self._labels = labels
    self._seq_len = seq_len
    self._text_field = text_field
    self._label_field = label_field
    self._multi_label = multi_label

  def map(self, record):
    q = self._seq_len
    valid = not record.get("_padding", False)
    ids = self._tokenizer.encode(record[self._text_field])[:q - 2] if valid else []
    tokens = np.zeros(q, np.int32)
    tokens[:len(ids) + 2] = [tokenizer_lib.CLS_ID, *ids, tokenizer_lib.SEP_ID]
    if valid:
      label = self._labels.encode(record[self._label_field], self._multi_label)
    else:
      label = (np.zeros(len(self._labels), np.float32) if self._multi_label else np.int32(0))
    return {"tokens": tokens, "token_mask": np.arange(q) < len(ids) + 2, "label": label,
            "example_mask": np.bool_(valid)}


class _DropKey(grain.transforms.Map):
  """Removes one key from each element (the padding flag when batches are not padded)."""

  def __init__(self, key):
    self._key = key

  def map(self, element):
    element.pop(self._key)
    return element


def classification_dataset(records_or_path, tokenizer: tokenizer_lib.Tokenizer, *, seq_len: int,
                           batch_size: int, labels: LabelVocab | Sequence[str] | None = None,
                           text_field: str = "text", label_field: str = "label",
                           multi_label: bool = False, shuffle: bool = True, seed: int = 0,
                           num_epochs: int | None = None, drop_remainder: bool = True,
                           pad_final_batch: bool = False, process_index: int = 0,
                           process_count: int = 1, worker_count: int = 0,
                           augment: augment_lib.AugmentText | None = None,
                           group_by_length: int = 0) -> grain.IterDataset:
  """Grain dataset of classification batches.

  Args:
    records_or_path: list of records with text and label fields, or a path/spec read by
      `r1jax.data.sources` ("builtin:task:train" works).
    labels: the class names (LabelVocab or list); default: sorted labels found in the records.
      Unknown labels raise a ValueError naming them.
    batch_size: GLOBAL batch size; this process yields batch_size // process_count rows.
    num_epochs: None repeats forever (training); 1 for one evaluation pass.
    shuffle: reshuffled every epoch from `seed`.
    drop_remainder: drop the last partial batch (ignored with pad_final_batch).
    pad_final_batch: pad the data with empty rows to a multiple of the global batch, and add
      `example_mask` bool [B] (False on padding): every process gets the same number of full
      batches, which multi-host evaluation needs.
    augment: text augmentation applied on the fly (training), drawn afresh every epoch from
      `seed`; None = the texts as they are.
    group_by_length: 0 = off. Training (shuffle=True): rows per group of similar token length
      (`grain_ops.LengthGroupedShuffle`; best the rows of one jitted call of several steps), so
      that
      `grain_ops.trim_to_length` can cut each batch's padding. Evaluation (shuffle=False): any
      positive value orders the records by length.
  """
  local_batch, _ = grain_ops.local_rows(batch_size, process_index, process_count)
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count} must be >= 0.")
  if isinstance(records_or_path, (str, os.PathLike)):
    records = [r for r in sources.read_records(str(records_or_path)) if not r.get("_error")]
  else:
    records = list(records_or_path)
  if not records:
    raise ValueError("classification_dataset got no records.")
  for i, r in enumerate(records):
    if not isinstance(r.get(text_field), str):
      raise ValueError(f"Record {i} has no string field {text_field!r}: {str(r)[:120]}")
    if label_field not in r:
      raise ValueError(f"Record {i} has no label field {label_field!r}: {str(r)[:120]}")
  if labels is None:
    labels = LabelVocab.from_records(records, label_field, multi_label)
  elif not isinstance(labels, LabelVocab):
    labels = LabelVocab.from_names(labels)
  for r in records:  # fail before training starts, not at the first bad batch
    labels.encode(r[label_field], multi_label)
  lengths = None
  if group_by_length:
    lengths = [min(seq_len, len(tokenizer.encode(r[text_field])) + 2) for r in records]
    if not shuffle:
      order = np.argsort(lengths, kind="stable")
      records, lengths = [records[i] for i in order], [lengths[i] for i in order]
  if pad_final_batch:
    if num_epochs != 1:
      raise ValueError("pad_final_batch is for one evaluation pass: set num_epochs=1.")
    records = records + [{"_padding": True}] * (-len(records) % batch_size)
  ds = grain.MapDataset.source(records)
  ds = ds[process_index::process_count]
  if shuffle and group_by_length:
    ds = grain_ops.LengthGroupedShuffle(ds, lengths[process_index::process_count],
                                        group=group_by_length, seed=seed)
  elif shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if augment is not None:
    ds = ds.random_map(augment, seed=seed + 1)
  ds = ds.map(EncodeClassification(tokenizer, labels, seq_len, text_field, label_field,
                                   multi_label))
  if not pad_final_batch:
    ds = ds.map(_DropKey("example_mask"))
  # No reader threads: encoding is Python under the GIL; parallelism comes from workers.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count:
    ds = grain_ops.worker_prefetch(ds, worker_count)
  return ds.batch(local_batch, drop_remainder=drop_remainder and not pad_final_batch)


def classification_batches(records_or_path, tokenizer, **kwargs) -> grain.DatasetIterator:
  """`iter(classification_dataset(...))`."""
  return iter(classification_dataset(records_or_path, tokenizer, **kwargs))
