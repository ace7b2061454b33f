"""bench/quality.py's wiring: the task reaches every finetuning, the domain corpus never holds the
test split, overrides are checked, and a bad task directory fails in one line."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quality():
  spec = importlib.util.spec_from_file_location("r1jax_bench_quality",
                                                os.path.join(REPO, "bench", "quality.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def task_dir(tmp_path):
  for split in ("train", "dev", "test"):
    rows = [{"text": f"{split} row {i}", "label": "ab"[i % 2]} for i in range(4)]
    (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(tmp_path)


def _args(quality, *argv):
  parser = quality.argparse.ArgumentParser()
  parser.add_argument("--task", default="")
  parser.add_argument("--domain", default="")
  parser.add_argument("--variant", default="tiny")
  parser.add_argument("--set", action="append", default=[])
  return parser.parse_args(list(argv))


def test_task_directory_reaches_both_finetunings_and_scratch(quality, task_dir):
  config = quality.build_config(_args(quality, "--task", task_dir))
  for stage in quality.FINETUNES:
    cfg = quality.pipeline.stage_config(config, stage, "/w")
    for split in ("train", "dev", "test"):
      assert cfg.task[split] == os.path.join(task_dir, f"{split}.jsonl")
  scratch = quality.scratch_config(config)
  assert scratch.init_from == "" and scratch.task.test == os.path.join(task_dir, "test.jsonl")
  assert scratch.train.num_steps == config.pipeline.finetune_domain.train.num_steps


def test_task_adaptive_corpus_is_train_and_dev_never_test(quality, task_dir):
  config = quality.build_config(_args(quality, "--task", task_dir))
  inputs = quality.pipeline.stage_config(config, "data_domain", "/w").data.inputs.split(",")
  assert inputs == [os.path.join(task_dir, "train.jsonl"), os.path.join(task_dir, "dev.jsonl")]
  given = quality.build_config(_args(quality, "--task", task_dir, "--domain", "notes/*.txt"))
  assert quality.pipeline.domain_inputs(given).split(",")[0] == "notes/*.txt"
  embedded = quality.build_config(_args(quality))
  assert quality.pipeline.domain_inputs(embedded) == (
      "builtin:domain,builtin:task:train,builtin:task:dev")
  assert quality.pipeline.stage_config(embedded, "finetune_general",
                                       "/w").task.test == "builtin:task:test"


def test_overrides_are_typed_and_checked(quality):
  config = quality.build_config(_args(quality, "--set", "finetune_domain.train.num_epochs=12",
                                      "--set", "finetune_domain.schedule=full"))
  assert config.pipeline.finetune_domain.train.num_epochs == 12.0
  assert config.pipeline.finetune_domain.schedule == "full"
  for bad in ("finetune_domain.train.no_such_key=1", "nostage.train.num_steps=1",
              "finetune_domain.train.num_epochs"):
    with pytest.raises(SystemExit, match="--set"):
      quality.build_config(_args(quality, "--set", bad))


def test_bad_task_directory_names_the_missing_files(quality, tmp_path):
  with pytest.raises(SystemExit, match="lacks .*train.jsonl.*dev.jsonl and test.jsonl"):
    quality.task_specs(str(tmp_path))
