"""The real pretraining command in a subprocess, fault injection into its batches, and its outputs.

`Harness` runs `python -m r1jax.main --config=configs/pretrain.py:variant=tiny --workdir=W` with a
smaller model (`TINY_MODEL`) and a short schedule, on 8 forced CPU devices (mesh 2x2x2, so
checkpoints are sharded), sharing a JAX persistent compilation cache so that a restart costs an
import, not a compile. The readers below tolerate a run that is being written (or was killed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from r1jax import run_dir
from r1jax.data import builtin
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib

from fault_harness import source

TIMING_FIELDS = loop_lib.TIMING_FIELDS
TINY_MODEL = dict(n_layer=1, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=16)
TMP_MARK = ".orbax-checkpoint-tmp"
RESUME_RE = re.compile(r"Resuming from checkpoint step (\d+)")
STARTED_TRAINING = "Pretraining tiny model"

# Runs the CLI with a fault injected into the training batches: R1JAX_FAULTS_INJECT="KIND@STEP"
# (KIND nan_weights: NaN mlm_weights; bad_tokens: token ids outside the vocabulary) changes the
# batch of optimizer step STEP (1-based) of the first iterator the stage opens (the training stream;
# the held-out stream is opened later). Everything else is the unmodified command.
INJECT = r"""
import os, sys
import numpy as np
from r1jax.data import pretraining
kind, at = os.environ["R1JAX_FAULTS_INJECT"].split("@")
at = int(at)
real = pretraining.pretrain_iterator
opened = []

class Injected:
  def __init__(self, it):
    self._it = it
  def __iter__(self):
    return self
  def __next__(self):
    batch = next(self._it)
    if self._it.get_state()["step"] == at:
      batch = dict(batch)
      if kind == "nan_weights":
        batch["mlm_weights"] = np.full_like(batch["mlm_weights"], np.nan)
      else:
        batch["tokens"] = np.where(batch["token_mask"], 10**6, 0).astype(np.int32)
    return batch
  def get_state(self):
    return self._it.get_state()
  def set_state(self, state):
    self._it.set_state(state)

def patched(*args, **kwargs):
  opened.append(1)
  it = real(*args, **kwargs)
  return Injected(it) if len(opened) == 1 else it

pretraining.pretrain_iterator = patched
from r1jax import main
sys.argv[0] = "r1jax.main"
main.cli()
"""


@dataclasses.dataclass
class Harness:
  """The tiny pretraining command, its environment and its outputs."""
  tokenizer: str             # a trained tokenizer.model (`prepare_tokenizer`)
  cache_dir: str             # the shared JAX persistent compilation cache
  num_steps: int = 24        # train.num_steps
  every: int = 4             # checkpoint.every_steps
  eval_every: int = 8        # eval.every_steps
  devices: int = 8           # forced CPU devices of each subprocess
  mesh: tuple[int, int, int] = (2, 2, 2)  # data, fsdp, tensor
  batch_size: int = 8        # train.batch_size

  def overrides(self) -> list[str]:
    out = [f"--config.data.tokenizer={self.tokenizer}", "--config.train.progress_bar=False",
           f"--config.train.num_steps={self.num_steps}", "--config.train.log_every_steps=1",
           f"--config.train.batch_size={self.batch_size}", "--config.train.warmup_steps=2",
           f"--config.checkpoint.every_steps={self.every}",
           f"--config.eval.every_steps={self.eval_every}", "--config.eval.num_batches=1"]
    out += [f"--config.mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), self.mesh)]
    out += [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]
    return out

  def command(self, workdir: str, *extra: str, inject: str | None = None) -> list[str]:
    prefix = [sys.executable, "-c", INJECT] if inject else [sys.executable, "-m", "r1jax.main"]
    return prefix + [f"--config={source.config_path()}:variant=tiny", f"--workdir={workdir}",
                     *self.overrides(), *extra]

  def env(self, inject: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update(
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={self.devices}".strip(),
        JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=source.pythonpath(env),
        JAX_COMPILATION_CACHE_DIR=self.cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("R1JAX_FAULTS_INJECT", None)
    if inject:
      env["R1JAX_FAULTS_INJECT"] = inject
    return env

  def start(self, workdir: str, log_path: str, *extra: str,
            inject: str | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
      return subprocess.Popen(self.command(workdir, *extra, inject=inject),
                              cwd=source.SOURCE["root"], env=self.env(inject), stdout=log,
                              stderr=subprocess.STDOUT)

  def run(self, workdir: str, log_path: str, *extra: str, inject: str | None = None,
          timeout: float = 900) -> tuple[int, str]:
    proc = self.start(workdir, log_path, *extra, inject=inject)
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    return proc.returncode, read_text(log_path)


def prepare_tokenizer(path: str) -> str:
  """Trains the harness's tokenizer (1,000 pieces, embedded general text) at `path` once."""
  if not os.path.exists(path):
    tokenizer_lib.Tokenizer.train(builtin.texts("general"), 1000).save(path)
  return path


