"""The hyperparameter search's files: DIR/report.md, its PNGs and DIR/best_config.py/.json.

    rows = tune_report.trial_rows(trials, values_of, workdir_of)          # summary["trials"]
    summary.update(tune_report.write_best_config(workdir, best_cfg, summary))
    summary.update(tune_report.write_report(workdir, study, summary, rows))

`r1jax.stages.tune.write_outputs` assembles the summary (the study's facts) and calls these; this
module reads the study and the summary and writes files, nothing else.

report.md: the search settings, the best trial and the command that reruns it, the trials table,
the optimisation history (DIR/history.png: each trial's value and the best so far, and the values
reported at each eval) and the parameter importances (DIR/importances.png; fANOVA with
scikit-learn installed, else PED-ANOVA).
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import optuna
from optuna.trial import TrialState

from r1jax import configlib
from r1jax import eval as eval_lib
from r1jax import run_dir

REPORT_FILE = "report.md"
HISTORY_PNG = "history.png"
IMPORTANCES_PNG = "importances.png"
BEST_CONFIG_PY = "best_config.py"
BEST_CONFIG_JSON = "best_config.json"


def trial_rows(trials: Sequence[optuna.trial.FrozenTrial],
               values_of: Callable[[optuna.trial.FrozenTrial], dict[str, Any]],
               workdir_of: Callable[[int], str]) -> list[dict[str, Any]]:
  """One row per trial: number, state, value, searched config values (`values_of`), steps, notes
  (retries, enqueued, failure reason), the values reported at each eval and its workdir."""
  rows = []
  retries = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
  for t in trials:
    result = t.user_attrs.get("result") or {}
    last_step = max(t.intermediate_values) if t.intermediate_values else None
    notes = []
    if "retry_of" in t.user_attrs:
      notes.append(f"retry of {t.user_attrs['retry_of']}")
    if t.user_attrs.get("enqueued"):
      notes.append(f"enqueued ({t.user_attrs['enqueued']})")
    if t.user_attrs.get("fail_reason"):
      notes.append(t.user_attrs["fail_reason"][:120])
    if t.number in retries:
      notes.append(f"re-queued as {retries[t.number]}")
    rows.append({
        "number": t.number, "state": t.state.name, "value": t.value,
        "values": values_of(t), "params": dict(t.params),
        "steps": (t.user_attrs.get("pruned_at_step") if t.state == TrialState.PRUNED
                  else result.get("steps_trained", last_step)),
        "value_step": result.get("step"),
        "intermediate": {int(k): v for k, v in sorted(t.intermediate_values.items())},
        "secs": t.duration.total_seconds() if t.duration else None,
        "workdir": workdir_of(t.number), "notes": "; ".join(notes),
    })
  return rows


def write_best_config(workdir: str, cfg: ml_collections.ConfigDict,
                      summary: Mapping[str, Any]) -> dict[str, str]:
  """DIR/best_config.json and DIR/best_config.py (a configs/-style file that reruns `cfg`, the
  config of summary["best"]); returns the summary entries naming them and the rerun command."""
  best = summary["best"]
  json_path = os.path.join(workdir, BEST_CONFIG_JSON)
  py_path = os.path.join(workdir, BEST_CONFIG_PY)
  command = f"python -m r1jax.main --config={py_path} --workdir=BEST_RUN"
  doc = (f"Best trial {best['number']} of study {summary['study_name']!r} ({summary['metric']} = "
         f"{best['value']:.6g}, {summary['direction']}); written by r1jax.stages.tune.\n\n"
         f"    {command}\n\n"
         f"Searched values: {json.dumps(best['config_values'])}")
  run_dir.write_json(json_path, configlib.to_dict(cfg))
  run_dir.write_text(py_path, configlib.render_config_py(cfg, doc))
  return {"best_config_py": py_path, "best_config_json": json_path, "best_command": command}


def write_report(workdir: str, study: optuna.Study, summary: Mapping[str, Any],
                 rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The parameter importances, DIR/history.png, DIR/importances.png and DIR/report.md; returns
  the summary entries they add (importances, importances_method, *_png, report)."""
  importances, method = _importances(study)
  out: dict[str, Any] = {
      "importances": importances, "importances_method": method,
      "importances_png": _plot_importances(importances or {},
                                           os.path.join(workdir, IMPORTANCES_PNG), method),
      "history_png": _plot_history(rows, os.path.join(workdir, HISTORY_PNG), summary["metric"],
                                   summary["direction"] == "maximize"),
  }
  out["report"] = run_dir.write_text(os.path.join(workdir, REPORT_FILE),
                                     _markdown({**summary, **out}, rows))
  return out


# --------------------------------------------------------------------------------------------------
# Plots (`eval.pyplot()` imports matplotlib when a plot is drawn).


