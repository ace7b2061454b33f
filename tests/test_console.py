"""What a run prints: the library chatter filter on absl's handler (r1jax.console)."""
import logging as std_logging

import numpy as np
import onnx
from onnx import helper
from onnxruntime import quantization as ort_quant

from r1jax import console


class _Keep(std_logging.Handler):
  """Records that pass the chatter filter, as absl's handler would print them."""

  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.addFilter(console._LibraryChatter())
    self.records = []

  def emit(self, record):
    self.records.append(record)


def test_onnxruntime_quantizer_chatter_is_dropped_and_r1jax_lines_are_not(tmp_path):
  """A real int8 quantization of a one-MatMul graph logs INFO lines and a pre-processing warning
  through the root logger; none of them passes, while a line of r1jax's own and other libraries'
  warnings still do."""
  weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 3],
                              np.arange(12, dtype=np.float32).tolist())
  graph = helper.make_graph(
      [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
      [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
      [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])], [weight])
  onnx.save(helper.make_model(graph), str(tmp_path / "f.onnx"))
  seen, kept = [], _Keep()

  class _All(std_logging.Handler):
    def emit(self, record):
      seen.append(record)

  root = std_logging.getLogger()
  old_level, everything = root.level, _All(std_logging.DEBUG)
  root.addHandler(kept)
  root.addHandler(everything)
  root.setLevel(std_logging.DEBUG)
  try:
    ort_quant.quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"),
                               weight_type=ort_quant.QuantType.QInt8)
    std_logging.getLogger("r1jax.compress.edge").info("Quantized 1 MatMul.")
    std_logging.getLogger("some.library").warning("A real warning.")
  finally:
    root.removeHandler(kept)
    root.removeHandler(everything)
    root.setLevel(old_level)
  from_ort = [r for r in seen if "/onnxruntime/quantization/" in r.pathname.replace("\\", "/")]
  assert from_ort, "onnxruntime's quantizer logged nothing: the test no longer exercises it"
  assert [r.getMessage() for r in kept.records] == ["Quantized 1 MatMul.", "A real warning."]
