"""Classify raw text with an exported model.onnx in onnxruntime: no JAX, no Flax.

What runs on the edge device is this module, numpy, sentencepiece and onnxruntime. It reads a
directory holding `model.onnx` (written by `r1jax.compress.edge`, float or int8) and
`tokenizer.model`; the label names, the sequence length and the multi-label threshold travel in the
ONNX file's metadata, so the two files are all a deployment needs.

    predictor = serve.Predictor.load("runs/q/artifact")         # DIR or DIR/model.onnx
    predictor.predict(["a compiler for Lisp", "..."])            # [{"label", "scores"}, ...]
    predictor.logits(tokens, token_mask)                         # int32 [B, Q], bool [B, Q] -> [B, C]

    python -m r1jax.serve --model runs/q/artifact "a compiler for Lisp"
    python -m r1jax.serve --model runs/qmm/artifact --image folder.png "folder music"  # multimodal

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
from r1jax.data import images as images_lib
from r1jax.data import tokenizer as tokenizer_lib

ONNX_FILE = "model.onnx"
INPUTS = ("tokens", "token_mask")
IMAGES = "images"                       # a multimodal model's image input, uint8 [B, S, S, 3]
INPUT_DTYPES = {"tokens": np.int32, "token_mask": np.bool_, IMAGES: np.uint8}
OUTPUT = "logits"
# metadata_props of an exported model.onnx (strings; JSON where structured).
META_LABELS = "r1jax.label_names"      # JSON list, class id order
META_SEQ_LEN = "r1jax.seq_len"
META_MULTI_LABEL = "r1jax.multi_label"  # "true" | "false"
META_THRESHOLD = "r1jax.threshold"      # multi-label decision threshold on sigmoid scores
META_KIND = "r1jax.kind"                # "float" | "int8"
META_QUANTIZATION = "r1jax.quantization"  # how the int8 graph was made ("" for float)
META_MODALITIES = "r1jax.modalities"    # JSON list, multimodal models only: "text" and/or "image"
META_IMAGE_SIZE = "r1jax.image_size"    # multimodal models only: S of the square images


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

  def __init__(self, sess: Any, tokenizer: tokenizer_lib.Tokenizer | None, path: str = ""):
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
    self.input_names = tuple(i.name for i in sess.get_inputs())
    self.modalities = tuple(json.loads(meta.get(META_MODALITIES, '["text"]')))
    self.image_size = int(meta.get(META_IMAGE_SIZE, "0"))
    if IMAGES in self.input_names and not self.image_size:
      raise errors.BadInput(f"{path}: takes images but its metadata lacks {META_IMAGE_SIZE}; "
                            f"export it with r1jax.compress.edge.")

  @classmethod
  def load(cls, path: str, *, tokenizer: str = "", threads: int = 0) -> "Predictor":
    """`path`: a directory with model.onnx and tokenizer.model, or a .onnx file (the tokenizer
    then beside it, or given)."""
    model = os.path.join(path, ONNX_FILE) if os.path.isdir(path) else path
    sess = session(model, threads=threads)
    if INPUTS[0] not in {i.name for i in sess.get_inputs()}:   # an image-only model
      return cls(sess, None, model)
    tokenizer = tokenizer or os.path.join(os.path.dirname(model), "tokenizer.model")
    if not os.path.exists(tokenizer):
      raise errors.InputNotFound(f"{tokenizer} does not exist: the SentencePiece model the "
                                 f"classifier was trained with goes beside {ONNX_FILE}.")
    return cls(sess, tokenizer_lib.Tokenizer.load(tokenizer), model)

  @property
  def reads_images(self) -> bool:
    return IMAGES in self.input_names

  @property
  def reads_text(self) -> bool:
    return INPUTS[0] in self.input_names

  def logits(self, tokens: np.ndarray | None = None, token_mask: np.ndarray | None = None,
             images: np.ndarray | None = None) -> np.ndarray:
    """int [B, Q], bool [B, Q] (and/or images uint8 [B, S, S, 3]: the model's inputs) ->
    float32 [B, C]."""
    feed = {}
    if self.reads_text:
      tokens = np.asarray(tokens, np.int32)
      if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
        raise errors.BadInput(f"tokens must be [batch, {self.seq_len}], got {tokens.shape}.")
      feed.update({INPUTS[0]: tokens, INPUTS[1]: np.asarray(token_mask, bool)})
    if self.reads_images:
      want = (self.image_size, self.image_size, 3)
      if images is None or np.ndim(images) != 4 or np.shape(images)[1:] != want:
        raise errors.BadInput(f"images must be uint8 [batch, {want[0]}, {want[1]}, 3] for this "
                              f"model, got {None if images is None else np.shape(images)}.")
      feed[IMAGES] = np.asarray(images, np.uint8)
    return self.session.run([OUTPUT], feed)[0]

  def load_images(self, refs: Sequence[Any]) -> np.ndarray:
    """Image files (paths, bytes or base64: strings) -> uint8 [B, S, S, 3], decoded and fitted as
    the finetune stage decodes them (`r1jax.data.images`); a bad image is refused naming it."""
    out = []
    for ref in refs:
      decoded = images_lib.load_image(ref, self.image_size)
      if decoded.pixels is None:
        where = ref if isinstance(ref, str) and len(ref) < 200 else "an image"
        raise errors.BadInput(f"{where}: cannot use this image ({decoded.problem}).")
      out.append(decoded.pixels)
    return np.stack(out)

  def _inputs(self, texts: Sequence[str], images: Sequence[Any] | None) -> dict[str, Any]:
    """Checks what was given against what the model reads; returns `logits`' arguments."""
    what = "+".join(self.modalities)
    if images is not None and len(images) and not self.reads_images:
      raise errors.BadInput(f"{self.path}: this model reads text only; --image / images= apply "
                            "to a multimodal export (finetune's multimodal mode, then quantize).")
    if self.reads_images and (images is None or not len(images)):
      raise errors.BadInput(f"{self.path}: this model reads {what}; give an image for each "
                            "example (--image FILE).")
    if self.reads_images and self.reads_text and len(images) != len(texts):
      raise errors.BadInput(f"{self.path}: this model reads {what}: {len(texts)} texts and "
                            f"{len(images)} images; give one text per image, in order.")
    if not self.reads_text and texts:
      raise errors.BadInput(f"{self.path}: this model reads images only; give no text.")
    inputs = {}
    if self.reads_text:
      inputs.update(encode(self.tokenizer, list(texts), self.seq_len))
    if self.reads_images:
      inputs["images"] = self.load_images(images)
    return inputs

  def scores(self, texts: Sequence[str], images: Sequence[Any] | None = None) -> np.ndarray:
    """Class probabilities [B, C]: softmax, or per-class sigmoid for a multi-label model.
    `images` (paths or bytes, one per text) for a model that reads images."""
    z = self.logits(**self._inputs(texts, images)).astype(np.float64)
    if self.multi_label:
      return 1.0 / (1.0 + np.exp(-z))
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)

  def predict(self, texts: Sequence[str], images: Sequence[Any] | None = None
              ) -> list[dict[str, Any]]:
    """[{"label": name (a list of names when multi-label), "scores": {name: probability}}]."""
    out = []
    for row in self.scores(texts, images):
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
  parser.add_argument("--image", action="append", default=[],
                      help="an image file for a multimodal model, once per text, in order")
  parser.add_argument("texts", nargs="*", help="texts (none and no --image: one per line from "
                      "stdin)")
  args = parser.parse_args(argv)
  texts = args.texts
  if not texts and not args.image:
    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
  try:
    predictor = Predictor.load(args.model)
    results = predictor.predict(texts, args.image or None)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.EXIT_CODE
  for i, result in enumerate(results):
    top = sorted(result["scores"].items(), key=lambda kv: -kv[1])[:args.top]
    shown = ({"text": texts[i]} if i < len(texts) else {}) | (
        {"image": args.image[i]} if i < len(args.image) else {})
    print(json.dumps({**shown, "label": result["label"],
                      "top": [[n, round(p, 4)] for n, p in top]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
