r"""Continual learning on the embedded data: classes or a new domain arriving in rounds.

    python bench/continual.py                                  # FOLDOC's classes in 2 groups
    python bench/continual.py --groups 3 --workdir runs/cl3    # rerunning resumes / skips
    python bench/continual.py --scenario domains               # WordNet topics, then FOLDOC
    python bench/continual.py --set replay.size=2500 --set lwf.weight=0 --name replay2500

Scenarios. groups: the FOLDOC task's classes (in the embedded task's order, by frequency) dealt
round-robin into `--groups` groups, so each has frequent and rare classes; group 1 is task 0 and
every later group one round (new classes of the same domain). domains: task 0 is a general-English
task (a WordNet document's topic among the 10 largest noun lexicographer files), and the round is
the FOLDOC task (a new domain with 10 new classes). A classifier is finetuned on task 0 from
scratch (configs/finetune.py, tiny, with the mean-pooled head and its n-gram bag); the rounds run
in the continual stage (configs/continual.py) from it, which also runs naive sequential
finetuning of the same rounds as its reference. A classifier finetuned with the same settings on
every task at once is the joint reference. All share one tokenizer (trained on the embedded
FOLDOC corpus, plus the WordNet text for domains; neither holds the tasks' dev or test entries).

Prints, per model, the test accuracy on the old tasks' rows (pooled) when they were learned and
after the last round, and on the last round's rows, every figure over all the classes the model
has; then the issue's targets (issue #26): old-task drop <= 2 points with forgetting control
(naive's drop beside it), and the last round's accuracy within 2 points of the joint model's.
The last line is one JSON object with the same numbers. Results go to bench/NOTES_continual.md.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402
import jax  # noqa: E402

from r1jax import configlib  # noqa: E402
from r1jax.compress import source as source_lib  # noqa: E402
from r1jax.data import builtin  # noqa: E402
from r1jax.data import rounds as rounds_lib  # noqa: E402
from r1jax.data import tokenizer as tokenizer_lib  # noqa: E402
from r1jax.stages import continual  # noqa: E402
from r1jax.stages import finetune  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "dev", "test")
TARGET_POINTS = 2.0
SCENARIOS = ("groups", "domains")
WORDNET_CLASSES = ("noun.artifact", "noun.person", "noun.plant", "noun.animal", "noun.act",
                   "noun.communication", "noun.state", "noun.location", "noun.substance",
                   "noun.food")
# Finetuning (task 0 and the joint reference): the pipeline's tiny head (mean pooling + n-gram
# bag), every layer trains, 64 tokens, the best dev accuracy kept.
FINETUNE = {"schedule": "full", "train.num_steps": -1, "train.num_epochs": 8.0,
            "eval.every_steps": 64, "eval.early_stopping_patience": 4,
            "eval.best_metric": "accuracy", "train.log_every_steps": 32,
            "checkpoint.every_steps": 64, "task.seq_len": 64, "model.pooling": "mean",
            "model.ngram_buckets": 16384, "report.linear_baseline": False,
            "report.latency_repeats": 2, "report.latency_warmup": 1,
            "augment.prob": 0.0}  # as measured in bench/NOTES_continual.md (no EDA augmentation)
# The continual rounds: as many epochs per round over the round's rows + the replayed ones.
CONTINUAL = {"train.num_epochs": 4.0, "eval.every_steps": 64, "train.log_every_steps": 32,
             "checkpoint.every_steps": 64, "report.eval_batch_size": 64}


def _set(config, key: str, value) -> None:
  configlib.field_type(config, key)  # raises on a key the config lacks
  configlib.set_path(config, key, value)


def _config(name: str, values: dict, extra: list[str] = ()) -> object:
  config = configlib.load_config(os.path.join(REPO, "configs", name) + ":variant=tiny")
  config.train.progress_bar = False
  for key, value in values.items():
    _set(config, key, value)
  for item in extra:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    _set(config, key, value)
  return config


def _write(path: str, rows: list[dict]) -> str:
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      for r in rows:
        f.write(json.dumps({"text": r["text"], "label": r["label"]}) + "\n")
    os.replace(path + ".tmp", path)
  return path


def wordnet_task() -> dict[str, list[dict]]:
  """The general-domain task: a WordNet document's lexicographer file (its synsets' topic) among
  the 10 largest noun files; row i of each file is test if i % 10 == 9, dev if 8, else train."""
  docs = [d for d in builtin.load("general") if d["lexfile"] in WORDNET_CLASSES]
  split = {s: [] for s in SPLITS}
  for i, d in enumerate(docs):
    split["test" if i % 10 == 9 else "dev" if i % 10 == 8 else "train"].append(
        {"text": d["text"], "label": d["lexfile"]})
  return split


def write_stream(data_dir: str, scenario: str, groups: int
                 ) -> tuple[list[list[str]], dict[str, str], dict[str, str]]:
  """(the class groups, task 0's split files + the tokenizer + the rounds directory, the joint
  task's split files), written under `data_dir` once.

  groups: FOLDOC's classes dealt round-robin into `groups` groups; group 1 is task 0, each later
  group a round. domains: task 0 is the WordNet task (general English), the round is FOLDOC's
  10 classes (a new domain with new classes)."""
  foldoc = {s: builtin.load("task", split=s) for s in SPLITS}
  if scenario == "groups":
    labels = builtin.labels()
    grouped = [labels[g::groups] for g in range(groups)]
    tasks = [{s: [r for r in foldoc[s] if r["label"] in names] for s in SPLITS}
             for names in grouped]
    tok_texts = builtin.texts("domain")
  else:
    tasks = [wordnet_task(), foldoc]
    grouped = [list(WORDNET_CLASSES), builtin.labels()]
    tok_texts = builtin.texts("domain") + builtin.texts("general")
  paths = {}
  for g, task in enumerate(tasks):
    where = (os.path.join(data_dir, "task0") if g == 0 else
             os.path.join(data_dir, "rounds", f"{g:02d}_group{g + 1}"))
    for s in SPLITS:
      path = _write(os.path.join(where, f"{s}.jsonl"), task[s])
      if g == 0:
        paths[s] = path
  joint = {s: _write(os.path.join(data_dir, "joint", f"{s}.jsonl"),
                     [r for task in tasks for r in task[s]]) for s in SPLITS}
  tok = os.path.join(data_dir, "tokenizer.model")
  if not os.path.exists(tok):
    tokenizer_lib.Tokenizer.train(tok_texts, 2000).save(tok)
  paths["tokenizer"] = tok
  paths["rounds"] = os.path.join(data_dir, "rounds")
  return grouped, paths, joint


def joint_accuracy(workdir: str, tasks: list[rounds_lib.Task]) -> dict[str, dict[str, float]]:
  """The joint model's accuracy on each group's test rows (over all its classes)."""
  src = source_lib.load(workdir)
  return continual.test_tasks(src.spec, jax.device_get(src.params), tasks, batch_size=64)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/continual_bench")
  parser.add_argument("--scenario", choices=SCENARIOS, default="groups")
  parser.add_argument("--groups", type=int, default=2, help="groups scenario: class groups")
  parser.add_argument("--name", default="continual", help="the continual run's directory name")
  parser.add_argument("--set", action="append", default=[],
                      help="KEY=VALUE for the continual config (e.g. replay.size=2000)")
  parser.add_argument("--finetune_set", action="append", default=[],
                      help="KEY=VALUE for both finetunings (task 0 and joint)")
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  started = time.time()
  workdir = os.path.abspath(args.workdir)
  grouped, paths, joint_task = write_stream(os.path.join(workdir, "data"), args.scenario,
                                            args.groups)
  common = dict(FINETUNE, **{"task.tokenizer": paths["tokenizer"]})
  first = finetune.run(_config("finetune.py", dict(common, **{
      "task.train": paths["train"], "task.dev": paths["dev"], "task.test": paths["test"]}),
      args.finetune_set), os.path.join(workdir, "finetune_group1"))
  joint = finetune.run(_config("finetune.py", dict(common, **{
      "task.train": joint_task["train"], "task.dev": joint_task["dev"],
      "task.test": joint_task["test"]}), args.finetune_set), os.path.join(workdir, "joint"))
  summary = continual.run(_config("continual.py", dict(CONTINUAL, **{
      "init_from": os.path.join(workdir, "finetune_group1"), "stream.rounds": paths["rounds"]}),
      args.set), os.path.join(workdir, args.name))

  tasks = [rounds_lib.Task("task0", paths["train"], [], [], _rows(paths["test"]))]
  for name in sorted(os.listdir(paths["rounds"])):
    tasks.append(rounds_lib.Task(name.split("_", 1)[1], name, [], [],
                                 _rows(os.path.join(paths["rounds"], name, "test.jsonl"))))
  joint_tests = joint_accuracy(os.path.join(workdir, "joint"), tasks)
  old = [t.name for t in tasks[:-1]]
  pooled = sum(joint_tests[t]["num_examples"] for t in old)
  joint_old = sum(joint_tests[t]["accuracy"] * joint_tests[t]["num_examples"] for t in old) / pooled
  joint_new = joint_tests[tasks[-1].name]["accuracy"]

  main_numbers, naive = summary["continual"], summary["naive"]
  print()
  print(f"Groups: {grouped}")
  print(f"task 0 classifier: test accuracy {first['test']['accuracy']:.4f} on group 1; joint: "
        f"{joint['test']['accuracy']:.4f} on every class")
  print("continual controls: " + ", ".join(f"{k}={v}" for k, v in summary["controls"].items()))
  print(f"{'model':34s} {'old learned':>11s} {'old final':>9s} {'drop pts':>8s} "
        f"{'newest':>7s}")
  for label, n in (("continual (with the controls)", main_numbers),
                   ("naive sequential finetuning", naive)):
    if n is None:  # report.naive_reference=False
      continue
    print(f"{label[:34]:34s} {100 * n['old_accuracy_learned']:11.1f} "
          f"{100 * n['old_accuracy_final']:9.1f} {100 * n['old_accuracy_drop']:8.1f} "
          f"{100 * n['new_accuracy']:7.1f}")
  print(f"{'joint training (all classes)':34s} {'':11s} {100 * joint_old:9.1f} {'':8s} "
        f"{100 * joint_new:7.1f}")
  drop = 100 * main_numbers["old_accuracy_drop"]
  gap = 100 * (joint_new - main_numbers["new_accuracy"])
  naive_drop = None if naive is None else 100 * naive["old_accuracy_drop"]
  print(f"target: old-task drop <= {TARGET_POINTS:g} points with forgetting control: "
        f"{drop:.1f} ({'met' if drop <= TARGET_POINTS else 'NOT met'}); naive drop "
        f"{'not run' if naive_drop is None else f'{naive_drop:.1f}'}")
  print(f"target: newest group within {TARGET_POINTS:g} points of joint training: "
        f"{100 * main_numbers['new_accuracy']:.1f} vs {100 * joint_new:.1f}, gap {gap:.1f} "
        f"({'met' if abs(gap) <= TARGET_POINTS or gap < 0 else 'NOT met'})")
  minutes = (time.time() - started) / 60
  print(json.dumps({"groups": grouped, "controls": summary["controls"],
                    "old_drop_points": drop, "naive_old_drop_points": naive_drop,
                    "new_accuracy": main_numbers["new_accuracy"],
                    "naive_new_accuracy": None if naive is None else naive["new_accuracy"],
                    "joint_new_accuracy": joint_new,
                    "joint_old_accuracy": joint_old, "minutes": minutes}))


def _rows(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
  main()
