"""Logical axis names and the default logical -> mesh rules (the only place they are defined).

Parameters name their dimensions with the *parameter* axes below; activations are constrained with
the *activation* axes. The two families are kept apart on purpose: a weight's embedding dimension
is sharded over 'fsdp' (ZeRO-3 style), while the batch of an activation already uses 'fsdp', so
the activation's embedding dimension must map elsewhere (replicated here).

The mesh has three axes:
  'data'   pure data parallelism (parameters replicated),
  'fsdp'   data parallelism with parameters sharded along their embedding dimension,
  'tensor' Megatron-style model parallelism over heads, MLP width and vocabulary.

Typical use (the training engine does this)::

  abstract = jax.eval_shape(model.init, rngs, tokens)       # no weights materialised
  shardings = axes.logical_to_mesh_sharding(abstract["params"], mesh)
  with axes.activation_sharding(mesh):                        # activation constraints on
    ... jax.jit(step, in_shardings=...)(...)
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax

# Mesh axis names.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Parameter axes.
EMBED = "embed"            # model width d of a weight
MLP = "mlp"                # feed-forward width d_inner
HEADS = "heads"            # attention heads H
KV = "kv"                  # per-head width D
QKV = "qkv"                # the fused q|k|v axis (size 3)
VOCAB = "vocab"            # vocabulary V
NORM = "norm"              # LayerNorm scale/bias (width d, replicated)
TYPES = "token_types"      # token-type (segment A/B) table rows
CLASSES = "classes"        # classifier / NSP / knowledge outputs
PATCH = "patch"            # pixels of one flattened image patch (P * P * channels)
PATCHES = "patches"        # rows of the image patches' position table (one per patch)

# Activation axes.
BATCH = "activation_batch"        # B
LENGTH = "activation_length"      # Q (queries) or K (keys, memory included)
ACT_EMBED = "activation_embed"    # d of an activation
ACT_HEADS = "activation_heads"    # H of an activation
ACT_KV = "activation_kv"          # D of an activation
ACT_MLP = "activation_mlp"        # d_inner of an activation
ACT_VOCAB = "activation_vocab"    # V of logits

LogicalRules = Sequence[tuple[str, Any]]

# Logical -> mesh axes. flax assigns each mesh axis at most once per array, in rule order.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    (EMBED, FSDP),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (KV, None),
    (QKV, None),
    (VOCAB, TENSOR),
    (NORM, None),
    (TYPES, None),
    (CLASSES, None),
    (PATCH, None),
    (PATCHES, None),
    # Activations.
    (BATCH, (DATA, FSDP)),
    (LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, TENSOR),
    (ACT_KV, None),
    (ACT_MLP, TENSOR),
    (ACT_VOCAB, TENSOR),
)


def logical_to_mesh_sharding(tree: Any, mesh: jax.sharding.Mesh,
                             rules: LogicalRules = DEFAULT_RULES) -> Any:
  """NamedShardings for a tree of (abstract) boxed variables or of logical PartitionSpecs.

  Args:
    tree: either the output of `jax.eval_shape(model.init, ...)` (or any part of it, e.g. its
      "params"): leaves are `nn.LogicallyPartitioned` boxes of ShapeDtypeStructs, so no weight is
      materialised; or a tree of logical `PartitionSpec`s (as `nn.get_partition_spec` returns).
    mesh: the device mesh (axes among 'data', 'fsdp', 'tensor').
    rules: logical -> mesh axis rules.

  Returns:
    A tree of `jax.sharding.NamedSharding` with the structure of the *unboxed* tree (the same
    structure as `nn.unbox(tree)` / the real params). Unannotated leaves are replicated.
  """
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def logical_to_mesh_spec(logical_axes: Sequence[str | None],
                         rules: LogicalRules = DEFAULT_RULES) -> jax.sharding.PartitionSpec:
  """The mesh PartitionSpec for one array's logical axis names, e.g. (BATCH, LENGTH)."""
  return nn.logical_to_mesh_axes(tuple(logical_axes), list(rules))


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh,
                        rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
  """Context in which the model's `nn.with_logical_constraint`s become real sharding constraints.

  Outside such a context (no global mesh, no rules) the constraints are no-ops, so the model runs
  unchanged on one device.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`nn.with_logical_constraint` under the active rules (a no-op without mesh and rules)."""
  return nn.with_logical_constraint(x, tuple(logical_axes))
