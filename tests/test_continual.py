"""Continual stage: reservoir replay, the EWC / L2-SP penalty, head growth that keeps old logits,
the diagonal Fisher, rounds end to end (report, drift, naive reference, a final classifier the
compression stages can load), a killed round resumed bitwise, and bad streams refused in one line
or skipped with a log line."""
import json
import os
import shutil
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax.compress import source as source_lib
from r1jax.data import builtin
from r1jax.data import replay as replay_lib
from r1jax.data import rounds as rounds_lib
from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.stages import continual
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import continual as continual_lib
from test_compress_source import make_classifier_workdir
from test_finetune import bitwise_equal
from test_finetune import make_config
from test_finetune import read_params
from test_finetune import write_jsonl

LABELS = builtin.labels()  # the classifier workdir's 10 classes
WORDS = {"language": "compiler syntax", "networking": "packet router", "hardware": "chip memory",
         "forest": "tree leaf", "river": "water bank"}
FILLER = "the of and to in is was for on that with as by it from at".split()


def rows(labels, n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    label = labels[i % len(labels)]
    words = list(rng.choice(FILLER, size=4)) + WORDS[label].split()
    rng.shuffle(words)
    out.append({"text": " ".join(words), "label": label})
  return out


# --------------------------------------------------------------------------------------------------
# Units.


def test_replay_buffer_is_a_uniform_reservoir_with_resumable_state():
  records = [{"text": f"t{i}", "label": "a"} for i in range(300)]
  buffer = replay_lib.ReplayBuffer.empty(capacity=50, seed=3)
  whole = buffer.added(records)
  assert len(whole.items) == 50 and whole.seen == 300 and whole.full
  # Fed in two parts through JSON (a save and a resume), the buffer ends bitwise the same.
  half = replay_lib.ReplayBuffer.from_json(json.loads(json.dumps(buffer.added(records[:120])
                                                                 .to_json())))
  assert half.added(records[120:]) == whole
  assert json.dumps(half.added(records[120:]).to_json()) == json.dumps(whole.to_json())
  # Every example has the same chance capacity / seen: late ones are not favoured.
  kept = np.zeros(300)
  for seed in range(200):
    for item in replay_lib.ReplayBuffer.empty(50, seed).added(records).items:
      kept[int(item["text"][1:])] += 1
  assert abs(kept[:150].mean() - kept[150:].mean()) < 0.1 * kept.mean()
  # A buffer larger than the data holds all of it, in order.
  small = replay_lib.ReplayBuffer.empty(1000, 0).added(records[:7])
  assert [i["text"] for i in small.items] == [f"t{i}" for i in range(7)] and not small.full
  assert replay_lib.ReplayBuffer.empty(0, 0).added(records).items == ()
  with pytest.raises(ValueError, match="capacity -1"):
    replay_lib.ReplayBuffer.empty(-1, 0)


def _classifier(num_classes, seed):
  cfg = txl.get_variant("tiny", vocab_size=120, n_layer=1, dropout=0.0, ngram_buckets=64)
  model = heads.Classifier(cfg, num_classes)
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 10), jnp.int32))["params"]
  return model, jax.device_get(nn.unbox(params))


@pytest.fixture(scope="module")
def heads_pair():
  """A 4-class classifier (with the n-gram path: its head has two output layers), a 6-class
  model of the same backbone, and the 4-class weights grown to 6 classes."""
  old_model, old = _classifier(4, 0)
  new_model = heads.Classifier(old_model.config, 6)
  target = jax.eval_shape(new_model.init, jax.random.PRNGKey(1), jnp.zeros((1, 10), jnp.int32))
  grown, paths = continual_lib.grow_params(old, nn.unbox(target["params"]), jax.random.PRNGKey(2))
  return old_model, old, new_model, grown, paths


def _batch(n=5, classes=4):
  rng = np.random.RandomState(0)
  return {"tokens": jnp.asarray(rng.randint(5, 120, (n, 10)), jnp.int32),
          "token_mask": jnp.asarray(np.arange(10)[None] < rng.randint(3, 11, (n, 1))),
          "label": jnp.asarray(rng.randint(0, classes, (n,)), jnp.int32)}


def _logits(model, params, batch):
  return jax.jit(model.apply)({"params": params}, batch["tokens"], batch["token_mask"])[0]


def test_new_classes_grow_the_head_without_changing_old_logits(heads_pair):
  old_model, old, new_model, grown, paths = heads_pair
  assert set(paths) == {"cls_head/out/kernel", "cls_head/out/bias", "cls_head/ngram_out/kernel",
                        "cls_head/ngram_out/bias"}
  batch = _batch()
  before = _logits(old_model, old, batch)
  after = _logits(new_model, grown, batch)
  assert after.shape == (5, 6)
  assert np.array_equal(np.asarray(before), np.asarray(after[:, :4]))
  assert np.all(np.isfinite(np.asarray(after[:, 4:])))
  with pytest.raises(ValueError, match="only a head's last axis can grow"):
    continual_lib.grow_params(grown, old, jax.random.PRNGKey(0))


