"""The training engine shared by every training stage (pretrain, finetune, distill, prune recovery).

- `mesh`: (data, fsdp, tensor) device mesh from config; shardings; global batches from process data.
- `state`: `TrainState` (step, params, opt_state, rng, extras, nonfinite_skips) and its sharded init.
- `optim`: AdamW + warmup/decay + clipping, weight-decay mask, regex freeze / per-group rules.
- `steps`: pluggable loss functions, pure `train_step` / `eval_step`, and `Engine` (jitted, sharded).
- `loop`: `fit` (logging, eval, early stopping, checkpoints, NaN handling, preemption) and
  `train_and_evaluate` (restore-or-init + fit + summary.json), what a stage's `run` calls.
- `checkpoint`: Orbax checkpoints with verified restore and fallback, SIGTERM, workdir lock.
- `metrics`: metrics.jsonl, TensorBoard, progress bar, FLOPs and MFU.
"""
