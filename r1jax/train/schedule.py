"""Stage transitions decided by the run (issue #26, part 2): at a plateau of a stage's eval metric
per unit of compute, unfreeze more layers, lower the learning rate, or leave the stage.

    controller = schedule.PlateauController(metric="loss", window=2, min_gain_per_kstep=0.05,
                                            policy="adaptive", relative=0.25, log_path=PATH)
    finetune.run(config, workdir, on_eval=controller)   # any stage that takes loop.fit's on_eval
    controller.decisions                                # one Decision per eval, with its numbers
    controller.table()                                  # the same as a markdown table

At each eval the controller takes the selection score (`loop.selection_score`: lower is better,
an accuracy negated) and compares the best score so far with the best score `window` evals
earlier: gain = (best then - best now) per 1000 optimizer steps between those evals. A gain under
the threshold is a plateau per unit of compute, and the controller acts, the first that applies:
- "unfreeze" while the stage has frozen layers it can still unfreeze (`unfreezes_left` > 0, set by
  a finetuning with phases before each phase): True, which ends the phase like early stopping,
  and the finetuning goes on with its next phase, one more layer trained (`finetune_phases`);
- "lower_lr" while fewer than `max_lr_drops` drops were made: `loop.EvalAction(lr_factor=...)`,
  the learning rate times `lr_factor` from the next step on (ReduceLROnPlateau; the factor is
  optimizer state, `optim.scale_lr`);
- "leave_stage": True, which ends the stage like early stopping (`loop.fit`, stop_reason
  "on_eval").
After an unfreeze or a lower_lr the rate is measured from that eval on (at least one eval after
it, at most `window`), so the next decision sees what the change did. Every eval's decision is
kept with the numbers that caused it (and the learning rate from then on, when the loop gives
it). Early stopping (eval patience) waits for no improvement at all; this acts when improvements
are too small for what they cost.

The threshold, by `policy`:
- "rule": a fixed `min_gain_per_kstep` in the metric's own units (the rule-based fallback).
- "adaptive": `relative` x the highest gain per 1000 steps this stage has shown so far, so one
  setting serves a masked-LM loss and a dev accuracy alike: a stage leaves once it gains less than
  a quarter (say) of what it gained at its best. While the stage has shown no positive gain yet
  (its first rate, or a metric that never improved), the rule's threshold decides.

Resumable: with `log_path` every decision is written (atomically) as it is made, and a controller
built on an existing log takes its decisions back. A run killed after its last checkpoint resumes
from that checkpoint and evaluates again from there, so at its first eval the controller drops the
logged decisions from that step on (they belong to the lost steps) and decides them afresh: with
exact resumption (`loop.fit`) the same metrics give the same decisions, as metrics.jsonl is cut
back to the checkpoint by `metrics.MetricsWriter`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from absl import logging

from r1jax import eval as eval_lib
from r1jax import run_dir
from r1jax.train import loop as loop_lib

CONTINUE, UNFREEZE, LOWER_LR, LEAVE = "continue", "unfreeze", "lower_lr", "leave_stage"
ACTIONS = (UNFREEZE, LOWER_LR)  # decisions that change the training and let it go on
POLICIES = ("adaptive", "rule")
_NUMBERS = ("value", "best", "gain_per_kstep", "threshold")


@dataclasses.dataclass(frozen=True)
class Decision:
  """One eval's decision and the numbers behind it (gain None until `window` evals exist;
  threshold: the gain per 1000 steps it was compared with)."""
  step: int
  action: str
  metric: str
  value: float
  best: float
  gain_per_kstep: float | None
  reason: str
  threshold: float | None = None
  policy: str = "rule"
  learning_rate: float | None = None  # the rate from the next step on (None: not given)
  lr_factor: float | None = None      # lower_lr: the factor applied

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class PlateauController:
  """`loop.fit`'s on_eval hook: acts (unfreeze, lower_lr, leave the stage) once the best eval
  score has improved by less than the policy's threshold per 1000 steps over the last `window`
  evals. `unfreezes_left`: how many more phases a finetuning can unfreeze (it sets this)."""

  def __init__(self, *, metric: str = "loss", window: int = 2, min_gain_per_kstep: float = 0.01,
               stage: str = "", policy: str = "rule", relative: float = 0.25,
               lr_factor: float = 0.3, max_lr_drops: int = 0, log_path: str | None = None):
    if window < 1:
      raise ValueError(f"window={window}: compare with at least the previous eval (>= 1).")
    if not min_gain_per_kstep >= 0:
      raise ValueError(f"min_gain_per_kstep={min_gain_per_kstep}: must be >= 0.")
    if policy not in POLICIES:
      raise ValueError(f"policy={policy!r}: one of {POLICIES}.")
    if not 0.0 < relative < 1.0:
      raise ValueError(f"relative={relative}: a fraction of the best rate, in (0, 1).")
    if not 0.0 < lr_factor < 1.0:
      raise ValueError(f"lr_factor={lr_factor}: the learning rate's multiplier, in (0, 1).")
    if max_lr_drops < 0:
      raise ValueError(f"max_lr_drops={max_lr_drops}: must be >= 0.")
    self.metric, self.window, self.min_gain = metric, window, float(min_gain_per_kstep)
    self.stage, self.policy, self.relative = stage, policy, float(relative)
    self.lr_factor, self.max_lr_drops = float(lr_factor), int(max_lr_drops)
    self.unfreezes_left = 0
    self.log_path = log_path
    self.decisions: list[Decision] = []
    self._history: list[tuple[int, float]] = []  # (step, best score so far) per eval
    self._resumed = False
    if log_path:
      self._load(log_path)

  def settings(self) -> dict[str, Any]:
    return {"metric": self.metric, "window": self.window, "min_gain_per_kstep": self.min_gain,
            "policy": self.policy, "relative": self.relative, "lr_factor": self.lr_factor,
            "max_lr_drops": self.max_lr_drops}

  def _load(self, path: str) -> None:
    saved = run_dir.read_json(path)
    if not saved or not saved.get("decisions"):
      return
    if saved.get("settings") != self.settings():
      logging.warning("Schedule log %s was written with settings %s, not %s: its decisions are "
                      "kept in the file's history but not used.", path, saved.get("settings"),
                      self.settings())
      return
    for d in saved["decisions"]:  # run_dir.json_ready wrote NaN / inf as strings
      self._append(Decision(**{k: float(v) if k in _NUMBERS and isinstance(v, str) else v
                               for k, v in d.items()}))
    self._resumed = True
    logging.info("Schedule%s: %d earlier decisions taken back from %s.", self._label(),
                 len(self.decisions), path)

  def _label(self) -> str:
    return f" ({self.stage})" if self.stage else ""

  def _append(self, decision: Decision) -> None:
    sign = loop_lib.selection_score({self.metric: 1.0}, self.metric)
    self.decisions.append(decision)
    self._history.append((decision.step, sign * decision.best))

  def _peak_rate(self, gain: float) -> float | None:
    """The highest gain per 1000 steps so far, this eval's included; None if none is positive."""
    peak = max([gain] + [d.gain_per_kstep for d in self.decisions
                         if d.gain_per_kstep is not None])
    return peak if peak > 0 else None

  def __call__(self, step: int, metrics: Mapping[str, float]) -> bool:
    step = int(step)
    if self._resumed:  # the first eval after a resume: what was decided from here on is redone
      dropped = [d for d in self.decisions if d.step >= step]
      if dropped:
        logging.info("Schedule%s: resumed before step %d; its %d logged decisions from there on "
                     "are made again.", self._label(), dropped[0].step, len(dropped))
        keep = self.decisions[:len(self.decisions) - len(dropped)]
        self.decisions, self._history = [], []
        for d in keep:
          self._append(d)
      self._resumed = False
    score = loop_lib.selection_score(metrics, self.metric)
    best = min(score, self._history[-1][1]) if self._history else score
    sign = loop_lib.selection_score({self.metric: 1.0}, self.metric)  # report in its own terms
    gain, threshold, action, policy = None, None, CONTINUE, self.policy
    # The rate's start: `window` evals back, or the last unfreeze / lower_lr if more recent.
    acted = [i for i, d in enumerate(self.decisions) if d.action in ACTIONS]
    base = max(len(self._history) - self.window, acted[-1] if acted else -1)
    if base < 0:
      reason = f"fewer than {self.window + 1} evals: no rate yet"
    else:
      then_step, then_best = self._history[base]
      gain = (then_best - best) / max(step - then_step, 1) * 1000.0
      peak = self._peak_rate(gain) if self.policy == "adaptive" else None
      if peak is not None:
        threshold = self.relative * peak
        why = f"{self.relative:g} x the best rate {peak:.4g}"
      else:  # the rule, or adaptive before the stage has shown any gain
        threshold, policy = self.min_gain, "rule"
        why = "the rule's minimum" + (" (no gain yet)" if self.policy == "adaptive" else "")
      if gain < threshold:
        action = self._plateau_action()
        reason = (f"best {self.metric} improved {then_best - best:.4g} over steps {then_step}-"
                  f"{step}: {gain:.4g} per 1000 steps < {threshold:.4g} ({why})")
      else:
        reason = f"{gain:.4g} per 1000 steps >= {threshold:.4g} ({why})"
    rate = metrics.get("learning_rate")
    factor = self.lr_factor if action == LOWER_LR else None
    if action == UNFREEZE:
      reason += f"; unfreeze: the next phase trains more layers ({self.unfreezes_left} left)"
    elif action == LOWER_LR:
      drops = sum(d.action == LOWER_LR for d in self.decisions) + 1
      reason += (f"; learning rate x{factor:g} (drop {drops} of {self.max_lr_drops})" +
                 (f": {rate:.4g} -> {rate * factor:.4g}" if rate is not None else ""))
    decision = Decision(step=step, action=action, metric=self.metric,
                        value=float(metrics[self.metric]), best=sign * best,
                        gain_per_kstep=gain, reason=reason, threshold=threshold, policy=policy,
                        learning_rate=None if rate is None else float(rate) * (factor or 1.0),
                        lr_factor=factor)
    self._append(decision)
    if self.log_path:
      self.save(self.log_path)
    if action != CONTINUE:
      logging.info("Schedule%s: %s at step %d (%s).", self._label(), action, step, reason)
    if action == LOWER_LR:
      return loop_lib.EvalAction(lr_factor=self.lr_factor)
    return action in (UNFREEZE, LEAVE)

  def _plateau_action(self) -> str:
    """At a plateau: unfreeze while layers can be, then lower the rate, then leave."""
    if self.unfreezes_left > 0:
      return UNFREEZE
    if sum(d.action == LOWER_LR for d in self.decisions) < self.max_lr_drops:
      return LOWER_LR
    return LEAVE

  def save(self, path: str) -> None:
    """The decision log as JSON: {"stage", "settings", "decisions", "left_at"}."""
    run_dir.write_json(path, {"stage": self.stage, "settings": self.settings(),
                              "decisions": self.to_json(), "left_at": self.left_at})

  @property
  def left_at(self) -> int | None:
    """The step at which the controller ended the stage (None: it has not)."""
    return next((d.step for d in self.decisions if d.action == LEAVE), None)

  def to_json(self) -> list[dict[str, Any]]:
    return [d.to_json() for d in self.decisions]

  def table(self) -> str:
    """Every decision as a markdown table (for a stage's report)."""
    return eval_lib.markdown_table(*decision_rows(self.to_json(), self.metric))


def decision_rows(decisions: list[Mapping[str, Any]], metric: str
                  ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
  """(headers, rows) of a decision log (`PlateauController.to_json()` or its saved file)."""
  def num(x):
    return math.nan if x is None else float(x)
  rows = [(d["step"], d["action"], d["value"], d["best"], num(d.get("gain_per_kstep")),
           num(d.get("threshold")), num(d.get("learning_rate")), d["reason"]) for d in decisions]
  return (("step", "decision", metric, f"best {metric}", "gain / 1000 steps", "threshold",
           "learning rate", "why"), rows)


def lowers_lr(hook: Any) -> bool:
  """Whether `hook` (a stage's on_eval) may lower the learning rate: the stage then builds its
  optimizer with a learning-rate factor (`optim.build_optimizer(..., adjustable_lr=True)`)."""
  return isinstance(hook, PlateauController) and hook.max_lr_drops > 0


def read_log(path: str) -> dict[str, Any] | None:
  """A saved decision log ({"stage", "settings", "decisions", "left_at"}), None if absent."""
  return run_dir.read_json(path) if os.path.exists(path) else None
