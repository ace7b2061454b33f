"""Opt-in host allocator setting for CPU training: trade resident memory for fewer page faults.

XLA:CPU allocates one scratch ("temp") buffer per execution of a compiled program (540 MiB for
the small MLM train step in `bench/`) and frees it when the step ends. glibc serves an allocation
that large with a fresh `mmap` and returns it with `munmap`, so every step faults the whole
buffer back in, one 4 KiB page at a time: 130k minor faults and 0.19 s of kernel time in a
0.87 s one-core step.

`R1JAX_HOST_MALLOC=keep` makes r1jax set three `mallopt` parameters when it is imported:

- `M_ARENA_MAX = 1`: every thread allocates from the main arena. Executions run on XLA's own
  threads, and a secondary arena's heaps are capped at 64 MiB, so without this a 540 MiB request
  from those threads always falls back to `mmap`;
- `M_MMAP_MAX = 0`: large requests come from the heap, not from `mmap`;
- `M_TRIM_THRESHOLD = 2 GiB - 1`: freed memory at the top of the heap stays mapped.

The scratch buffer is then reused without faults. Measured (bench/NOTES.md, change 17): the small
MLM step 0.87 -> 0.69 CPU-s on one core, 0.61 -> 0.52 s with 2 threads beside a PyTorch peer.

Why it is not the default: any allocation made between two steps can split the freed block, and
the next step then takes a new one, so the resident set grows by one or two scratch buffers
(1.2 -> 1.7 or 2.3 GiB for the small model; several GiB for the base model on CPU). Use it where
that memory is available. Transparent huge pages for malloc (`GLIBC_TUNABLES=
glibc.malloc.hugetlb=1`) were also measured: faster alone, but slower than glibc's defaults when
another process's steps alternate with ours, so they are not offered here.

The settings apply to the whole process and only work before JAX starts its threads, which is
why `r1jax/__init__.py` applies them on import. Linux with glibc only; elsewhere nothing changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_VAR = "R1JAX_HOST_MALLOC"  # "keep": apply the settings above; unset or "default": don't

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_BYTES = 2**31 - 1  # mallopt takes a C int

_status: str | None = None


def configure() -> str:
  """Applies the settings once per process when R1JAX_HOST_MALLOC=keep; returns `status()`."""
  global _status
  if _status is not None:
    return _status
  setting = os.environ.get(ENV_VAR, "default").strip().lower()
  if setting in ("", "default"):
    _status = "glibc defaults"
  elif setting != "keep":
    _status = (f"glibc defaults ({ENV_VAR}={os.environ[ENV_VAR]!r} is not a setting: use 'keep' "
               "or 'default')")
    print(f"r1jax: {_status}", file=sys.stderr)
  else:
    libc = _glibc()
    if libc is None:
      _status = f"glibc defaults ({ENV_VAR}=keep needs Linux with glibc)"
    elif all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES))):
      _status = "keep (mallopt: one arena, no mmap, no trim)"
    else:
      _status = "glibc defaults (mallopt refused a setting)"
  return _status


def status() -> str:
  """One line for reports: what this process's allocator settings are."""
  return configure()


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only, not musl)
  except (OSError, AttributeError):
    return None
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  return libc
