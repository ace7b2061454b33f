"""Train/eval steps on the real PretrainModel: sharding invariance, accumulation, NaN guard, memory."""
import functools
import os
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from r1jax import configlib
from r1jax.model import axes
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl
from r1jax.train import mesh as mesh_lib
from r1jax.train import optim
from r1jax.train import steps
from r1jax.train.state import TrainState

B, Q, P, V = 8, 16, 3, 64
CFG = txl.get_variant("tiny", vocab_size=V, d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64,
                      mem_len=8, n_token_types=2, dropout=0.0)
MODEL = heads.PretrainModel(CFG)
TRAIN = configlib.train_section(learning_rate=3e-3, warmup_steps=1, num_steps=10)


def init_params(rng):
  return MODEL.init({"params": rng}, jnp.zeros((1, 4), jnp.int32),
                    token_types=jnp.zeros((1, 4), jnp.int32))["params"]


def make_batch(seed, reset=False):
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(5, V, (B, Q)).astype(np.int32),
          "token_mask": np.ones((B, Q), bool),
          "token_types": (np.arange(Q)[None, :] >= Q // 2).repeat(B, 0).astype(np.int32),
          "mlm_positions": np.sort(rng.choice(Q, (B, P)), axis=1).astype(np.int32),
          "mlm_ids": rng.integers(5, V, (B, P)).astype(np.int32),
          "mlm_weights": np.ones((B, P), np.float32),
          "nsp_label": rng.integers(0, 2, (B,)).astype(np.int32),
          "reset_memory": np.full((B,), reset)}


def make_engine(shape=(1, 1, 1), accum=1, loss_fn=None):
  n = int(np.prod(shape))
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, shape))),
                            devices=jax.devices()[:n])
  abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  return steps.Engine(
      mesh=mesh, rules=axes.DEFAULT_RULES, tx=optim.build_optimizer(TRAIN, abstract, num_steps=10),
      init_params=init_params, init_extras=lambda: {"memory": txl.init_memory(CFG, B)},
      loss_fn=loss_fn or losses.pretrain_loss_fn(MODEL), batch_size=B, accum_steps=accum,
      lr_schedule=optim.make_schedule(TRAIN, 10))


def train(engine, batches):
  state = engine.init_state(jax.random.PRNGKey(0))
  metrics = []
  for b in batches:
    state, m = engine.train_step(state, b)
    metrics.append(m)
  return state, [steps.normalize(m) for m in jax.device_get(metrics)]


@pytest.fixture(scope="module")
def batches():
  return [make_batch(i, reset=(i == 0)) for i in range(4)]


@pytest.fixture(scope="module")
def engine1():
  return make_engine()


@pytest.fixture(scope="module")
def engine8():
  return make_engine((2, 2, 2))


@pytest.fixture(scope="module")
def single(engine1, batches):
  return train(engine1, batches)


