"""Grain plumbing shared by the data pipelines (pretraining, classification, cleaning).

- `local_rows`: this process's share of a global batch (process sharding);
- `worker_prefetch`: Grain worker processes, usable outside an absl app;
- `FlattenIterDataset`: lists -> their items, checkpointable without asking an unstarted parent
  (a multiprocessing prefetch) for its state.
"""
from typing import Any

from absl import flags
import grain


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
