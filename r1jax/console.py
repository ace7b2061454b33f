"""What a run prints: library INFO chatter that would bury the stage's own lines is left out.

`quiet_library_logs()` adds one filter to absl's log handler, which prints the records of every
Python logger when a command runs under absl (`python -m r1jax.main`). It drops:
- Orbax's INFO lines: dozens per checkpoint save or restore (handler registration, metadata reads,
  finalize threads). Its warnings and errors still show.
- JAX's start-up line "Unable to initialize backend 'tpu': ... Failed to open libtpu.so" on a machine
  without a TPU, which reads like an error. Nothing is hidden on machines where it matters: JAX logs
  a WARNING of its own when TPU or NVIDIA hardware is present but its backend failed, and with
  JAX_PLATFORMS set a backend that fails raises.
- onnxruntime's quantizer's INFO lines (one "Quantization parameters for tensor ... not specified"
  per activation of the int8 ONNX export: ~20 in a tiny model's quantize stage) and its warning
  "Please consider to run pre-processing before quantization", advice to the caller of
  `quantize_dynamic` (r1jax, whose graph it measures) that the user cannot act on.
The stage's own INFO lines (r1jax's loggers) are untouched.
"""
import logging as std_logging

from absl import logging


class _LibraryChatter(std_logging.Filter):
  """False for the records described in the module docstring."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    if "/onnxruntime/quantization/" in path and (
        record.levelno < std_logging.WARNING
        or str(record.msg).startswith("Please consider to run pre-processing")):
      return False
    if record.levelno >= std_logging.WARNING:
      return True
    if "/orbax/" in path:
      return False
    return not (record.name.startswith("jax._src.xla_bridge")
                and str(record.msg).startswith("Unable to initialize backend"))


def quiet_library_logs() -> None:
  """Installs the filter on absl's handler (once)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryChatter) for f in handler.filters):
    handler.addFilter(_LibraryChatter())
