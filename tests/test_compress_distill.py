"""Tests for r1jax.compress.distill and the distill stage."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import configlib
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import distill as distill_lib
from r1jax.compress import source as source_lib
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl
from r1jax.stages import distill as distill_stage
from r1jax.train import steps as steps_lib
from test_compress_source import finetuned_dir  # noqa: F401  (fixture)
from test_compress_source import make_classifier_workdir

Q = 12


def _teacher(n_layer=3, dropout=0.1):
  cfg = txl.get_variant("tiny", vocab_size=200, n_layer=n_layer, dropout=dropout)
  model = heads.Classifier(cfg, 4)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, Q), jnp.int32))["params"])
  return model, params


def _batch(n=6):
  rng = np.random.RandomState(0)
  return {"tokens": jnp.asarray(rng.randint(5, 200, (n, Q)), jnp.int32),
          "token_mask": jnp.asarray(np.arange(Q)[None] < rng.randint(3, Q + 1, (n, 1))),
          "label": jnp.asarray(rng.randint(0, 4, (n,)), jnp.int32),
          "example_mask": jnp.asarray([True] * (n - 1) + [False])}


def test_student_config_and_layer_map():
  teacher = txl.get_variant("tiny", n_layer=6)
  cfg = distill_lib.student_config(teacher)
  assert cfg.n_layer == 2 and cfg.d_model == teacher.d_model
  assert distill_lib.layer_map(2, 6) == [2, 5]
  assert distill_lib.layer_map(2, 6, "first") == [0, 1]
  assert distill_lib.layer_map(2, 6, "last") == [4, 5]
  assert distill_lib.layer_map(3, 3) == [0, 1, 2]
  assert distill_lib.layer_map(2, 6, [1, 4]) == [1, 4]
  with pytest.raises(ValueError, match="increasing teacher layer indices"):
    distill_lib.layer_map(2, 6, [4, 1])
  with pytest.raises(ValueError, match="allowed values are uniform, first, last"):
    distill_lib.layer_map(2, 6, "middle")


def test_student_larger_than_teacher_is_refused():
  teacher = txl.get_variant("tiny", n_layer=3)
  with pytest.raises(distill_lib.StudentTooLarge, match="n_layer=4 > teacher's 3"):
    distill_lib.student_config(teacher, n_layer=4)
  with pytest.raises(distill_lib.StudentTooLarge, match="d_inner=512 > teacher's 256"):
    distill_lib.student_config(teacher, d_inner=512)
  with pytest.raises(ValueError, match="student.d_model=0"):
    distill_lib.student_config(teacher, d_model=0)


def test_loss_is_zero_when_student_equals_teacher():
  teacher, params = _teacher()
  batch = _batch()
  options = losses.DistillOptions(alpha=1.0, temperature=2.0, hidden_weight=1.0)
  loss_fn = losses.distill_loss_fn(teacher, teacher, options, [0, 1, 2])
  tree = {"student": params, "teacher": params}
  loss, (metrics, _) = jax.jit(lambda p: loss_fn(p, batch, {}, jax.random.PRNGKey(0), True))(tree)
  assert abs(float(loss)) < 1e-6
  assert abs(float(steps_lib.normalize(metrics)["hidden_mse"])) < 1e-10
  # With alpha < 1 only the hard-label part is left: (1 - alpha) * CE over the real rows.
  options = losses.DistillOptions(alpha=0.25, temperature=3.0)
  loss_fn = losses.distill_loss_fn(teacher, teacher, options, [0, 1, 2])
  loss, _ = loss_fn(tree, batch, {}, jax.random.PRNGKey(0), True)
  logits = teacher.apply({"params": params}, batch["tokens"], batch["token_mask"])[0]
  ce = losses.cross_entropy(logits, batch["label"])[0][:-1].mean()
  np.testing.assert_allclose(float(loss), 0.75 * float(ce), rtol=1e-5)


def test_loss_positive_and_gradients_only_reach_student():
  teacher, t_params = _teacher()
  student = heads.Classifier(distill_lib.student_config(teacher.config), 4)
  s_params = nn.unbox(student.init(jax.random.PRNGKey(5), jnp.zeros((1, Q), jnp.int32))["params"])
  options = losses.DistillOptions(alpha=0.5, hidden_weight=0.5)
  loss_fn = losses.distill_loss_fn(student, teacher, options, [2])
  tree = {"student": s_params, "teacher": t_params}
  batch = _batch()
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, {}, jax.random.PRNGKey(0), False)[0]))(
      tree)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["teacher"]))
  assert float(optax_norm(grads["student"])) > 0.0
  # Soft term of the multi-label form is also exactly 0 for equal logits.
  z = jnp.asarray([[0.3, -2.0, 5.0]])
  assert float(losses.soft_loss(z, z, 2.0, multi_label=True)[0]) == 0.0
  assert float(losses.soft_loss(z, z + 1.0, 2.0, multi_label=True)[0]) > 0.0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))


def test_init_from_teacher_copies_mapped_layers():
  teacher, t_params = _teacher(n_layer=3)
  student = heads.Classifier(distill_lib.student_config(teacher.config, n_layer=2), 4)
  s_params = nn.unbox(student.init(jax.random.PRNGKey(5), jnp.zeros((1, Q), jnp.int32))["params"])
  out, info = distill_lib.init_from_teacher(s_params, t_params, [0, 2])
  assert not info["kept_random"]
  np.testing.assert_array_equal(out["backbone"]["layer_1"]["ff_in"]["kernel"],
                                t_params["backbone"]["layer_2"]["ff_in"]["kernel"])
  np.testing.assert_array_equal(out["cls_head"]["out"]["kernel"],
                                t_params["cls_head"]["out"]["kernel"])
  narrow = heads.Classifier(distill_lib.student_config(teacher.config, n_layer=1, d_inner=128), 4)
  n_params = nn.unbox(narrow.init(jax.random.PRNGKey(5), jnp.zeros((1, Q), jnp.int32))["params"])
  _, info = distill_lib.init_from_teacher(n_params, t_params, [2])
  assert "backbone/layer_0/ff_in/kernel" in info["kept_random"]
  assert "backbone/layer_0/attn/qkv/kernel" in info["copied"]


def _stage_config(init_from, **student):
  config = configlib.load_config("configs/distill.py:variant=tiny")
  config.init_from = init_from
  config.train.num_steps = 4
  config.train.batch_size = 16
  config.train.progress_bar = False
  config.eval.every_steps = 100
  config.eval.num_batches = 1
  config.checkpoint.async_save = False
  config.report.latency_repeats = 2
  config.report.latency_warmup = 1
  config.report.latency_batch_size = 8
  config.report.test_limit_batches = 1
  config.export.enabled = False
  for k, v in student.items():
    config.student[k] = v
  return config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return make_classifier_workdir(str(tmp_path_factory.mktemp("teacher")), n_layer=3)


def test_distill_stage(teacher_dir, tmp_path):
  workdir = str(tmp_path / "kd")
  config = _stage_config(teacher_dir)
  config.distill.hidden_weight = 1.0
  summary = distill_stage.run(config, workdir)
  assert [r["name"] for r in summary["artifacts"]] == ["float", "distilled-1L"]
  student = summary["artifacts"][1]
  assert student["params"] < summary["artifacts"][0]["params"]
  assert summary["layer_map"] == [2] and summary["step"] == 4
  art = artifact_lib.load(os.path.join(workdir, "artifact"))
  assert art.kind == "distilled" and art.spec.model.n_layer == 1
  # The distill workdir is a valid source: its student comes back.
  src = source_lib.load(workdir)
  assert src.spec.model.n_layer == 1
  np.testing.assert_array_equal(src.params["cls_head"]["out"]["kernel"],
                                art.params["cls_head"]["out"]["kernel"])


def test_distill_stage_bad_inputs(teacher_dir, tmp_path):
  with pytest.raises(distill_lib.StudentTooLarge, match="larger than the teacher"):
    distill_stage.run(_stage_config(teacher_dir, n_layer=5), str(tmp_path / "a"))
  with pytest.raises(configlib.ConfigError, match="student.layer_map"):
    distill_stage.validate(_stage_config(teacher_dir, layer_map="middle"))
  bad = _stage_config(teacher_dir)
  bad.distill.temperature = 0.0
  with pytest.raises(configlib.ConfigError, match="distill.temperature"):
    distill_stage.validate(bad)
  pretrain = make_classifier_workdir(str(tmp_path / "pt"), pretrain=True)
  with pytest.raises(source_lib.WrongCheckpointKind, match="cls_head"):
    distill_stage.run(_stage_config(pretrain), str(tmp_path / "b"))


@pytest.mark.slow
def test_distill_finetuned_third_of_layers(finetuned_dir, tmp_path):  # noqa: F811
  config = _stage_config(finetuned_dir)
  config.train.num_steps = 150
  config.train.batch_size = 32
  config.report.test_limit_batches = 0
  summary = distill_stage.run(config, str(tmp_path / "kd"))
  student = summary["artifacts"][1]
  assert student["n_layer"] == 1 and summary["artifacts"][0]["n_layer"] == 3
  assert student["retained_accuracy_pct"] > 80.0
  # Speed is measured by bench/compression_tradeoff.py, not asserted in a test (load-dependent).
  assert student["speedup_batch1"] > 0
