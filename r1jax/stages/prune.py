"""Prune stage: magnitude or structured pruning of a finetuned classifier, then recovery finetuning.

    python -m r1jax.main --config=configs/prune.py --workdir=DIR --config.init_from=FINETUNE_DIR

`run(config, workdir)`: validates the config (target sparsity in [0, 1)), loads the classifier
(refusing a checkpoint without a classification head), selects the kernels to prune, builds the
finetuning engine with `compress.prune.masked_pruning` as the last link of the optax chain, prunes
(one-shot before the first step, or gradually), finetunes with `loop.train_and_evaluate`
(resumable: the masks are in the optimizer state), checks the result's sparsity per layer, saves
DIR/artifact/, measures it against the dense model on the test split, exports it with `jax.export`
and writes DIR/summary.json, DIR/report.md and DIR/tradeoff.png. With prune.mode=structured,
`stages.prune_structured` removes whole heads and feed-forward units instead.
"""
from __future__ import annotations

import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from r1jax import configlib
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import measure
from r1jax.compress import prune as prune_lib
from r1jax.compress import source as source_lib
from r1jax.compress import stage_lib
from r1jax.compress import structured
from r1jax.model import heads
from r1jax.stages import prune_structured
from r1jax.model import losses
from r1jax.train import loop as loop_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import optim

