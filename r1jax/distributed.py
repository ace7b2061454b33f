"""Multi-process start-up: one code path for a laptop, a SLURM GPU cluster and a TPU pod.

`maybe_initialize()` calls `jax.distributed.initialize` exactly when several processes were launched:
- the local launcher (`launch/local.sh`) and tests set R1JAX_COORDINATOR, R1JAX_NUM_PROCESSES,
  R1JAX_PROCESS_ID (and use gloo collectives on CPU);
- SLURM (`srun`) and Cloud TPU VMs are detected by JAX's own cluster detection.
Nothing happens for a single process.
"""
import os

import jax
from absl import logging

_initialized = False


def _slurm_multi_process() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def _tpu_pod() -> bool:
  # Cloud TPU VM slices with several workers list every worker's hostname here.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize() -> None:
  """Initializes jax.distributed when this process is one of several; idempotent."""
  global _initialized
  if _initialized:
    return
  if "R1JAX_COORDINATOR" in os.environ:
    num = int(os.environ["R1JAX_NUM_PROCESSES"])
    pid = int(os.environ["R1JAX_PROCESS_ID"])
    # CPU devices need a collectives backend across processes; harmless on GPU/TPU. Set before any
    # backend is created, so no jax.devices() call may precede this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["R1JAX_COORDINATOR"], num_processes=num, process_id=pid)
  elif _slurm_multi_process() or _tpu_pod():
    jax.distributed.initialize()  # JAX detects SLURM and TPU environments itself.
  else:
    return
  _initialized = True
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
