"""Finetuning's phases: which backbone layers train when (config.schedule), the optimizer's
freezing rules for each phase, and the plan a rerun must match."""
import dataclasses
import os
from typing import Any

import jax
import ml_collections

from r1jax import configlib
from r1jax import run_dir
from r1jax.train import optim

ALL_LAYERS = -1  # Phase.layers value: every backbone parameter trains



@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase: which backbone layers train, for how long, and its early-stop patience.

  layers: 0 = head only; k = the head + the last k layers; ALL_LAYERS = every parameter.
  steps: planned steps, None = until the run's total.
  """
  index: int
  name: str
  layers: int
  steps: int | None
  patience: int

  @property
  def dirname(self) -> str:
    return f"{self.index}_{self.name}"


def plan_phases(config: ml_collections.ConfigDict, *, n_layer: int, total_steps: int,
                steps_per_epoch: int) -> list[Phase]:
  """The phases of config.schedule for a run of `total_steps` steps."""
  u = config.unfreeze
  patience = config.eval.early_stopping_patience
  layers = min(u.num_layers, n_layer)
  if config.schedule == "head_only":
    return [Phase(0, "head_only", 0, None, patience)]
  if config.schedule == "full":
    return [Phase(0, "full", ALL_LAYERS, None, patience)]
  if config.schedule == "a_then_b":
    a_steps = max(1, int(round(u.stage_a_fraction * total_steps)))
    if a_steps >= total_steps:
      raise configlib.ConfigError(f"schedule=a_then_b: all {total_steps} steps go to stage A "
                                  f"(unfreeze.stage_a_fraction={u.stage_a_fraction}); add steps.")
    return [Phase(0, "stage_a", 0, a_steps, patience), Phase(1, "stage_b", layers, None, patience)]
  every = max(1, int(round(u.every_epochs * steps_per_epoch)))
  if layers * every >= total_steps:
    raise configlib.ConfigError(
        f"schedule=progressive: {layers} layer(s) x unfreeze.every_epochs={u.every_epochs} "
        f"(= {every} steps each) needs more than the {total_steps} training steps; raise "
        f"train.num_epochs/num_steps or lower unfreeze.every_epochs or unfreeze.num_layers.")
  step_patience = u.plateau_patience or patience
  out = [Phase(i, f"top{i}" if i else "head", i, every, step_patience) for i in range(layers)]
  out.append(Phase(layers, f"top{layers}", layers, None, patience))
  return out


def phase_rules(phase: Phase, n_layer: int, unfreeze: Any) -> list[optim.Rule]:
  """Regex rules for `optim.build_optimizer`: the frozen part and the backbone's learning rate."""
  rules: list[optim.Rule] = []
  if unfreeze.extra_frozen:
    rules.append((unfreeze.extra_frozen, optim.FROZEN))
  backbone_lr = {"learning_rate": float(unfreeze.learning_rate)}
  if phase.layers == ALL_LAYERS:
    rules.append((r"backbone/.*", backbone_lr))
    return rules
  if phase.layers:
    top = "|".join(str(i) for i in range(n_layer - phase.layers, n_layer))
    rules.append((rf"backbone/layer_({top})/.*", backbone_lr))
  rules.append((r"backbone/.*", optim.FROZEN))
  return rules


def check_plan(workdir: str, plan: list[Phase]) -> None:
  """Writes DIR/phases/plan.json, or checks a rerun against it."""
  path = os.path.join(workdir, "phases", "plan.json")
  wanted = [dataclasses.asdict(p) for p in plan]
  saved = run_dir.read_json(path)
  if saved is None:
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      run_dir.write_json(path, {"phases": wanted})
    return
  if saved["phases"] != wanted:
    raise configlib.ConfigError(f"{workdir} was started with the phases {saved['phases']} but "
                                f"this config plans {wanted}; rerun with the original "
                                "schedule/steps, or use a new --workdir.")
