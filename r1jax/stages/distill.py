"""Distill stage: teacher (a finetuned classifier) -> smaller student, on the shared engine.

    python -m r1jax.main --config=configs/distill.py --workdir=DIR --config.init_from=FINETUNE_DIR

`run(config, workdir)`: validates the config, loads the teacher (refusing a checkpoint without a
classification head), derives the student config (refusing one larger than the teacher), builds one
engine whose parameters are {"student", "teacher"[, "hidden_proj"]} with the teacher frozen by an
optimizer rule, initialises the student from a subset of teacher layers where shapes allow, trains
with `loop.train_and_evaluate` (resumable, early stopping on the dev distillation loss), saves the
student as DIR/artifact/, measures teacher and student on the test split, exports the student with
`jax.export`, and writes DIR/summary.json, DIR/report.md and DIR/tradeoff.png.
"""
from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from r1jax import configlib
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import distill as distill_lib
from r1jax.compress import measure
from r1jax.compress import spec as spec_lib
from r1jax.compress import stage_lib
from r1jax.model import heads
from r1jax.model import losses
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import optim

TARGET_RETAINED_PCT = 95.0
TARGET_SPEEDUP_BATCH1 = 2.0


def _layer_map_arg(value: str) -> str | list[int]:
  value = value.strip()
  if value in distill_lib.LAYER_MAPS:
    return value
  return [int(x) for x in value.split(",") if x.strip()]


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """Checks that need no data or compilation (the teacher-relative size checks come after the
  teacher is read, before anything is compiled); raises ConfigError naming each bad key."""
  def extra(v: configlib.Validator) -> None:
    v.stage("distill")
    stage_lib.validate_common(v)
    for key in distill_lib.SIZE_FIELDS:
      v.int_at_least(f"student.{key}", 1, allow=(-1,))
    dropout = v._typed("student.dropout", (int, float), "a number")  # pylint: disable=protected-access
    if dropout is not None and dropout != -1 and not 0 <= dropout < 1:
      v.add("student.dropout", f"{dropout!r}: in [0, 1), or -1 for the teacher's.")
    layer_map = v.string("student.layer_map")
    if layer_map is not None:
      try:
        _layer_map_arg(layer_map)
      except ValueError:
        v.add("student.layer_map", f"{layer_map!r}: one of {distill_lib.LAYER_MAPS} or teacher "
              "layer indices like '1,3,5'.")
    v.boolean("student.init_from_teacher")
    v.number_in("distill.alpha", 0.0, 1.0)
    v.number_in("distill.temperature", 0.0, 1e3, low_open=True)
    v.number_in("distill.hidden_weight", 0.0, 1e6)
  return configlib.validate_training(config, num_devices=num_devices, process_count=process_count,
                                     extra=extra)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes, or returns the summary of a finished) distillation in `workdir`."""
  validate(config)
  return stage_lib.run_once(config, workdir, _run)


def student_spec(config: ml_collections.ConfigDict, teacher: spec_lib.ClassifierSpec
                 ) -> tuple[spec_lib.ClassifierSpec, list[int]]:
  """(the student's spec, teacher layer of each student layer); raises StudentTooLarge."""
  s = config.student
  cfg = distill_lib.student_config(
      teacher.model, n_layer=s.n_layer, d_model=s.d_model, n_head=s.n_head, d_head=s.d_head,
      d_inner=s.d_inner, dropout=None if s.dropout == -1 else float(s.dropout))
  mapping = distill_lib.layer_map(cfg.n_layer, teacher.model.n_layer, _layer_map_arg(s.layer_map))
  return teacher.replace(model=cfg), mapping


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  started = time.time()
  src = stage_lib.load_source(config)
  t_spec = stage_lib.prepare_workdir(workdir, src.spec)
  s_spec, mapping = student_spec(config, t_spec)  # errors before anything is compiled
  data = measure.task_data(t_spec)
  teacher = heads.Classifier(t_spec.model, t_spec.num_classes, t_spec.multi_label)
  student = heads.Classifier(s_spec.model, s_spec.num_classes, s_spec.multi_label)
  options = losses.DistillOptions(
      alpha=config.distill.alpha, temperature=config.distill.temperature,
      hidden_weight=config.distill.hidden_weight, label_smoothing=config.train.label_smoothing,
      multi_label=t_spec.multi_label)
  projection = options.hidden_weight > 0 and s_spec.model.d_model != t_spec.model.d_model
  num_steps, per_epoch = stage_lib.steps_for(config, data)
  init_params = distill_lib.init_params_fn(student, teacher, hidden_projection=projection)
  abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx = optim.build_optimizer(config.train, abstract, num_steps=num_steps,
                             rules=[distill_lib.FREEZE_TEACHER])
  mesh = mesh_lib.make_mesh(config.mesh)
  engine = loop_lib.engine_for(
      config, mesh=mesh, tx=tx, init_params=init_params, num_steps=num_steps,
      loss_fn=losses.distill_loss_fn(student, teacher, options, mapping))
  counts = {"teacher_params": artifact_lib.count_params(src.params),
            "student_params": sum(x.size for x in jax.tree.leaves(abstract["student"]))}
  init_info: dict[str, Any] = {}

  def init_state():
    state = engine.init_state(jax.random.PRNGKey(config.seed))
    params = dict(jax.device_get(state.params), teacher=jax.device_get(src.params))
    if config.student.init_from_teacher:
      params["student"], info = distill_lib.init_from_teacher(params["student"], params["teacher"],
                                                             mapping)
      init_info.update(copied=len(info["copied"]), kept_random=len(info["kept_random"]))
      logging.info("Student initialised from teacher layers %s: %d leaves copied, %d random.",
                   mapping, len(info["copied"]), len(info["kept_random"]))
    return state.replace(params=jax.device_put(params, engine.state_shardings.params))

  if jax.process_index() == 0:
    stage_lib.write_config(config, workdir, s_spec, teacher_model=t_spec.to_json()["model"],
                           layer_map=mapping, num_steps=num_steps, steps_per_epoch=per_epoch,
                           mesh=dict(mesh.shape), source=src.path, **counts)
  logging.info("Distilling %d-layer teacher (%d params) into %d-layer student (%d params), layer "
               "map %s, %d steps.", t_spec.model.n_layer, counts["teacher_params"],
               s_spec.model.n_layer, counts["student_params"], mapping, num_steps)
  train_summary = loop_lib.train_and_evaluate(
      config, workdir, engine=engine, train_iter=stage_lib.train_iterator(config, t_spec, data),
      init_state=init_state, num_steps=num_steps,
      evaluate=stage_lib.dev_evaluator(config, t_spec, data, engine),
      deadline=loop_lib.deadline_of(config, started),
      summary_extra={"layer_map": mapping, "student_init": init_info or None, **counts})

  restored, step = ckpt_lib.restore_params(
      workdir, {"student": ckpt_lib.on_one_device(spec_lib.abstract_params(s_spec))})
  reference = stage_lib.float_reference(workdir, t_spec, src.params, src.path)
  name = f"distilled-{s_spec.model.n_layer}L"
  art = artifact_lib.save(os.path.join(workdir, stage_lib.ARTIFACT_DIR), s_spec,
                          restored["student"], kind="distilled",
                          metadata={"teacher": src.path, "layer_map": mapping, "step": step,
                                    "alpha": options.alpha, "temperature": options.temperature,
                                    "hidden_weight": options.hidden_weight})
  test = stage_lib.test_batches(config, t_spec, data)
  rows = stage_lib.measure_all(config, [(stage_lib.REFERENCE, reference), (name, art)], test,
                               extras={stage_lib.REFERENCE: {"n_layer": t_spec.model.n_layer},
                                       name: {"n_layer": s_spec.model.n_layer,
                                              "layer_map": mapping}})
  exported = stage_lib.maybe_export(config, art)
  student_row = rows[1]
  targets = {"layer_fraction": s_spec.model.n_layer / t_spec.model.n_layer,
             "retained_accuracy_pct": student_row["retained_accuracy_pct"],
             "retained_target_met": student_row["retained_accuracy_pct"] >= TARGET_RETAINED_PCT,
             "speedup_batch1": student_row["speedup_batch1"],
             "speedup_target_met": student_row["speedup_batch1"] >= TARGET_SPEEDUP_BATCH1}
  notes = [
      f"Student {s_spec.model.n_layer}/{t_spec.model.n_layer} layers (layer map {mapping}), "
      f"{counts['student_params']:,} vs {counts['teacher_params']:,} parameters; alpha "
      f"{options.alpha}, T {options.temperature}, hidden weight {options.hidden_weight}.",
      stage_lib.targets_note(student_row["retained_accuracy_pct"], TARGET_RETAINED_PCT,
                             "% of teacher accuracy kept"),
      stage_lib.targets_note(student_row["speedup_batch1"], TARGET_SPEEDUP_BATCH1,
                             "speedup at batch 1"),
  ]
  summary = dict(train_summary, artifact=art.path, export=exported, targets=targets,
                 teacher=src.path, student_model=s_spec.to_json()["model"])
  return stage_lib.finish(config, workdir, rows, title="Knowledge distillation", notes=notes,
                          summary=summary)
