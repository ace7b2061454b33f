"""Tests for r1jax.compress.prune and the prune stage."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax import run_dir
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import prune as prune_lib
from r1jax.compress import source as source_lib
from r1jax.compress import structured
from r1jax.stages import prune as prune_stage
from test_compress_source import classifier_dir  # noqa: F401  (fixture)
from test_compress_source import finetuned_dir  # noqa: F401  (fixture)
from test_compress_source import pretrain_dir  # noqa: F401  (fixture)


def _params():
  rng = np.random.RandomState(0)
  return {"backbone": {"layer_0": {"ff_in": {"kernel": jnp.asarray(rng.randn(8, 16), jnp.float32),
                                             "bias": jnp.asarray(rng.randn(16), jnp.float32)}},
                       "layer_1": {"ff_in": {"kernel": jnp.asarray(0.01 * rng.randn(16, 8),
                                                                   jnp.float32)}},
                       "word_emb": {"embedding": jnp.asarray(rng.randn(10, 8), jnp.float32)}}}


def test_select_and_masks_per_layer_and_global():
  params = _params()
  selected = prune_lib.select(params)
  assert prune_lib.masks_from_selected(selected) == {
      "backbone/layer_0/ff_in/bias": False, "backbone/layer_0/ff_in/kernel": True,
      "backbone/layer_1/ff_in/kernel": True, "backbone/word_emb/embedding": False}
  masks = prune_lib.compute_masks(params, selected, 0.5, "layer")
  assert float(jnp.mean(masks["backbone"]["layer_0"]["ff_in"]["kernel"])) == 0.5
  assert float(jnp.mean(masks["backbone"]["layer_1"]["ff_in"]["kernel"])) == 0.5
  assert bool(jnp.all(masks["backbone"]["word_emb"]["embedding"]))
  kept = jnp.abs(params["backbone"]["layer_0"]["ff_in"]["kernel"])
  m = masks["backbone"]["layer_0"]["ff_in"]["kernel"]
  assert float(kept[m].min()) > float(kept[~m].max())  # the smallest magnitudes go
  # Global: one threshold, so the layer of small weights loses (almost) everything first.
  masks = prune_lib.compute_masks(params, selected, 0.5, "global")
  assert float(jnp.mean(masks["backbone"]["layer_1"]["ff_in"]["kernel"])) < 0.05
  total = sum(int(masks["backbone"][l]["ff_in"]["kernel"].sum()) for l in ("layer_0", "layer_1"))
  assert total == 128
  with pytest.raises(ValueError, match="selects no"):
    prune_lib.select(params, include="head/.*")


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True])
def test_sparsity_outside_range_is_refused(bad):
  with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
    prune_lib.Schedule(sparsity=bad)


def test_bad_schedule_and_scope():
  with pytest.raises(ValueError, match="one_shot, gradual"):
    prune_lib.Schedule(0.5, kind="cubic")
  with pytest.raises(ValueError, match="layer, global"):
    prune_lib.Schedule(0.5, scope="row")
  with pytest.raises(ValueError, match="ramp_steps >= 1"):
    prune_lib.Schedule(0.5, kind="gradual", ramp_steps=0)


@pytest.mark.parametrize("kind", ["one_shot", "gradual"])
def test_pruned_weights_stay_exactly_zero_under_adam(kind):
  params = _params()
  selected = prune_lib.select(params)
  schedule = prune_lib.Schedule(0.6, kind=kind, ramp_steps=6, update_every=2)
  tx = optax.chain(optax.adamw(0.05, weight_decay=0.1),
                   prune_lib.masked_pruning(selected, schedule))
  state = tx.init(params)
  if kind == "one_shot":
    params, prune_state = prune_lib.initial_state(params, selected, schedule)
    state = prune_lib.replace_state(state, prune_state)

  @jax.jit
  def step(params, state, i):
    # Gradients that push every weight, pruned or not, away from zero.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * (1.0 + i), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  targets = []
  for i in range(10):
    params, state = step(params, state, i)
    report = prune_lib.sparsity_report(params, selected)
    targets.append(report["selected_sparsity"])
  masks = prune_lib.find_state(state).masks
  for path in ("layer_0", "layer_1"):
    p = params["backbone"][path]["ff_in"]["kernel"]
    m = masks["backbone"][path]["ff_in"]["kernel"]
    assert float(jnp.mean(m)) == pytest.approx(0.4, abs=0.01)
    assert bool(jnp.all(p[~m] == 0.0)), "a pruned weight moved"
    assert bool(jnp.all(p[m] != 0.0))
  assert targets[-1] == pytest.approx(0.6, abs=0.01)
  if kind == "gradual":
    assert targets[0] < targets[3] < targets[-1]  # the cubic ramp
  assert float(jnp.mean(params["backbone"]["word_emb"]["embedding"] == 0.0)) == 0.0


def _stage_config(init_from, **prune):
  config = configlib.load_config("configs/prune.py:variant=tiny")
  config.init_from = init_from
  config.train.num_steps = 4
  config.train.batch_size = 16
  config.train.learning_rate = 1e-2
  config.train.progress_bar = False
  config.eval.every_steps = 100
  config.eval.num_batches = 1
  config.checkpoint.async_save = False
  config.report.latency_repeats = 2
  config.report.latency_warmup = 1
  config.report.latency_batch_size = 8
  config.report.test_limit_batches = 1
  config.export.enabled = False
  for k, v in prune.items():
    config.prune[k] = v
  return config


def test_prune_stage_zeros_survive_recovery_finetuning(classifier_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "p")
  summary = prune_stage.run(_stage_config(classifier_dir, sparsity=0.5), workdir)
  assert [r["name"] for r in summary["artifacts"]] == ["float", "pruned-50%"]
  per_layer = summary["sparsity"]["per_layer"]
  assert len(per_layer) == 10 and all(v == pytest.approx(0.5, abs=1e-3) for v in per_layer.values())
  dense = source_lib.load(classifier_dir).params
  pruned = artifact_lib.load(os.path.join(workdir, "artifact")).params
  selected = prune_lib.select(dense)
  initial = prune_lib.compute_masks(dense, selected, 0.5, "layer")
  moved = 0
  for path, flag in prune_lib.masks_from_selected(selected).items():
    if not flag:
      continue
    keys = path.split("/")
    mask, before, after = _at(initial, keys), _at(dense, keys), _at(pruned, keys)
    assert bool(jnp.all(after[~mask] == 0.0)), path  # exactly zero after recovery finetuning
    moved += int(jnp.sum(after[mask] != before[mask]))
  assert moved > 0, "recovery finetuning did not change the kept weights"


def _at(tree, keys):
  for k in keys:
    tree = tree[k]
  return jnp.asarray(tree)


def test_prune_stage_bad_inputs(pretrain_dir, tmp_path):  # noqa: F811
  with pytest.raises(configlib.ConfigError, match=r"prune.sparsity.*must be in \[0, 1\)"):
    prune_stage.validate(_stage_config(pretrain_dir, sparsity=1.0))
  with pytest.raises(configlib.ConfigError, match="prune.schedule"):
    prune_stage.validate(_stage_config(pretrain_dir, schedule="cubic"))
  with pytest.raises(source_lib.WrongCheckpointKind, match="cls_head"):
    prune_stage.run(_stage_config(pretrain_dir), str(tmp_path / "p"))


@pytest.mark.slow
def test_prune_finetuned_half(finetuned_dir, tmp_path):  # noqa: F811
  config = _stage_config(finetuned_dir, sparsity=0.5, schedule="gradual")
  config.train.num_steps = 100
  config.train.batch_size = 32
  config.train.learning_rate = 5e-4
  config.report.test_limit_batches = 0
  summary = prune_stage.run(config, str(tmp_path / "p"))
  assert summary["sparsity"]["selected_sparsity"] == pytest.approx(0.5, abs=1e-3)
  assert summary["artifacts"][1]["retained_accuracy_pct"] > 90.0


def test_structured_prune_stage_shrinks_and_reloads(classifier_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / "s")
  config = _stage_config(classifier_dir, mode="structured", heads_fraction=0.5,
                         ffn_fraction=0.25, score_batches=2)
  summary = prune_stage.run(config, workdir)
  names = [r["name"] for r in summary["artifacts"]]
  assert names[0] == "float" and names[2] == "structured -50% heads -25% units"
  assert names[1] == names[2] + " (no recovery)"
  dense = source_lib.load(classifier_dir)
  art = artifact_lib.load(os.path.join(workdir, "artifact"))
  n = dense.spec.model.n_layer
  assert art.spec.model.layer_heads == () and art.spec.model.n_head == 2   # uniform: 2 per layer
  assert art.spec.model.d_inner == dense.spec.model.d_inner * 3 // 4
  assert summary["structured"]["heads_kept"] == [2] * n
  assert art.params["backbone"]["layer_0"]["attn"]["qkv"]["kernel"].shape[2] == 2
  assert summary["artifacts"][2]["params"] < summary["artifacts"][0]["params"]
  assert summary["artifacts"][2]["bytes"] < summary["artifacts"][0]["bytes"]
  # The kept heads are the plan's, and the workdir is a valid init_from for the next stage.
  plan = structured.Plan.from_json(run_dir.read_json(os.path.join(workdir, "structured_plan.json")))
  assert all(len(h) == 2 for h in plan.heads)
  before = artifact_lib.load(os.path.join(workdir, "unrecovered")).params
  np.testing.assert_array_equal(
      before["backbone"]["layer_1"]["attn"]["out"]["kernel"],
      np.asarray(dense.params["backbone"]["layer_1"]["attn"]["out"]["kernel"])[list(plan.heads[1])])
  again = source_lib.load(workdir)
  assert again.spec.model == art.spec.model
  card = open(os.path.join(workdir, "artifact", "MODEL_CARD.md")).read()
  assert f"Structured pruning: {2 * n} attention heads" in card and "heads per layer [2, 2]" in card


def test_structured_prune_refuses_emptying_a_layer_before_any_work(classifier_dir,  # noqa: F811
                                                                    tmp_path):
  workdir = tmp_path / "s"
  with pytest.raises(structured.StructuredPruningError,
                     match=r"heads_fraction=0.9 would remove all 4 attention heads of layer 0"):
    prune_stage.run(_stage_config(classifier_dir, mode="structured", heads_fraction=0.9),
                    str(workdir))
  assert not workdir.exists()
  with pytest.raises(configlib.ConfigError, match="prune.heads_fraction"):
    prune_stage.validate(_stage_config(classifier_dir, mode="structured", heads_fraction=1.0))
  with pytest.raises(configlib.ConfigError, match="prune.mode"):
    prune_stage.validate(_stage_config(classifier_dir, mode="channels"))


def test_structured_prune_refusal_is_one_line_from_the_command(classifier_dir,  # noqa: F811
                                                               tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.main", "--config=configs/prune.py:variant=tiny",
       f"--workdir={tmp_path / 'w'}", f"--config.init_from={classifier_dir}",
       "--config.prune.mode=structured", "--config.prune.heads_fraction=0.9"],
      cwd=root, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == errors.EXIT_CODE and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("r1jax: prune.heads_fraction=0.9 would remove all 4 attention heads")
  assert not (tmp_path / "w").exists()
