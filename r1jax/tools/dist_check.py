r"""Checks a multi-process launch end to end: start-up, topology and a real cross-process reduction.

    launch/local.sh --devices-per-process 2 2 -- python -m r1jax.tools.dist_check \
        --expect_processes=2 --expect_global_devices=4

Every process initialises `jax.distributed` through `r1jax.distributed.maybe_initialize()` (the same
call `r1jax.main` makes), prints one line with its rank and device counts, then:
1. builds a global array [D, W] (D = global devices) from per-process rows with
   `jax.make_array_from_process_local_data` and sums it with a jitted `jnp.sum` whose output is
   replicated, which forces an all-reduce across processes;
2. runs `lax.psum` inside `jax.shard_map` over the same array;
3. all-gathers the process indices with `multihost_utils.process_allgather`.
Each result is compared with the value computed by formula; the exit code is 0 when all agree and
every expectation passed, 1 otherwise. Run it without a launcher for the single-process case.
"""
from __future__ import annotations

import argparse
import sys

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from r1jax import distributed

_WIDTH = 3  # W: columns per row, so the reduction is over a real 2-D array.


def _rows(process_index: int, local_devices: int) -> np.ndarray:
  """This process's rows [local_devices, W]: row i holds (process_index + 1) * (i + 1) * (c + 1)."""
  i = np.arange(local_devices, dtype=np.float32)[:, None]
  c = np.arange(_WIDTH, dtype=np.float32)[None, :]
  return (process_index + 1) * (i + 1) * (c + 1)


def _expected_column_sums(num_processes: int, local_devices: int) -> np.ndarray:
  """Column sums [W] of all processes' rows, assuming every process has `local_devices` devices."""
  per_process = sum(p + 1 for p in range(num_processes))  # sum over p of (p + 1)
  per_row = local_devices * (local_devices + 1) // 2  # sum over i of (i + 1)
  return per_process * per_row * np.arange(1, _WIDTH + 1, dtype=np.float64)


def run(expect_processes: int | None = None, expect_global_devices: int | None = None) -> bool:
  """Runs the checks in this process and prints the results; True when all of them pass."""
  plan = distributed.maybe_initialize()

  rank, count = jax.process_index(), jax.process_count()
  local, total = jax.local_device_count(), jax.device_count()
  tag = f"[dist_check {rank}/{count}]"
  print(f"{tag} launcher={plan.kind} platform={jax.devices()[0].platform} local_devices={local} "
        f"global_devices={total}", flush=True)

  failures = []
  if expect_processes is not None and count != expect_processes:
    failures.append(f"process_count={count}, expected {expect_processes}")
  if expect_global_devices is not None and total != expect_global_devices:
    failures.append(f"device_count={total}, expected {expect_global_devices}")
  if total != local * count:
    failures.append(f"uneven devices: {local} local x {count} processes != {total} global")

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  rows = _rows(rank, local)
  global_rows = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("d")), rows, (total, _WIDTH))
  expected = _expected_column_sums(count, local)

  total_sum = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(global_rows)
  got_sum = float(np.asarray(total_sum.addressable_data(0)))
  if not np.isclose(got_sum, expected.sum()):
    failures.append(f"jit sum={got_sum}, expected {expected.sum()}")

  psum = jax.jit(jax.shard_map(
      lambda block: jax.lax.psum(block.sum(axis=0), "d"), mesh=mesh, in_specs=P("d"),
      out_specs=P()))
  got_psum = np.asarray(psum(global_rows).addressable_data(0))
  if not np.allclose(got_psum, expected):
    failures.append(f"psum={got_psum.tolist()}, expected {expected.tolist()}")

  ranks = np.asarray(multihost_utils.process_allgather(np.int32(rank))).reshape(-1)
  if ranks.tolist() != list(range(count)):
    failures.append(f"allgather of ranks={ranks.tolist()}, expected {list(range(count))}")

  status = "OK" if not failures else "FAIL: " + "; ".join(failures)
  print(f"{tag} sum={got_sum:g} expected={expected.sum():g} psum={got_psum.tolist()} "
        f"ranks={ranks.tolist()} {status}", flush=True)
  return not failures


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--expect_processes", type=int, default=None,
                      help="Fail unless jax.process_count() equals this.")
  parser.add_argument("--expect_global_devices", type=int, default=None,
                      help="Fail unless jax.device_count() equals this.")
  args = parser.parse_args(argv)
  return 0 if run(args.expect_processes, args.expect_global_devices) else 1


if __name__ == "__main__":
  sys.exit(main())
