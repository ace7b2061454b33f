"""Tests for r1jax.compress.structured: head / unit importance, removal that shrinks the matrices,
per-layer sizes in the model config, and the one-line refusal of a pruning that empties a layer."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import run_dir
from r1jax.compress import artifact as artifact_lib
from r1jax.compress import spec as spec_lib
from r1jax.compress import structured
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl

Q = 12


@pytest.fixture(scope="module")
def tiny():
  cfg = txl.get_variant("tiny", vocab_size=200, n_layer=2, d_inner=32, dropout=0.0,
                        pooling="mean")
  model = heads.Classifier(cfg, 3)
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(5, 200, (8, Q)), jnp.int32)
  mask = jnp.asarray(np.arange(Q)[None, :] < rng.randint(4, Q + 1, (8, 1)))
  params = jax.device_get(nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:1])["params"]))
  # Larger weights than the init's 0.02 so that every head and unit matters to the output.
  params = jax.tree.map(lambda x: x * 20 if x.ndim >= 2 else x, params)
  return cfg, model, params, tokens, mask


def _logits(cfg, params, tokens, mask):
  model = heads.Classifier(cfg, 3)
  return np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens, mask)[0])(params))


def _zero_removed(params, plan):
  """The full-size params with the removed heads' output slices and units' ff_out rows zeroed:
  the same function as shrink(params, plan) (a removed head or unit then adds nothing)."""
  out = jax.tree.map(np.array, params)
  for i, (h, u) in enumerate(zip(plan.heads, plan.units)):
    layer = out["backbone"][f"layer_{i}"]
    gone_h = [j for j in range(layer["attn"]["out"]["kernel"].shape[0]) if j not in h]
    gone_u = [j for j in range(layer["ff_out"]["kernel"].shape[0]) if j not in u]
    layer["attn"]["out"]["kernel"][gone_h] = 0
    layer["ff_out"]["kernel"][gone_u] = 0
  return out


def test_nothing_pruned_gives_the_same_model(tiny):
  cfg, _, params, tokens, mask = tiny
  plan = structured.Plan.identity(cfg)
  assert structured.pruned_config(cfg, plan) == cfg
  same = structured.shrink(params, plan)
  np.testing.assert_array_equal(_logits(cfg, same, tokens, mask),
                                _logits(cfg, params, tokens, mask))
  plan0 = structured.make_plan(cfg, structured.Scores(
      tuple(np.ones(4) for _ in range(2)), tuple(np.ones(32) for _ in range(2))), 0.0, 0.0)
  assert plan0 == plan


def test_removing_heads_and_units_shrinks_matrices_and_matches_zeroed_model(tiny):
  cfg, _, params, tokens, mask = tiny
  plan = structured.Plan(heads=((0, 2, 3), (1,)), units=(tuple(range(0, 32, 2)), (5, 6, 30)))
  small_cfg = structured.pruned_config(cfg, plan)
  assert small_cfg.layer_heads == (3, 1) and small_cfg.layer_d_inner == (16, 3)
  small = structured.shrink(params, plan)
  layer1 = small["backbone"]["layer_1"]
  assert layer1["attn"]["qkv"]["kernel"].shape == (64, 3, 1, 16)
  assert layer1["attn"]["r_net"]["kernel"].shape == (64, 1, 16)
  assert layer1["attn"]["out"]["kernel"].shape == (1, 16, 64)
  assert layer1["attn"]["r_w_bias"].shape == layer1["attn"]["r_r_bias"].shape == (1, 16)
  assert layer1["ff_in"]["kernel"].shape == (64, 3) and layer1["ff_in"]["bias"].shape == (3,)
  assert layer1["ff_out"]["kernel"].shape == (3, 64)
  # The kept slices are the original ones, in order.
  np.testing.assert_array_equal(layer1["attn"]["qkv"]["kernel"][:, :, 0],
                                params["backbone"]["layer_1"]["attn"]["qkv"]["kernel"][:, :, 1])
  np.testing.assert_array_equal(layer1["ff_out"]["kernel"],
                                params["backbone"]["layer_1"]["ff_out"]["kernel"][[5, 6, 30]])
  # The shrunk model fits its config and computes the full model with those parts cut out.
  abstract = spec_lib.abstract_params(spec_lib.ClassifierSpec(
      model=small_cfg, num_classes=3, label_names=("a", "b", "c"), seq_len=Q))
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, small)
  got = _logits(small_cfg, small, tokens, mask)
  want = _logits(cfg, _zero_removed(params, plan), tokens, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)   # float32 sums in another order
  assert np.abs(got - _logits(cfg, params, tokens, mask)).max() > 1e-3   # it did change


def test_importance_picks_dead_heads_and_units(tiny):
  cfg, model, params, tokens, mask = tiny
  plan_dead = structured.Plan(heads=((0, 1), (1, 2, 3)), units=(tuple(range(8, 32)),
                                                                tuple(range(16))))
  dead = _zero_removed(params, plan_dead)     # heads 2, 3 / 0 and units 0-7 / 16-31 add nothing
  loss_fn = losses.classification_loss_fn(model, multi_label=False)
  labels = jnp.asarray(np.arange(8) % 3, jnp.int32)
  batches = [{"tokens": tokens[:4], "token_mask": mask[:4], "label": labels[:4]},
             {"tokens": tokens[4:], "token_mask": mask[4:], "label": labels[4:]}]
  scores = structured.importance(loss_fn, dead, batches)
  assert [s.shape for s in scores.heads] == [(4,), (4,)]
  assert [s.shape for s in scores.units] == [(32,), (32,)]
  assert np.all(scores.heads[0][[2, 3]] == 0) and np.all(scores.heads[0][[0, 1]] > 0)
  assert np.all(scores.units[1][16:] == 0) and np.all(scores.units[1][:16] > 0)
  plan = structured.make_plan(cfg, scores, heads_fraction=0.5, ffn_fraction=0.25)
  assert plan.heads[0] == (0, 1) and len(plan.heads[1]) == 2 and 0 not in plan.heads[1]
  assert len(plan.units[0]) == 24 and set(plan.units[0]) == set(range(8, 32))
  assert set(range(32)) - set(plan.units[1]) <= set(range(16, 32))   # 8 of the 16 dead ones
  # The importance equals the finite-difference effect of scaling the head's output.
  eps = 1e-3
  def loss_at(scale):
    p = jax.tree.map(np.array, dead)
    p["backbone"]["layer_1"]["attn"]["out"]["kernel"][2] *= scale
    return sum(float(loss_fn(p, b, {}, jax.random.PRNGKey(0), True)[0]) for b in batches[:1])
  fd = abs(loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps)
  one = structured.importance(loss_fn, dead, batches[:1])
  assert one.heads[1][2] == pytest.approx(fd, rel=2e-2, abs=1e-6)


def test_a_fraction_that_empties_a_layer_is_refused_in_one_line(tiny):
  cfg = tiny[0]
  assert structured.keep_counts(cfg, 0.5, 0.3) == ((2, 2), (22, 22))
  with pytest.raises(structured.StructuredPruningError,
                     match=r"heads_fraction=0.9 would remove all 4 attention heads of layer 0"):
    structured.keep_counts(cfg, 0.9, 0.5)
  with pytest.raises(structured.StructuredPruningError, match="feed-forward units of layer 1"):
    structured.keep_counts(cfg.with_layer_sizes((4, 4), (32, 1)), 0.1, 0.5)
  with pytest.raises(structured.StructuredPruningError, match=r"must be in \[0, 1\)"):
    structured.keep_counts(cfg, 1.0, 0.5)
  assert "\n" not in str(pytest.raises(structured.StructuredPruningError,
                                       structured.keep_counts, cfg, 0.95, 0.0).value)


def test_per_layer_sizes_in_config_artifact_and_checkpoint_shapes(tiny, tmp_path):
  cfg, _, params, tokens, mask = tiny
  plan = structured.Plan(heads=((0, 1, 2), (3,)), units=((1, 2), tuple(range(20))))
  small_cfg, small = structured.pruned_config(cfg, plan), structured.shrink(params, plan)
  with pytest.raises(ValueError, match="layer_heads"):
    txl.get_variant("tiny", layer_heads=(4, 0))
  assert txl.get_variant("tiny", layer_heads="3,1").layer_heads == (3, 1)
  spec = spec_lib.ClassifierSpec(model=small_cfg, num_classes=3, label_names=("a", "b", "c"),
                                 seq_len=Q)
  art = artifact_lib.save(str(tmp_path / "a"), spec, small, kind="pruned")
  back = artifact_lib.load(art.path)
  assert back.spec.model == small_cfg
  np.testing.assert_array_equal(back.predict({"tokens": tokens, "token_mask": mask}),
                                _logits(small_cfg, small, tokens, mask))
  # "Which model is in this workdir?" answers the same config from the parameter shapes.
  shapes = {"/".join(k): tuple(v.shape) for k, v in
            flax.traverse_util.flatten_dict(small).items()}
  got = run_dir.model_config_of(str(tmp_path), shapes=shapes)
  assert (got.layer_heads, got.layer_d_inner, got.n_head, got.d_inner) == (
      (3, 1), (2, 20), 3, 2)


def test_global_scope_prunes_where_the_scores_are_lowest(tiny):
  cfg = tiny[0]
  # Layer 0's heads all matter; in layer 1 only head 2 does. Units: the reverse.
  scores = structured.Scores(
      heads=(np.array([5.0, 4.0, 6.0, 5.5]), np.array([0.1, 0.2, 9.0, 0.1])),
      units=(np.r_[np.full(16, 0.01), np.ones(16)], np.ones(32)))
  plan = structured.make_plan(cfg, scores, heads_fraction=0.5, ffn_fraction=0.25,
                              scope="global")
  # Normalised per layer, layer 1's three weak heads rank lowest, then layer 0's head 1.
  assert plan.heads == ((0, 2, 3), (2,))
  assert plan.units[0] == tuple(range(16, 32)) and plan.units[1] == tuple(range(32))
  small = structured.pruned_config(cfg, plan)
  assert small.layer_heads == (3, 1) and small.layer_d_inner == (16, 32)
  # Never a layer without heads: with 6 of 8 heads to go, each layer keeps one.
  keep = structured.make_plan(cfg, structured.Scores(
      heads=(np.array([1.0, 1, 1, 1]), np.array([0.0, 0, 0, 0])), units=scores.units),
      heads_fraction=0.75, ffn_fraction=0.0, scope="global")
  assert [len(h) for h in keep.heads] == [1, 1]
  with pytest.raises(structured.StructuredPruningError,
                     match=r"would remove 7 of the 8 attention heads, leaving a layer with none"):
    structured.check(cfg, 0.9, 0.0, "global")
  with pytest.raises(structured.StructuredPruningError, match="structured_scope"):
    structured.check(cfg, 0.5, 0.5, "net")
