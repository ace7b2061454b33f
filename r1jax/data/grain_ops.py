"""Grain plumbing shared by the data pipelines (pretraining, classification, cleaning).

- `local_rows`: this process's share of a global batch (process sharding);
- `worker_prefetch`: Grain worker processes, usable outside an absl app;
- `FlattenIterDataset`: lists -> their items, checkpointable without asking an unstarted parent
  (a multiprocessing prefetch) for its state;
- `LengthGroupedShuffle`: a shuffle that puts rows of similar length in the same batches, and
  `bucket_length` / `trim_to_length`: cut a batch's padding to a few fixed widths.
"""
import functools
import math
from typing import Any, Mapping, Sequence

from absl import flags
import grain
import numpy as np


def local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, range]:
  """(rows per process, this process's global row indices) of a global batch of `batch_size`."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (global) must be divisible by "
                     f"process_count={process_count}.")
  per = batch_size // process_count
  return per, range(process_index * per, (process_index + 1) * per)


def worker_prefetch(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  """Grain worker processes; outside an absl app (tests, notebooks) Grain's flags need parsing.

  Arrays under 1 MiB are pickled with their element instead of getting a shared-memory block each
  (one block per small array costs more than the copy). Each element crossing the process boundary
  costs the main process a few hundred microseconds of Grain and multiprocessing bookkeeping
  (measured), so callers send chunks: lists of records, groups of steps.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  ds = grain.experimental.WithOptionsIterDataset(
      ds, grain.experimental.DatasetOptions(min_shm_size=1 << 20))
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


class FlattenIterDataset(grain.IterDataset):
  """Elements that are lists -> their items, in order; checkpointable.

  State: the parent's state before the current list (None while in the first list: the parent's
  initial state) and how many of the list's items were taken, like Grain's FlatMapIterDataset.
  That one, though, asks its parent for its state before the first element, and Grain's
  multiprocessing prefetch, asked before it started, creates its worker iterators unstarted (worker
  k's process then starts only when its first element is requested: the start-ups, 0.6 s each on
  the 2-core development machine, ran one after another) and answers with a state that does not
  name the worker's slice. This iterator never asks the parent for its state before it started.
  """

  def __iter__(self):
    return _FlattenIterator(self._parent)

  def __str__(self):
    return "FlattenIterDataset"


class _FlattenIterator(grain.DatasetIterator):
  """State: {"parent": the parent's state before the current list or None, "index": items taken}."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent.__iter__())
    self._parent_ds = parent
    self._items = []
    self._index = 0
    self._items_state = None  # the parent's state before self._items; None: its initial state
    self._parent_moved = False  # False while the parent is at its initial state

  def __next__(self):
    while self._index >= len(self._items):
      self._items_state = self._parent.get_state() if self._parent_moved else None
      self._parent_moved = True
      self._items = next(self._parent)
      self._index = 0
    item = self._items[self._index]
    self._index += 1
    return item

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._items_state, "index": self._index}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["parent"] is not None:
      self._parent.set_state(state["parent"])
      self._parent_moved = True
    elif self._parent_moved:  # back to the very start: a fresh parent iterator
      self._parent.close()
      self._parents = (self._parent_ds.__iter__(),)
      self._parent_moved = False
    self._items_state = state["parent"]
    self._items, self._index = [], 0
    if state["index"]:
      self._items = next(self._parent)
      self._parent_moved = True
      self._index = state["index"]


class LengthGroupedShuffle(grain.MapDataset):
  """A shuffle, reshuffled every epoch, whose consecutive `group` rows have similar lengths.

  Epoch e (index // epoch length): the rows in a random order (seed, e), cut into windows of
  `window_groups * group` rows, each window sorted by length and cut into groups of `group` rows,
  and the groups shuffled within the window. Batches cut from a group (a group is best the rows of
  one jitted call of several steps) then hold rows of similar length, so `trim_to_length` removes
  most of the padding. An epoch is rounded up to whole groups with rows drawn again from the same
  epoch's order (as torch's DistributedSampler pads), so every epoch's groups line up with the
  calls. A pure index map: Grain's iterator state stays one index, and resume is exact. Place it
  where `shuffle` would be, before `repeat`.
  """

  def __init__(self, parent: grain.MapDataset, lengths: Sequence[int], *, group: int, seed: int,
               window_groups: int = 8):
    super().__init__(parent)
    if len(lengths) != len(parent):
      raise ValueError(f"{len(lengths)} lengths for {len(parent)} rows.")
    if group < 1 or window_groups < 1 or not len(parent):
      raise ValueError(f"group={group}, window_groups={window_groups}, {len(parent)} rows: need "
                       f"at least one row, group >= 1 and window_groups >= 1.")
    self._lengths = np.asarray(lengths)
    self._group = group
    self._window = group * window_groups
    self._seed = seed
    self._epoch_len = -(-len(parent) // group) * group

  def __len__(self) -> int:
    return self._epoch_len

  def __str__(self) -> str:
    return f"LengthGroupedShuffle(group={self._group})"

  @functools.lru_cache(maxsize=2)
  def _order(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, epoch])
    rows = np.resize(rng.permutation(len(self._lengths)), self._epoch_len)
    out = []
    for start in range(0, len(rows), self._window):
      window = rows[start:start + self._window]
      groups = window[np.argsort(self._lengths[window], kind="stable")].reshape(-1, self._group)
      out.append(groups[rng.permutation(len(groups))].reshape(-1))
    return np.concatenate(out)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, self._epoch_len)
    return self._parent[int(self._order(epoch)[position]) + epoch * len(self._parent)]


# Narrowest step between two bucket widths: each width compiles the training call once (seconds
# to tens of seconds on a CPU), which finer steps on short rows would not win back.
MIN_BUCKET_STRIDE = 32


def bucket_length(length: int, max_length: int, num_buckets: int, min_stride: int = 1) -> int:
  """The width a batch whose longest row has `length` tokens is padded to: the smallest multiple
  of max(ceil(max_length / num_buckets), min_stride) that holds it, at most max_length (so at
  most `num_buckets` widths, each compiled once)."""
  if num_buckets <= 1:
    return max_length
  stride = max(min_stride, math.ceil(max_length / num_buckets))
  return min(max_length, max(1, math.ceil(length / stride)) * stride)


def trim_to_length(batch: Mapping[str, Any], length: int, keys: Sequence[str]) -> dict[str, Any]:
  """`batch` with the last axis of each of `keys` (where present) cut to `length` positions."""
  return {k: (np.asarray(v)[..., :length] if k in keys else v) for k, v in batch.items()}