def test_penalty_is_zero_at_the_previous_weights_and_grows_away_from_them(heads_pair):
  _, previous, _, grown, _ = heads_pair
  importance = jax.tree.map(lambda x: np.full(x.shape, 2.0, np.float32), previous)
  penalty = jax.jit(continual_lib.anchor_penalty)
  for weights in (None, importance):  # L2-SP, EWC
    assert float(penalty(grown, previous, weights)) == 0.0
    values = [float(penalty(jax.tree.map(lambda x, s=s: x + s, grown), previous, weights))
              for s in (1e-3, 1e-2, 1e-1)]
    assert 0 < values[0] < values[1] < values[2]
    np.testing.assert_allclose(values[1] / values[0], 100.0, rtol=1e-3)  # quadratic
  # EWC weights each coordinate: doubling the importance doubles the penalty.
  moved = jax.tree.map(lambda x: x + 0.01, grown)
  np.testing.assert_allclose(float(penalty(moved, previous, importance)),
                             2 * float(penalty(moved, previous, None)), rtol=1e-5)
  # The new head columns are free: moving only them costs nothing.
  only_new = jax.tree.map(lambda x: x.copy(), grown)
  only_new["cls_head"]["out"]["kernel"][:, 4:] += 1.0
  assert float(penalty(only_new, previous, None)) == 0.0


def test_loss_terms_vanish_at_the_previous_model_and_fisher_has_mean_one(heads_pair):
  old_model, previous, new_model, grown, _ = heads_pair
  importance, used = continual_lib.fisher_diagonal(
      old_model, previous, [dict(_batch(), example_mask=np.array([1, 1, 1, 1, 0], bool))] * 3,
      multi_label=False, max_examples=10)
  assert used == 10
  leaves = jax.tree.leaves(importance)
  assert all(np.all(x >= 0) for x in leaves)
  np.testing.assert_allclose(sum(x.sum() for x in leaves) / sum(x.size for x in leaves), 1.0,
                             rtol=1e-4)
  # At the start of a round the model is the previous one, grown: the penalty is 0, and so is the
  # LwF term, which compares the old classes' logits only.
  options = continual_lib.ContinualOptions(penalty_weight=3.0, lwf_weight=1.0)
  loss_fn = jax.jit(continual_lib.continual_loss_fn(new_model, old_model, options),
                    static_argnums=4)
  tree = {"model": grown, "previous": previous, "importance": importance}
  _, (metrics, _) = loss_fn(tree, _batch(), {}, jax.random.PRNGKey(0), True)
  assert float(metrics["penalty"][0]) == 0.0 and abs(float(metrics["lwf_loss"][0])) < 1e-6
  moved = dict(tree, model=jax.tree.map(lambda x: x + 0.05, grown))
  _, (metrics, _) = loss_fn(moved, _batch(), {}, jax.random.PRNGKey(0), True)
  assert float(metrics["penalty"][0]) > 0.0 and float(metrics["lwf_loss"][0]) > 1e-6
  with pytest.raises(ValueError, match="temperature"):
    continual_lib.ContinualOptions(temperature=0.0)


# --------------------------------------------------------------------------------------------------
# The stage end to end.


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
  """A random 10-class classifier workdir whose task (task0) is small synthetic data over three
  of its classes, and a stream: a one-file round with a new class, an empty round, and a
  train/dev/test directory round with another new class."""
  base = tmp_path_factory.mktemp("continual")
  clf = make_classifier_workdir(str(base / "clf"), n_layer=1, seq_len=16)
  old = ["language", "networking", "hardware"]
  task = {s: write_jsonl(base / f"task0_{s}.jsonl", rows(old, n, seed))
          for s, n, seed in (("train", 48, 0), ("dev", 16, 1), ("test", 16, 2))}
  with open(os.path.join(clf, "config.json")) as f:
    config = json.load(f)
  config["task"].update(task)
  with open(os.path.join(clf, "config.json"), "w") as f:
    json.dump(config, f)
  rounds = base / "rounds"
  rounds.mkdir()
  write_jsonl(rounds / "a_week1.jsonl", rows(["forest", "language"], 60, 3))
  (rounds / "b_empty.jsonl").write_text("")
  (rounds / "c_week3").mkdir()
  for s, n, seed in (("train", 40, 4), ("dev", 8, 5), ("test", 12, 6)):
    write_jsonl(rounds / "c_week3" / f"{s}.jsonl", rows(["river", "hardware"], n, seed))
  return {"init_from": clf, "rounds": str(rounds), "base": base}


