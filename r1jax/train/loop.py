"""The training loop every training stage runs: steps, logging, eval, early stopping, checkpoints.

    result = fit(engine, state, train_iter, options=LoopOptions.from_config(config, ...),
                 checkpointer=ckpt, writer=writer, evaluate=lambda params: {...},
                 on_eval=lambda step, metrics: should_stop)

The loop only dispatches steps; the host fetches metrics at log/eval/checkpoint points (and every
`max_pending` steps), checks the NaN/inf flag of each step there, and sums metrics over the log window.
Host-side loop state (the partial log window, best eval, patience counter, skip count) is saved in
every checkpoint, so a resumed run writes the same metrics.jsonl records as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import numpy as np

from r1jax import distributed
from r1jax import remote
from r1jax import run_dir
from r1jax.model import axes
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim
from r1jax.train import steps as steps_lib
from r1jax.train.state import TrainState


class NonFiniteError(FloatingPointError):
  """A step produced a NaN/inf loss or gradient (and train.skip_nonfinite is False)."""


# Train-record fields measured over the wall-clock window since the previous log (the first call
# after a start or an eval is not in it): they differ between a run and its resumed twin.
TIMING_FIELDS = ("tokens_per_sec", "steps_per_sec", "mfu", "real_token_fraction",
                 "mfu_real_tokens")


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  num_steps: int
  log_every: int = 10
  eval_every: int = 0                 # 0: only the final eval
  checkpoint_every: int = 500
  early_stopping_patience: int = 0    # evals without improvement; 0 disables
  early_stopping_min_delta: float = 0.0  # what counts as an improvement for the patience (in the
                                      # metric's units); the best step still takes any gain
  skip_nonfinite: bool = False
  tokens_per_step: int = 0            # global tokens per step when constant (else counted)
  flops_per_step: float = 0.0         # model training FLOPs per step (global batch), for MFU
  peak_flops: float = 0.0             # all devices; 0: no MFU
  progress_bar: bool = True
  sigterm_grace_secs: float = 60.0
  max_pending: int = 50               # fetch metrics at least this often (bounds device memory)
  deadline: float = 0.0               # time.time() at which training stops (evaluated and
                                      # checkpointed, like early stopping); 0 = none
  best_metric: str = "loss"           # eval metric that picks the best step and drives patience

  @classmethod
  def from_config(cls, config: Any, *, num_steps: int, flops_per_step: float = 0.0,
                  peak_flops: float = 0.0, tokens_per_step: int = 0,
                  deadline: float = 0.0) -> "LoopOptions":
    return cls(num_steps=num_steps, deadline=deadline, log_every=config.train.log_every_steps,
               eval_every=config.eval.every_steps, checkpoint_every=config.checkpoint.every_steps,
               early_stopping_patience=config.eval.early_stopping_patience,
               early_stopping_min_delta=config.eval.get("early_stopping_min_delta", 0.0),
               skip_nonfinite=config.train.skip_nonfinite, tokens_per_step=tokens_per_step,
               flops_per_step=flops_per_step, peak_flops=peak_flops,
               progress_bar=config.train.progress_bar,
               sigterm_grace_secs=config.checkpoint.sigterm_grace_secs,
               best_metric=config.eval.get("best_metric", "loss"))


@dataclasses.dataclass(frozen=True)
class EvalAction:
  """What an on_eval hook may return instead of a bool: stop, and/or multiply the learning rate
  by `lr_factor` from the next step on (the optimizer needs `optim.build_optimizer(...,
  adjustable_lr=True)`; the factor is optimizer state, checkpointed with the rest)."""
  stop: bool = False
  lr_factor: float = 1.0


def selection_score(result: Mapping[str, float], metric: str) -> float:
  """An eval result's score for `metric`, lower is better: a loss as it is (names ending in loss,
  nll or perplexity), any other metric (accuracy, F1) negated."""
  if metric not in result:
    raise ValueError(f"eval.best_metric={metric!r} is not among this stage's eval metrics "
                     f"{sorted(result)}.")
  value = float(result[metric])
  return value if metric.endswith(("loss", "nll", "perplexity")) else -value


@dataclasses.dataclass
class LoopState:
  """Host-side state saved with each checkpoint (JSON)."""
  window: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # name -> [sum, count]
  window_steps: int = 0
  best_eval_loss: float | None = None  # eval loss at best_step
  best_score: float | None = None      # selection_score at best_step (lower is better)
  best_step: int | None = None
  evals_without_improvement: int = 0
  patience_score: float | None = None  # the score that last reset the patience (by > min_delta)
  nonfinite_skips: int = 0
  stopped_early: bool = False
  stop_reason: str = ""               # why stopped_early: early_stopping | on_eval | time_budget
  last_train: dict[str, Any] | None = None
  last_eval: dict[str, Any] | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any] | None) -> "LoopState":
    return cls(**dict(data or {}))


@dataclasses.dataclass
class FitResult:
  state: TrainState
  loop: LoopState
  step: int
  wall_secs: float
  last_checkpoint: int | None


def _add_to_window(window: dict[str, list[float]], metrics: Mapping[str, Any]) -> None:
  for name, (total, count) in metrics.items():
    acc = window.setdefault(name, [0.0, 0.0])
    acc[0] += float(total)
    acc[1] += float(count)


def fit(engine: steps_lib.Engine, state: TrainState, train_iter: Iterator[Mapping[str, Any]], *,
        options: LoopOptions, checkpointer: ckpt_lib.Checkpointer,
        writer: metrics_lib.MetricsWriter,
        evaluate: Callable[[Any], dict[str, float]] | None = None,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None,
        loop_state: LoopState | None = None, start_step: int | None = None) -> FitResult:
  """Trains `state` until `options.num_steps`, early stopping, or preemption.

  Args:
    engine: compiled steps.
    state: initial or restored state.
    train_iter: yields local (per-process) numpy batches; `get_state()` (if present) is saved.
    options: loop settings.
    checkpointer, writer: where checkpoints and metrics go.
    evaluate: params -> {"loss": ..., ...} on held-out data (also run at the end).
    on_eval: hook called after each eval with (step, metrics; with the engine's learning rate for
      the next step as "learning_rate"); returning True stops training (e.g. an optuna pruner),
      an `EvalAction` may also lower the learning rate. Early stopping on eval loss is built in.
    loop_state: host state restored from the checkpoint (None for a fresh run).
    start_step: `state.step` as a host int if already known (avoids one fetch).
  Raises:
    NonFiniteError: a NaN/inf step with skip_nonfinite=False (the message names the step and the
      last good checkpoint).
    checkpoint.Preempted: after saving on SIGTERM (exits the process with code 143).
  """
  loop = loop_state or LoopState()
  step = int(jax.device_get(state.step)) if start_step is None else start_step
  last_ckpt = checkpointer.latest_step()
  pending: list[tuple[int, int, Any]] = []  # (last step, steps in the call, metrics)
  watcher = ckpt_lib.PreemptionWatcher(options.sigterm_grace_secs)
  per_call = max(1, getattr(engine, "steps_per_call", 1))
  if per_call > 1:
    logging.info("Running up to %d optimizer steps per jitted call (train.steps_per_call; calls "
                 "stop at every log, eval and checkpoint step).", per_call)
  bar = metrics_lib.ProgressBar(options.num_steps, initial=step, enabled=options.progress_bar)
  get_data_state = getattr(train_iter, "get_state", None)
  started = time.time()
  clock = None          # throughput clock: starts once the first step (compilation) is done
  clock_steps = clock_tokens = clock_slots = 0
  process_count = jax.process_count()

  def flush() -> None:
    """Fetches pending step metrics; NaN/inf check; sums into the log window."""
    if not pending:
      return
    fetched = jax.device_get([m for _, _, m in pending])
    for (last, n, _), m_call in zip(pending, fetched):
      for i in range(n):
        s = last - n + 1 + i
        m = m_call if n == 1 else jax.tree.map(lambda x, i=i: x[i], m_call)
        if float(m["nonfinite"][0]) > 0:
          if not options.skip_nonfinite:
            checkpointer.wait()
            good = checkpointer.latest_step()
            where = (f"the last good checkpoint is step {good} in {checkpointer.directory} "
                     f"(rerunning resumes from it)" if good is not None else
                     "no checkpoint was saved yet")
            raise NonFiniteError(
                f"Non-finite loss or gradient at step {s} (loss={float(m['loss'][0])}, "
                f"grad_norm={float(m['grad_norm'][0])}); the update was not applied and {where}. "
                f"Lower train.learning_rate, check the data, or set train.skip_nonfinite=True.")
          loop.nonfinite_skips += 1
          logging.warning("Skipped step %d: non-finite loss/gradient (%d skipped so far).", s,
                          loop.nonfinite_skips)
          continue
        _add_to_window(loop.window, {k: v for k, v in m.items() if k != "nonfinite"})
        loop.window_steps += 1
    pending.clear()

  def save(score: float | None = None) -> None:
    nonlocal last_ckpt
    flush()  # never save past a NaN step unnoticed
    data_state = get_data_state() if get_data_state else None
    last_ckpt = checkpointer.save(state, data_state=data_state, meta={"loop": loop.to_json()},
                                  score=score)

  try:
    while step < options.num_steps and not loop.stopped_early:  # (a restored run may have stopped)
      # Several steps per call only where no log/eval/checkpoint point falls inside the call.
      room = _steps_to_next_event(step, options, evaluate is not None)
      want = per_call if room >= per_call else 1
      batches = []
      for _ in range(want):
        try:
          batches.append(next(train_iter))
        except StopIteration:
          break
      if not batches:
        logging.warning("Training data ran out at step %d of %d; stopping.", step, options.num_steps)
        break
      # Cut the padding (engine.length_buckets); the throughput figures count what is computed.
      batches = engine.trim(batches) if hasattr(engine, "trim") else batches
      if len(batches) > 1 and len(batches) == per_call:
        state, metrics = engine.train_steps(state, batches)
        step += len(batches)
        pending.append((step, len(batches), metrics))
      else:  # one step, or the data ran out part-way through a call: the rest one at a time
        for batch in batches:
          state, metrics = engine.train_step(state, batch)
          step += 1
          pending.append((step, 1, metrics))
      if clock is None:
        jax.block_until_ready(metrics)
        clock = time.time()
      else:
        clock_steps += len(batches)
        clock_tokens += sum(options.tokens_per_step or steps_lib.tokens_in(b) * process_count
                            for b in batches)
        clock_slots += sum(np.size(b["tokens"]) * process_count for b in batches
                           if "token_mask" in b and "tokens" in b)
      is_last = step == options.num_steps
      is_log = step % options.log_every == 0 or is_last
      is_eval = evaluate is not None and (is_last or (options.eval_every and
                                                      step % options.eval_every == 0))
      is_ckpt = step % options.checkpoint_every == 0 or is_last
      preempt = watcher.should_stop(step)
      # Checked where every process stops anyway (a log, eval or checkpoint step), with process
      # 0's clock deciding for all: processes must leave the loop at the same step.
      out_of_time = (bool(options.deadline) and not is_last and (is_log or is_eval or is_ckpt)
                     and bool(distributed.agree(float(time.time() >= options.deadline))))
      if out_of_time:  # stop like early stopping: evaluated, checkpointed
        is_eval, is_ckpt = evaluate is not None, True
      if (is_log or is_eval or is_ckpt or preempt or out_of_time or
          sum(n for _, n, _ in pending) >= options.max_pending):
        flush()

      if is_log and loop.window_steps:
        record = steps_lib.normalize(loop.window)
        if "learning_rate" in loop.window:  # report the current rate, not the window mean
          record["learning_rate"] = float(np.ravel(jax.device_get(metrics["learning_rate"][0]))[-1])
        elapsed = time.time() - clock if clock else 0.0
        if elapsed > 0 and clock_steps:
          record["tokens_per_sec"] = clock_tokens / elapsed
          record["steps_per_sec"] = clock_steps / elapsed
          if options.flops_per_step and options.peak_flops:
            record["mfu"] = options.flops_per_step * clock_steps / elapsed / options.peak_flops
          if clock_slots and not options.tokens_per_step:
            # Share of the token positions holding a real token (the rest is padding), and the
            # MFU counting only those: the figure that says how much of the step was useful.
            record["real_token_fraction"] = clock_tokens / clock_slots
            if "mfu" in record:
              record["mfu_real_tokens"] = record["mfu"] * record["real_token_fraction"]
        record["nonfinite_skips"] = loop.nonfinite_skips
        writer.write(step, "train", record)
        loop.last_train = dict(record, step=step)
        bar.update_to(step, loss=record.get("loss", math.nan),
                      tok_s=record.get("tokens_per_sec", 0.0))
        loop.window, loop.window_steps = {}, 0
        clock, clock_steps, clock_tokens, clock_slots = time.time(), 0, 0, 0

      score = None
      if is_eval:
        result = evaluate(state.params)
        score = selection_score(result, options.best_metric)
        writer.write(step, "eval", result)
        loop.last_eval = dict(result, step=step)
        if loop.best_score is None and loop.best_eval_loss is not None:  # a run saved before
          loop.best_score = loop.best_eval_loss                          # best_score existed
        if loop.patience_score is None:      # a run saved before patience_score existed
          loop.patience_score = loop.best_score
        improved = loop.best_score is None or score < loop.best_score
        if improved:
          loop.best_score, loop.best_eval_loss, loop.best_step = score, result["loss"], step
        if (loop.patience_score is None
            or score < loop.patience_score - options.early_stopping_min_delta):
          loop.patience_score, loop.evals_without_improvement = score, 0
        else:
          loop.evals_without_improvement += 1
        logging.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in result.items()))
        stop = False
        if on_eval is not None:
          rate = engine.learning_rate(state) if hasattr(engine, "learning_rate") else None
          answer = on_eval(step, result if rate is None else dict(result, learning_rate=rate))
          if isinstance(answer, EvalAction) and answer.lr_factor != 1.0:
            state = state.replace(opt_state=optim.scale_lr(state.opt_state, answer.lr_factor))
            logging.info("Learning rate x%g from step %d on (%s -> %s).", answer.lr_factor, step,
                         rate, engine.learning_rate(state) if rate is not None else None)
            is_ckpt = True  # a resumed run restores the lowered rate, not the decision
          stop = answer.stop if isinstance(answer, EvalAction) else bool(answer)
        if stop:
          loop.stop_reason = "on_eval"
        patience = options.early_stopping_patience
        if patience and loop.evals_without_improvement >= patience:
          logging.info("Early stopping at step %d: eval %s has not improved on %.4f (step %d) "
                       "for %d evals.", step, options.best_metric,
                       abs(loop.best_score) if loop.best_score is not None else math.nan,
                       loop.best_step, patience)
          stop, loop.stop_reason = True, "early_stopping"
        if stop:
          loop.stopped_early = True
        if improved or stop:
          is_ckpt = True
        clock = time.time()

      if out_of_time and not loop.stopped_early:
        logging.warning("Stopping at step %d of %d: the time budget (train.time_budget_minutes) "
                        "is spent.", step, options.num_steps)
        loop.stopped_early, loop.stop_reason = True, "time_budget"
      if is_ckpt or preempt:
        save(score)
        clock = time.time() if clock is not None else None
      if preempt:
        checkpointer.wait()
        bar.close()
        raise ckpt_lib.Preempted(step)
      if loop.stopped_early:
        break
    flush()
    checkpointer.wait()
  finally:
    watcher.close()
    bar.close()
    writer.flush()
  return FitResult(state=state, loop=loop, step=step, wall_secs=time.time() - started,
                   last_checkpoint=last_ckpt)


def _steps_to_next_event(step: int, options: LoopOptions, evaluates: bool) -> int:
  """Steps from `step` to the next log, eval, checkpoint point or the end (>= 1)."""
  periods = [options.log_every, options.checkpoint_every]
  if evaluates and options.eval_every:
    periods.append(options.eval_every)
  return min([options.num_steps - step] + [p - step % p for p in periods if p > 0])


MAX_AUTO_STEPS_PER_CALL = 16


def steps_per_call(config: Any, platform: str | None = None) -> int:
  """Optimizer steps per jitted call for a stage: `train.steps_per_call`, or the automatic choice.

  Automatic (0): on CPU the largest n <= 16 that divides the log, eval and checkpoint periods, so a
  call never straddles one of them (XLA:CPU maps and page-faults its scratch buffer afresh at every
  call; n steps per call pay that once: +27% tokens/s for the small model at n = 5, about 5% more
  at n = 10, bench/NOTES.md changes 20 and 23); elsewhere 1 (a GPU or TPU step does not pay it,
  and a GPU while loop may sync per trip). A call of n steps holds n batches and reports progress
  once, so n stays small next to the log period.
  """
  requested = int(config.train.get("steps_per_call", 0))
  if requested < 0:
    raise ValueError(f"train.steps_per_call={requested}: use a positive number of optimizer steps "
                     f"per jitted call, or 0 to choose automatically.")
  if requested:
    return requested
  if (platform or jax.default_backend()) != "cpu":
    return 1
  periods = [config.train.log_every_steps, config.checkpoint.every_steps]
  if "eval" in config and config.eval.every_steps > 0:
    periods.append(config.eval.every_steps)
  common = math.gcd(*[int(p) for p in periods if p > 0])
  if common == 0:
    return MAX_AUTO_STEPS_PER_CALL
  return max(n for n in range(1, MAX_AUTO_STEPS_PER_CALL + 1) if common % n == 0)


# ------------------------------------------------------------------------------------------------
# Time budgets: steps sized from the measured step rate.

# Share of a time budget the optimizer steps may take; evals and checkpoints take the rest.
BUDGET_TRAIN_SHARE = 0.85
# The loop stops at this multiple of the budget even if the measured rate was optimistic.
BUDGET_HARD_STOP = 1.25


def measure_step_rate(engine: steps_lib.Engine, state: TrainState,
                      batches: Iterator[Mapping[str, Any]], *, min_secs: float = 2.0,
                      max_calls: int = 8) -> float:
  """Optimizer steps per second of `engine` on `batches`: one untimed call (compilation), then
  calls of `steps_per_call` steps until `min_secs` pass (at most `max_calls`). `state` is used up
  (its buffers may be donated): pass a throwaway one."""
  per_call = max(1, getattr(engine, "steps_per_call", 1))

  def call(state):
    group = [next(batches) for _ in range(per_call)]
    if per_call > 1:
      state, metrics = engine.train_steps(state, group)
    else:
      state, metrics = engine.train_step(state, group[0])
    jax.block_until_ready(metrics)
    return state

  state = call(state)
  started, calls = time.perf_counter(), 0
  while calls < max_calls and (calls == 0 or time.perf_counter() - started < min_secs):
    state = call(state)
    calls += 1
  return calls * per_call / (time.perf_counter() - started)


def budget_steps(config: Any, workdir: str, num_steps: int, measure: Callable[[], float],
                 started: float | None = None, minimum: int = 1
                 ) -> tuple[int, dict[str, Any] | None]:
  """(num_steps, budget record): the planned steps, or fewer when what is left of
  `train.time_budget_minutes` (the run began at `started`, a time.time(); None = now) cannot
  hold them at the rate `measure()` returns (steps/s). A rerun in the same workdir reuses the
  first attempt's decision (DIR/config.json `resolved.budget`) whatever time it is given, so the
  schedule and the phases do not change on resume. Never fewer than `minimum` steps."""
  minutes = float(config.train.get("time_budget_minutes", 0.0) or 0.0)
  if minutes <= 0:
    return num_steps, None
  saved = ((run_dir.read_json(os.path.join(workdir, run_dir.CONFIG_FILE)) or {})
           .get("resolved", {}).get("budget"))
  if saved and saved.get("planned_steps") == num_steps:
    return int(saved["num_steps"]), saved
  rate = distributed.agree(measure())  # every process plans the same steps
  left = minutes * 60.0 - (time.time() - started if started is not None else 0.0)
  fits = int(rate * max(left, 0.0) * BUDGET_TRAIN_SHARE)
  steps = min(num_steps, max(minimum, fits))
  logging.info("Time budget %.2f min at %.1f steps/s: %d of the %d planned steps%s.", minutes,
               rate, steps, num_steps, "" if steps == num_steps else " (fewer, to fit)")
  return steps, {"minutes": minutes, "steps_per_sec": rate, "secs_left": left,
                 "planned_steps": num_steps, "num_steps": steps}


def deadline_of(config: Any, started: float) -> float:
  """The loop's hard stop for a run that started at `started` (time.time()); 0 = no budget."""
  minutes = float(config.train.get("time_budget_minutes", 0.0) or 0.0)
  return started + BUDGET_HARD_STOP * minutes * 60.0 if minutes > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# The part of a training stage's run() that is the same for every stage.


