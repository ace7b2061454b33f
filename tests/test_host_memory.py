"""r1jax.host_memory: with R1JAX_HOST_MALLOC=keep, large freed buffers stay mapped."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from r1jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What XLA:CPU does to the host allocator at every execution, without XLA: a 48 MiB buffer (above
# glibc's largest dynamic mmap threshold, 32 MiB, as XLA's scratch buffers are) malloc'ed, written
# and freed, four times, from the main thread and from another thread (XLA executes on its own
# threads). Prints each cycle's minor page faults. The effect on XLA's own executions is measured
# by bench/train_throughput.py's `R1JAX_HOST_MALLOC=keep` row (bench/NOTES.md); a jitted probe
# large enough to show it takes minutes per execution on this CPU.
_PROBE = textwrap.dedent("""
    import ctypes, json, resource, threading
    import r1jax  # applies R1JAX_HOST_MALLOC before any thread starts
    from r1jax import host_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    def cycles(out, size=48 << 20):
      for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    main, other = [], []
    cycles(main)
    thread = threading.Thread(target=cycles, args=(other,))
    thread.start()
    thread.join()
    print(json.dumps(dict(status=host_memory.status(), main=main, thread=other)))
""")


def _probe(setting: str | None, code: str = _PROBE) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop(host_memory.ENV_VAR, None)
  if setting is not None:
    env[host_memory.ENV_VAR] = setting
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_process_keeps_glibc_defaults():
  # The test process has no R1JAX_HOST_MALLOC (CI does not set it): nothing was changed.
  if os.environ.get(host_memory.ENV_VAR) is None:
    assert host_memory.status() == "glibc defaults"
  assert host_memory.configure() == host_memory.status()  # idempotent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings only")
def test_keep_removes_the_per_execution_page_faults():
  kept, default = _probe("keep"), _probe(None)
  typo = _probe("kep", "import json, r1jax\nprint(json.dumps(dict(status=r1jax.host_memory.status())))")
  if "needs Linux with glibc" in kept["status"]:
    pytest.skip(kept["status"])
  assert kept["status"].startswith("keep") and default["status"] == "glibc defaults"
  assert "'kep' is not a setting" in typo["status"]
  # glibc's defaults map and unmap the buffer at every cycle: each write faults its pages again
  # (4 KiB each, 12k per cycle; at least 20 where transparent huge pages are always on). Kept, the
  # heap holds the freed buffer and the next cycles, on either thread, reuse it.
  for faults in default["main"][1:] + default["thread"]:
    assert faults >= 20, default
  assert sum(kept["main"][1:] + kept["thread"]) < 10, kept
