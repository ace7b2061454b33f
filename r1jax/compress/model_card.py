"""MODEL_CARD.md of an artifact: what it classifies, how well, how big and fast, from what data.

    data = model_card.training_data(spec.task, source="/tmp/ft_tiny")  # -> "training_data"
    model_card.write(artifact_dir, meta)                               # meta: artifact.json's

The card is generated, never edited by hand: `artifact.save` writes it (task, labels, architecture,
quantization mode, size, training data and licences) and the compression stages write it again
once they have measured the artifact (`meta["measurements"]`: accuracy, macro-F1, latency at batch 1
and batched, the device, the comparison with the float reference).

Training data: the task splits the artifact was trained / calibrated / measured on, plus, walking
the `init_from` chain of the source workdir's config.json files (and the `source` of an artifact
directory), the corpora every earlier stage read (`data.corpus`, `data.inputs`,
`data.knowledge_file`, `task.*`), and, for a corpus that is another stage's output (the data
stage's DIR/data/clean), what that stage read. Licences come from the LICENSE.* files shipped
with the embedded corpus (r1jax/data/builtin/): each one's first paragraph names the files it
covers (e.g. "domain.jsonl.gz, task_*.jsonl.gz ... are derived from ... FOLDOC"), and a builtin
spec is matched to the licences that name its file; those LICENSE files are copied next to the
card. Data the user supplied has no licence r1jax can know, and the card says so.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
from typing import Any, Mapping, Sequence

from r1jax import run_dir
from r1jax.data import builtin

CARD_FILE = "MODEL_CARD.md"
_MAX_CHAIN = 16    # init_from links followed before giving up (guards against a cycle)


def _specs(value: Any) -> list[str]:
  """A corpus spec (comma-separated string or list) -> its parts."""
  if isinstance(value, (list, tuple)):
    return [p for v in value for p in _specs(v)]
  return [p.strip() for p in str(value or "").split(",") if p.strip()]


def _builtin_file(spec: str) -> str | None:
  """The embedded file a builtin spec reads ("builtin:task:train" -> "task_train.jsonl.gz")."""
  if spec == "builtin" or spec == "builtin:knowledge":
    return os.path.basename(builtin.path("knowledge"))
  if not spec.startswith("builtin:"):
    return None
  name, _, split = spec[len("builtin:"):].partition(":")
  try:
    return os.path.basename(builtin.path(name, split or None))
  except (ValueError, FileNotFoundError):
    return None


def _made_by(spec: str) -> str:
  """The r1jax stage workdir a local corpus path lies in (the data stage's DIR/data/clean: a
  config.json naming a stage up to 3 levels above it), or ""."""
  if spec.startswith(("builtin", "tfds:")):
    return ""
  path = os.path.abspath(os.path.expanduser(spec.split("*")[0].split("?")[0]))
  if not os.path.exists(path):
    return ""
  if not os.path.isdir(path):  # a corpus file: its directory may be the stage's
    path = os.path.dirname(path)
  for _ in range(4):
    if (run_dir.read_json(os.path.join(path, run_dir.CONFIG_FILE)) or {}).get("stage"):
      return path
    path = os.path.dirname(path)
  return ""


def training_data(task: Mapping[str, Any], source: str = "") -> list[dict[str, str]]:
  """[{"role", "spec", "stage", "workdir", "made_by"}] of every dataset behind an artifact (see
  the module docstring); "made_by" names the stage workdir that produced a corpus (then listed
  too), "" for data from outside r1jax."""
  out = [{"role": f"task {s}", "spec": str(task[s]), "stage": "this artifact", "workdir": "",
          "made_by": ""} for s in ("train", "dev", "test") if task.get(s)]
  seen: set[str] = set()
  queue = [os.path.abspath(source)] if source else []
  while queue and len(seen) < _MAX_CHAIN:
    path = queue.pop(0)
    if path in seen:
      continue
    seen.add(path)
    art = run_dir.read_json(os.path.join(path, "artifact.json")) or {}
    if art:   # an artifact directory: its own record of the data behind it
      out += [dict(d, stage=d.get("stage") or "artifact", workdir=d.get("workdir") or path)
              for d in art.get("training_data") or []]
      continue
    config = run_dir.read_json(os.path.join(path, run_dir.CONFIG_FILE)) or {}
    stage = str(config.get("stage", "?"))
    data, task_section = config.get("data") or {}, config.get("task") or {}
    found = [("corpus", spec) for key in ("corpus", "inputs") for spec in _specs(data.get(key))]
    if data.get("knowledge_file"):
      found.append(("knowledge", str(data["knowledge_file"])))
    if isinstance(task_section, Mapping):
      found += [(f"task {s}", str(task_section[s])) for s in ("train", "dev", "test")
                if task_section.get(s)]
    for role, spec in found:
      made_by = _made_by(spec)
      out.append({"role": role, "spec": spec, "stage": stage, "workdir": path,
                  "made_by": made_by})
      if made_by:
        queue.append(made_by)
    if config.get("init_from"):
      queue.append(os.path.abspath(os.path.join(path, config["init_from"])))
  unique, keys = [], set()
  for d in out:
    if (d["role"], d["spec"], d["stage"]) not in keys:
      keys.add((d["role"], d["spec"], d["stage"]))
      unique.append(d)
  return unique


def shipped_licences() -> dict[str, tuple[str, list[str]]]:
  """{LICENSE file name: (its first paragraph, the file patterns that paragraph names)}."""
  out = {}
  for name in sorted(os.listdir(builtin.DIR)):
    if not name.startswith("LICENSE"):
      continue
    with open(os.path.join(builtin.DIR, name), encoding="utf-8") as f:
      head = f.read().split("\n\n", 1)[0].strip()
    words = re.split(r"[\s,]+", head.split(" are derived from")[0])
    out[name] = (" ".join(head.split()), [w for w in words if "." in w and w != "and"])
  return out


def licences_for(data: Sequence[Mapping[str, str]]) -> dict[str, list[str]]:
  """{LICENSE file: [builtin specs it covers]} for the datasets in `data`."""
  found: dict[str, list[str]] = {}
  for name, (_, patterns) in shipped_licences().items():
    for d in data:
      file = _builtin_file(d["spec"])
      if file and any(fnmatch.fnmatch(file, p) for p in patterns) and d["spec"] not in found.get(
          name, []):
        found.setdefault(name, []).append(d["spec"])
  return found


def _fmt(value: Any, digits: int = 4) -> str:
  if isinstance(value, float):
    return f"{value:.{digits}g}"
  return "n/a" if value is None else str(value)


def render(meta: Mapping[str, Any]) -> str:
  """The card's Markdown for artifact.json's dict `meta`."""
  spec, model = meta["spec"], meta["spec"]["model"]
  extra = meta.get("metadata") or {}
  quant = meta.get("quantization")
  m = meta.get("measurements") or {}
  data = meta.get("training_data") or []
  lines = [f"# Model card: {m.get('name') or meta['kind']} text classifier (r1jax artifact)", "",
           "Generated by r1jax (`r1jax.compress.model_card`) from `artifact.json`; do not edit.",
           ""]
  heads = model.get("layer_heads") or [model["n_head"]] * model["n_layer"]
  inner = model.get("layer_d_inner") or [model["d_inner"]] * model["n_layer"]
  lines += ["## Model", "",
            f"- Kind: {meta['kind']}" + (f" (source: `{extra['source']}`)" if extra.get("source")
                                          else ""),
            f"- Architecture: Transformer-XL encoder ({model.get('attention', '?')} attention), "
            f"{model['n_layer']} layers, d_model {model['d_model']}, heads per layer {heads} "
            f"(d_head {model['d_head']}), feed-forward width per layer {inner}, vocabulary "
            f"{model['vocab_size']}; classification head with {spec['num_classes']} outputs",
            f"- Parameters: {meta.get('num_params', 0):,}",
            "- Quantization: " + ("none (float32 weights)" if not quant else
                                  f"int8 weights, mode `{quant['mode']}` "
                                  f"({len(quant.get('leaves') or {})} int8 leaves with per-channel "
                                  f"scales; the other leaves float32)")]
  if extra.get("sparsity"):
    lines.append(f"- Magnitude pruning: {100 * extra['sparsity']['selected_sparsity']:.1f}% of "
                 f"the pruned kernels are zero "
                 f"({100 * extra['sparsity']['model_sparsity']:.1f}% of all parameters)")
  if extra.get("structured"):
    s = extra["structured"]
    lines.append(f"- Structured pruning: {s.get('heads_removed', 0)} attention heads and "
                 f"{s.get('units_removed', 0)} feed-forward units removed")
  lines += ["", "## Task", "",
            f"- {'Multi-label' if spec.get('multi_label') else 'Single-label'} classification of "
            f"text, {spec['seq_len']} SentencePiece tokens per text (`tokenizer.model`)",
            f"- Labels ({spec['num_classes']}, in class-id order): "
            + ", ".join(f"`{n}`" for n in spec["label_names"]),
            "- Splits: " + ", ".join(f"{s} `{spec['task'].get(s)}`"
                                     for s in ("train", "dev", "test")),
            ""]
  lines += ["## Metrics", ""]
  if m:
    ref = m.get("reference")
    lines += [f"On the test split ({m.get('num_examples', '?')} examples)"
              + (f", beside the float reference `{ref}`" if ref and ref != m.get("name") else "")
              + ":", "",
              "| accuracy | macro-F1 | % of reference accuracy | accuracy drop (points) |",
              "|---|---|---|---|",
              f"| {_fmt(m.get('accuracy'))} | {_fmt(m.get('macro_f1'))} | "
              f"{_fmt(m.get('retained_accuracy_pct'))} | "
              f"{_fmt(m.get('accuracy_drop_points'), 3)} |",
              ""]
  else:
    lines += ["Not measured yet (the compression stages measure every artifact they write).", ""]
  lines += ["## Size and latency", "",
            f"- Weights file: `{meta.get('weights_file', 'params.npz')}`, "
            f"{meta.get('bytes_params_file', 0):,} bytes"
            + (f" ({meta['sparse_arrays']} mostly-zero arrays stored as bitmask + values; "
               f"{meta.get('bytes_params_dense', 0):,} bytes dense)" if meta.get("sparse_arrays")
               else "")
            + (f"; {_fmt(m['size_pct'], 3)}% of the reference's" if m.get("size_pct") else "")]
  if m:
    lines += [f"- Latency on {m.get('device', '?')} (ms per example, median of "
              f"{m.get('latency_repeats', '?')} timed calls): batch 1 "
              f"{_fmt(m.get('latency_ms_batch1'))} ms, batch {m.get('latency_batch_size', '?')} "
              f"{_fmt(m.get('latency_ms_batched'))} ms"
              + (f"; speedup over the reference {_fmt(m['speedup_batch1'], 3)}x / "
                 f"{_fmt(m.get('speedup_batched'), 3)}x" if m.get("speedup_batch1") else "")]
  lines += ["", "## Training data", "", "| role | data | stage | workdir |", "|---|---|---|---|"]
  lines += [f"| {d['role']} | `{d['spec']}`" + (f" (made by {d['made_by']})" if d.get("made_by")
                                                  else "")
            + f" | {d['stage']} | {d['workdir'] or ''} |" for d in data]
  lines += ["", "## Licences of the training data", ""]
  found = licences_for(data)
  texts = shipped_licences()
  for name, specs in found.items():
    lines += [f"- **{name}** (copied next to this card; covers "
              + ", ".join(f"`{s}`" for s in specs) + f"): {texts[name][0]}"]
  own = [d["spec"] for d in data if not _builtin_file(d["spec"]) and not d.get("made_by")]
  if own:
    lines.append("- Not embedded in r1jax, licence unknown to it (check the data's own terms): "
                 + ", ".join(f"`{s}`" for s in dict.fromkeys(own)))
  if not found and not own:
    lines.append("- No training data recorded.")
  return "\n".join(lines) + "\n"


def write(directory: str, meta: Mapping[str, Any]) -> str:
  """Writes DIR/MODEL_CARD.md (and copies the licences it names); returns the card's path."""
  for name in licences_for(meta.get("training_data") or []):
    shutil.copyfile(os.path.join(builtin.DIR, name), os.path.join(directory, name))
  path = os.path.join(directory, CARD_FILE)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(render(meta))
  os.replace(path + ".tmp", path)
  return path