def test_sharded_data_fsdp_tensor_matches_one_device(single, engine8, batches):
  """Same losses and parameters on 1 device and on a 2x2x2 (data x fsdp x tensor) mesh.

  Tolerance: relative 1e-5 on losses, absolute 1e-5 on parameters (float32 reductions are
  reordered across devices; the values are not bitwise equal).
  """
  state1, m1 = single
  state8, m8 = train(engine8, batches)
  assert len(jax.tree.leaves(state8.params)[0].sharding.device_set) == 8
  np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  kernel = state8.params["backbone"]["layer_0"]["ff_in"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_grad_accumulation_matches_full_batch(single, batches):
  """Two micro-batches of 4 rows == one batch of 8 when every row weighs the same."""
  state1, m1 = single
  state2, m2 = train(make_engine((2, 2, 1), accum=2), batches)
  np.testing.assert_allclose([m["loss"] for m in m2], [m["loss"] for m in m1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state2.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  # Memory is per row and comes back in the original row order.
  for a, b in zip(jax.tree.leaves(state2.extras), jax.tree.leaves(state1.extras)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-4)


@pytest.mark.parametrize("which", ["engine1", "engine8"])
def test_init_state_from_restored_params_equals_init_then_replace(which, request):
  """init_state_from (only the unrestored parameters' init compiles) gives the state init_state
  gives with those parameters replaced, leaf for leaf; with every parameter restored too."""
  engine = request.getfixturevalue(which)
  rng = jax.random.PRNGKey(3)
  full = engine.init_state(rng)
  other = engine.init_state(jax.random.PRNGKey(4)).params
  partial = {"backbone": other["backbone"]}
  for restored in (partial, other):
    want = full.replace(params={**full.params, **restored})
    got = engine.init_state_from(rng, restored)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.sharding == b.sharding
      np.testing.assert_array_equal(jax.random.key_data(a) if jnp.issubdtype(
          a.dtype, jax.dtypes.prng_key) else a, jax.random.key_data(b) if jnp.issubdtype(
          b.dtype, jax.dtypes.prng_key) else b)
  # Not a vacuous comparison: the heads differ between the two seeds.
  assert not np.array_equal(full.params["nsp_head"]["pooler"]["kernel"],
                            other["nsp_head"]["pooler"]["kernel"])


def test_compiles_once_and_donates_state(engine8, batches):
  engine = engine8
  state = engine.init_state(jax.random.PRNGKey(0))
  old_leaf = jax.tree.leaves(state.params)[0]
  for b in batches[:3]:
    state, _ = engine.train_step(state, b)
  assert old_leaf.is_deleted()  # donated: no second copy of the state
  assert engine._train._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.step) == 3


def test_several_steps_in_one_call_match_one_call_each(single, batches):
  """`train_steps` (lax.scan over stacked batches) on a 2x2x2 mesh == four `train_step` calls."""
  state1, m1 = single
  engine = make_engine((2, 2, 2))
  state = engine.init_state(jax.random.PRNGKey(0))
  metrics = []
  for pair in (batches[:2], batches[2:]):
    state, m = engine.train_steps(state, pair)
    m = jax.device_get(m)
    assert m["loss"][0].shape == (2,)  # each step's metrics, stacked
    metrics += [steps.normalize(jax.tree.map(lambda x, i=i: x[i], m)) for i in range(2)]
  assert int(state.step) == 4
  assert engine._train_many._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_allclose([m["loss"] for m in metrics], [m["loss"] for m in m1], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  for a, b in zip(jax.tree.leaves(state.extras), jax.tree.leaves(state1.extras)):  # memory
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-4)


def test_nonfinite_step_is_skipped_not_applied(engine1, batches):
  engine = engine1
  state = engine.init_state(jax.random.PRNGKey(0))
  state, _ = engine.train_step(state, batches[0])
  before = jax.device_get(state.params)
  bad = dict(batches[1], mlm_weights=np.full((B, P), np.nan, np.float32))
  state, metrics = engine.train_step(state, bad)
  metrics = jax.device_get(metrics)
  assert metrics["nonfinite"][0] == 1.0
  assert int(state.step) == 2 and int(state.nonfinite_skips) == 1
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  state, metrics = engine.train_step(state, batches[2])
  assert jax.device_get(metrics)["nonfinite"][0] == 0.0
  assert np.isfinite(float(jax.device_get(metrics)["loss"][0]))


def test_memory_is_carried_and_reset_per_row(single, engine1, batches):
  state, _ = single
  engine = engine1
  memory = state.extras["memory"]
  assert bool(np.asarray(memory.mask).all())  # mem_len 8 < Q: all slots valid after a step
  probe = batches[1]
  fresh, _ = engine.eval_step(state.params, engine.new_extras(), dict(probe, reset_memory=np.ones(B,
                                                                                              bool)))
  reset, _ = engine.eval_step(state.params, state.extras, dict(probe,
                                                               reset_memory=np.ones(B, bool)))
  carried, _ = engine.eval_step(state.params, state.extras, probe)
  fresh, reset, carried = (steps.normalize(jax.device_get(m)) for m in (fresh, reset, carried))
  # Reset rows see no memory (same loss as fresh memory); carried memory changes the loss (the
  # effect is small at initialisation, but far above float noise).
  assert abs(fresh["loss"] - reset["loss"]) < 1e-6
  assert abs(carried["loss"] - fresh["loss"]) > 2e-5


def test_evaluate_sums_over_batches(single, engine1, batches):
  state, _ = single
  engine = engine1
  both = engine.evaluate(state.params, batches[:2])
  extras = engine.new_extras()
  parts = []
  for b in batches[:2]:
    m, extras = engine.eval_step(state.params, extras, b)
    parts.append(jax.device_get(m))
  total = {k: (parts[0][k][0] + parts[1][k][0]) / (parts[0][k][1] + parts[1][k][1])
           for k in both}
  for k in both:
    assert both[k] == pytest.approx(float(total[k]), rel=1e-6)


def test_cross_entropy_label_smoothing_matches_optax():
  logits = jax.random.normal(jax.random.PRNGKey(1), (5, 7))
  labels = jnp.array([0, 3, 6, 2, 1])
  loss, nll = losses.cross_entropy(logits, labels, 0.1)
  ref = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 7), 0.1))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(nll, optax.softmax_cross_entropy_with_integer_labels(logits, labels),
                             rtol=1e-5)