def _plot_history(rows: Sequence[Mapping[str, Any]], path: str, metric: str,
                  maximize: bool) -> str | None:
  plt = eval_lib.pyplot()
  done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
  pruned = [r for r in rows if r["state"] == "PRUNED" and r["value"] is not None]
  if not done and not pruned:
    return None
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.scatter([r["number"] for r in done], [r["value"] for r in done], label="complete", zorder=3)
  ax1.scatter([r["number"] for r in pruned], [r["value"] for r in pruned], marker="x",
              color="gray", label="pruned (last reported)", zorder=3)
  best, xs, ys = None, [], []
  for r in sorted(done, key=lambda r: r["number"]):
    if best is None or (r["value"] > best if maximize else r["value"] < best):
      best = r["value"]
    xs.append(r["number"])
    ys.append(best)
  if xs:
    ax1.step(xs, ys, where="post", color="C3", label="best so far")
  ax1.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax1.set_xlabel("trial")
  ax1.set_ylabel(metric)
  ax1.set_title("Optimisation history")
  ax1.legend(fontsize=8)
  for r in rows:
    if r["intermediate"]:
      steps, vals = zip(*sorted(r["intermediate"].items()))
      ax2.plot(steps, vals, "--" if r["state"] == "PRUNED" else "-", marker=".", alpha=0.8,
               label=f"{r['number']} {r['state'].lower()}")
  ax2.set_xlabel("training step")
  ax2.set_ylabel(f"eval {metric}")
  ax2.set_title("Reported at each eval (dashed: pruned)")
  if 0 < len(rows) <= 12 and any(r["intermediate"] for r in rows):
    ax2.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _importances(study: optuna.Study) -> tuple[dict[str, float] | None, str]:
  """({param: importance}, method): fANOVA (optuna's default; needs scikit-learn), else PED-ANOVA
  (no extra dependency; coarse with few trials)."""
  complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if len(complete) < 2:
    return None, f"needs 2 complete trials, the study has {len(complete)}"
  try:
    importlib.import_module("sklearn")
    evaluator, method = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
  except ImportError:
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    method = "PED-ANOVA (install scikit-learn for fANOVA)"
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), method
  except (ValueError, RuntimeError, ZeroDivisionError) as e:
    return None, f"{method} failed: {type(e).__name__}: {e}"


def _plot_importances(importances: Mapping[str, float], path: str, method: str) -> str | None:
  if not importances:
    return None
  plt = eval_lib.pyplot()
  names = list(importances)[::-1]
  fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
  ax.barh(names, [importances[n] for n in names])
  ax.set_xlabel("importance")
  ax.set_title(f"Parameter importances ({method.split(' (')[0]})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# --------------------------------------------------------------------------------------------------
# report.md.


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def _markdown(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
  """report.md's text from the summary (with the importances and PNG entries) and trial rows."""
  s = summary
  lines = [f"# Hyperparameter search: study `{s['study_name']}`", ""]
  lines.append(f"- trials run `{s['trial_stage']}` ({s['variant']}) from `base`; objective: "
               f"{s['direction']} eval `{s['metric']}` (at the model the stage delivers)")
  lines.append(f"- budget {s['n_trials']} trials; states: " +
               ", ".join(f"{k.lower()} {v}" for k, v in s["states"].items() if v))
  lines.append(f"- {s['search']}")
  lines.append(f"- storage: `{s['storage']}`")
  lines.append("- search space: " + "; ".join(f"`{f}` {d}" for f, d in s["space"].items()))
  best = s.get("best")
  if best:
    values = ", ".join(f"`{k}`={_fmt(v)}" for k, v in best["config_values"].items())
    lines += ["", "## Best trial", "",
              f"Trial {best['number']}: {s['metric']} = {best['value']:.4f} with {values}.", "",
              "Run it on its own (the same config, a fresh workdir):", "", "```",
              f"python -m r1jax.main --config={s['best_config_py']} --workdir=BEST_RUN", "```"]
  else:
    lines += ["", "No trial has completed yet."]
  fields = list(s["space"])
  lines += ["", "## Trials", ""]
  lines.append(eval_lib.markdown_table(
      ["#", "state", s["metric"]] + fields + ["steps", "secs", "notes"],
      [[r["number"], r["state"].lower(), r["value"]] + [r["values"].get(f) for f in fields]
       + [r["steps"], r["secs"], r["notes"]] for r in rows]))
  lines.append("Pruned trials show the last value they reported; `steps` is where they stopped.")
  if s.get("history_png"):
    lines += ["", "## Optimisation history", "",
              f"![history]({os.path.basename(s['history_png'])})"]
  lines += ["", "## Parameter importances", ""]
  if s.get("importances"):
    lines.append(f"Method: {s['importances_method']}, over the complete trials.\n")
    lines.append(eval_lib.markdown_table(("parameter", "importance"),
                                         list(s["importances"].items())))
    if s.get("importances_png"):
      lines.append(f"![importances]({os.path.basename(s['importances_png'])})")
  else:
    lines.append(f"Not available: {s['importances_method']}.")
  return "\n".join(lines) + "\n"
