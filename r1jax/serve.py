"""Classify raw text with an exported model.onnx in onnxruntime: no JAX, no Flax.

What runs on the edge device is this module, numpy, sentencepiece and onnxruntime. It reads a
directory holding `model.onnx` (written by `r1jax.compress.edge`, float or int8) and
`tokenizer.model`; the label names, the sequence length and the multi-label threshold travel in the
ONNX file's metadata, so the two files are all a deployment needs.

    predictor = serve.Predictor.load("runs/q/artifact")         # DIR or DIR/model.onnx
    predictor.predict(["a compiler for Lisp", "..."])            # [{"label", "scores"}, ...]
    predictor.logits(tokens, token_mask)                         # int32 [B, Q], bool [B, Q] -> [B, C]

    python -m r1jax.serve --model runs/q/artifact "a compiler for Lisp"

Texts are encoded as finetuning encodes them (`r1jax.data.task.EncodeClassification`: [CLS] text
[SEP], cut to seq_len, padded with id 0; tests/test_edge_export.py checks the two agree).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Sequence

import numpy as np

from r1jax import errors
from r1jax.data import tokenizer as tokenizer_lib

ONNX_FILE = "model.onnx"
INPUTS = ("tokens", "token_mask")
OUTPUT = "logits"
# metadata_props of an exported model.onnx (strings; JSON where structured).
META_LABELS = "r1jax.label_names"      # JSON list, class id order
META_SEQ_LEN = "r1jax.seq_len"
META_MULTI_LABEL = "r1jax.multi_label"  # "true" | "false"
META_THRESHOLD = "r1jax.threshold"      # multi-label decision threshold on sigmoid scores
META_KIND = "r1jax.kind"                # "float" | "int8"
META_QUANTIZATION = "r1jax.quantization"  # how the int8 graph was made ("" for float)


def _ort():
  try:
    import onnxruntime as ort  # Lazy: only running an exported model needs it (the [edge] extra).
  except ImportError as e:
    raise errors.missing_extra(e, extra="edge", what="Running an exported model.onnx") from e
  return ort


def session(path: str, *, threads: int = 0) -> Any:
  """An onnxruntime CPU InferenceSession of `path` (threads 0 = onnxruntime's default).

  A model the runtime cannot run (an op or type it has no kernel for, an invalid graph) is refused
  in one line that names the op, instead of onnxruntime's multi-line report.
  """
  ort = _ort()
  if not os.path.exists(path):
    raise errors.InputNotFound(f"{path} does not exist (export one with the quantize stage, "
                               f"export.onnx=True).")
  options = ort.SessionOptions()
  options.log_severity_level = 3
  if threads:
    options.intra_op_num_threads = threads
  # Idle worker threads sleep instead of spinning: on a CPU shared with other work (JAX timed in
  # turn with this session, other processes) spinning steals the cores they need.
  options.add_session_config_entry("session.intra_op.allow_spinning", "0")
  try:
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime raises its own pybind exception types
    text = str(e)
    found = re.search(r"implementation for (\w+)\((\d+)\)", text)
    if found:
      raise errors.BadInput(
          f"{path}: onnxruntime {ort.__version__} has no CPU kernel for the ONNX op "
          f"{found.group(1)} (opset {found.group(2)}) with these input types; re-export without "
          f"it or run a newer onnxruntime.") from None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    raise errors.BadInput(f"{path}: onnxruntime cannot load this model: {first}") from None


def metadata(sess: Any) -> dict[str, str]:
  return dict(sess.get_modelmeta().custom_metadata_map)


def encode(tokenizer: tokenizer_lib.Tokenizer, texts: Sequence[str],
           seq_len: int) -> dict[str, np.ndarray]:
  """texts -> {"tokens": int32 [B, Q], "token_mask": bool [B, Q]}: [CLS] text [SEP], padded."""
  tokens = np.zeros((len(texts), seq_len), np.int32)
  lengths = np.zeros((len(texts), 1), np.int32)
  for row, text in enumerate(texts):
    ids = tokenizer.encode(text)[:seq_len - 2]
    tokens[row, :len(ids) + 2] = [tokenizer_lib.CLS_ID, *ids, tokenizer_lib.SEP_ID]
    lengths[row] = len(ids) + 2
  return {"tokens": tokens, "token_mask": np.arange(seq_len)[None, :] < lengths}


class Predictor:
  """An exported classifier: model.onnx in onnxruntime + its tokenizer."""

  def __init__(self, sess: Any, tokenizer: tokenizer_lib.Tokenizer, path: str = ""):
    self.session, self.tokenizer, self.path = sess, tokenizer, path
    meta = metadata(sess)
    missing = [k for k in (META_LABELS, META_SEQ_LEN) if k not in meta]
    if missing:
      raise errors.BadInput(f"{path}: not an r1jax export (its metadata lacks {missing}); export "
                            f"it with r1jax.compress.edge.")
    self.label_names = tuple(json.loads(meta[META_LABELS]))
    self.seq_len = int(meta[META_SEQ_LEN])
    self.multi_label = meta.get(META_MULTI_LABEL, "false") == "true"
    self.threshold = float(meta.get(META_THRESHOLD, "0.5"))
    self.kind = meta.get(META_KIND, "")

  @classmethod
  def load(cls, path: str, *, tokenizer: str = "", threads: int = 0) -> "Predictor":
    """`path`: a directory with model.onnx and tokenizer.model, or a .onnx file (the tokenizer
    then beside it, or given)."""
    model = os.path.join(path, ONNX_FILE) if os.path.isdir(path) else path
    sess = session(model, threads=threads)
    tokenizer = tokenizer or os.path.join(os.path.dirname(model), "tokenizer.model")
    if not os.path.exists(tokenizer):
      raise errors.InputNotFound(f"{tokenizer} does not exist: the SentencePiece model the "
                                 f"classifier was trained with goes beside {ONNX_FILE}.")
    return cls(sess, tokenizer_lib.Tokenizer.load(tokenizer), model)

  def logits(self, tokens: np.ndarray, token_mask: np.ndarray) -> np.ndarray:
    """int [B, Q], bool [B, Q] -> float32 [B, C]."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
      raise errors.BadInput(f"tokens must be [batch, {self.seq_len}], got {tokens.shape}.")
    return self.session.run([OUTPUT], {INPUTS[0]: tokens,
                                       INPUTS[1]: np.asarray(token_mask, bool)})[0]

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    """Class probabilities [B, C]: softmax, or per-class sigmoid for a multi-label model."""
    batch = encode(self.tokenizer, list(texts), self.seq_len)
    z = self.logits(batch["tokens"], batch["token_mask"]).astype(np.float64)
    if self.multi_label:
      return 1.0 / (1.0 + np.exp(-z))
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)

  def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
    """[{"label": name (a list of names when multi-label), "scores": {name: probability}}]."""
    out = []
    for row in self.scores(texts):
      scores = {n: float(p) for n, p in zip(self.label_names, row)}
      if self.multi_label:
        label = [n for n, p in scores.items() if p >= self.threshold]
      else:
        label = self.label_names[int(np.argmax(row))]
      out.append({"label": label, "scores": scores})
    return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m r1jax.serve",
                                   description="Classify texts with an exported model.onnx.")
  parser.add_argument("--model", required=True, help="directory with model.onnx + tokenizer.model")
  parser.add_argument("--top", type=int, default=3, help="scores printed per text")
  parser.add_argument("texts", nargs="*", help="texts (none: one per line from stdin)")
  args = parser.parse_args(argv)
  texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
  try:
    predictor = Predictor.load(args.model)
    results = predictor.predict(texts)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_CODE
  for text, result in zip(texts, results):
    top = sorted(result["scores"].items(), key=lambda kv: -kv[1])[:args.top]
    print(json.dumps({"text": text, "label": result["label"],
                      "top": [[n, round(p, 4)] for n, p in top]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
