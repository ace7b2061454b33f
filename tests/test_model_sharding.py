"""The logical axes map the model onto a data x fsdp x tensor mesh (8 forced CPU devices)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from r1jax.model import axes
from r1jax.model import heads
from r1jax.model import transformer_xl as txl


def _mesh():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  return jax.make_mesh((2, 2, 2), axes.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _n_constraints(stablehlo: str) -> int:
  """Sharding constraints in lowered StableHLO (Shardy or GSPMD spelling)."""
  return stablehlo.count("sdy.sharding_constraint") + stablehlo.count("@Sharding")


def test_sharded_forward_equals_single_device():
  mesh = _mesh()
  cfg = txl.get_variant("tiny", dropout=0.0, n_token_types=2)
  model = heads.PretrainModel(cfg)
  b, q = 4, 8
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, q)).astype(np.int32)
  token_mask = np.ones((b, q), bool)
  token_mask[3, 5:] = False
  types = (np.arange(q) >= 3).astype(np.int32)[None].repeat(b, 0)
  positions = rng.integers(0, q, (b, 3)).astype(np.int32)
  memory = txl.init_memory(cfg, b)

  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  shardings = axes.logical_to_mesh_sharding(abstract["params"], mesh)
  init = jax.jit(lambda k: nn.unbox(model.init(k, tokens)["params"]), out_shardings=shardings)
  params = init(jax.random.key(0))
  qkv = params["backbone"]["layer_0"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == P(axes.FSDP, None, axes.TENSOR, None)
  assert qkv.addressable_shards[0].data.shape == (32, 3, 2, 16)   # [64, 3, 4, 16] / fsdp, tensor

  def two_segments(p, tok, mask, typ, pos, mem):
    out1, mem = model.apply({"params": p}, tok, mem, mask, typ, pos)
    out2, mem = model.apply({"params": p}, tok[::-1], mem, mask[::-1], typ, pos)
    return out1, out2, mem

  batch_sharding = NamedSharding(mesh, axes.logical_to_mesh_spec((axes.BATCH, axes.LENGTH)))
  args = (params, *(jax.device_put(x, batch_sharding)
                    for x in (tokens, token_mask, types, positions)), memory)
  with axes.activation_sharding(mesh):
    lowered = jax.jit(two_segments).lower(*args)
    sharded = lowered.compile()(*args)
  host_params = jax.device_get(params)
  single = two_segments(host_params, tokens, token_mask, types, positions, memory)

  # The activation constraints are real inside the context (and no-ops outside it).
  assert _n_constraints(lowered.as_text()) >= 4 * cfg.n_layer
  assert _n_constraints(jax.jit(two_segments).lower(*args).as_text()) == 0
  hidden = sharded[1]["hidden"]
  assert hidden.sharding.is_equivalent_to(NamedSharding(mesh, P((axes.DATA, axes.FSDP))), 3)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(np.asarray(a, np.float32),
                                                       np.asarray(c, np.float32), atol=2e-5),
               sharded, single)


def test_base_param_shardings_without_materialising():
  mesh = _mesh()
  cfg = txl.get_variant("base", n_token_types=2)
  model = heads.PretrainModel(cfg, num_kg_labels=2)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((2, 512), jnp.int32))
  # Nothing was materialised: every leaf is an abstract shape.
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(nn.unbox(abstract["params"])))
  shardings = axes.logical_to_mesh_sharding(abstract["params"], mesh)
  bb = shardings["backbone"]
  assert bb["word_emb"]["embedding"].spec == P(axes.TENSOR, axes.FSDP)
  assert bb["layer_11"]["attn"]["qkv"]["kernel"].spec == P(axes.FSDP, None, axes.TENSOR, None)
  assert bb["layer_0"]["attn"]["out"]["kernel"].spec == P(axes.TENSOR, None, axes.FSDP)
  assert bb["layer_0"]["attn"]["r_w_bias"].spec == P(axes.TENSOR, None)
  assert bb["layer_5"]["ff_in"]["kernel"].spec == P(axes.FSDP, axes.TENSOR)
  assert bb["layer_5"]["ff_out"]["kernel"].spec == P(axes.TENSOR, axes.FSDP)
  assert bb["layer_5"]["ff_norm"]["scale"].spec == P(None)
  assert shardings["mlm_head"]["bias"].spec == P(axes.TENSOR)
  assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(shardings))
  # Same structure as the real params, so it can be passed as jit out_shardings.
  assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(abstract["params"]))
  assert 125e6 < heads.count_params(cfg) < 135e6