# --------------------------------------------------------------------------------------------------
# A run's outputs.


def read_text(path: str) -> str:
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def checkpoint_entries(workdir: str) -> tuple[list[int], list[str]]:
  """(finalized steps, names of half-written tmp directories) in DIR/checkpoints."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARK in n)


def last_train_step(workdir: str) -> int:
  """The newest step in DIR/metrics.jsonl (0 if none); tolerates a line being written."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      lines = f.read().split(b"\n")
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue
  return 0


def metrics_records(workdir: str) -> list[dict[str, Any]]:
  """DIR/metrics.jsonl without the timing fields (which differ between identical runs)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def final_checksums(workdir: str, step: int) -> dict[str, int]:
  with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)["checksums"]


def file_state(path: str) -> tuple[int, int, int] | None:
  """(inode, size, mtime_ns) of `path`, None if absent: tells a rewritten file from the old one."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  return st.st_ino, st.st_size, st.st_mtime_ns


def workdir_files(workdir: str) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file (the lock excepted)."""
  out = {}
  for dirpath, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(dirpath, name)
      if name == run_dir.LOCK_FILE:
        continue
      try:
        st = os.stat(path)
      except FileNotFoundError:
        continue
      out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
  return out


class quiet_absl:  # pylint: disable=invalid-name
  """Raises the absl logger to ERROR inside the block (Orbax's read-only-manager warnings)."""

  def __enter__(self):
    self._logger = logging.getLogger("absl")
    self._level = self._logger.level
    self._logger.setLevel(logging.ERROR)

  def __exit__(self, *exc):
    self._logger.setLevel(self._level)


def compare_runs(workdir: str, reference: str, num_steps: int) -> list[str]:
  """Differences between two finished runs: metrics.jsonl, state checksums, parameters."""
  problems = []
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    return ["no summary.json: the run did not finish"]
  a, b = metrics_records(workdir), metrics_records(reference)
  if a != b:
    diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    problems.append(f"metrics.jsonl differs from record {diff} ({len(a)} vs {len(b)} records): "
                    f"{a[diff] if diff < len(a) else None} vs {b[diff] if diff < len(b) else None}")
  if final_checksums(workdir, num_steps) != final_checksums(reference, num_steps):
    problems.append(f"state checksums of step {num_steps} differ")
  with quiet_absl():
    pa, sa = ckpt_lib.restore_params(workdir, step=num_steps)
    pb, sb = ckpt_lib.restore_params(reference, step=num_steps)
  same = (sa == sb and jax.tree.structure(pa) == jax.tree.structure(pb) and
          all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))))
  if not same:
    problems.append("final parameters differ")
  return problems


# --------------------------------------------------------------------------------------------------
# Watching and signalling a subprocess.


def poll(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 600,
         interval: float = 0.002) -> bool:
  """Waits until condition() (True) or the process exits / time runs out (False)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return condition()
    time.sleep(interval)
  return False


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
  """Sends `sig` unless the process is already gone."""
  try:
    os.kill(proc.pid, sig)
  except ProcessLookupError:
    pass
