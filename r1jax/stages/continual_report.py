"""The continual stage's numbers and report: accuracy on every task after every round, forgetting,
and the same for naive sequential finetuning beside it.

Definitions (per chain of rounds; task 0 is init_from's task, task i the i-th round's):
- accuracy[r][t]: test accuracy on task t after round r (t <= r), over every class the model has
  after round r;
- learned[t]: accuracy[t][t], task t's accuracy right after the round that brought it;
- forgetting[t] = max over rounds r >= t of accuracy[r][t] - accuracy[last][t] (drop from its best);
- old-task drop: the test rows of every task but the last, pooled: their accuracy when learned
  minus their accuracy after the last round (points are 100x these fractions);
- new-task accuracy: accuracy[last][last].
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax

from r1jax import eval as eval_lib
from r1jax import run_dir

REPORT_FILE = "report.md"


def chain_numbers(initial_test: Mapping[str, Mapping[str, float]],
                  records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
  """The accuracy table and forgetting figures of one chain (definitions in the module doc)."""
  rows = [{"after": "init_from", "accuracy": {t: m["accuracy"] for t, m in initial_test.items()}}]
  sizes = {t: m["num_examples"] for t, m in initial_test.items()}
  for record in records:
    if record.get("status") != "complete":
      continue
    rows.append({"after": record["name"],
                 "accuracy": {t: m["accuracy"] for t, m in record["test"].items()}})
    sizes.update({t: m["num_examples"] for t, m in record["test"].items()})
  per_task = {}
  for task in tasks:
    seen = [row["accuracy"][task] for row in rows if task in row["accuracy"]]
    if seen:
      per_task[task] = {"learned": seen[0], "best": max(seen), "final": seen[-1],
                        "forgetting": max(seen) - seen[-1], "num_examples": sizes[task]}
  learned_tasks = [t for t in tasks if t in per_task]
  old = learned_tasks[:-1]
  pooled = sum(per_task[t]["num_examples"] for t in old)

  def pool(key):
    return (sum(per_task[t][key] * per_task[t]["num_examples"] for t in old) / pooled
            if pooled else None)
  numbers = {"accuracy": rows, "tasks": per_task,
             "old_accuracy_learned": pool("learned"), "old_accuracy_final": pool("final"),
             "new_task": learned_tasks[-1] if learned_tasks else None,
             "new_accuracy": per_task[learned_tasks[-1]]["final"] if learned_tasks else None,
             "mean_forgetting": (sum(per_task[t]["forgetting"] for t in old) / len(old)
                                 if old else None)}
  numbers["old_accuracy_drop"] = (numbers["old_accuracy_learned"] - numbers["old_accuracy_final"]
                                  if pooled else None)
  return numbers


def summarize(initial_test: Mapping[str, Mapping[str, float]],
              records: Sequence[Mapping[str, Any]], naive: Sequence[Mapping[str, Any]] | None, *,
              tasks: Sequence[str]) -> dict[str, Any]:
  """{"tasks", "continual": chain_numbers, "naive": chain_numbers or None}."""
  return {"tasks": list(tasks), "continual": chain_numbers(initial_test, records, tasks),
          "naive": None if naive is None else chain_numbers(initial_test, naive, tasks)}


def _pct(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}"


def _accuracy_table(numbers: Mapping[str, Any], tasks: Sequence[str]) -> str:
  rows = [[row["after"]] + [_pct(row["accuracy"].get(t)) if t in row["accuracy"] else ""
                            for t in tasks] for row in numbers["accuracy"]]
  return eval_lib.markdown_table(["after round"] + list(tasks), rows)


def report_text(summary: Mapping[str, Any]) -> str:
  tasks = summary["tasks"]
  main, naive = summary["continual"], summary.get("naive")
  lines = ["# Continual learning", "",
           f"From `{summary['init_from']}` (task0: its own task), {len(summary['rounds'])} "
           f"round(s); controls: {summary['controls']}. Accuracies in %, on each task's test rows, "
           "over every class the model has after that round.", "",
           "## Rounds", ""]
  rows = []
  for r in summary["rounds"]:
    if r["status"] != "complete":
      rows.append([r["name"], r["status"], r.get("reason", ""), "", "", "", ""])
      continue
    d = r.get("drift") or {}
    rows.append([r["name"], f"{r['start_step']}-{r['end_step']}",
                 f"{r['rows']['train']} + {r['rows']['replayed']} replayed",
                 ", ".join(r["new_labels"]) or "none", d.get("verdict", ""),
                 "" if not d else
                 f"{d['confidence_incoming']:.3f} vs {d['confidence_earlier']:.3f}",
                 "" if not d else f"{d['word_token_coverage']:.3f}"])
  lines += [eval_lib.markdown_table(
      ["round", "steps", "training rows", "new classes", "drift", "confidence in vs earlier",
       "word coverage"], rows), ""]
  lines += ["## Accuracy after each round (with forgetting control)", "",
            _accuracy_table(main, tasks)]
  if naive is not None:
    lines += ["## Accuracy after each round (naive sequential finetuning)", "",
              _accuracy_table(naive, tasks)]
  headers = ["task", "learned", "best", "final", "forgetting"]
  lines += ["## Forgetting (points: best - final)", ""]
  rows = []
  for t in tasks:
    for label, numbers in (("continual", main), ("naive", naive)):
      if numbers is not None and t in numbers["tasks"]:
        m = numbers["tasks"][t]
        rows.append([f"{t} ({label})", _pct(m["learned"]), _pct(m["best"]), _pct(m["final"]),
                     _pct(m["forgetting"])])
  lines += [eval_lib.markdown_table(headers, rows), ""]
  lines += ["## Summary", ""]
  for label, numbers in (("with forgetting control", main), ("naive sequential finetuning", naive)):
    if numbers is None:
      continue
    lines.append(f"- {label}: old tasks {_pct(numbers['old_accuracy_learned'])} when learned -> "
                 f"{_pct(numbers['old_accuracy_final'])} at the end (drop "
                 f"{_pct(numbers['old_accuracy_drop'])} points); newest task "
                 f"({numbers['new_task']}) {_pct(numbers['new_accuracy'])}.")
  return "\n".join(lines) + "\n"


def publish(workdir: str, summary: Mapping[str, Any]) -> None:
  """Process 0 writes DIR/report.md and DIR/summary.json; every process logs the closing line."""
  if jax.process_index() == 0:
    run_dir.write_text(os.path.join(workdir, REPORT_FILE), report_text(summary))
    run_dir.write_json(os.path.join(workdir, run_dir.SUMMARY_FILE), summary)
  main, naive = summary["continual"], summary.get("naive")
  logging.info("Continual: old-task drop %s points (naive %s), newest task %s%% (naive %s%%). "
               "Report: %s", _pct(main["old_accuracy_drop"]),
               _pct(naive["old_accuracy_drop"]) if naive else "n/a", _pct(main["new_accuracy"]),
               _pct(naive["new_accuracy"]) if naive else "n/a",
               os.path.join(workdir, REPORT_FILE))