TARGET_RETAINED_PCT = 98.0
MODES = ("magnitude", "structured")


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Checks that need no data or compilation; raises ConfigError naming each bad key."""
  def extra(v: configlib.Validator) -> None:
    v.stage("prune")
    stage_lib.validate_common(v)
    sparsity = v._typed("prune.sparsity", (int, float), "a number")  # pylint: disable=protected-access
    if sparsity is not None:
      try:
        prune_lib.check_sparsity(sparsity)
      except ValueError as e:
        v.add("prune.sparsity", str(e))
    v.choice("prune.mode", MODES)
    for key in ("prune.heads_fraction", "prune.ffn_fraction"):
      v.number_in(key, 0.0, 1.0, high_open=True)
    v.positive_int("prune.score_batches")
    v.choice("prune.structured_scope", structured.SCOPES)
    v.choice("prune.scope", prune_lib.SCOPES)
    v.choice("prune.schedule", prune_lib.SCHEDULES)
    v.number_in("prune.ramp_fraction", 0.0, 1.0, low_open=True)
    v.positive_int("prune.update_every")
    for key in ("prune.include", "prune.exclude"):
      pattern = v.string(key)
      if pattern:
        try:
          re.compile(pattern)
        except re.error as e:
          v.add(key, f"{pattern!r} is not a valid regex ({e}).")
    v.require(bool(config.prune.get("include")), "prune.include",
              "is empty; name the kernels to prune (default backbone/layer_\\d+/.*kernel).")
  return configlib.validate_training(config, num_devices=num_devices, process_count=process_count,
                                     extra=extra)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes, or returns the summary of a finished) pruning in `workdir`."""
  validate(config)
  if config.prune.mode == "structured":
    stage_lib.require_init_from(config)
    # A fraction that would empty a layer is refused here, before the lock, loading or scoring.
    structured.check(source_lib.model_config(config.init_from), config.prune.heads_fraction,
                     config.prune.ffn_fraction, config.prune.structured_scope)
    return stage_lib.run_once(config, workdir, prune_structured.run_structured)
  return stage_lib.run_once(config, workdir, _run)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  src = stage_lib.load_source(config)
  spec = stage_lib.prepare_workdir(workdir, src.spec)
  data = measure.task_data(spec)
  model = heads.Classifier(spec.model, spec.num_classes, spec.multi_label)
  num_steps, per_epoch = stage_lib.steps_for(config, data)

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, 8), jnp.int32))["params"]

  abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  selected = prune_lib.select(abstract, config.prune.include, config.prune.exclude)
  p = config.prune
  schedule = prune_lib.Schedule(
      sparsity=float(p.sparsity), kind=p.schedule, scope=p.scope, update_every=p.update_every,
      ramp_steps=max(1, int(round(p.ramp_fraction * num_steps))) if p.schedule == "gradual" else 0)
  tx = optax.chain(optim.build_optimizer(config.train, abstract, num_steps=num_steps),
                   prune_lib.masked_pruning(selected, schedule))
  mesh = mesh_lib.make_mesh(config.mesh)
  engine = loop_lib.engine_for(
      config, mesh=mesh, tx=tx, init_params=init_params, num_steps=num_steps,
      loss_fn=losses.classification_loss_fn(model, multi_label=spec.multi_label,
                                            label_smoothing=config.train.label_smoothing))

  def init_state():
    state = engine.init_state(jax.random.PRNGKey(config.seed))
    params = jax.device_put(jax.device_get(src.params), engine.state_shardings.params)
    params, prune_state = prune_lib.initial_state(params, selected, schedule)
    prune_state = jax.device_put(prune_state,
                                 prune_lib.find_state(engine.state_shardings.opt_state))
    return state.replace(params=params,
                         opt_state=prune_lib.replace_state(state.opt_state, prune_state))

  if jax.process_index() == 0:
    stage_lib.write_config(config, workdir, spec, num_steps=num_steps, steps_per_epoch=per_epoch,
                           mesh=dict(mesh.shape), source=src.path,
                           ramp_steps=schedule.ramp_steps)
  logging.info("Pruning %d kernels to sparsity %.2f (%s, %s), %d recovery steps.",
               sum(jax.tree.leaves(selected)), schedule.sparsity, schedule.scope, schedule.kind,
               num_steps)
  train_summary, params, step = stage_lib.finetune_and_restore(
      config, workdir, engine=engine, spec=spec, saved_spec=spec, data=data,
      init_state=init_state, num_steps=num_steps)
  report = prune_lib.sparsity_report(params, selected)
  if report["selected_sparsity"] + 1e-6 < schedule.sparsity * 0.999:
    raise RuntimeError(f"pruned model has sparsity {report['selected_sparsity']:.4f} below the "
                       f"target {schedule.sparsity}; the masks were not applied.")
  reference = stage_lib.float_reference(workdir, spec, src.params, src.path)
  name = f"pruned-{int(round(100 * schedule.sparsity))}%"
  art = artifact_lib.save(os.path.join(workdir, stage_lib.ARTIFACT_DIR), spec, params,
                          kind="pruned",
                          metadata={"source": src.path, "step": step, "sparsity": report,
                                    "schedule": {"kind": schedule.kind, "scope": schedule.scope,
                                                 "target": schedule.sparsity,
                                                 "ramp_steps": schedule.ramp_steps}})
  test = stage_lib.test_batches(config, spec, data)
  sparsity_cols = {"selected_sparsity": report["selected_sparsity"],
                   "model_sparsity": report["model_sparsity"],
                   "nonzero_params": report["nonzero_params"]}
  rows = stage_lib.measure_all(config, [(stage_lib.REFERENCE, reference), (name, art)], test,
                               extras={name: sparsity_cols})
  exported = stage_lib.maybe_export(config, art)
  row = rows[1]
  notes = [
      f"{sum(jax.tree.leaves(selected))} kernels pruned ({report['selected_params']:,} weights, "
      f"{schedule.scope} scope, {schedule.kind}): {100 * report['selected_sparsity']:.1f}% zeros; "
      f"{100 * report['model_sparsity']:.1f}% of all parameters. Stored sparse (bitmask + kept "
      f"values in {art.weights_file}): {row['bytes']:,} bytes, {row['size_pct']:.1f}% of the "
      f"dense float file.",
      stage_lib.targets_note(row["retained_accuracy_pct"], TARGET_RETAINED_PCT,
                             "% of dense accuracy kept"),
      "Per-layer sparsity: " + ", ".join(f"{k}: {100 * v:.1f}%"
                                         for k, v in report["per_layer"].items()),
  ]
  summary = dict(train_summary, artifact=art.path, export=exported, sparsity=report,
                 targets={"retained_accuracy_pct": row["retained_accuracy_pct"],
                          "retained_target_met": row["retained_accuracy_pct"]
                          >= TARGET_RETAINED_PCT})
  return stage_lib.finish(config, workdir, rows, title="Magnitude pruning + recovery finetuning",
                          notes=notes, summary=summary)
