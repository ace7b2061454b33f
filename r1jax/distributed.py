"""Multi-process start-up: one code path for a laptop, a SLURM GPU cluster and a TPU pod.

`maybe_initialize()` calls `jax.distributed.initialize` exactly when this process is one of several,
and does nothing for a single process. It reads only environment variables (and, on a Cloud TPU VM,
the VM metadata server), so the same command runs unchanged everywhere:

| environment                         | detected from                                                |
|-------------------------------------|--------------------------------------------------------------|
| `launch/local.sh` (and the tests)   | R1JAX_COORDINATOR, R1JAX_NUM_PROCESSES, R1JAX_PROCESS_ID      |
| SLURM `srun` (`launch/slurm_gpu.sh`)| SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID, SLURM_LOCALID |
| Cloud TPU VM slice (`tpu_pod.sh`)   | R1JAX_DISTRIBUTED=auto (set by the launcher), or the TPU VM metadata listing more than one worker |
| GKE TPU / multislice                | TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES with more than one host, MEGASCALE_COORDINATOR_ADDRESS |

Overrides: R1JAX_DISTRIBUTED=auto forces `jax.distributed.initialize()` with JAX's own cluster
detection (SLURM, Open MPI, TPU); R1JAX_DISTRIBUTED=off never initialises (e.g. a single-task
`salloc` shell). R1JAX_LOCAL_DEVICE_IDS (or JAX's JAX_LOCAL_DEVICE_IDS) restricts the accelerators a
process uses, e.g. "0,1,2,3"; R1JAX_INIT_TIMEOUT sets the connection timeout in seconds (default 300).

Nothing here may touch a JAX backend (`jax.devices()`, `jax.default_backend()`, any computation)
before `jax.distributed.initialize`: JAX refuses to initialise afterwards.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
from collections.abc import Callable, Mapping
import urllib.request

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

KINDS = ("single", "local", "slurm", "tpu", "auto")
_DISTRIBUTED_CHOICES = ("auto", "off")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # PCI vendor id of Cloud TPU chips and Google virtual NICs.


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
  """How this process joins the job, decided from the environment alone.

  Attributes:
    kind: one of KINDS; "single" means no jax.distributed at all.
    coordinator_address: "host:port" of process 0, or None to let JAX detect it.
    num_processes: number of processes in the job, or None to let JAX detect it.
    process_id: this process's rank in [0, num_processes), or None to let JAX detect it.
    local_device_ids: accelerator ids this process uses, or None for JAX's default.
  """
  kind: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  @property
  def is_multi_process(self) -> bool:
    return self.kind != "single"


_initialized_plan: LaunchPlan | None = None


def _int_var(environ: Mapping[str, str], name: str) -> int:
  value = environ.get(name)
  if value is None:
    raise ValueError(f"{name} is not set; the local launcher sets R1JAX_COORDINATOR, "
                     "R1JAX_NUM_PROCESSES and R1JAX_PROCESS_ID together (see launch/local.sh).")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer.") from None


def _device_ids(value: str, name: str) -> tuple[int, ...]:
  try:
    ids = tuple(int(v) for v in value.split(",") if v.strip())
  except ValueError:
    raise ValueError(f"{name}={value!r} must be a comma-separated list of device ids, "
                     "e.g. '0,1,2,3'.") from None
  if not ids:
    raise ValueError(f"{name}={value!r} lists no device ids; unset it to use every device.")
  return ids


def _explicit_device_ids(environ: Mapping[str, str]) -> tuple[int, ...] | None:
  for name in ("R1JAX_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"):
    if environ.get(name):
      return _device_ids(environ[name], name)
  return None


def _local_plan(environ: Mapping[str, str]) -> LaunchPlan:
  """Plan for `launch/local.sh`: every value given explicitly, no cluster detection."""
  address = environ["R1JAX_COORDINATOR"]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"R1JAX_COORDINATOR={address!r} must be 'host:port', e.g. '127.0.0.1:12355'.")
  num = _int_var(environ, "R1JAX_NUM_PROCESSES")
  pid = _int_var(environ, "R1JAX_PROCESS_ID")
  if num < 1:
    raise ValueError(f"R1JAX_NUM_PROCESSES={num} must be at least 1.")
  if not 0 <= pid < num:
    raise ValueError(f"R1JAX_PROCESS_ID={pid} must be in [0, {num}) for R1JAX_NUM_PROCESSES={num}.")
  return LaunchPlan("local", address, num, pid, _explicit_device_ids(environ))


def _slurm_plan(environ: Mapping[str, str]) -> LaunchPlan | None:
  """Plan for an `srun` step with several tasks; JAX derives address, count and rank itself.

  JAX gives each SLURM task one GPU, number SLURM_LOCALID among the GPUs the task sees. That is
  right for one task per GPU when every task sees all GPUs of its node; two cases need other ids:
  a task that sees a single GPU (SLURM bound it with --gpus-per-task=1 or cgroups) uses id 0,
  and one task per node (SLURM_NTASKS_PER_NODE=1) uses every GPU it sees.
  """
  needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if not all(name in environ for name in needed) or _int_var(environ, "SLURM_NTASKS") <= 1:
    return None
  device_ids = _explicit_device_ids(environ)
  visible = [v for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
  if device_ids is None and visible:
    if len(visible) == 1:
      device_ids = (0,)
    elif environ.get("SLURM_NTASKS_PER_NODE") == "1":
      device_ids = tuple(range(len(visible)))
  return LaunchPlan("slurm", local_device_ids=device_ids)


def google_pci_device_count() -> int:
  """Number of Google PCI devices on this host (TPU chips, gVNIC); reads /sys only.

  Zero off Google Cloud, so `detect` asks the metadata server only on Google Cloud VMs. Any Google
  device counts (not a list of TPU device ids), so a new TPU generation needs no change here.
  """
  count = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if pathlib.Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
        count += 1
    except OSError:
      continue
  return count


def gce_tpu_worker_count(timeout_s: float = 2.0) -> int:
  """Workers in this Cloud TPU VM slice per the VM metadata server; 0 when there is no answer.

  Only asked on hosts with Google PCI devices (see `detect`), so machines off Google Cloud never
  wait on it; other Google Cloud VMs have no such attribute and get 0 at once.
  """
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints",
      headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      endpoints = response.read().decode()
  except (OSError, ValueError):  # URLError, timeouts and HTTP errors are OSErrors.
    return 0
  return len([e for e in endpoints.split(",") if e.strip()])


def _tpu_hosts_from_env(environ: Mapping[str, str]) -> int:
  for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if environ.get(name):
      return len([h for h in environ[name].split(",") if h.strip()])
  return 0


def detect(environ: Mapping[str, str] | None = None,
           tpu_worker_count: Callable[[], int] = gce_tpu_worker_count,
           google_devices: Callable[[], int] = google_pci_device_count) -> LaunchPlan:
  """Decides from the environment whether and how to join a multi-process job.

  Args:
    environ: the environment to read; `os.environ` by default.
    tpu_worker_count: returns the number of workers of this TPU VM slice; only called on hosts
      where `google_devices()` is positive and no variable decided already.
    google_devices: returns the number of Google PCI devices of this host (0 off Google Cloud).

  Returns:
    The LaunchPlan; kind "single" when this is the only process.

  Raises:
    ValueError: a launcher variable is malformed or inconsistent.
  """
  environ = os.environ if environ is None else environ
  mode = environ.get("R1JAX_DISTRIBUTED", "").strip().lower()
  if mode and mode not in _DISTRIBUTED_CHOICES:
    raise ValueError(f"R1JAX_DISTRIBUTED={mode!r} is not one of {_DISTRIBUTED_CHOICES}; unset it "
                     "to detect the environment.")
  if mode == "off":
    return LaunchPlan("single")
  if "R1JAX_COORDINATOR" in environ:
    return _local_plan(environ)
  slurm = _slurm_plan(environ)
  if slurm is not None:
    return slurm
  if mode == "auto":
    return LaunchPlan("auto", local_device_ids=_explicit_device_ids(environ))
  if _tpu_hosts_from_env(environ) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return LaunchPlan("tpu")
  if google_devices() > 0 and tpu_worker_count() > 1:
    return LaunchPlan("tpu")
  return LaunchPlan("single")


def maybe_initialize(environ: Mapping[str, str] | None = None) -> LaunchPlan:
  """Initialises jax.distributed when this process is one of several; idempotent.

  Call it before anything touches a JAX backend. Returns the plan it acted on; "single" means
  nothing was initialised.
  """
  global _initialized_plan
  if _initialized_plan is not None:
    return _initialized_plan
  plan = detect(environ)
  if plan.is_multi_process and not jax.distributed.is_initialized():
    # Several CPU processes need a cross-process collectives backend (gloo); the setting only
    # concerns the CPU client, so it is harmless on GPU and TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = os.environ if environ is None else environ
    timeout = _int_var({"R1JAX_INIT_TIMEOUT": "300", **env}, "R1JAX_INIT_TIMEOUT")
    # The local launcher gives every value; skipping detection keeps a SLURM allocation around
    # `launch/local.sh` from pinning each process to one GPU.
    detection = "deactivate" if plan.kind == "local" else None
    logging.info("jax.distributed.initialize via %s launcher (coordinator=%s, processes=%s, "
                 "rank=%s, local devices=%s)", plan.kind, plan.coordinator_address,
                 plan.num_processes, plan.process_id, plan.local_device_ids)
    jax.distributed.initialize(
        coordinator_address=plan.coordinator_address,
        num_processes=plan.num_processes,
        process_id=plan.process_id,
        local_device_ids=None if plan.local_device_ids is None else list(plan.local_device_ids),
        cluster_detection_method=detection,
        initialization_timeout=timeout)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  _initialized_plan = plan
  return plan


def sync(tag: str) -> None:
  """Waits until every process of the job reaches `tag` (returns at once with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(tag)


def agree(value: float) -> float:
  """Process 0's `value` on every process (a host-side decision all processes must share: a
  measured step rate, a clock check); `value` itself with one process."""
  if jax.process_count() == 1:
    return value
  return float(multihost_utils.broadcast_one_to_all(np.float64(value)))
