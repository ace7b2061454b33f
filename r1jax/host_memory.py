"""Host allocator settings that stop XLA:CPU from faulting in its scratch memory on every step.

XLA:CPU allocates one scratch ("temp") buffer per execution of a compiled program (540 MiB for
the small MLM train step in `bench/`) and frees it when the step ends. glibc serves an allocation
that large with a fresh `mmap` and returns it with `munmap`, so every step faults the whole
buffer back in page by page: 130k minor faults and 0.19 s of kernel time in a 0.88 s one-core
step. Three `mallopt` settings keep the memory mapped and reused instead:

- `M_ARENA_MAX = 1`: every thread allocates from the main arena. The executions run on XLA's own
  threads, and a secondary arena's heaps are capped at 64 MiB, so without this a 540 MiB request
  from those threads always falls back to `mmap`.
- `M_MMAP_MAX = 0`: large requests come from the main heap, not from `mmap`.
- `M_TRIM_THRESHOLD = 2 GiB - 1`: freed memory at the top of the heap stays mapped for the next
  step instead of going back to the kernel.

Measured with `bench/train_throughput.py`'s small MLM step on one core: 0.87 -> 0.70 CPU-s per
step, 0 page faults per step after the first (see bench/NOTES.md). Peak RSS is unchanged: the
memory kept is what the step reaches at its peak anyway.

The settings apply to the whole process and only work when made before JAX starts its threads,
so `r1jax/__init__.py` applies them on import. Set `R1JAX_HOST_MALLOC=default` to keep glibc's
defaults. Other platforms and C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "R1JAX_HOST_MALLOC"

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_BYTES = 2**31 - 1  # mallopt takes a C int

# What `configure` did, for reports: "applied", "disabled" (by the environment variable),
# "unsupported" (not Linux with glibc) or "failed" (mallopt refused a setting).
status = "not configured"


def configure() -> str:
  """Applies the settings above once per process; returns and records `status`."""
  global status
  if status != "not configured":
    return status
  if os.environ.get(ENV_VAR, "keep").lower() in ("default", "0", "off", "false"):
    status = "disabled"
    return status
  libc = _glibc()
  if libc is None:
    status = "unsupported"
    return status
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES)))
  status = "applied" if ok else "failed"
  return status


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    version = libc.gnu_get_libc_version  # glibc only; musl has no such symbol
  except (OSError, AttributeError):
    return None
  version.restype = ctypes.c_char_p
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  return libc
