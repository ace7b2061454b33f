"""A stream of labelled data arriving in rounds: where the rounds are, and each round's rows.

    specs = rounds.round_specs("rounds/")            # [(name, path)], sorted directory entries
    task = rounds.read_round(name, path, fields, multi_label=False, holdout_every=5)
    rounds.new_labels(task, known_labels, multi_label=False)

`stream.rounds` (configs/continual.py) is comma-separated entries, or one directory whose sorted
entries are the rounds. A round is a data file (any input `sources.read_records` reads), whose row
i is test when i % n == n - 1, dev when n - 2 and train otherwise (n = holdout_every), or a
directory with train.*, dev.* and test.* files. An empty round reads as None (the continual stage
logs and skips it); rows with several labels for a single-label classifier, a round too small to
hold out dev and test rows, or a dev/test class its train rows lack are refused in one line.
"""
from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Sequence

from r1jax import errors
from r1jax.data import sources
from r1jax.data import task as task_lib

SPLITS = ("train", "dev", "test")



@dataclasses.dataclass(frozen=True)
class Task:
  """One task's rows ({"text", "label"} each) per split; task 0 is init_from's."""
  name: str
  source: str
  train: list[dict[str, Any]]
  dev: list[dict[str, Any]]
  test: list[dict[str, Any]]

  def label_names(self, multi_label: bool) -> set[str]:
    return {n for split in (self.train, self.dev, self.test) for r in split
            for n in (r["label"] if multi_label else [r["label"]])}


def round_specs(rounds: str) -> list[tuple[str, str]]:
  """[(name, path)] of `stream.rounds`: comma-separated entries, or one directory whose sorted
  entries are the rounds (unless it is itself a round: a directory with a train file)."""
  parts = [p.strip() for p in rounds.split(",") if p.strip()]
  if len(parts) == 1 and os.path.isdir(os.path.expanduser(parts[0])) and not _split_files(
      os.path.expanduser(parts[0])):
    directory = os.path.expanduser(parts[0])
    parts = [os.path.join(directory, e) for e in sorted(os.listdir(directory))
             if not e.startswith(".")]
    if not parts:
      raise errors.InputNotFound(f"stream.rounds={rounds!r} is an empty directory; put one data "
                                 "file (or train/dev/test directory) per round in it.")
  out = []
  for part in parts:
    path = part if part.startswith("builtin:") else os.path.expanduser(part)
    if not part.startswith("builtin:") and not os.path.exists(path):
      raise errors.InputNotFound(f"stream.rounds: {part!r} does not exist; name round files or "
                                 "directories, or one directory holding them.")
    name = (part.replace(":", "_") if part.startswith("builtin:")
            else os.path.basename(path.rstrip("/")).split(".")[0])
    out.append((name, path))
  return out


def _split_files(directory: str) -> dict[str, str]:
  """{split: file} of a round directory (files named train.*, dev.*, test.*)."""
  out = {}
  for entry in sorted(os.listdir(directory)):
    base = entry.split(".")[0]
    if base in SPLITS and not entry.startswith("."):
      out[base] = os.path.join(directory, entry)
  return out


def _is_empty(spec: str, text_field: str) -> bool:
  if not spec.startswith("builtin:") and os.path.isfile(spec) and os.path.getsize(spec) == 0:
    return True
  return next(iter(sources.read_records(spec, text_field=text_field)), None) is None


def _read(spec: str, what: str, fields: Any) -> list[dict[str, Any]]:
  """The usable rows of one file (`task.read_split`), refusing rows with several labels for a
  single-label classifier (which `read_split` would skip)."""
  if not fields.multi_label:
    rows = several = 0
    first = ""
    for record in sources.read_records(spec, text_field=fields.text_field):
      rows += 1
      if len(task_lib.label_names_of(record.get(fields.label_field), False)) > 1:
        several += 1
        first = first or f"{record.get('_file', spec)}:{record.get('_line', '?')}"
    if several:
      raise errors.BadInput(
          f"stream round {what} ({spec}): {several} of its {rows} rows carry several labels "
          f"(first at {first}), but init_from's classifier is single-label (one softmax over its "
          "classes); give each row one label, or start from a classifier finetuned with "
          "task.multi_label=True.")
  return task_lib.public_records(task_lib.read_split(spec, what, fields).records)


def read_round(name: str, path: str, stream: Any, multi_label: bool) -> Task | None:
  """A round's rows, or None for an empty round (the caller logs and skips it). `stream` has
  text_field, label_field, label_delimiter and holdout_every (configs/continual.py's section)."""
  fields = types.SimpleNamespace(text_field=stream.text_field, label_field=stream.label_field,
                                 multi_label=multi_label, label_delimiter=stream.label_delimiter)
  if os.path.isdir(path):
    files = _split_files(path)
    missing = [s for s in SPLITS if s not in files]
    if missing:
      raise errors.InputNotFound(f"stream round {name!r} ({path}) is a directory without "
                                 f"{'/'.join(missing)} file(s); a round directory holds "
                                 "train.*, dev.* and test.*.")
    if _is_empty(files["train"], stream.text_field):
      return None
    splits = {s: _read(files[s], f"{name}/{s}", fields) for s in SPLITS}
    return Task(name, path, **splits)
  if _is_empty(path, stream.text_field):
    return None
  rows, n = _read(path, name, fields), stream.holdout_every
  task = Task(name, path, train=[r for i, r in enumerate(rows) if i % n < n - 2],
              dev=[r for i, r in enumerate(rows) if i % n == n - 2],
              test=[r for i, r in enumerate(rows) if i % n == n - 1])
  if not task.dev or not task.test:
    raise errors.BadInput(f"stream round {name!r} ({path}) has {len(rows)} usable rows: too few to "
                          f"hold out a dev and a test row in every {n}; add rows or give the round "
                          "as a directory with train/dev/test files.")
  return task


def new_labels(task: Task, known: Sequence[str], multi_label: bool) -> list[str]:
  """The round's classes the classifier does not have yet (sorted); a dev/test class that its
  train split lacks is refused (the model could never learn it)."""
  train = {n for r in task.train for n in (r["label"] if multi_label else [r["label"]])}
  unseen = sorted(task.label_names(multi_label) - train - set(known))
  if unseen:
    raise errors.BadInput(f"stream round {task.name!r} ({task.source}): its dev/test rows have "
                          f"label(s) {unseen[:10]} that neither its train rows nor the classifier "
                          "have; add training rows of those classes to the round.")
  return sorted(train - set(known))