def test_cross_entropy_gradient_and_accuracy_match_reference():
  logits = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 11)) * 3.0
  labels = jax.random.randint(jax.random.PRNGKey(3), (4, 6), 0, 11)
  ref = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).sum()  # noqa: E731
  ours = lambda x: losses.cross_entropy(x, labels)[1].sum()  # noqa: E731
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-6)
  np.testing.assert_array_equal(losses.correct_predictions(logits, labels),
                                (logits.argmax(-1) == labels).astype(np.float32))
  # A wrong label is wrong even when it ties every logit but the top one.
  tied = jnp.array([[2.0, 1.0, 1.0]])
  np.testing.assert_array_equal(losses.correct_predictions(tied, jnp.array([1])), [0.0])


def test_causal_lm_loss_chunked_equals_unchunked():
  cfg = txl.get_variant("tiny", vocab_size=V, d_model=32, n_layer=2, n_head=2, d_head=16,
                        d_inner=64, mem_len=8, attention="causal", dropout=0.0)
  model = heads.PretrainModel(cfg)
  rng = np.random.default_rng(0)
  stream = rng.integers(5, V, (B, Q + 1)).astype(np.int32)
  mask = np.ones((B, Q), bool)
  mask[-1, Q // 2:] = False  # a padded row: its tail is neither attended nor scored
  batch = {"tokens": stream[:, :-1], "labels": stream[:, 1:], "token_mask": mask,
           "reset_memory": np.zeros(B, bool)}
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  extras = {"memory": txl.init_memory(cfg, B)}
  out = {}
  for chunk in (0, 4):
    fn = losses.causal_lm_loss_fn(model, chunk_size=chunk)
    (loss, (metrics, new_extras)), grads = jax.value_and_grad(fn, has_aux=True)(
        params, batch, extras, jax.random.key(1), True)
    out[chunk] = (loss, grads, metrics["lm_loss"][1])
  # Reference: the full [B, Q, V] logits from the model's forward pass.
  logits = model.apply({"params": params}, batch["tokens"], extras["memory"], mask)[0][
      "mlm_logits"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  np.testing.assert_allclose(out[0][0], (nll * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(out[4][0], out[0][0], rtol=1e-6)
  assert float(out[4][2]) == mask.sum()
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[4][1])):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match="chunk_size=5 must divide the number of positions 16"):
    losses.causal_lm_loss_fn(model, chunk_size=5)(params, batch, extras, jax.random.key(1), True)


def test_split_and_merge_rows_round_trip():
  x = jnp.arange(24).reshape(8, 3)
  split = steps.split_rows(x, 2)
  assert split.shape == (2, 4, 3)
  np.testing.assert_array_equal(split[1, :, 0], [3, 9, 15, 21])  # rows 1, 3, 5, 7
  np.testing.assert_array_equal(steps.merge_rows(split), x)


def test_knowledge_loss_is_added_with_its_weight():
  model = heads.PretrainModel(CFG, num_kg_labels=2)
  params = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 4), jnp.int32),
                      token_types=jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  batch = dict(make_batch(0, reset=True), kg_tokens=rng.integers(5, V, (B, 8)).astype(np.int32),
               kg_token_mask=np.ones((B, 8), bool), kg_label=rng.integers(0, 2, (B,)).astype(
                   np.int32))
  extras = {"memory": txl.init_memory(CFG, B)}
  loss_fn = losses.pretrain_loss_fn(model, kg_weight=0.5)
  loss, (m, _) = jax.jit(loss_fn, static_argnums=4)(params, batch, extras, jax.random.PRNGKey(0),
                                                   True)
  m = steps.normalize(jax.device_get(m))
  assert {"kg_loss", "kg_accuracy"} <= set(m)
  # The reported losses are unweighted means; the optimised loss weights the knowledge term.
  assert float(loss) == pytest.approx(m["mlm_loss"] + m["nsp_loss"] + 0.5 * m["kg_loss"], rel=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_nonfinite_skip_keeps_params_and_moments_on_either_guard(monkeypatch, backend):
  # The guard is a conditional except on GPU, where it is a select (no host read of the
  # predicate); both must skip a NaN step whole and apply a finite one the same way.
  monkeypatch.setattr(steps.jax, "default_backend", lambda: backend)
  tx = optax.adamw(0.1)
  params = {"w": jnp.arange(3.0), "b": jnp.ones(())}

  def loss_fn(p, batch, extras, rng, deterministic):
    del rng, deterministic
    loss = jnp.sum((p["w"] * batch["x"] + p["b"]) ** 2)
    return loss, ({"loss": losses.metric(loss)}, extras + 1)

  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)), extras=jnp.zeros(()),
                     nonfinite_skips=jnp.zeros((), jnp.int32))
  step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx))
  good, _ = step(state, {"x": jnp.ones(3)})
  skipped, m = step(good, {"x": jnp.array([1.0, np.nan, 1.0])})
  assert float(m["nonfinite"][0]) == 1.0 and int(skipped.nonfinite_skips) == 1
  for a, b in zip(jax.tree.leaves((skipped.params, skipped.opt_state, skipped.extras)),
                  jax.tree.leaves((good.params, good.opt_state, good.extras))):
    np.testing.assert_array_equal(a, b)
  again, _ = step(skipped, {"x": jnp.ones(3)})
  expect, _ = step(good, {"x": jnp.ones(3)})
  np.testing.assert_allclose(again.params["w"], expect.params["w"], rtol=1e-6)
  assert not np.allclose(again.params["w"], good.params["w"])
  assert float(again.extras) == 2.0


