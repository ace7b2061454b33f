"""bench/quality.py's wiring: the task reaches every finetuning, the domain corpus never holds the
test split, overrides are checked, and a bad task directory fails in one line."""
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name):
  spec = importlib.util.spec_from_file_location(f"r1jax_bench_{name}",
                                                os.path.join(REPO, "bench", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def quality():
  return _bench("quality")


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


def test_wordnet_task_is_short_glosses_kept_out_of_the_general_corpus(tmp_path, quality):
  """bench/wordnet_task.py: the second task's splits are disjoint, hold the asked classes, and
  none of its glosses is left in the general corpus it writes for pretraining."""
  out = str(tmp_path / "wn")
  written = _bench("wordnet_task").main(["--out", out, "--classes", "5", "--train", "300",
                                         "--dev", "60", "--test", "60"])
  splits = {s: [json.loads(l) for l in open(os.path.join(out, f"{s}.jsonl"))]
            for s in ("train", "dev", "test")}
  assert [len(splits[s]) for s in ("train", "dev", "test")] == [300, 60, 60]
  texts = [r["text"] for rows in splits.values() for r in rows]
  assert len({r["label"] for rows in splits.values() for r in rows}) == 5
  general = [json.loads(l)["text"] for l in open(os.path.join(out, "general.jsonl"))]
  left = {line.partition(": ")[2].strip() for doc in general for line in doc.split("\n")}
  assert written["general_lines_dropped"] >= len(set(texts)) and not left & set(texts)
  assert quality.task_specs(out)["test"].endswith("test.jsonl")  # a task directory quality.py takes