def engine_for(config: Any, *, mesh: Any, tx: Any, init_params: Callable[[jax.Array], Any],
               loss_fn: Callable[..., Any], num_steps: int | None = None,
               init_extras: Callable[[], Any] = dict, eval_loss_fn: Callable[..., Any] | None = None,
               lr_schedule: Callable[[Any], Any] | None = None,
               length_buckets: int = 0) -> steps_lib.Engine:
  """A training stage's Engine: the model and loss are the stage's; the global batch, gradient
  accumulation and steps per call come from `config.train`, `length_buckets` cuts batches'
  padding (`steps_lib.Engine`), the logical->mesh rules are the defaults, and the learning-rate
  schedule (logged) is `train`'s over `num_steps` unless given.
  A warmup clamped to the run's `num_steps` (optim.warmup_steps) is logged here, once per run."""
  if num_steps is not None and optim.warmup_clamped(config.train, num_steps):
    logging.info("train.warmup_steps=%d is not shorter than this run's %d steps: warming up for %d "
                 "(train.warmup_fraction=%g of them).", config.train.warmup_steps, num_steps,
                 optim.warmup_steps(config.train, num_steps), config.train.warmup_fraction)
  if lr_schedule is None and num_steps is not None:
    lr_schedule = optim.make_schedule(config.train, num_steps)
  return steps_lib.Engine(
      mesh=mesh, rules=axes.DEFAULT_RULES, tx=tx, init_params=init_params, init_extras=init_extras,
      batch_size=config.train.batch_size, accum_steps=config.train.grad_accum_steps,
      steps_per_call=steps_per_call(config), loss_fn=loss_fn, eval_loss_fn=eval_loss_fn,
      lr_schedule=lr_schedule, length_buckets=length_buckets)


