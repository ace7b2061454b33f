"""Image+text classification data: splits read from JSONL/CSV, image folders or the embedded icon
task, images decoded once on the host, and batches as a Grain pipeline with image augmentation.

    split = multimodal.read_image_split("builtin:icons:train", "train", image_size=32)
    split.report.summary()       # "465 of 465 images used"
    ds = multimodal.image_text_dataset(split.records, tok, labels=vocab, seq_len=16,
                                       batch_size=32, image_size=32,
                                       augment=image_augment.ImageAugmentConfig(), seed=0)
    it = iter(ds); batch = next(it); state = it.get_state()   # resume: it.set_state(state)

Input specs (task.train / dev / test):
  a JSONL / CSV spec `r1jax.data.sources` reads, whose rows carry a text, a label and an image
  reference (`image_field`: a path, relative to the file's directory, or "base64:<bytes>"); a
  row without text is an image-only row (its text is ""); `builtin:icons:SPLIT` the embedded task;
  images:DIR   an image folder DIR/<label>/<file> (no text).
Rows without a usable label, or broken rows (`sources` reasons), are skipped and counted; bad
images are counted by `images.ImageReport`; none of these stops a run unless nothing is left.

Batches (B = batch_size // process_count rows on this process, Q = seq_len, S = image_size):
  tokens       int32 [B, Q]      [CLS] text [SEP] [PAD]... (as `task.classification_dataset`)
  token_mask   bool  [B, Q]
  images       uint8 [B, S, S, 3]  augmented when `augment` is given (each epoch drawn afresh)
  label        int32 [B]
  example_mask bool  [B]         only with pad_final_batch=True (False on padding rows)
The pipeline is a Grain MapDataset up to the iterator (`ShuffledBatches`, then the augmentation
as a random map), so its state is one index: a resumed iterator gives the same batches,
augmentation included.
"""
import dataclasses
import functools
import os
import sys
from typing import Any, Sequence

from absl import logging
import grain
import numpy as np

from r1jax import errors
from r1jax.data import builtin
from r1jax.data import grain_ops
from r1jax.data import image_augment
from r1jax.data import images as images_lib
from r1jax.data import sources
from r1jax.data import task as task_lib

IMAGE_FOLDER_PREFIX = "images:"
ICONS_PREFIX = "builtin:icons"


@dataclasses.dataclass(frozen=True)
class ImageSplit:
  """One split: usable records {"text", "label", "images" uint8 [S, S, 3], "_where"}, row counts
  by reason (`counts`) and what happened to the images (`report`)."""
  name: str
  records: list[dict[str, Any]]
  counts: dict[str, int]
  report: images_lib.ImageReport


def _raw_records(spec: str, text_field: str, label_field: str, image_field: str,
                 counts: dict[str, int]) -> list[dict[str, Any]]:
  """Rows with one label and an image reference (decoded later); the rest counted."""
  if spec.startswith(IMAGE_FOLDER_PREFIX):
    rows = images_lib.folder_records(spec[len(IMAGE_FOLDER_PREFIX):])
    counts["rows"] += len(rows)
    return rows
  out = []
  for record in sources.read_records(spec, text_field=text_field):
    counts["rows"] += 1
    where = f"{record.get('_file', spec)}:{record.get('_line', '?')}"
    error = record.get("_error")
    if error and error != "missing_text":
      counts["skipped_bad_row"] += 1
      continue
    names = task_lib.label_names_of(record.get(label_field), False)
    if len(names) != 1:
      counts["skipped_missing_label" if not names else "skipped_multiple_labels"] += 1
      continue
    source_file = record.get("_file", "")
    out.append({"text": "" if error else record["text"], "label": names[0],
                "image": record.get(image_field), "_where": where,
                "_base": os.path.dirname(source_file) if os.path.isfile(source_file) else ""})
  return out


