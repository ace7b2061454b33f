r"""A second classification task of short texts, built from the embedded WordNet text.

    python bench/wordnet_task.py --out runs/wn13         # runs/wn13/{train,dev,test}.jsonl
    python bench/quality.py --task runs/wn13 --set data_general.data.inputs=runs/wn13/general.jsonl

The embedded task (FOLDOC subjects) has long entries (median 117 pieces); the issue's held-out
task has one-line definitions. This one stands in for the latter: each WordNet gloss (the text
after the lemmas, median 27 pieces) labelled with its lexicographer file (noun.animal,
noun.artifact, adj.all, ...), the `--classes` most frequent files, `--train/--dev/--test` rows
drawn at random. It also writes `general.jsonl`: the embedded general corpus without the
task's glosses, so that pretraining has not read the test texts (pass it as the pipeline's
`data_general.data.inputs`). Deterministic for a given --seed.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1jax.data import builtin  # noqa: E402


def glosses() -> list[tuple[str, str, str]]:
  """(document id, lexicographer file, gloss) of every line of the embedded general corpus."""
  path = os.path.join(os.path.dirname(builtin.__file__), "general.jsonl.gz")
  out = []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      for entry in doc["text"].split("\n"):
        _, sep, gloss = entry.partition(": ")
        if sep and gloss.strip():
          out.append((doc["id"], doc["lexfile"], gloss.strip()))
  return out


def write_jsonl(path: str, rows: list[dict[str, str]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> dict[str, int]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory for the task and general.jsonl")
  parser.add_argument("--classes", type=int, default=13, help="most frequent lexicographer files")
  parser.add_argument("--train", type=int, default=4000)
  parser.add_argument("--dev", type=int, default=800)
  parser.add_argument("--test", type=int, default=800)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  entries = glosses()
  counts = collections.Counter(label for _, label, _ in entries)
  top = {label for label, _ in counts.most_common(args.classes)}
  rows = [{"text": gloss, "label": label} for _, label, gloss in entries if label in top]
  random.Random(args.seed).shuffle(rows)
  sizes = (args.train, args.dev, args.test)
  if sum(sizes) > len(rows):
    raise SystemExit(f"wordnet_task.py: {sum(sizes)} rows asked for, {len(rows)} glosses in the "
                     f"{args.classes} most frequent files; ask for fewer.")
  os.makedirs(args.out, exist_ok=True)
  start, written = 0, {}
  for name, size in zip(("train", "dev", "test"), sizes):
    write_jsonl(os.path.join(args.out, f"{name}.jsonl"), rows[start:start + size])
    written[name], start = size, start + size
  # The general corpus without any of the task's glosses, grouped by document as shipped.
  used = {r["text"] for r in rows[:start]}
  docs: dict[str, list[str]] = collections.defaultdict(list)
  path = os.path.join(os.path.dirname(builtin.__file__), "general.jsonl.gz")
  dropped = 0
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      for entry in doc["text"].split("\n"):
        if entry.partition(": ")[2].strip() in used:
          dropped += 1
        else:
          docs[doc["id"]].append(entry)
  write_jsonl(os.path.join(args.out, "general.jsonl"),
              [{"id": i, "text": "\n".join(lines)} for i, lines in docs.items() if lines])
  written["general_lines_dropped"] = dropped
  print(json.dumps(written))
  return written


if __name__ == "__main__":
  main()
