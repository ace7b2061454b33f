r"""The pipeline's final report: DIR/report.md, DIR/report.html and the PNG plots beside them.

    paths = pipeline_report.write_report(DIR)   # {"markdown", "html", "loss_curves", "tradeoff"}
    python -m r1jax.stages.pipeline_report DIR   # regenerate from the files in DIR

Everything is read back from the stage workdirs (DIR/<stage>/summary.json, config.json,
metrics.jsonl, DIR/data_*/data/report.json, DIR/pipeline_state/<stage>.json), so the report can be
rebuilt at any time and shows every stage that has finished in DIR, whichever run finished it.
The stages are those of `pipeline_stages`; this module does not import the pipeline that runs them.

Sections: the stages (what each did, its headline result, steps, wall time, attempts), the
stage transitions of schedule=auto (`pipeline_schedule`: each decision and its numbers), the data
report counts, loss curves (DIR/loss_curves.png: train and held-out loss per training stage),
pretraining results, the general vs domain-adapted classifier table (with differences), the
compression trade-off table (every artifact of distill / quantize / prune against its float
reference, plot DIR/compression_tradeoff.png), tuning results, and links to each stage's report.
The Markdown and the HTML are rendered from one `pipeline_document.Document`, so they always say
the same.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

from r1jax import configlib
from r1jax import eval as eval_lib
from r1jax import run_dir
from r1jax.train import schedule as schedule_lib
from r1jax.stages import compare as compare_lib
from r1jax.stages import pipeline_schedule
from r1jax.stages import pipeline_stages
from r1jax.stages.pipeline_document import cell
from r1jax.stages.pipeline_document import Document
from r1jax.stages.pipeline_document import fmt_secs
from r1jax.stages.pipeline_document import signed

TRAINING_STAGES = ("pretrain_general", "pretrain_domain", "finetune_general", "finetune_domain",
                   "distill", "prune")
COMPRESSION_STAGES = ("distill", "quantize", "prune")
LOSS_PNG = "loss_curves.png"
TRADEOFF_PNG = "compression_tradeoff.png"

# --------------------------------------------------------------------------------------------------
# Reading a workdir.


@dataclasses.dataclass
class StageInfo:
  name: str
  directory: str
  summary: dict[str, Any] | None
  config: dict[str, Any] | None
  state: dict[str, Any] | None

  @property
  def finished(self) -> bool:
    return self.summary is not None and self.summary.get("status", "complete") in (
        pipeline_stages.FINISHED)


def read_stages(workdir: str, config: Mapping[str, Any] | None) -> dict[str, StageInfo]:
  init_from = (config or {}).get("init_from") or ""
  out = {}
  for name in pipeline_stages.STAGES:
    directory = pipeline_stages.stage_dir(workdir, name, init_from)
    out[name] = StageInfo(name, directory,
                          run_dir.read_json(os.path.join(directory, run_dir.SUMMARY_FILE)),
                          run_dir.read_json(os.path.join(directory, run_dir.CONFIG_FILE)),
                          run_dir.read_json(pipeline_stages.state_path(workdir, name)))
  return out


def read_metrics(directory: str) -> list[dict[str, Any]]:
  path = os.path.join(directory, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:  # a line cut by a kill mid-write
        continue
  return records


def _rel(workdir: str, path: str | None) -> str | None:
  if not path:
    return None
  rel = os.path.relpath(path, workdir)
  return path if rel.startswith("..") else rel


# --------------------------------------------------------------------------------------------------
# Headline results per stage.


def _get(tree: Any, *keys: str) -> Any:
  for key in keys:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def headline(info: StageInfo) -> str:
  s = info.summary or {}
  module = pipeline_stages.SPEC[info.name].module
  if module == "data":
    text = f"{cell(s.get('documents_out'))} of {cell(s.get('documents_in'))} documents kept"
    if s.get("tokenizer"):
      text += f"; tokenizer vocab {cell(s.get('vocab_size'))}"
    return text
  if module == "pretrain":
    ev = s.get("final_eval") or {}
    parts = [f"held-out loss {cell(ev.get('loss'))}"]
    if "mlm_accuracy" in ev:
      parts.append(f"MLM acc. {cell(ev['mlm_accuracy'])} "
                   f"(chance {cell(s.get('mlm_chance_accuracy'))})")
    if "nsp_accuracy" in ev:
      parts.append(f"NSP acc. {cell(ev['nsp_accuracy'])}")
    return ", ".join(parts)
  if module == "finetune":
    t = s.get("test") or {}
    text = f"test accuracy {cell(t.get('accuracy'))}, macro-F1 {cell(t.get('macro_f1'))}"
    lb = (s.get("linear_baseline") or {}).get("test")
    if lb:
      text += (f" (TF-IDF + LR baseline: {cell(lb.get('accuracy'))}, "
               f"{cell(lb.get('macro_f1'))})")
    return text
  if module == "compare":
    rows = {r["metric"]: r for r in s.get("metrics", [])}
    parts = []
    for metric in ("accuracy", "macro-F1"):
      if metric in rows and rows[metric]["differences"]:
        parts.append(f"{metric} {signed(rows[metric]['differences'][-1])}")
    names = s.get("names") or ["general", "adapted"]
    return f"{names[-1]} - {names[0]}: " + ", ".join(parts) if parts else ""
  if module == "tune":
    best = s.get("best")
    if not best:
      return f"no trial completed ({cell(s.get('budget_used'))} started)"
    return (f"best {s.get('metric')} {cell(best.get('value'))} (trial {best.get('number')}) of "
            f"{cell(s.get('budget_used'))} trials")
  if module in COMPRESSION_STAGES:
    arts = s.get("artifacts") or []
    main = next((a for a in arts if a.get("path") == s.get("artifact")), arts[-1] if arts else None)
    if not main:
      return ""
    return (f"{main['name']}: size {cell(main.get('size_pct'))}% of float, accuracy "
            f"{cell(main.get('accuracy'))} ({signed(-main.get('accuracy_drop_points', 0.0), 3)} "
            f"points), batch-1 speedup {cell(main.get('speedup_batch1'))}x")
  return ""


def _steps(info: StageInfo) -> str:
  s = info.summary or {}
  if "step" in s:
    return cell(s["step"])
  return ""


# --------------------------------------------------------------------------------------------------
# Plots (`eval.pyplot()` imports matplotlib when a plot is drawn).


def _subsample(xs: list[Any], max_points: int) -> list[Any]:
  if len(xs) <= max_points:
    return xs
  stride = math.ceil(len(xs) / max_points)
  return xs[::stride] + ([xs[-1]] if (len(xs) - 1) % stride else [])


def plot_loss_curves(workdir: str, stages: Mapping[str, StageInfo], path: str, *,
                     max_points: int = 2000) -> str | None:
  """One panel per training stage: train loss per logged step, held-out loss per eval."""
  panels = []
  for name in TRAINING_STAGES:
    info = stages.get(name)
    if info is None or not info.summary:
      continue
    records = read_metrics(info.directory)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r]
    # Finetuning runs in phases (head only, then unfrozen layers): mark where each later one starts.
    phases = [(p["start_step"], p["name"]) for p in (info.summary.get("phases") or [])[1:]
              if isinstance(p, Mapping) and "start_step" in p]
    if train or evals:
      panels.append((name, _subsample(train, max_points), _subsample(evals, max_points), phases))
  if not panels:
    return None
  plt = eval_lib.pyplot()
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
  for ax, (name, train, evals, phases) in zip(axes.flat, panels):
    if train:
      ax.plot(*zip(*train), label="train", lw=1.2)
    if evals:
      ax.plot(*zip(*evals), "o-", label="held-out", ms=3, lw=1.0)
    for step, phase in phases:
      ax.axvline(step, color="grey", ls="--", lw=0.8)
      ax.annotate(phase, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                  textcoords="offset points", fontsize=7, color="grey")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: str) -> str | None:
  """Size on disk vs test accuracy of every compression artifact (one colour per stage)."""
  points = [r for r in rows if r.get("bytes") and r.get("accuracy") is not None]
  if not points:
    return None
  plt = eval_lib.pyplot()
  fig, ax = plt.subplots(figsize=(7.0, 4.6))
  # Points at the same place (the float reference of each stage, int8 modes of equal accuracy)
  # are drawn once with their names joined.
  groups: dict[tuple[float, float, str], list[str]] = {}
  for r in points:
    key = (round(r["bytes"] / 1e6, 6), round(100.0 * r["accuracy"], 4),
           "reference" if r.get("is_reference") else r["stage"])
    name = "float (reference)" if r.get("is_reference") else r["name"]
    if name not in groups.setdefault(key, []):
      groups[key].append(name)
  colours = {"reference": "black"}
  for (x, y, stage), names in groups.items():
    colour = colours.setdefault(stage, f"C{len(colours) - 1}")
    shown = ax.get_legend_handles_labels()[1]
    ax.scatter([x], [y], color=colour, s=40, label=None if stage in shown else stage)
    ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("weights on disk (MB, log scale)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("compression: size vs accuracy")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# --------------------------------------------------------------------------------------------------
# Sections.


def compression_rows(stages: Mapping[str, StageInfo]) -> list[dict[str, Any]]:
  """Every artifact of the compression stages, each after the float reference its stage measured
  it against (the same model measured again per stage: relative columns use that stage's own)."""
  rows = []
  for name in COMPRESSION_STAGES:
    info = stages[name]
    if not info.finished:
      continue
    source = (info.config or {}).get("init_from") or name
    for artifact in info.summary.get("artifacts", []):
      is_ref = artifact.get("name") == info.summary.get("reference", "float")
      rows.append(dict(artifact, stage=name, source=source, is_reference=is_ref))
  return rows


def _compare_result(stages: Mapping[str, StageInfo]) -> dict[str, Any] | None:
  if stages["compare"].finished:
    return stages["compare"].summary
  fg, fd = stages["finetune_general"], stages["finetune_domain"]
  if fg.finished and fd.finished and "test" in fg.summary and "test" in fd.summary:
    return compare_lib.compare([fg.summary, fd.summary], ["general", "domain-adapted"])
  return None


def _data_section(doc: Document, workdir: str, stages: Mapping[str, StageInfo]) -> None:
  rows = []
  notes = []
  for name in ("data_general", "data_domain"):
    info = stages[name]
    if not info.finished:
      continue
    report = run_dir.read_json(os.path.join(info.directory, "data", "report.json")) or {}
    dropped = {k: v for k, v in (report.get("dropped") or {}).items() if v}
    repaired = {k: v for k, v in (report.get("repaired") or {}).items() if v}
    rows.append([name, f"`{info.summary.get('inputs')}`", report.get("documents_in"),
                 report.get("documents_out"), sum(dropped.values()),
                 ", ".join(f"{k} {v:,}" for k, v in sorted(dropped.items(), key=lambda x: -x[1]))
                 or "none",
                 ", ".join(f"{k} {v:,}" for k, v in sorted(repaired.items(), key=lambda x: -x[1]))
                 or "none",
                 report.get("augmented", 0), report.get("docs_per_sec")])
    if info.summary.get("tokenizer"):
      notes.append(f"Tokenizer: `{_rel(workdir, info.summary['tokenizer'])}` (vocabulary "
                   f"{cell(info.summary.get('vocab_size'))}), trained on the cleaned {name} "
                   "corpus" + (f" and `{info.summary['tokenizer_extra_inputs']}` (for the "
                               "vocabulary only)" if info.summary.get("tokenizer_extra_inputs")
                               else "") + ", shared by every later stage.")
    notes.append(f"{name}: full report with samples of every dropped document in "
                 f"[`{_rel(workdir, os.path.join(info.directory, 'data', 'report.json'))}`]"
                 f"({_rel(workdir, os.path.join(info.directory, 'data', 'report.json'))}).")
  if not rows:
    return
  doc.heading(2, "Data")
  doc.table(["corpus", "inputs", "documents in", "kept", "dropped", "dropped by rule",
             "repaired", "augmented", "docs/s"], rows)
  doc.bullets(notes)


def _pretrain_section(doc: Document, workdir: str, stages: Mapping[str, StageInfo]) -> None:
  rows = []
  for name in ("pretrain_general", "pretrain_domain"):
    info = stages[name]
    if not info.finished:
      continue
    s = info.summary
    ev, tr = s.get("final_eval") or {}, s.get("final_train") or {}
    corpus = _get(info.config, "data", "corpus")
    rows.append([name, f"`{_rel(workdir, corpus)}`" if corpus else "", s.get("num_params"),
                 s.get("step"), tr.get("loss"), ev.get("loss"), ev.get("mlm_accuracy"),
                 ev.get("nsp_accuracy"), tr.get("tokens_per_sec"), s.get("status")])
  if rows:
    doc.heading(2, "Pretraining")
    doc.table(["stage", "corpus", "parameters", "steps", "train loss", "held-out loss",
               "MLM accuracy", "NSP accuracy", "tokens/s", "status"], rows)


def _domain_skipped(workdir: str, stages: Mapping[str, StageInfo]) -> bool:
  """Whether schedule=auto skipped pretrain_domain in this workdir (and it has not run since)."""
  return (pipeline_schedule.decision_record(workdir).get("action") == pipeline_schedule.SKIP
          and not stages[pipeline_schedule.DOMAIN_STAGE].finished)


def _domain_section(doc: Document, workdir: str, d: Mapping[str, Any]) -> None:
  """Whether pretrain_domain ran, and the diagnostic numbers that decided it."""
  m, t = d["measures"], d["thresholds"]
  doc.heading(3, "pretrain_domain: run or skip")
  path = _rel(workdir, pipeline_schedule.decision_path(workdir))
  doc.para(("**Skipped.** Domain pretraining did not run: finetune_domain (the "
            "\"domain-adapted\" model) starts from the general model, pretrain_general, as "
            "finetune_general does. " if d["action"] == pipeline_schedule.SKIP else "**Run.** ") +
           f"Decided from the general model (step {d['general_model']['step']}) measured on "
           f"{m['eval_rows_per_corpus']} held-out segments of {m['seq_len']} tokens of each "
           f"corpus ({fmt_secs(d['wall_secs'])}): {d['reason']} Record: `{path}` (the "
           "diagnostic's report beside it).")
  doc.table(["measure", "general", "domain", "domain / general", "thresholds"], [
      ["held-out MLM loss", m["general_mlm_loss"], m["domain_mlm_loss"], "", ""],
      ["perplexity", m["general_perplexity"], m["domain_perplexity"], m["perplexity_ratio"],
       f"moderate >= {cell(t['moderate_ppl_ratio'])}, large >= {cell(t['large_ppl_ratio'])}"],
      ["domain word occurrences in general text", "", m["word_token_coverage"], "",
       f"large < {cell(t['low_word_coverage'])}"]])


def _schedule_section(doc: Document, workdir: str, stages: Mapping[str, StageInfo]) -> None:
  """schedule=auto: where each stage was left and every decision with its numbers."""
  logs, decision = pipeline_schedule.read_logs(workdir), pipeline_schedule.decision_record(workdir)
  if not logs and not decision:
    return
  doc.heading(2, "Stage transitions (schedule=auto)")
  doc.para("Each pretraining and finetuning stage was left when its eval metric gained too "
           "little per 1000 steps (its configured steps are the ceiling), after unfreezing frozen "
           "layers and lowering the learning rate at earlier plateaus; one decision per eval, "
           "with the numbers behind it (`pipeline_state/<stage>.schedule.json`).")
  if decision:
    _domain_section(doc, workdir, decision)
  for name, log in logs.items():
    info, cfg = stages[name], log.get("settings") or {}
    s = info.summary or {}
    planned, ran = s.get("num_steps"), s.get("step")
    left = log.get("left_at")
    if left is not None and planned and left < planned:
      how = (f"left at step {left}, {1 - left / planned:.0%} of its planned {cell(planned)} "
             "steps saved")
    elif left is not None:
      how = f"trained to its ceiling ({cell(ran)} steps; its last eval found a plateau too)"
    elif s.get("stopped_by"):
      how = f"not left by the schedule (stopped by {s['stopped_by']} at step {cell(ran)})"
    else:
      how = f"trained to its ceiling ({cell(ran)} steps)" if ran else "not finished"
    doc.heading(3, name)
    doc.para(f"{how}; policy {cfg.get('policy')} on `{cfg.get('metric')}`, window "
             f"{cfg.get('window')} evals, relative {cell(cfg.get('relative'))}, rule minimum "
             f"{cell(cfg.get('min_gain_per_kstep'))} per 1000 steps, learning rate x"
             f"{cell(cfg.get('lr_factor'))} up to {cell(cfg.get('max_lr_drops'))} times.")
    headers, rows = schedule_lib.decision_rows(log["decisions"], cfg.get("metric", "metric"))
    doc.table(headers, rows)


def _compare_section(doc: Document, workdir: str, stages: Mapping[str, StageInfo]) -> None:
  result = _compare_result(stages)
  if not result:
    return
  names = result["names"]
  doc.heading(2, "General vs domain-adapted model")
  skipped = ("**Domain pretraining was skipped** (schedule=auto: no domain shift): here the "
             "\"domain-adapted\" classifier was finetuned from the general model too. "
             if _domain_skipped(workdir, stages) else "")
  doc.para(f"Both classifiers were finetuned the same way on the same task "
           f"({result.get('split', 'test')} split shown); the only difference is the pretrained "
           f"model they started from. {skipped}" + ("Differences are adapted minus general."
                                                    if len(names) == 2 else "Each finetuning "
           "trained a fused (text+image), a text-only and an image-only model on the same batches "
           f"(multimodal.enabled); differences are each column minus {names[0]}."))
  headers = ["metric", *names] + [f"{n} - {names[0]}" for n in names[1:]]
  rows = []
  for r in result["metrics"]:
    ratio = ""
    if r["metric"].startswith("latency") and r.get("ratios") and r["ratios"][0]:
      ratio = f" ({r['ratios'][0]:.2f}x)"
    rows.append([r["metric"], *r["values"]] +
                [(signed(d) + ratio) if d is not None else "" for d in r["differences"]])
  doc.table(headers, rows)
  mb = result.get("majority_baseline")
  if mb:
    doc.para(f"Majority-class baseline (always `{mb['class']}`): accuracy {cell(mb['accuracy'])}, "
             f"macro-F1 {cell(mb['macro_f1'])}.")
  if result.get("linear_baseline"):
    doc.para(compare_lib.linear_baseline_text(result).strip())
  per_class = result.get("per_class_f1") or {}
  if per_class:
    doc.heading(3, "Per-class F1")
    doc.table(["class", *names] + [f"{n} - {names[0]}" for n in names[1:]],
              [[c, *vals] + [signed(v - vals[0]) if v is not None and vals[0] is not None
                             else "" for v in vals[1:]] for c, vals in per_class.items()])
  images = [(n, os.path.join(stages[n].directory, "confusion_matrix.png"))
            for n in ("finetune_general", "finetune_domain")]
  for name, path in images:
    if os.path.exists(path):
      doc.image(_rel(workdir, path), f"{name} confusion matrix")


TRADEOFF_HEADERS = ["stage", "artifact", "parameters", "MB on disk", "MB compressed", "size %",
                    "accuracy",
                    "macro-F1", "accuracy change (points)", "ms/example batch 1",
                    "ms/example batched", "speedup batch 1", "speedup batched"]


def _compression_section(doc: Document, workdir: str, stages: Mapping[str, StageInfo],
                         plot_path: str | None) -> None:
  rows = compression_rows(stages)
  if not rows:
    return
  doc.heading(2, "Compression trade-off")
  sources = sorted({r["source"] for r in rows})
  doc.para("Every artifact measured on the test split against the float model it was made from "
           "(size, accuracy and speed relative to the reference row of the same stage, measured "
           "in that stage; latency is ms per example, median after warm-up). \"MB compressed\" "
           "is the weights file after generic compression, where pruned zeros pay off. Sources: "
           + ", ".join(f"`{_rel(workdir, s)}`" for s in sources) + ".")
  doc.table(TRADEOFF_HEADERS, [
      [r["stage"], r["name"] + (" (reference)" if r["is_reference"] else ""), r.get("params"),
       (r["bytes"] / 1e6) if r.get("bytes") else None,
       (r["bytes_compressed"] / 1e6) if r.get("bytes_compressed") else None, r.get("size_pct"),
       r.get("accuracy"),
       r.get("macro_f1"), signed(-r.get("accuracy_drop_points", 0.0), 3),
       r.get("latency_ms_batch1"), r.get("latency_ms_batched"), r.get("speedup_batch1"),
       r.get("speedup_batched")] for r in rows])
  if plot_path:
    doc.image(_rel(workdir, plot_path), "compression trade-off")


def _tune_section(doc: Document, workdir: str, stages: Mapping[str, StageInfo]) -> None:
  info = stages["tune"]
  if not info.finished:
    return
  s = info.summary
  doc.heading(2, "Hyperparameter search")
  states = ", ".join(f"{k.lower()} {v}" for k, v in (s.get("states") or {}).items() if v)
  doc.para(f"{s.get('trial_stage', '')} trials, objective {s.get('metric')} "
           f"({s.get('direction')}), {s.get('sampler')} sampler, {s.get('pruner')} pruner; "
           f"{cell(s.get('budget_used'))} of {cell(s.get('n_trials'))} trials ({states}).")
  best = s.get("best")
  if best:
    doc.table(["searched field", "best value"],
              sorted((f"`{k}`", v) for k, v in (best.get("config_values") or {}).items()))
    doc.para(f"Best trial {best.get('number')}: {s.get('metric')} = {cell(best.get('value'))}. "
             f"Run it on its own with `{s.get('best_command')}`.")
  for key, alt in (("history_png", "search history"), ("importances_png", "parameter importances")):
    if s.get(key) and os.path.exists(s[key]):
      doc.image(_rel(workdir, s[key]), alt)


def build(workdir: str, config: Mapping[str, Any] | None = None, *, max_points: int = 2000,
          device: str | None = None) -> tuple[Document, dict[str, str | None]]:
  """The report document of `workdir` and the plots it references (written next to it)."""
  workdir = os.path.abspath(workdir)
  if config is None:
    config = run_dir.read_json(os.path.join(workdir, run_dir.CONFIG_FILE)) or {}
  stages = read_stages(workdir, config)
  present = [s for s in pipeline_stages.STAGES if stages[s].summary or stages[s].state]
  loss_png = plot_loss_curves(workdir, stages, os.path.join(workdir, LOSS_PNG),
                              max_points=max_points)
  tradeoff_png = plot_tradeoff(compression_rows(stages), os.path.join(workdir, TRADEOFF_PNG))

  doc = Document()
  doc.heading(1, "r1jax pipeline report")
  total = sum(float(stages[s].state.get("wall_secs") or 0.0) for s in present
              if stages[s].state and stages[s].state.get("status") == "finished")
  finished = [s for s in present if stages[s].finished]
  doc.bullets([
      f"workdir: `{workdir}`",
      f"variant: `{config.get('variant', '?')}`; stages finished: {len(finished)} of "
      f"{len(pipeline_stages.STAGES)}",
      f"total wall time of the finished stages: {fmt_secs(total)} "
      f"({device or 'device not recorded'})",
      f"report written {datetime.datetime.now().isoformat(timespec='seconds')}",
  ])

  doc.heading(2, "Stages")
  rows = []
  domain_skipped = _domain_skipped(workdir, stages)
  for i, name in enumerate(pipeline_stages.STAGES, 1):
    info = stages[name]
    state = info.state or {}
    if info.finished:
      status = info.summary.get("status", "complete")
    elif state.get("status") == "running":
      status = "interrupted (rerun to resume)"
    elif name == pipeline_schedule.DOMAIN_STAGE and domain_skipped:
      status = "skipped by schedule=auto (no domain shift)"
    else:
      status = "not run"
    wall = state.get("wall_secs") if state.get("status") == "finished" else None
    attempts = state.get("attempts")
    rows.append([i, f"[{name}]({_rel(workdir, info.directory)})" if info.summary else name,
                 pipeline_stages.SPEC[name].description if info.finished else "",
                 headline(info) if info.finished else "", status, _steps(info), fmt_secs(wall),
                 attempts if attempts and attempts > 1 else ("1" if attempts else "")])
  doc.table(["#", "stage", "what it did", "result", "status", "steps", "wall time", "attempts"],
            rows)
  doc.para("Wall time is that of the attempt that finished the stage (compilation and "
           "evaluation included); attempts > 1 means earlier attempts were interrupted (or "
           "failed) and the stage was resumed.")

  _schedule_section(doc, workdir, stages)
  _data_section(doc, workdir, stages)
  if loss_png:
    doc.heading(2, "Loss curves")
    doc.para("Training loss per logged step and held-out loss per evaluation, from each "
             "stage's `metrics.jsonl` (finetuning and distillation include label smoothing / the "
             "distillation terms in their training loss).")
    doc.image(LOSS_PNG, "loss curves")
  _pretrain_section(doc, workdir, stages)
  _compare_section(doc, workdir, stages)
  _compression_section(doc, workdir, stages, tradeoff_png)
  _tune_section(doc, workdir, stages)

  links = []
  for name in pipeline_stages.STAGES:
    report = os.path.join(stages[name].directory, "report.md")
    if stages[name].summary and os.path.exists(report):
      links.append(f"{name}: [{_rel(workdir, report)}]({_rel(workdir, report)})")
  if links:
    doc.heading(2, "Stage reports")
    doc.bullets(links)
  return doc, {"loss_curves": loss_png, "tradeoff": tradeoff_png}


def write_report(workdir: str, config: Any = None, *, html_too: bool | None = None,
                 device: str | None = None) -> dict[str, str | None]:
  """Writes DIR/report.md (+ DIR/report.html) and the plots; returns their paths.

  `config`: the pipeline config (a ConfigDict or its dict; None reads DIR/config.json). `device`:
  the devices the stages ran on, for the wall-time line (the pipeline passes its own; the report
  itself never starts a JAX backend, so regenerating it does not touch a busy accelerator).
  """
  if config is not None and hasattr(config, "to_dict"):
    config = configlib.to_dict(config)
  report_cfg = (config or {}).get("report") or {}
  if html_too is None:
    html_too = report_cfg.get("html", True)
  doc, plots = build(workdir, config, max_points=int(report_cfg.get("max_points", 2000)),
                     device=device)
  workdir = os.path.abspath(workdir)
  paths: dict[str, str | None] = dict(plots)
  paths["markdown"] = run_dir.write_text(os.path.join(workdir, "report.md"), doc.markdown())
  paths["html"] = (run_dir.write_text(os.path.join(workdir, "report.html"),
                                      doc.html("r1jax pipeline report")) if html_too else None)
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) != 1:
    raise SystemExit("usage: python -m r1jax.stages.pipeline_report DIR")
  paths = write_report(argv[0])
  print(f"Pipeline report: {paths['markdown']}")


if __name__ == "__main__":
  main()
