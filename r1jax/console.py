"""What a run prints: library INFO chatter that would bury the stage's own lines is left out.

`quiet_library_logs()` adds one filter to absl's log handler, which prints the records of every
Python logger when a command runs under absl (`python -m r1jax.main`). It drops:
- Orbax's INFO lines: dozens per checkpoint save or restore (handler registration, metadata reads,
  finalize threads). Its warnings and errors still show.
- JAX's start-up line "Unable to initialize backend 'tpu': ... Failed to open libtpu.so" on a machine
  without a TPU, which reads like an error. Nothing is hidden on machines where it matters: JAX logs
  a WARNING of its own when TPU or NVIDIA hardware is present but its backend failed, and with
  JAX_PLATFORMS set a backend that fails raises.
The stage's own INFO lines (r1jax's loggers) are untouched.
"""
import logging as std_logging

from absl import logging


class _LibraryChatter(std_logging.Filter):
  """False for the INFO-and-below records described in the module docstring."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    if "/orbax/" in record.pathname.replace("\\", "/"):
      return False
    return not (record.name.startswith("jax._src.xla_bridge")
                and str(record.msg).startswith("Unable to initialize backend"))


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (once)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryChatter) for f in handler.filters):
    handler.addFilter(_LibraryChatter())
