"""Which code is under test: the checkout, or a snapshot of its r1jax/ (the configs included).

The campaign copies the code at its start (`snapshot_source`) so that edits made to the checkout
while it runs (minutes) do not change what it tests; every subprocess gets the same root on its
PYTHONPATH. This module imports nothing from r1jax or jax: the choice (and the device count) must be
made before they are imported.
"""
from __future__ import annotations

import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The root the subprocesses and `config_path` use; `snapshot_source` changes it.
SOURCE = {"root": ROOT}


def config_path() -> str:
  """configs/pretrain.py of the code under test (shipped in r1jax/configs/)."""
  return os.path.join(SOURCE["root"], "r1jax", "configs", "pretrain.py")


def snapshot_source(directory: str) -> str:
  """Copies r1jax/ (the configs included) to `directory` and makes it the code under test (here
  and in the subprocesses); call before anything imports r1jax."""
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.rmtree(os.path.join(directory, "r1jax"), ignore_errors=True)
  shutil.copytree(os.path.join(ROOT, "r1jax"), os.path.join(directory, "r1jax"), ignore=ignore)
  SOURCE["root"] = directory
  sys.path.insert(0, directory)
  return directory


def set_cpu_devices(count: int) -> None:
  """XLA_FLAGS for `count` CPU devices (before jax is imported)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pythonpath(env: dict[str, str]) -> str:
  """PYTHONPATH for a subprocess running the code under test."""
  return SOURCE["root"] + os.pathsep + env.get("PYTHONPATH", "")