def checkpointer_for(config: Any, directory: str) -> ckpt_lib.Checkpointer:
  """The Checkpointer of a training run's `checkpoint` config section, saving to `directory`."""
  return ckpt_lib.Checkpointer(directory, max_to_keep=config.checkpoint.max_to_keep,
                               keep_best=config.checkpoint.keep_best,
                               async_save=config.checkpoint.async_save)


def resume_and_fit(config: Any, *, engine: steps_lib.Engine,
                   train_iter: Iterator[Mapping[str, Any]], init_state: Callable[[], TrainState],
                   options: LoopOptions, checkpoint_dir: str, metrics_dir: str,
                   metrics_tags: Mapping[str, Any] | None = None,
                   evaluate: Callable[[Any], dict[str, float]] | None = None,
                   on_eval: Callable[[int, dict[str, float]], bool] | None = None
                   ) -> tuple[FitResult, int]:
  """Restore-or-init, then `fit`; returns (the fit result, the step it started from).

  Resuming: the newest good checkpoint in `checkpoint_dir` gives the state, the data iterator state
  (`train_iter.set_state`) and the host loop state; `metrics_dir`'s metrics.jsonl/TensorBoard are
  cut back to it (`metrics_tags` are added to every record). `init_state()` is only called for a
  fresh run (it may load `init_from` parameters). A restored run that had stopped early trains no
  further: `fit` returns at once.
  """
  checkpointer = checkpointer_for(config, checkpoint_dir)
  writer = None
  try:
    restored = checkpointer.restore(engine.abstract_state())
    if restored is not None:
      state, start = restored.state, restored.step
      if restored.data_state is not None and hasattr(train_iter, "set_state"):
        train_iter.set_state(restored.data_state)
      loop_state = LoopState.from_json(restored.meta.get("loop"))
      logging.info("Resuming from checkpoint step %d in %s.", start, checkpointer.directory)
    else:
      state = init_state()
      start, loop_state = int(jax.device_get(state.step)), None
    writer = metrics_lib.MetricsWriter(metrics_dir, resume_step=start, tags=metrics_tags)
    result = fit(engine, state, train_iter, options=options, checkpointer=checkpointer,
                 writer=writer, evaluate=evaluate, on_eval=on_eval, loop_state=loop_state,
                 start_step=start)
  finally:
    if writer is not None:
      writer.close()
    checkpointer.close()
  return result, start