def stage_config(stream, **overrides):
  values = {"init_from": stream["init_from"], "stream.rounds": stream["rounds"],
            "train.num_steps": 8, "train.batch_size": 16, "train.warmup_steps": 1,
            "train.log_every_steps": 4, "eval.every_steps": 4, "eval.num_batches": 1,
            "checkpoint.every_steps": 4, "replay.size": 24, "regularize.method": "ewc",
            "regularize.weight": 1.0, "lwf.weight": 1.0, "regularize.fisher_examples": 16,
            "report.eval_batch_size": 16}
  values.update(overrides)
  return make_config("continual.py", **values)


@pytest.fixture(scope="module")
def finished(stream):
  workdir = str(stream["base"] / "run")
  return workdir, continual.run(stage_config(stream), workdir)


@pytest.mark.slow
def test_rounds_report_drift_and_naive_reference(finished, stream):
  workdir, summary = finished
  assert summary["status"] == "complete" and summary["tasks"] == ["task0", "a_week1", "c_week3"]
  statuses = [(r["name"], r["status"]) for r in summary["rounds"]]
  assert statuses == [("01_a_week1", "complete"), ("02_b_empty", "skipped"),
                      ("03_c_week3", "complete")]
  first, _, last = summary["rounds"]
  assert first["new_labels"] == ["forest"] and last["new_labels"] == ["river"]
  assert summary["labels"] == LABELS + ["forest", "river"]
  assert (first["start_step"], first["end_step"], last["end_step"]) == (0, 8, 16)
  # One-file round: every 5th row is test, the one before dev; the buffer holds task0's rows.
  assert first["rows"] == {"train": 36, "dev": 12, "test": 12, "replayed": 24}
  assert first["replay"] == {"capacity": 24, "seen": 48 + 36, "held": 24}
  assert first["fisher_examples"] == 16
  assert set(last["test"]) == {"task0", "a_week1", "c_week3"}
  drift = first["drift"]
  assert drift["new_class_share"] == 0.5 and drift["verdict"] == "large"
  assert 0 < drift["confidence_incoming"] <= 1 and 0 < drift["word_token_coverage"] <= 1
  # Both chains are reported: per-task accuracy after each round, forgetting, old/new figures.
  for chain in ("continual", "naive"):
    numbers = summary[chain]
    assert [r["after"] for r in numbers["accuracy"]] == ["init_from", "01_a_week1", "03_c_week3"]
    assert set(numbers["tasks"]) == {"task0", "a_week1", "c_week3"}
    assert numbers["old_accuracy_drop"] is not None and numbers["new_task"] == "c_week3"
  assert os.path.exists(os.path.join(workdir, "naive", "rounds", "03_c_week3", "round.json"))
  assert summary["naive_rounds"][0]["controls"]["lwf_weight"] == 0.0
  report = open(os.path.join(workdir, "report.md")).read()
  assert "naive sequential finetuning" in report and "| 02_b_empty | skipped |" in report
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r.get("round") for r in records} == {"01_a_week1", "03_c_week3"}
  assert [r["step"] for r in records if r["split"] == "drift"] == [0, 8]
  steps = [r["step"] for r in records if r["split"] == "train"]
  assert steps == sorted(steps) and steps[-1] == 16
  # The final classifier is a classifier workdir: a compression stage's init_from.
  src = source_lib.load(workdir)
  assert src.spec.num_classes == 12 and src.spec.label_names[-2:] == ("forest", "river")
  assert src.step == 16
  # A rerun of the finished stage does nothing and returns the same summary.
  assert continual.run(stage_config(stream), workdir)["wall_secs"] == summary["wall_secs"]
  # The stream grows by a round the classifier cannot take: refused in one line before anything
  # trains, and the workdir keeps what it had.
  grown = stream["base"] / "grown"
  shutil.copytree(stream["rounds"], grown)
  write_jsonl(grown / "d_week4.jsonl",
              [{"text": "tree leaf", "label": ["forest", "river"]}] * 10)
  before = open(os.path.join(workdir, "summary.json")).read()
  with pytest.raises(errors.BadInput, match="rows carry several labels"):
    continual.run(stage_config(stream, **{"stream.rounds": str(grown)}), workdir)
  assert open(os.path.join(workdir, "summary.json")).read() == before
  assert os.path.exists(os.path.join(workdir, "rounds", "03_c_week3", "round.json"))


