"""The pipeline's stages: the table `r1jax.stages.pipeline` runs and `pipeline_report` reports.

    spec = pipeline_stages.SPEC["finetune_domain"]   # module "finetune", what it does, its inputs
    pipeline_stages.state_path(DIR, "finetune_domain")   # DIR/pipeline_state/finetune_domain.json

Each stage runs in DIR/<stage>/ (pretrain_general: config.init_from when set); the pipeline records
each one in DIR/pipeline_state/<stage>.json (config fingerprint, inputs, wall time, attempts).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

from r1jax import run_dir


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One pipeline stage: the module that runs it and what it does (for logs and the report)."""
  name: str
  module: str           # r1jax.stages.<module>
  description: str
  needs: tuple[str, ...] = ()  # fixed inputs; tune and the compression stages add config.sources
  text_only: bool = False      # takes text classifiers only (left out under multimodal.enabled)


SPECS = (
    StageSpec("data_general", "data", "cleaned the general corpus and trained the tokenizer"),
    StageSpec("data_domain", "data", "cleaned the domain corpus"),
    StageSpec("pretrain_general", "pretrain", "MLM + NSP pretraining on the general corpus",
              ("data_general",)),
    StageSpec("pretrain_domain", "pretrain",
              "domain-adaptive pretraining, starting from the general model",
              ("pretrain_general", "data_domain")),
    StageSpec("finetune_general", "finetune",
              "classifier finetuning of the general model",
              ("pretrain_general",)),
    StageSpec("finetune_domain", "finetune",
              "classifier finetuning of the adapted model",
              ("pretrain_domain",)),
    StageSpec("compare", "compare", "general vs domain-adapted classifier table",
              ("finetune_general", "finetune_domain")),
    StageSpec("tune", "tune", "hyperparameter search", text_only=True),
    StageSpec("distill", "distill", "distilled a smaller student classifier", text_only=True),
    StageSpec("quantize", "quantize", "INT8 post-training quantization"),
    StageSpec("prune", "prune", "magnitude pruning with recovery finetuning", text_only=True),
)
SPEC = {s.name: s for s in SPECS}
STAGES = tuple(s.name for s in SPECS)
STATE_DIR = "pipeline_state"
# summary.json "status" values of a stage whose final checkpoint is usable (compare writes none).
FINISHED = ("complete", "stopped_early", "data_exhausted")


def multimodal(config) -> bool:
  """Whether the pipeline `config` runs the image+text task (`multimodal.enabled`)."""
  return bool((config.get("multimodal") or {}).get("enabled", False))


def left_out(config) -> tuple[str, ...]:
  """The stages the pipeline `config` cannot run: the text-only ones under multimodal.enabled."""
  return tuple(s.name for s in SPECS if s.text_only) if multimodal(config) else ()


def stage_dir(workdir: str, name: str, init_from: str = "") -> str:
  """Where stage `name` of the pipeline in `workdir` runs: DIR/<name>, except pretrain_general
  when the pipeline's `init_from` names an existing pretraining workdir instead."""
  if name == "pretrain_general" and init_from:
    return os.path.abspath(os.path.expanduser(init_from))
  return os.path.join(workdir, name)


def state_path(workdir: str, name: str) -> str:
  """DIR/pipeline_state/<name>.json: the pipeline's record of stage `name`."""
  return os.path.join(workdir, STATE_DIR, f"{name}.json")


def summary_sha(directory: str) -> str | None:
  """SHA-256 of DIR/summary.json (None if absent): what a later stage's record says it was made
  from, so a redone input is noticed."""
  path = os.path.join(directory, run_dir.SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()