def read_image_split(spec: str, name: str, *, image_size: int, text_field: str = "text",
                     label_field: str = "label", image_field: str = "image",
                     max_pixels: int = images_lib.DEFAULT_MAX_PIXELS) -> ImageSplit:
  """Reads `spec` and decodes its images to uint8 [image_size, image_size, 3].

  Raises errors.BadInput when no row is left (naming the spec and the counts).
  """
  counts = {"rows": 0, "skipped_bad_row": 0, "skipped_missing_label": 0,
            "skipped_multiple_labels": 0}
  raw = _raw_records(spec, text_field, label_field, image_field, counts)
  kept, report = images_lib.decode_records(raw, image_size, max_pixels=max_pixels)
  counts["used"] = len(kept)
  counts.update({f"image_{k}": v for k, v in report.counts.items() if k not in ("rows", "used")})
  if counts["rows"] > len(kept):
    logging.warning("%s split (%s): %d of %d rows used; %s.", name, spec, len(kept),
                    counts["rows"], report.summary())
  if not kept:
    raise errors.BadInput(
        f"task.{name}={spec!r}: none of its {counts['rows']} rows has a label in field "
        f"{label_field!r} and a usable image in field {image_field!r} ({report.summary()}); "
        "check task.label_field / task.image_field and the image paths.")
  return ImageSplit(name, [{k: r[k] for k in ("text", "label", "images", "_where")}
                           for r in kept], counts, report)


@dataclasses.dataclass(frozen=True)
class ImageTaskData:
  labels: task_lib.LabelVocab
  train: ImageSplit
  dev: ImageSplit
  test: ImageSplit


def load_image_task(task: Any, image_size: int) -> ImageTaskData:
  """The three splits of a task config section (train, dev, test, text_field, label_field,
  image_field, labels). Labels: task.labels, the icon task's context order, or the sorted
  training labels; a dev/test label outside them is refused, naming it."""
  image_field = getattr(task, "image_field", "image")
  read = lambda spec, name: read_image_split(
      spec, name, image_size=image_size, text_field=task.text_field,
      label_field=task.label_field, image_field=image_field)
  train = read(task.train, "train")
  dev = read(task.dev, "dev") if task.dev else None
  test = read(task.test, "test") if task.test else None
  if dev is None:  # every 10th training row, as the text task does
    held = [r for i, r in enumerate(train.records) if i % 10 == 9]
    train = dataclasses.replace(train, records=[r for i, r in enumerate(train.records)
                                                if i % 10 != 9])
    dev = ImageSplit("dev", held, {"rows": len(held), "used": len(held)}, train.report)
  test = test or dev
  if task.labels:
    vocab = task_lib.LabelVocab.from_names(n.strip() for n in task.labels.split(",")
                                           if n.strip())
  elif task.train.startswith(ICONS_PREFIX):
    vocab = task_lib.LabelVocab.from_names(builtin.labels("icons"))
  else:
    vocab = task_lib.LabelVocab.from_records(train.records)
  for split in (train, dev, test):
    unknown = sorted({r["label"] for r in split.records} - set(vocab.names))
    if unknown:
      raise errors.BadInput(f"task.{split.name} has labels outside the class list: "
                            f"{unknown[:10]}; known: {list(vocab.names)[:50]}. Fix the data or "
                            "list every class in task.labels.")
  if len(vocab) < 2:
    raise errors.BadInput(f"task.train has a single class {list(vocab.names)}; a classifier "
                          "needs at least 2.")
  return ImageTaskData(vocab, train, dev, test)


class EncodeImageText(grain.transforms.Map):
  """Record {"text", "label", "images"} -> {tokens, token_mask, label, images[, example_mask]};
  the text part is `task.EncodeClassification`'s, a padding record gets a blank image."""

  def __init__(self, tokenizer, labels: task_lib.LabelVocab, seq_len: int, image_size: int,
               example_mask: bool):
    self._text = task_lib.EncodeClassification(tokenizer, labels, seq_len, "text", "label",
                                               False)
    self._blank = np.zeros((image_size, image_size, 3), np.uint8)
    self._example_mask = example_mask

  def map(self, record):
    out = self._text.map(record)
    out["images"] = self._blank if record.get("_padding") else record["images"]
    if not self._example_mask:
      del out["example_mask"]
    return out


