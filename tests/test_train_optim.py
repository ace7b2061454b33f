"""Optimizer: schedule, weight-decay mask, regex rules (frozen leaves have no state), clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import configlib
from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.train import optim


def _train_cfg(**kw):
  return configlib.train_section(**kw)


def _params():
  return {
      "backbone": {
          "word_emb": {"embedding": jnp.ones((10, 4))},
          "layer_0": {"attn": {"qkv": {"kernel": jnp.ones((4, 3, 2, 2))},
                               "r_w_bias": jnp.ones((2, 2))},
                      "attn_norm": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
                      "ff_in": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros((8,))}},
          "layer_1": {"ff_in": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros((8,))}},
      },
      "mlm_head": {"norm": {"scale": jnp.ones((4,))}, "bias": jnp.zeros((10,))},
  }


def test_schedule_warmup_then_linear_decay():
  cfg = _train_cfg(learning_rate=1.0, warmup_steps=10, end_lr_fraction=0.1)
  sched = optim.make_schedule(cfg, num_steps=110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  cos = optim.make_schedule(_train_cfg(learning_rate=2.0, warmup_steps=0, schedule="cosine"), 100)
  np.testing.assert_allclose([cos(0), cos(50), cos(100)], [2.0, 1.0, 0.0], atol=1e-6)
  frac = optim.make_schedule(_train_cfg(learning_rate=1.0, warmup_steps=-1, warmup_fraction=0.2),
                             50)
  np.testing.assert_allclose(frac(10), 1.0, atol=1e-6)


def test_warmup_not_shorter_than_the_run_becomes_its_fraction():
  cfg = _train_cfg(learning_rate=1.0, warmup_steps=100, warmup_fraction=0.1)
  assert optim.warmup_clamped(cfg, 60) and optim.warmup_steps(cfg, 60) == 6
  assert optim.warmup_clamped(cfg, 100) and optim.warmup_steps(cfg, 100) == 10
  assert not optim.warmup_clamped(cfg, 101) and optim.warmup_steps(cfg, 101) == 100
  assert not optim.warmup_clamped(_train_cfg(warmup_steps=-1), 60)
  sched = optim.make_schedule(cfg, num_steps=60)
  np.testing.assert_allclose([sched(3), sched(6), sched(60)], [0.5, 1.0, 0.0], atol=1e-6)


def test_weight_decay_mask_excludes_biases_and_layernorm():
  mask = optim.map_with_path(optim.decays, _params())
  assert mask["backbone"]["word_emb"]["embedding"]
  assert mask["backbone"]["layer_0"]["attn"]["qkv"]["kernel"]
  assert mask["backbone"]["layer_0"]["ff_in"]["kernel"]
  assert not mask["backbone"]["layer_0"]["attn"]["r_w_bias"]
  assert not mask["backbone"]["layer_0"]["attn_norm"]["scale"]
  assert not mask["backbone"]["layer_0"]["ff_in"]["bias"]
  assert not mask["mlm_head"]["norm"]["scale"]
  assert not mask["mlm_head"]["bias"]


def test_decay_mask_on_the_real_model_names():
  cfg = txl.get_variant("tiny", n_layer=1, n_token_types=2)
  params = jax.eval_shape(heads.PretrainModel(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  flat = dict(zip(optim.param_paths(params), jax.tree.leaves(optim.map_with_path(optim.decays,
                                                                                  params))))
  no_decay = sorted(p for p, d in flat.items() if not d)
  assert all(p.endswith(("bias", "scale")) for p in no_decay), no_decay
  assert flat["backbone/layer_0/attn/qkv/kernel"] and flat["backbone/word_emb/embedding"]
  assert not flat["backbone/layer_0/attn_norm/scale"]


def test_decoupled_weight_decay_only_on_masked_leaves():
  params = _params()
  tx = optim.build_optimizer(_train_cfg(learning_rate=0.1, warmup_steps=0, schedule="constant",
                                        weight_decay=0.5, grad_clip_norm=0.0), params, num_steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradient: Adam's step is 0, so the update is -lr * wd * param where decay applies.
  np.testing.assert_allclose(updates["backbone"]["layer_0"]["ff_in"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["backbone"]["layer_0"]["attn_norm"]["scale"], 0.0)
  np.testing.assert_allclose(updates["mlm_head"]["bias"], 0.0)


def test_frozen_rule_has_no_state_and_no_update():
  params = _params()
  rules = [(r"backbone/(word_emb|layer_0)/.*", "frozen"), (r"mlm_head/.*", {"lr_mult": 10.0})]
  tx = optim.build_optimizer(_train_cfg(learning_rate=0.1, warmup_steps=0, schedule="constant",
                                        weight_decay=0.0), params, num_steps=10, rules=rules)
  state = tx.init(params)
  stateful = [x.shape for x in jax.tree.leaves(state) if x.ndim]
  # Adam mu and nu only for layer_1 (2 leaves) and mlm_head (2 leaves).
  assert sorted(stateful) == sorted([(4, 8), (8,), (10,), (4,)] * 2)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  updates, _ = tx.update(grads, state, params)
  for path, u in zip(optim.param_paths(updates), jax.tree.leaves(updates)):
    if path.startswith(("backbone/word_emb", "backbone/layer_0")):
      assert float(jnp.abs(u).max()) == 0.0, path
    else:
      assert float(jnp.abs(u).max()) > 0.0, path
  # lr_mult: Adam's first step is lr * sign(g): 0.1 for layer_1, 1.0 for mlm_head.
  np.testing.assert_allclose(updates["backbone"]["layer_1"]["ff_in"]["kernel"], -0.1, rtol=1e-5)
  np.testing.assert_allclose(updates["mlm_head"]["bias"], -1.0, rtol=1e-5)
  counts = optim.count_params(params, optim.assign_groups(params, rules)["labels"])
  assert counts["total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert counts["trainable"] == 4 * 8 + 8 + 4 + 10


def test_frozen_gradients_do_not_count_in_clipping():
  params = {"a": jnp.zeros((3,)), "b": jnp.zeros((3,))}
  cfg = _train_cfg(learning_rate=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0,
                   grad_clip_norm=1.0, b1=0.0, b2=0.0, eps=1.0)
  sgd_like = optim.build_optimizer(cfg, params, num_steps=5, rules=[("a", "frozen")])
  grads = {"a": jnp.full((3,), 1e6), "b": jnp.array([0.5, 0.0, 0.0])}
  # With b1 = b2 = 0 and eps = 1 the step is -g / (|g| + 1). b's norm (0.5) is below the clip, so
  # its step is -1/3; had the frozen a counted, b would be scaled to ~3e-7 first.
  updates, _ = sgd_like.update(grads, sgd_like.init(params), params)
  np.testing.assert_allclose(updates["b"], [-1 / 3, 0.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(updates["a"], 0.0)


@pytest.mark.parametrize("rules,message", [
    ([("backbone/layer_9/.*", "frozen")], "matched no parameter"),
    ([("backbone/.*", "frozen"), ("backbone/layer_0/.*", {"lr_mult": 2.0})], "matched no parameter"),
    ([("mlm_head/.*", "freeze")], "is not 'frozen' or a dict"),
    ([("mlm_head/.*", {"lr": 1.0})], "unknown keys"),
])
def test_bad_rules_fail_loudly(rules, message):
  with pytest.raises(ValueError, match=message):
    optim.build_optimizer(_train_cfg(), _params(), num_steps=10, rules=rules)


def test_absolute_learning_rate_and_weight_decay_per_group():
  params = _params()
  tx = optim.build_optimizer(
      _train_cfg(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0,
                 grad_clip_norm=0.0),
      params, num_steps=10,
      rules=[(r"backbone/layer_1/.*", {"learning_rate": 0.3, "weight_decay": 1.0})])
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["backbone"]["layer_1"]["ff_in"]["kernel"], -0.3, rtol=1e-6)
  np.testing.assert_allclose(updates["backbone"]["layer_0"]["ff_in"]["kernel"], 0.0)
  assert isinstance(tx, optax.GradientTransformation)
