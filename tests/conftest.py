"""Test setup: force 8 CPU devices before jax is imported, so sharding code paths run for real."""
import os

# The suite's time is mostly XLA compiling tiny models for a few steps each: LLVM's optimisation
# level 0 halves a finetuning test's time (84 -> 41 s on the 2-core VM) and the models stay too
# small for the slower code to matter (R1JAX_TEST_FULL_OPT=1 compiles as users do).
_FAST_COMPILE = ("" if os.environ.get("R1JAX_TEST_FULL_OPT") else
                 " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# The 8 forced devices meet in XLA:CPU's in-process collectives, which abort the process (SIGABRT,
# "Termination timeout ... of 40 seconds exceeded") when one device's thread reaches an all-reduce
# 40 s after the others: on 2 oversubscribed cores (two xdist workers, or a test's subprocesses
# beside the test) a starved thread can. Measured with a pmap whose last device works longer
# (session 20): aborts at the default, completes with these. No test relies on the abort.
_PATIENT_COLLECTIVES = (" --xla_cpu_collective_call_warn_stuck_timeout_seconds=600"
                        " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
                        " --xla_cpu_collective_timeout_seconds=3600")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + _FAST_COMPILE
    + _PATIENT_COLLECTIVES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (must come after XLA_FLAGS)

import pytest  # noqa: E402

from r1jax.data import builtin  # noqa: E402
from r1jax.data import tokenizer as tokenizer_lib  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core this process may use, at most 4 (each worker is a JAX process
  with 8 forced devices and its own compilations: 1-3 GB at peak)."""
  del config
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    cores = os.cpu_count() or 1
  return max(1, min(4, cores))


@pytest.fixture(scope="module")
def docs():
  """400 documents of the embedded domain corpus (FOLDOC)."""
  return builtin.texts("domain")[:400]


@pytest.fixture(scope="module")
def tok(docs):
  """A 2,000-piece tokenizer trained on `docs` plus a little Chinese text."""
  return tokenizer_lib.Tokenizer.train(docs + ["计算机网络协议在主机之间传输数据包。"] * 5, 2000)


# The default suite's heaviest files, heaviest first: summed test times in a 2-worker run at load
# 9-14 (session 22, bench/NOTES.md "CI time (session 22, helper-24)"), each over 100 s there.
# xdist's loadfile hands each worker a whole file at a time in collection order; setup.cfg turns
# off its own reordering (files with the most tests first), which started these few-test heavy
# files last and left one worker finishing them alone (bench/ci_schedule.py on that run's times:
# 11% over an even split, this order 1%; on a later complete run's: 1.3% and 0.9%). Unnamed
# files follow in name order and fill the gaps at the end.
HEAVY_FILES = (
    "test_finetune.py", "test_bench.py", "test_train_steps.py", "test_faults.py",
    "test_compress_prune.py", "test_model.py", "test_pretrain.py", "test_user_errors.py",
    "test_model_parity.py", "test_pipeline_schedule.py", "test_edge_export.py",
    "test_data_clean_beam.py", "test_data_pretraining.py", "test_pipeline.py",
    "test_multimodal_model.py", "test_tune.py", "test_compress_distill.py",
)


def pytest_collection_modifyitems(items):
  """Runs HEAVY_FILES' tests first (a stable sort: each file's tests keep their order). The slow
  step (test by test, `--dist load`) gets the same order: simulated, within 2% of name order."""
  rank = {name: i for i, name in enumerate(HEAVY_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