class ShuffledBatches(grain.sources.RandomAccessDataSource):
  """Batches gathered from row arrays: batch i = epoch i // per_epoch's permutation (seed,
  epoch) cut into `batch_size` rows (rows in order without shuffle). A pure index map, so a
  Grain iterator over it resumes exactly from its index; len = num_epochs x batches per epoch
  (num_epochs None: endless)."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, shuffle: bool, seed: int,
               num_epochs: int | None, drop_remainder: bool):
    self._arrays = arrays
    self._rows = len(next(iter(arrays.values())))
    self._batch = batch_size
    self._shuffle, self._seed = shuffle, seed
    self._per_epoch = (self._rows // batch_size if drop_remainder
                       else -(-self._rows // batch_size))
    if self._per_epoch < 1:
      raise ValueError(f"{self._rows} rows make no batch of {batch_size} (drop_remainder); use "
                       "a smaller batch_size.")
    self._len = sys.maxsize if num_epochs is None else num_epochs * self._per_epoch

  def __len__(self) -> int:
    return self._len

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self._rows)
    return np.random.default_rng([self._seed, epoch]).permutation(self._rows)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    epoch, position = divmod(int(index), self._per_epoch)
    rows = self._order(epoch)[position * self._batch:(position + 1) * self._batch]
    return {k: v[rows] for k, v in self._arrays.items()}


def image_text_dataset(records: Sequence[dict[str, Any]], tokenizer, *,
                       labels: task_lib.LabelVocab, seq_len: int, batch_size: int,
                       image_size: int,
                       augment: image_augment.ImageAugmentConfig | None = None,
                       shuffle: bool = True, seed: int = 0, num_epochs: int | None = None,
                       drop_remainder: bool = True, pad_final_batch: bool = False,
                       process_index: int = 0, process_count: int = 1,
                       worker_count: int = 0) -> grain.IterDataset:
  """Grain dataset of image+text batches (see the module docstring for the batch).

  Arguments as in `task.classification_dataset`; `augment` (training) draws every image's
  augmentation from (seed, batch index), so it changes every epoch and resumes exactly.
  """
  local_batch, _ = grain_ops.local_rows(batch_size, process_index, process_count)
  records = list(records)
  if not records:
    raise ValueError("image_text_dataset got no records.")
  for r in records:
    if np.shape(r.get("images")) != (image_size, image_size, 3):
      raise ValueError(f"Record {r.get('_where', '?')} has images of shape "
                       f"{np.shape(r.get('images'))}, not [{image_size}, {image_size}, 3]; "
                       "decode them with read_image_split(..., image_size=...).")
    labels.encode(r["label"])  # fail before training starts, not at the first bad batch
  if pad_final_batch:
    if num_epochs != 1:
      raise ValueError("pad_final_batch is for one evaluation pass: set num_epochs=1.")
    records = records + [{"_padding": True}] * (-len(records) % batch_size)
  # Encoded and stacked once here (the text is not augmented): a batch is then one gather from
  # each array, where tokenizing and stacking rows at every step would cost the pipeline more
  # than the augmentation does.
  encode = EncodeImageText(tokenizer, labels, seq_len, image_size, pad_final_batch)
  rows = [encode.map(r) for r in records[process_index::process_count]]
  arrays = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
  ds = grain.MapDataset.source(ShuffledBatches(
      arrays, local_batch, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      drop_remainder=drop_remainder and not pad_final_batch))
  if augment is not None:
    ds = ds.random_map(image_augment.AugmentImages(augment), seed=seed + 1)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count:
    ds = grain_ops.worker_prefetch(ds, worker_count)
  return ds