def test_host_cpu_names_the_model_and_its_vector_extensions():
  cpu = steps.host_cpu()
  assert cpu["model"] and cpu["logical_cpus"] >= 1
  assert set(cpu["vector_flags"]) <= set(steps.VECTOR_FLAGS)
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      words = set(f.read().split())
    assert set(cpu["vector_flags"]) == set(steps.VECTOR_FLAGS) & words
    assert steps._cpu_has_avx512() == ("avx512f" in words)  # pylint: disable=protected-access


def test_compiler_options_only_for_avx512_cpus(monkeypatch):
  monkeypatch.setattr(steps, "_cpu_has_avx512", lambda: True)
  assert steps.compiler_options("cpu") == {
      "xla_cpu_prefer_vector_width": 512, "xla_cpu_enable_concurrency_optimized_scheduler": True}
  assert steps.compiler_options("gpu") == {} and steps.compiler_options("tpu") == {}
  monkeypatch.setattr(steps, "_cpu_has_avx512", lambda: False)
  assert steps.compiler_options("cpu") == {}


def test_length_buckets_cut_padding_without_changing_a_classifier():
  # A classifier's loss does not depend on trailing padding: cutting every batch to its bucket
  # width gives the same evaluation and the same training step, on a 2-device mesh.
  cfg = txl.get_variant("tiny", vocab_size=V, d_model=32, n_layer=2, n_head=2, d_head=16,
                        d_inner=64, dropout=0.0, pooling="mean", ngram_buckets=64)
  model = heads.Classifier(cfg, 3)
  q = 128
  rng = np.random.default_rng(0)
  lens = rng.integers(3, 9, (4, B))  # every row fits the first bucket (width 32 of q=128 / 4)...
  lens[3, 0] = 40                     # ...but one batch, whose longest row needs width 64

  def batch(i):
    mask = np.arange(q)[None, :] < lens[i][:, None]
    return {"tokens": np.where(mask, rng.integers(5, V, (B, q)), 0).astype(np.int32),
            "token_mask": mask, "label": rng.integers(0, 3, B).astype(np.int32)}

  data = [batch(i) for i in range(4)]
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, (2, 1, 1)))),
                            devices=jax.devices()[:2])
  init = lambda rng: model.init({"params": rng}, jnp.zeros((1, 4), jnp.int32))["params"]
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))

  def engine(buckets):
    return steps.Engine(mesh=mesh, rules=axes.DEFAULT_RULES,
                        tx=optim.build_optimizer(TRAIN, abstract, num_steps=10), init_params=init,
                        init_extras=dict, batch_size=B, steps_per_call=2, length_buckets=buckets,
                        loss_fn=losses.classification_loss_fn(model, multi_label=False))

  full, cut = engine(0), engine(4)
  assert [b["tokens"].shape[1] for b in cut.trim(data[:3])] == [32, 32, 32]
  assert [b["tokens"].shape[1] for b in cut.trim(data[2:])] == [64, 64]
  assert [b["tokens"].shape[1] for b in full.trim(data)] == [q] * 4
  state = full.init_state(jax.random.PRNGKey(1))
  np.testing.assert_allclose(
      [cut.evaluate(state.params, data)[k] for k in ("loss", "accuracy")],
      [full.evaluate(state.params, data)[k] for k in ("loss", "accuracy")], rtol=1e-5)
  s_full, m_full = full.train_steps(full.init_state(jax.random.PRNGKey(1)), data[2:])
  s_cut, m_cut = cut.train_steps(cut.init_state(jax.random.PRNGKey(1)), cut.trim(data[2:]))
  np.testing.assert_allclose(np.asarray(m_full["loss"]), np.asarray(m_cut["loss"]), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(s_full.params), jax.tree.leaves(s_cut.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
