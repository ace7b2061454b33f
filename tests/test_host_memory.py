"""r1jax.host_memory: XLA:CPU's scratch memory stays mapped between executions."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from r1jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a jitted program whose scratch and per-dot buffers are far above glibc's mmap threshold,
# then counts the page faults of three more executions.
_PROBE = textwrap.dedent("""
    import json, resource
    import r1jax
    from r1jax import host_memory
    import jax, jax.numpy as jnp

    @jax.jit
    def f(x):
      a = jnp.exp(x) @ x
      b = jnp.sin(x) @ x
      return (a * b + jnp.cos(x) @ a).sum(axis=0)

    x = jnp.full((2048, 2048), 1e-3, jnp.float32)
    for _ in range(2):
      f(x).block_until_ready()
    faults = 0
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps(dict(status=host_memory.status, faults=faults)))
""")


def _probe(setting: str) -> dict:
  env = dict(os.environ, R1JAX_HOST_MALLOC=setting, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_status_is_recorded_on_import():
  # conftest imported jax before r1jax; r1jax's import still configured the allocator once.
  assert host_memory.status in ("applied", "unsupported")
  assert host_memory.configure() == host_memory.status  # idempotent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings only")
def test_kept_memory_removes_the_per_execution_page_faults():
  kept, default = _probe("keep"), _probe("default")
  if kept["status"] == "unsupported":
    pytest.skip("not glibc")
  assert kept["status"] == "applied" and default["status"] == "disabled"
  # glibc's defaults map and unmap the large buffers on every execution (~90k faults each here).
  assert default["faults"] > 20_000, default
  assert kept["faults"] < default["faults"] / 10, (kept, default)
