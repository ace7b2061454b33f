"""XLA_FLAGS for the tests' subprocesses: conftest's flags (its fast compiles and patient
collectives) with `devices` forced CPU devices in place of its 8.

    env = dict(os.environ, XLA_FLAGS=xla_env.flags(1))  # one device, as a user's CPU run has
"""
import os

_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def flags(devices: int) -> str:
  """This process's XLA_FLAGS with the forced device count set to `devices`."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT)]
  return " ".join([f"{_DEVICE_COUNT}={devices}", *kept])
