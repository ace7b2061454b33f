"""Stage transitions decided by the run (issue #26, part 2, its rule-based piece): leave a stage
when its eval metric stops paying for the compute.

    controller = schedule.PlateauController(metric="loss", window=2, min_gain_per_kstep=0.05)
    finetune.run(config, workdir, on_eval=controller)   # any stage that takes loop.fit's on_eval
    controller.decisions                                # one Decision per eval, with its numbers
    controller.table()                                  # the same as a markdown table

At each eval the controller takes the selection score (`loop.selection_score`: lower is better,
an accuracy negated) and compares the best score so far with the best score `window` evals
earlier: gain = (best then - best now) per 1000 optimizer steps between those evals. A gain under
`min_gain_per_kstep` is a plateau per unit of compute: the controller answers True, which ends
the stage like early stopping (`loop.fit`, stop_reason "on_eval"), and every eval's decision
(continue or leave) is kept with the numbers that caused it. Early stopping (eval patience) waits
for no improvement at all; this leaves when improvements are too small for what they cost.

What is not here yet: the pipeline's `--config.schedule=auto` wiring, the learned (bandit) policy
over more actions (run DAPT or not, unfreeze, lower the learning rate) and its benchmark.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from absl import logging

from r1jax import eval as eval_lib
from r1jax.train import loop as loop_lib

CONTINUE, LEAVE = "continue", "leave_stage"


@dataclasses.dataclass(frozen=True)
class Decision:
  """One eval's decision and the numbers behind it (gain None until `window` evals exist)."""
  step: int
  action: str
  metric: str
  value: float
  best: float
  gain_per_kstep: float | None
  reason: str

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class PlateauController:
  """`loop.fit`'s on_eval hook: True (leave the stage) once the best eval score has improved by
  less than `min_gain_per_kstep` per 1000 steps over the last `window` evals."""

  def __init__(self, *, metric: str = "loss", window: int = 2, min_gain_per_kstep: float = 0.01,
               stage: str = ""):
    if window < 1:
      raise ValueError(f"window={window}: compare with at least the previous eval (>= 1).")
    if not min_gain_per_kstep >= 0:
      raise ValueError(f"min_gain_per_kstep={min_gain_per_kstep}: must be >= 0.")
    self.metric, self.window, self.min_gain = metric, window, float(min_gain_per_kstep)
    self.stage = stage
    self.decisions: list[Decision] = []
    self._history: list[tuple[int, float]] = []  # (step, best score so far) per eval

  def __call__(self, step: int, metrics: Mapping[str, float]) -> bool:
    score = loop_lib.selection_score(metrics, self.metric)
    best = min(score, self._history[-1][1]) if self._history else score
    self._history.append((int(step), best))
    sign = loop_lib.selection_score({self.metric: 1.0}, self.metric)  # report in its own terms
    gain, action = None, CONTINUE
    if len(self._history) <= self.window:
      reason = f"fewer than {self.window + 1} evals: no rate yet"
    else:
      then_step, then_best = self._history[-1 - self.window]
      gain = (then_best - best) / max(step - then_step, 1) * 1000.0
      if gain < self.min_gain:
        action = LEAVE
        reason = (f"best {self.metric} improved {then_best - best:.4g} over steps {then_step}-"
                  f"{step}: {gain:.4g} per 1000 steps < {self.min_gain:g}")
      else:
        reason = f"{gain:.4g} per 1000 steps >= {self.min_gain:g}"
    decision = Decision(step=int(step), action=action, metric=self.metric,
                        value=float(metrics[self.metric]), best=sign * best,
                        gain_per_kstep=gain, reason=reason)
    self.decisions.append(decision)
    if action == LEAVE:
      logging.info("Schedule%s: leaving the stage at step %d (%s).",
                   f" ({self.stage})" if self.stage else "", step, reason)
    return action == LEAVE

  def to_json(self) -> list[dict[str, Any]]:
    return [d.to_json() for d in self.decisions]

  def table(self) -> str:
    """Every decision as a markdown table (for a stage's report)."""
    rows = [(d.step, d.action, d.value, d.best,
             math.nan if d.gain_per_kstep is None else d.gain_per_kstep, d.reason)
            for d in self.decisions]
    return eval_lib.markdown_table(("step", "decision", self.metric, f"best {self.metric}",
                                    "gain / 1000 steps", "why"), rows)
