"""The pipeline's image+text switch (issue 28): `multimodal.enabled` reaches the finetuning stages,
leaves the text-only stages out, refuses them when named, and compare / the report show one column
per model (fused, text-only, image-only); (slow) the pipeline runs a multimodal finetuning."""
import json
import os

import pytest

from r1jax import configlib
from r1jax.stages import compare
from r1jax.stages import pipeline
from r1jax.stages import pipeline_report
from test_compress_source import make_classifier_workdir
from test_pipeline import _config

MM = {"multimodal.enabled": True}


def test_switch_reaches_the_finetuning_stages_and_leaves_text_only_ones_out(tmp_path):
  config = _config(**MM)
  chosen = pipeline.selected_stages(config)
  assert not {"tune", "distill", "prune"} & set(chosen)
  assert {"finetune_general", "finetune_domain", "compare", "quantize"} <= set(chosen)
  for name in ("finetune_general", "finetune_domain"):
    assert pipeline.stage_config(config, name, str(tmp_path)).multimodal.enabled
    assert not pipeline.stage_config(_config(), name, str(tmp_path)).multimodal.enabled
  pipeline.validate(config, num_devices=8, process_count=1)   # the icon task is read and valid


@pytest.mark.parametrize("overrides,message", [
    ({"stages": "finetune_general,distill,prune"},
     r"stages: distill, prune take text classifiers only; drop them with multimodal.enabled"),
    ({"sources.quantize": "distill"}, r"sources.quantize: 'distill': with multimodal.enabled, "
                                      r"name finetune_general or finetune_domain"),
])
def test_text_only_stages_are_refused_under_the_switch(overrides, message):
  with pytest.raises(configlib.ConfigError, match=message):
    pipeline.validate(_config(**MM, **overrides), num_devices=8, process_count=1)


def _summary(name, fused, text, image):
  metrics = lambda acc: {"accuracy": acc, "macro_f1": acc / 2,
                         "per_class": {"a": {"f1": acc}, "b": {"f1": acc}}}
  models = {"fused": fused, "text": text, "image": image}
  return {"stage": "finetune", "multimodal": True, "task": {"labels": ["a", "b"]},
          "init_from": name, "dev": metrics(fused), "test": metrics(fused),
          "models": {k: {"dev": metrics(v), "test": metrics(v)} for k, v in models.items()}}


def test_compare_and_report_show_every_model_of_a_multimodal_finetuning(tmp_path):
  result = compare.compare([_summary("g", 0.8, 0.7, 0.4), _summary("d", 0.85, 0.75, 0.5)],
                           ["general", "domain-adapted"])
  assert result["names"] == ["general (fused)", "general (text)", "general (image)",
                             "domain-adapted (fused)", "domain-adapted (text)",
                             "domain-adapted (image)"]
  accuracy = next(r for r in result["metrics"] if r["metric"] == "accuracy")
  assert accuracy["values"] == [0.8, 0.7, 0.4, 0.85, 0.75, 0.5]
  assert accuracy["differences"][-1] == pytest.approx(0.5 - 0.8)
  text = compare.table_text(result)
  assert "general (image)" in text.splitlines()[2]
  # The pipeline's report reads the same table.
  for name, summary in (("finetune_general", _summary("g", 0.8, 0.7, 0.4)),
                        ("finetune_domain", _summary("d", 0.85, 0.75, 0.5))):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "summary.json").write_text(json.dumps(dict(summary, status="complete")))
  paths = pipeline_report.write_report(str(tmp_path), {"variant": "tiny"})
  report = open(paths["markdown"]).read()
  assert "domain-adapted (image)" in report and "a text-only and an image-only model" in report


@pytest.mark.slow  # ~40 s idle: a tiny fused model finetuned through the pipeline
def test_pipeline_runs_a_multimodal_finetuning(tmp_path):
  pretrained = make_classifier_workdir(str(tmp_path / "pt"), pretrain=True, n_layer=1)
  config = _config(**MM, stages="finetune_general", init_from=pretrained)
  ft = config.pipeline.finetune_general
  ft.multimodal.models = "fused,image"
  ft.multimodal.image_size = 16
  ft.task.seq_len = 12
  ft.train.num_steps, ft.train.batch_size = 6, 16
  ft.eval.every_steps = ft.checkpoint.every_steps = 3
  ft.train.progress_bar = False
  wd = str(tmp_path / "run")
  summary = pipeline.run(config, wd)
  assert summary["ran"] == ["finetune_general"]
  stage = json.load(open(os.path.join(wd, "finetune_general", "summary.json")))
  assert stage["multimodal"] and list(stage["models"]) == ["fused", "image"]
  assert stage["task"]["train"] == "builtin:icons:train" and stage["init_from"] == pretrained
  assert "finetune_general" in open(os.path.join(wd, "report.md")).read()
