"""What a user watches: metrics.jsonl, TensorBoard, a progress bar, FLOPs/MFU.

- `MetricsWriter`: `DIR/metrics.jsonl` (one JSON object per logged step: {"step", "split", ...}) and
  TensorBoard event files in `DIR/tensorboard/` (tensorboardX). On resume from step s, records after s
  are dropped from metrics.jsonl and purged from TensorBoard, so the files read as one run.
  `tensorboard_command(DIR)` is the command that shows them (`pip install tensorboard` first:
  r1jax writes the event files with tensorboardX and does not depend on TensorBoard itself).
- `ProgressBar`: tqdm with loss, tokens/s and ETA.
- `encoder_flops` / `pretrain_flops_per_step`: honest model FLOPs for Transformer-XL
  (bidirectional attention over memory + segment is counted in full, not halved as for causal LMs).
- `peak_flops`: the accelerator's peak (table by device kind; on CPU a matmul measured in-process).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX
import tqdm

from r1jax import run_dir


TENSORBOARD_DIR = "tensorboard"


def tensorboard_command(workdir: str) -> str:
  """How to look at a run's curves: "tensorboard --logdir DIR/tensorboard"."""
  return f"tensorboard --logdir {os.path.join(workdir, TENSORBOARD_DIR)}"


def tensorboard_hint(workdir: str) -> str:
  """The command and where it comes from, for a log line."""
  return f"{tensorboard_command(workdir)} (pip install tensorboard)"


class MetricsWriter:
  """Appends records to DIR/metrics.jsonl and TensorBoard; only the primary process writes.

  `tags` are added to every metrics.jsonl record (e.g. {"phase": "stage_b"} for finetuning's phases,
  which share one metrics.jsonl).
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool | None = None,
               tensorboard: bool = True, tags: Mapping[str, Any] | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.tags = dict(tags or {})
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    self._file = open(self.path, "a")
    if tensorboard:
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR),
                               purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    """Keeps only records with step <= `step` (a fresh run: none)."""
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write
          continue
        if record.get("step", 0) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update(run_dir.json_ready(dict(values, **self.tags)))
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
          self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def flush(self) -> None:
    if self.enabled:
      self._file.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict[str, Any]]:
  """Records of DIR/metrics.jsonl (optionally one split)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if split is None or r.get("split") == split]


class ProgressBar:
  """tqdm bar over optimizer steps, showing loss and tokens/s (ETA comes from tqdm)."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    self._bar = None
    if enabled and jax.process_index() == 0:
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

  def update_to(self, step: int, **postfix: Any) -> None:
    """Moves the bar to `step` and shows `postfix` values (e.g. loss, tok_s)."""
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                               for k, v in postfix.items()}, refresh=False)
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


# ------------------------------------------------------------------------------------------------
# FLOPs and MFU.


def encoder_flops(cfg: Any, *, batch_size: int, seq_len: int) -> float:
  """Forward matmul FLOPs of the Transformer-XL backbone on one [B, Q] segment (2 per multiply-add).

  Per layer, with K = mem_len + Q keys and R relative positions (K + Q in bidirectional mode, K in
  causal mode):
    q from the Q segment rows, k and v from all K rows:   2 d HD (Q + 2K)        per row
    content scores q.k over all K keys (not halved):      2 Q K HD               per row
    position scores over R positions (before the shift):  2 Q R HD               per row
    attention-weighted values:                            2 Q K HD               per row
    output projection:                                    2 Q HD d               per row
    feed-forward:                                         4 Q d d_inner          per row
    relative position projection of R embeddings:        2 R d HD               once per batch
  Elementwise work (softmax, LayerNorm, residuals) is not counted.
  """
  q = float(seq_len)
  k = cfg.mem_len + q
  hd = cfg.n_head * cfg.d_head
  r = k + q if getattr(cfg, "attention", "bidirectional") == "bidirectional" else k
  d = cfg.d_model
  per_row = (2 * d * hd * (q + 2 * k) + 2 * q * k * hd + 2 * q * r * hd + 2 * q * k * hd
             + 2 * q * hd * d + 4 * q * d * cfg.d_inner)
  return cfg.n_layer * (batch_size * per_row + 2 * r * d * hd)


def pretrain_flops_per_step(cfg: Any, *, batch_size: int, seq_len: int, num_predictions: int
                            ) -> float:
  """Training FLOPs (forward + backward = 3x forward) of one MLM+NSP step on the global batch.

  Heads: MLM transform (d x d) and tied decoder (d x V) on the P predicted positions per row; NSP
  pooler (d x d) and classifier on one row position.
  """
  encoder = encoder_flops(cfg, batch_size=batch_size, seq_len=seq_len)
  heads = num_predictions * (2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.vocab_size)
  heads += 2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * 2
  return 3.0 * (encoder + batch_size * heads)


# Dense bf16 peak FLOP/s per device (vendor figures).
_PEAK_BY_KIND = {
    "TPU v2": 45e12, "TPU v3": 123e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "V100": 125e12, "A10G": 125e12,
}
_measured_cpu_peak: float | None = None


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s this process reaches on its first device (measured once)."""
  global _measured_cpu_peak
  if _measured_cpu_peak is None:
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
      start = time.perf_counter()
      f(x).block_until_ready()
      best = min(best, time.perf_counter() - start)
    _measured_cpu_peak = 2.0 * n ** 3 / best
  return _measured_cpu_peak


def peak_flops(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of all devices, how it was obtained) for MFU.

  `configured` > 0 wins. Accelerators: per-device table x device count. CPU: all "devices" share the
  same cores, so the peak is one measured matmul, not multiplied by the device count.
  """
  if configured > 0:
    return float(configured), "config"
  device = jax.devices()[0]
  if device.platform == "cpu":
    return measure_matmul_peak(), "measured f32 matmul"
  for kind, peak in _PEAK_BY_KIND.items():
    if kind.lower() in device.device_kind.lower():
      return peak * jax.device_count(), f"{kind} bf16 table x {jax.device_count()}"
  logging.warning("Unknown device kind %r: MFU is not reported (set train.peak_flops).",
                  device.device_kind)
  return 0.0, "unknown"