@pytest.mark.slow
def test_killed_round_resumes_bitwise_with_its_replay_buffer(finished, stream, tmp_path):
  straight_dir, straight = finished
  workdir = str(tmp_path / "killed")
  config = stage_config(stream, **{"report.naive_reference": False})
  # Round 1 as the straight run left it (a finished round is read back, not rerun), then a kill
  # inside round 3 (steps 8-16), between checkpoints.
  shutil.copytree(os.path.join(straight_dir, "rounds", "01_a_week1"),
                  os.path.join(workdir, "rounds", "01_a_week1"))
  ckpt_lib.request_preemption(at_step=10)
  with pytest.raises(SystemExit):
    continual.run(config, workdir)
  rdir = os.path.join(workdir, "rounds", "03_c_week3")
  assert os.path.exists(os.path.join(rdir, "replay_before.json"))
  assert not os.path.exists(os.path.join(rdir, "round.json"))
  resumed = continual.run(config, workdir)
  assert 8 < resumed["rounds"][2]["resumed_from_step"] < 16  # the next call boundary after 10
  for name in ("replay_before.json", "replay_after.json"):
    a = open(os.path.join(rdir, name), "rb").read()
    b = open(os.path.join(straight_dir, "rounds", "03_c_week3", name), "rb").read()
    assert a == b
  a = read_params(os.path.join(rdir, "checkpoints"), 16)
  b = read_params(os.path.join(straight_dir, "rounds", "03_c_week3", "checkpoints"), 16)
  assert set(a) == set(b) and all(bitwise_equal(a[p], b[p]) for p in a)
  assert resumed["continual"] == straight["continual"]


# --------------------------------------------------------------------------------------------------
# Bad input: refused in one line before training, or skipped with a log line.


STREAM = types.SimpleNamespace(text_field="text", label_field="label", label_delimiter=",",
                               holdout_every=5)


def test_bad_rounds_are_refused_in_one_line_and_empty_ones_read_as_none(tmp_path):
  multi = write_jsonl(tmp_path / "multi.jsonl",
                      [{"text": "compiler syntax", "label": ["language", "forest"]}] * 10)
  with pytest.raises(errors.BadInput, match=r"10 of its 10 rows carry several labels .*, but "
                     r"init_from's classifier is single-label"):
    rounds_lib.read_round("multi", multi, STREAM, multi_label=False)
  # A multi-label classifier takes the same rows.
  assert rounds_lib.read_round("multi", multi, STREAM, multi_label=True).train[0]["label"] == [
      "language", "forest"]
  few = write_jsonl(tmp_path / "few.jsonl", rows(["forest"], 3, 0))
  with pytest.raises(errors.BadInput, match="too few to hold out a dev and a test row in every 5"):
    rounds_lib.read_round("few", few, STREAM, multi_label=False)
  (tmp_path / "r").mkdir()
  write_jsonl(tmp_path / "r" / "train.jsonl", rows(["forest"], 8, 0))
  with pytest.raises(errors.InputNotFound, match="without dev/test file"):
    rounds_lib.read_round("r", str(tmp_path / "r"), STREAM, multi_label=False)
  write_jsonl(tmp_path / "r" / "dev.jsonl", rows(["forest"], 4, 1))
  write_jsonl(tmp_path / "r" / "test.jsonl", rows(["river"], 4, 2))
  task = rounds_lib.read_round("r", str(tmp_path / "r"), STREAM, multi_label=False)
  with pytest.raises(errors.BadInput, match=r"label\(s\) \['river'\] that neither its train rows"):
    rounds_lib.new_labels(task, ["language"], False)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  assert rounds_lib.read_round("empty", str(empty), STREAM, multi_label=False) is None
  with pytest.raises(errors.InputNotFound, match="does not exist"):
    rounds_lib.round_specs(f"{empty},{tmp_path / 'nope.jsonl'}")
  # A directory of rounds: its sorted entries; a round directory (with a train file) is one round.
  assert [n for n, _ in rounds_lib.round_specs(str(tmp_path))] == [
      "empty", "few", "multi", "r"]
  assert rounds_lib.round_specs(str(tmp_path / "r")) == [("r", str(tmp_path / "r"))]


def test_config_problems_name_the_key_and_the_fix():
  config = make_config("continual.py", **{"replay.size": 0, "regularize.method": "sgd",
                                          "lwf.temperature": 0.0})
  with pytest.raises(configlib.ConfigError) as e:
    continual.validate(config)
  message = str(e.value)
  assert "replay.size: 0 with replay.enabled=True" in message
  assert "regularize.method" in message and "lwf.temperature" in message
  with pytest.raises(configlib.ConfigError, match="ewc estimates its Fisher on the replay"):
    continual.validate(make_config("continual.py", **{"replay.size": 0, "replay.enabled": False,
                                                      "regularize.method": "ewc"}))
  continual.validate(make_config("continual.py", **{"replay.size": 0, "replay.enabled": False}))
  with pytest.raises(configlib.ConfigError, match="init_from is empty"):
    continual.run(make_config("continual.py"), "/nonexistent/never-created")
