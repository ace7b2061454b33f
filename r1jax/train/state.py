"""The train state (a plain pytree) and its sharded initialisation through `jax.eval_shape`.

    state = TrainState(step, params, opt_state, rng, extras, nonfinite_skips)

`extras` holds per-stage state carried between steps, e.g. `{"memory": Memory}` for Transformer-XL
(memory is part of the state, so it is checkpointed and restored with everything else). Leaves of
`extras` whose leading dim is the global batch are split like the batch; others are replicated.

Initialisation never materialises unsharded arrays: `jax.eval_shape` gives the shapes and the logical
axes of every parameter (and, because optax maps over the boxed parameters, of the optimizer state),
those become NamedShardings, and a jitted init with `out_shardings` creates each shard in place.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
from flax.core import meta
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from r1jax.train import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array             # int32 [] optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array              # uint32 [2] raw key; step keys are fold_in(rng, step)
  extras: Any                 # per-stage carried state (Transformer-XL memory, ...)
  nonfinite_skips: jax.Array  # int32 [] steps whose update was skipped for NaN/inf


def init_state_fn(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                  init_extras: Callable[[], Any]) -> Callable[[jax.Array], TrainState]:
  """rng -> TrainState with logically boxed params/opt_state (unbox before use)."""
  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = init_params(params_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng, extras=init_extras(), nonfinite_skips=jnp.zeros((), jnp.int32))
  return init


def state_shardings(abstract_boxed: TrainState, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                    batch_size: int) -> TrainState:
  """NamedShardings for every state leaf: logical rules for params/opt_state, rows for extras."""
  shardings = mesh_lib.logical_shardings(abstract_boxed, mesh, rules)
  return shardings.replace(extras=mesh_lib.row_shardings(abstract_boxed.extras, mesh, batch_size))


def abstract_state(init: Callable[[jax.Array], TrainState], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]], batch_size: int) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStructs with shardings, NamedShardings) of the unboxed state; nothing allocated."""
  with mesh_lib.mesh_context(mesh, rules):
    abstract_boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = state_shardings(abstract_boxed, mesh, rules, batch_size)
  abstract = meta.unbox(abstract_boxed)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings), shardings


def sharded_init(init: Callable[[jax.Array], TrainState], shardings: TrainState
                 ) -> Callable[[jax.Array], TrainState]:
  """A jitted rng -> state that creates every leaf directly in its sharding (no full copies)."""
  return jax.jit(lambda rng: meta.unbox(init(rng)), out_shardings=shardings)


def create_train_state(rng: jax.Array, *, init_params: Callable[[jax.Array], Any],
                       tx: optax.GradientTransformation, init_extras: Callable[[], Any],
                       mesh: Mesh, rules: Sequence[tuple[str, Any]], batch_size: int
                       ) -> tuple[TrainState, TrainState]:
  """One-off (state, shardings); `steps.Engine` keeps the compiled init instead.

  Args:
    rng: key for parameter init and the state's rng.
    init_params: rng -> params tree whose leaves are `nn.LogicallyPartitioned` (from model.init).
    tx: optimizer.
    init_extras: () -> extras pytree (e.g. an all-invalid fixed-length memory for `batch_size`).
    mesh, rules: device mesh and logical->mesh axis rules.
    batch_size: global batch, to recognise per-row extras.
  """
  init = init_state_fn(init_params, tx, init_extras)
  _, shardings = abstract_state(init, mesh, rules, batch_size)
  with mesh_lib.mesh_context(mesh, rules):
    return sharded_init(init, shardings)(rng), shardings


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete tree, as restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def unbox(tree: Any) -> Any:
  return meta.unbox(tree)

