"""Device mesh from config, shardings from logical axis rules, and global batches from host data.

The mesh has three axes:
- `data`:   pure data parallelism (parameters replicated);
- `fsdp`:   data parallelism with parameters and optimizer state sharded along it;
- `tensor`: model (tensor) parallelism inside layers.
Batch rows are split over ("data", "fsdp"); how parameters split comes from the model's logical axis
rules (`r1jax.model.axes`). The axes use `AxisType.Auto` so XLA's GSPMD partitioner propagates
shardings through ordinary jnp code.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from r1jax import configlib
from r1jax.model import axes

MESH_AXES = axes.MESH_AXES
BATCH_AXES = (axes.DATA, axes.FSDP)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

  `mesh_cfg` has ints `data`, `fsdp`, `tensor`; -1 on one of them takes the remaining devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = configlib.resolve_mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways batch rows are split."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp; other axes replicated.

  `stacked`: `[n_steps, B, ...]` arrays (several steps' batches): the rows axis is split instead.
  """
  return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(abstract_boxed: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Returns the tree with boxes replaced by shardings (i.e. shaped like the *unboxed* tree); plain
  leaves become replicated.
  """
  return axes.logical_to_mesh_sharding(abstract_boxed, mesh, rules)


def row_shardings(tree: Any, mesh: Mesh, batch_size: int) -> Any:
  """Shardings for per-row state (e.g. Transformer-XL memory): leaves with leading dim
  `batch_size` split like the batch, everything else replicated."""
  def one(x):
    if getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch_size:
      return batch_sharding(mesh)
    return replicated(mesh)
  return jax.tree.map(one, tree)


def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]]):
  """Context for tracing model code: the mesh and the logical rules for activation constraints."""
  return axes.activation_sharding(mesh, rules)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, *,
                 stacked: bool = False) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays split over the batch axes.

  Every process passes its own `[B / process_count, ...]` rows, in process order, so the global
  batch is the concatenation over processes. On one process this is a plain sharded device_put.
  `stacked`: leaves are `[n_steps, B / process_count, ...]` (several steps' batches, see
  `steps.Engine.train_steps`); the step axis stays whole and the rows are split as above.
  """
  sharding = batch_sharding(mesh, stacked=stacked)
  n = jax.process_count()
  rows = 1 if stacked else 0

  def one(x):
    x = np.asarray(x)
    global_shape = x.shape[:rows] + (x.shape[rows] * n,) + x.shape[rows + 1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)
  return jax.tree.map(one, local_batch)
