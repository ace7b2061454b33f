r"""Finetuning on an image+text task (`config.multimodal.enabled`): one backbone reads both.

    python -m r1jax.main --config=configs/finetune.py:variant=tiny --workdir=DIR \
        --config.multimodal.enabled=True        # the embedded icon task (builtin:icons:SPLIT)

With the task splits left at the text task's defaults the embedded icon task is used; otherwise
task.train / dev / test name image+text data (`r1jax.data.multimodal`: JSONL/CSV rows with a
text, a label and an image path or base64 bytes in `multimodal.image_field`, or images:DIR
folders). Every model is a `vision.MultimodalClassifier` (the backbone of init_from, when given,
plus a new patch embedding and head), trained with all its parameters at `train.learning_rate`
through the shared engine, its checkpoints and metrics in DIR/models/<name>/:

  fused   text and image (`multimodal.fusion`: late, the default = the backbone reads each
          modality alone, a head each, logits summed, `multimodal.aux_weight` adding each
          branch's own loss; joint = one sequence over both, one head);
  text    the text alone;
  image   the image alone.
`multimodal.models` lists which to train (default all three, on the same batches, so the report
compares them on the same split); the first is the stage's model (DIR/checkpoints holds it).

Image augmentation (`image_augment.*`, training batches only, drawn from (seed, batch index))
applies to every model that reads images. The best dev checkpoint of each model is evaluated on
dev and test; DIR/summary.json holds each model's metrics and the images' counts by problem,
DIR/report.md the comparison table; the stage's model is also exported as StableHLO
(DIR/model.stablehlo, `compress.export.save_multimodal`); the quantize stage takes the workdir
(int8, ONNX: `compress.spec.ClassifierSpec.image`).
A rerun resumes each model where it stopped.

The text-task pieces (tokenizer, model config) come from `finetune` as arguments, so this module
does not import it (it is imported by it).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import configlib
from r1jax import eval as eval_lib
from r1jax import run_dir
from r1jax.compress import export as export_lib
from r1jax.data import image_augment
from r1jax.data import multimodal as multimodal_data
from r1jax.model import losses
from r1jax.model import transformer_xl as txl
from r1jax.model import vision
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import optim
from r1jax.train import schedule as schedule_lib

# Model name -> the modalities it reads; the first listed is the stage's own model.
MODELS = vision.MODELS
TEXT_TASK_SPECS = {"train": "builtin:task:train", "dev": "builtin:task:dev",
                   "test": "builtin:task:test"}


def augment_config(section: Any) -> image_augment.ImageAugmentConfig | None:
  """The ImageAugmentConfig of `config.image_augment`, or None when it is off (prob 0)."""
  if section is None or not section.prob:
    return None
  return image_augment.ImageAugmentConfig(
      prob=section.prob, rotate_degrees=section.rotate_degrees,
      crop_scale=(section.crop_scale_min, 1.0), flip_prob=section.flip_prob,
      brightness=section.brightness, contrast=section.contrast, saturation=section.saturation,
      hue=section.hue)


def validate(v: configlib.Validator, config: ml_collections.ConfigDict) -> None:
  """The multimodal keys (called by the finetune stage's validation when the switch is on)."""
  mm = config.multimodal
  v.string("multimodal.image_field")
  v.number_in("multimodal.modality_dropout", 0.0, 1.0, high_open=True)
  fusion = v.choice("multimodal.fusion", vision.FUSIONS)
  aux = v.number_in("multimodal.aux_weight", 0.0, 100.0)
  if aux and fusion == "joint":
    v.add("multimodal.aux_weight", f"{aux} needs multimodal.fusion=late (joint fusion has one "
          "head, no branch to weigh); set it to 0 or choose late.")
  size, patch = v.positive_int("multimodal.image_size"), v.positive_int("multimodal.patch_size")
  if size and patch and size % patch:
    v.add("multimodal.patch_size", f"{patch} must divide multimodal.image_size={size} "
          "(e.g. 8 for 32-pixel images).")
  models = v.string("multimodal.models")
  if models is not None:
    names = [m.strip() for m in models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad or not names or len(set(names)) != len(names):
      v.add("multimodal.models", f"{models!r}: list some of {', '.join(MODELS)} once each, "
            "comma-separated (the first is the stage's model).")
  section = config.get("image_augment")
  if section is not None:
    try:
      cfg = image_augment.ImageAugmentConfig(
          prob=float(section.prob), rotate_degrees=float(section.rotate_degrees),
          crop_scale=(float(section.crop_scale_min), 1.0), flip_prob=float(section.flip_prob),
          brightness=float(section.brightness), contrast=float(section.contrast),
          saturation=float(section.saturation), hue=float(section.hue))
    except (TypeError, ValueError) as e:
      v.add("image_augment", f"every value must be a number ({e}).")
    else:
      for name, problem in cfg.problems():
        key = "crop_scale_min" if name == "crop_scale" else name
        v.add(f"image_augment.{key}", problem + ".")


def _task_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.task with the icon task in place of the text task's default splits."""
  task = ml_collections.ConfigDict(config.task.to_dict())
  task.image_field = config.multimodal.image_field
  if all(task[k] == v for k, v in TEXT_TASK_SPECS.items()):
    for split in TEXT_TASK_SPECS:
      task[split] = f"{multimodal_data.ICONS_PREFIX}:{split}"
    logging.info("multimodal.enabled with the text task's splits: using the embedded icon task "
                 "(builtin:icons:train|dev|test).")
  return task


def load_task(config: ml_collections.ConfigDict) -> multimodal_data.ImageTaskData:
  """The image+text task a finetune config with multimodal.enabled trains on (its splits read,
  images decoded); raises BadInput / ValueError / OSError on a task it cannot learn from."""
  return multimodal_data.load_image_task(_task_section(config), config.multimodal.image_size)


def _predict_fn(model: vision.MultimodalClassifier, params: Any, modalities: tuple[str, ...]):
  """batch -> logits numpy [B, C] on one device, reading only `modalities`."""
  params = jax.device_put(params, jax.local_devices()[0])

  @jax.jit
  def logits_fn(p, batch):
    inputs = losses.multimodal_inputs(batch, modalities, model.config.n_token_types)
    return model.apply({"params": p}, **inputs, deterministic=True)[0]

  keys = ("tokens", "token_mask", "images")
  return lambda batch: np.asarray(logits_fn(params, {k: batch[k] for k in keys}))


def run(config: ml_collections.ConfigDict, workdir: str, *,
        model_config: Callable[..., txl.TransformerXLConfig],
        prepare_tokenizer: Callable[..., Any],
        on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
  """The multimodal finetuning body (inside the finetune stage's `run_once`); returns the summary.

  `model_config(config, vocab_size=, pretrained=)` and `prepare_tokenizer(config, workdir,
  texts, vocab_size)` are the finetune stage's.
  """
  mm = config.multimodal
  init_from = os.path.expanduser(config.init_from) if config.init_from else ""
  arch = run_dir.architecture_of(init_from) if init_from else {}
  task_cfg = _task_section(config)
  data = load_task(config)
  for split in (data.train, data.dev, data.test):
    logging.info("%s split: %s.", split.name, split.report.summary())
  texts = [r["text"] for r in data.train.records if r["text"]] or ["-"]
  tok = prepare_tokenizer(config, workdir, texts, model_config(config, pretrained=arch).vocab_size)
  mcfg = model_config(config, vocab_size=tok.vocab_size, pretrained=arch)
  if mcfg.ngram_buckets:  # the text-only classifier's wide path (configs/finetune.py's default)
    logging.info("model.ngram_buckets=%d: the multimodal classifier has no n-gram path; it runs "
                 "without one.", mcfg.ngram_buckets)
    mcfg = dataclasses.replace(mcfg, ngram_buckets=0)
  image = vision.ImageConfig(image_size=mm.image_size, patch_size=mm.patch_size)
  fusion = mm.get("fusion", "joint")
  seq_len = config.task.seq_len if config.task.seq_len > 0 else txl.SEGMENT_LEN[
      config.model.variant]
  batch_size = config.train.batch_size
  steps_per_epoch = max(1, len(data.train.records) // batch_size)
  total = config.train.num_steps
  if total == -1:
    total = max(1, int(round(config.train.num_epochs * steps_per_epoch)))
  mesh = mesh_lib.make_mesh(config.mesh)
  augment = augment_config(config.get("image_augment"))
  names = [m.strip() for m in mm.models.split(",") if m.strip()]
  if jax.process_index() == 0:
    data.labels.save(os.path.join(workdir, run_dir.LABELS_FILE))
    configlib.write_config_json(config, workdir, num_steps=total, seq_len=seq_len,
                                steps_per_epoch=steps_per_epoch, vocab_size=tok.vocab_size,
                                labels=list(data.labels.names), mesh=dict(mesh.shape),
                                models=names, task=task_cfg.to_dict())
  logging.info("Multimodal finetuning (%s) for %d steps, %d per epoch; image augmentation %s.",
               ", ".join(names), total, steps_per_epoch, "on" if augment else "off")

  def batches(records, *, train: bool, seed: int = 0):
    return multimodal_data.image_text_dataset(
        records, tok, labels=data.labels, seq_len=seq_len, batch_size=batch_size,
        image_size=mm.image_size, augment=augment if train else None, shuffle=train, seed=seed,
        num_epochs=None if train else 1, pad_final_batch=not train,
        process_index=0 if not train else jax.process_index(),
        process_count=1 if not train else jax.process_count())

  results = {}
  for name in names:
    # The fusion is the fused model's; one modality alone reads the plain joint path.
    model = vision.MultimodalClassifier(
        mcfg, dataclasses.replace(image, fusion=fusion if len(MODELS[name]) > 1 else "joint"),
        len(data.labels))
    results[name] = _train_one(config, workdir, name, model, mesh, total, batches, data,
                               init_from, on_eval, main=name == names[0], seq_len=seq_len)
  main = results[names[0]]
  summary = {
      "stage": "finetune", "multimodal": True, "status": main["status"],
      "step": main["step"], "num_steps": total, "config_num_steps": config.train.num_steps,
      "init_from": config.init_from, "model": config.model.variant, "main_model": names[0],
      "checkpoint": main["checkpoint"], "export": main.get("export"),
      "task": {"train": task_cfg.train, "dev": task_cfg.dev, "test": task_cfg.test,
               "num_labels": len(data.labels), "labels": list(data.labels.names),
               "seq_len": seq_len, "image_size": mm.image_size, "patch_size": mm.patch_size},
      "image_augment": None if augment is None else dict(config.image_augment.to_dict()),
      "data": {s.name: s.counts for s in (data.train, data.dev, data.test)},
      "images": {s.name: s.report.to_json() for s in (data.train, data.dev, data.test)},
      "models": results, "dev": main["dev"], "test": main["test"],
  }
  run_dir.write_json(os.path.join(workdir, run_dir.SUMMARY_FILE), summary)
  run_dir.write_text(os.path.join(workdir, "report.md"), report_markdown(summary))
  logging.info("Multimodal finetuning done: test accuracy %s; %s",
               ", ".join(f"{n} {r['test']['accuracy']:.3f}" for n, r in results.items()),
               os.path.join(workdir, "report.md"))
  return summary


def _train_one(config, workdir, name, model, mesh, total, batches, data, init_from,
               on_eval, main, seq_len) -> dict[str, Any]:
  """Trains one of MODELS in DIR/models/<name>/ (resuming), then evaluates its best dev step;
  the stage's model (`main`) is also exported to DIR/model.stablehlo."""
  modalities = MODELS[name]
  directory = os.path.join(workdir, "models", name)
  os.makedirs(directory, exist_ok=True)
  image = model.image

  def init_params(rng):
    return model.init({"params": rng}, jnp.zeros((1, 8), jnp.int32),
                      images=jnp.zeros((1, image.image_size, image.image_size, 3),
                                       jnp.uint8))["params"]
  abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx = optim.build_optimizer(config.train, abstract, num_steps=total,
                             adjustable_lr=schedule_lib.lowers_lr(on_eval))
  engine = loop_lib.engine_for(
      config, mesh=mesh, tx=tx, init_params=init_params, num_steps=total,
      loss_fn=losses.multimodal_loss_fn(
          model, modalities=modalities, label_smoothing=config.train.label_smoothing,
          modality_dropout=config.multimodal.get("modality_dropout", 0.0),
          aux_weight=config.multimodal.get("aux_weight", 0.0)),
      eval_loss_fn=losses.multimodal_loss_fn(model, modalities=modalities))

  def init_state():
    state = engine.init_state(jax.random.PRNGKey(config.seed))
    if not init_from:
      return state
    target = {"backbone": engine.abstract_state().params["backbone"]}
    restored, step = ckpt_lib.restore_params(init_from, target)
    logging.info("%s model: backbone from %s (step %d); patch embedding and head are new.", name,
                 init_from, step)
    return engine.state_from_params(dict(state.params, backbone=restored["backbone"]),
                                    jax.random.PRNGKey(config.seed))

  def evaluate(params):
    return engine.evaluate(params, batches(data.dev.records, train=False))

  options = loop_lib.LoopOptions.from_config(config, num_steps=total)
  checkpoints = os.path.join(directory, run_dir.CHECKPOINTS_DIR)
  result, _ = loop_lib.resume_and_fit(
      config, engine=engine, train_iter=iter(batches(data.train.records, train=True,
                                                     seed=config.seed)),
      init_state=init_state, options=options, checkpoint_dir=checkpoints, metrics_dir=directory,
      metrics_tags={"model": name}, evaluate=evaluate, on_eval=on_eval)
  best = result.loop.best_step
  try:
    params, used = ckpt_lib.restore_params(checkpoints, step=best) if best is not None else (
        None, None)
  except (FileNotFoundError, ValueError):
    params, used = None, None
  if params is None:
    params, used = jax.device_get(result.state.params), result.step
  predict = _predict_fn(model, params, modalities)
  out = {"modalities": list(modalities), "status": "stopped_early"
         if result.loop.stopped_early else "complete", "step": result.step,
         "evaluated_step": used, "checkpoint": os.path.join(checkpoints, str(used))}
  for split in (data.dev, data.test):
    metrics = eval_lib.evaluate_classifier(predict, batches(split.records, train=False),
                                           label_names=list(data.labels.names))
    out[split.name] = {k: v for k, v in metrics.items() if k != "confusion"}
  if main and jax.process_index() == 0:
    _link_checkpoints(workdir, checkpoints)
    out["export"] = export_lib.save_multimodal(
        model, jax.device_put(params, jax.local_devices()[0]), workdir,
        seq_len=seq_len, modalities=modalities, label_names=data.labels.names)
  return out


def _link_checkpoints(workdir: str, checkpoints: str) -> None:
  """DIR/checkpoints -> the stage's model's (what "the model in this workdir" means)."""
  link = os.path.join(workdir, run_dir.CHECKPOINTS_DIR)
  if not os.path.lexists(link):
    os.symlink(os.path.relpath(checkpoints, workdir), link)


def report_markdown(summary: Mapping[str, Any]) -> str:
  """DIR/report.md: the models side by side on the same dev and test splits."""
  task = summary["task"]
  rows = [(name, "+".join(r["modalities"]), f"{r['dev']['accuracy']:.3f}",
           f"{r['dev']['macro_f1']:.3f}", f"{r['test']['accuracy']:.3f}",
           f"{r['test']['macro_f1']:.3f}", r["evaluated_step"])
          for name, r in summary["models"].items()]
  lines = [
      "# Multimodal finetuning", "",
      f"Task: train `{task['train']}`, dev `{task['dev']}`, test `{task['test']}`; "
      f"{task['num_labels']} labels; text {task['seq_len']} tokens, images "
      f"{task['image_size']}x{task['image_size']} in {task['patch_size']}-pixel patches.",
      f"Image augmentation: {summary['image_augment'] or 'off'}.",
      "",
      eval_lib.markdown_table(("model", "reads", "dev accuracy", "dev macro-F1", "test accuracy",
                               "test macro-F1", "step"), rows),
      "", "Images by split (dropped ones by problem):", ""]
  for split, report in summary["images"].items():
    counts = report["counts"]
    lines.append(f"- {split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
  best = max(summary["models"].items(), key=lambda kv: kv[1]["test"]["accuracy"])
  lines += ["", f"Best test accuracy: {best[0]} ({best[1]['test']['accuracy']:.3f}).", ""]
  return "\n".join(lines)