def train_and_evaluate(config: Any, workdir: str, *, engine: steps_lib.Engine,
                       train_iter: Iterator[Mapping[str, Any]], init_state: Callable[[], TrainState],
                       num_steps: int, evaluate: Callable[[Any], dict[str, float]] | None = None,
                       on_eval: Callable[[int, dict[str, float]], bool] | None = None,
                       flops_per_step: float = 0.0, tokens_per_step: int = 0,
                       summary_extra: Mapping[str, Any] | None = None,
                       deadline: float = 0.0) -> dict[str, Any]:
  """Restore-or-init, train with `fit` (`resume_and_fit` in DIR/checkpoints), write
  DIR/summary.json; returns the summary. `deadline`: see LoopOptions."""
  peak, peak_source = metrics_lib.peak_flops(config.train.peak_flops)
  options = LoopOptions.from_config(config, num_steps=num_steps, flops_per_step=flops_per_step,
                                    peak_flops=peak, tokens_per_step=tokens_per_step,
                                    deadline=deadline)
  result, start = resume_and_fit(
      config, engine=engine, train_iter=train_iter, init_state=init_state, options=options,
      checkpoint_dir=remote.checkpoints_of(workdir), metrics_dir=workdir,
      evaluate=evaluate, on_eval=on_eval)
  loop = result.loop
  summary = {
      "stage": config.stage,
      "status": "stopped_early" if loop.stopped_early else (
          "complete" if result.step >= num_steps else "data_exhausted"),
      "step": result.step,
      "num_steps": num_steps,
      "config_num_steps": config.train.num_steps,
      "stopped_by": loop.stop_reason or None,
      "resumed_from_step": start or None,
      "wall_secs": result.wall_secs,
      "final_train": loop.last_train,
      "final_eval": loop.last_eval,
      "best_eval": ({"loss": loop.best_eval_loss, "step": loop.best_step,
                     "metric": config.eval.get("best_metric", "loss"),
                     "score": loop.best_score}
                    if loop.best_step is not None else None),
      "nonfinite_skips": loop.nonfinite_skips,
      "steps_per_call": getattr(engine, "steps_per_call", 1),
      "peak_flops": peak,
      "peak_flops_source": peak_source,
      "checkpoint": f"{remote.checkpoints_of(workdir)}/{result.last_checkpoint}",
      "tensorboard": metrics_lib.tensorboard_command(workdir),
  }
  summary.update(summary_extra or {})
  run_dir.write_json(os.path.join(workdir, run_dir.SUMMARY_FILE), summary)
  logging.info("%s stage %s at step %d: %s; curves: %s", config.stage, summary["status"],
               result.step, os.path.join(workdir, run_dir.SUMMARY_FILE),
               metrics_lib.tensorboard_hint(workdir))
  return summary
