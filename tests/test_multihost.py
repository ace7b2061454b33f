"""Multi-host: two local processes (jax.distributed, gloo collectives on CPU, 2 devices each) train
the tiny model like one process with 4 devices, then save and restore a checkpoint together; two
processes stream tokenized shards, each reading its own documents.

Slow: three JAX processes start and compile (about a minute on 2 cores).
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from r1jax.data import builtin
from r1jax.data import shards
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.train import metrics

import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrain.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("R1JAX_")}
  # `devices` CPU devices per process, compiled at conftest's fast settings like the test process.
  env.update(XLA_FLAGS=xla_env.flags(devices), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
  return env


def _command(workdir: str, tokenizer: str, num_steps: int) -> list[str]:
  return [sys.executable, "-m", "r1jax.main", f"--config={CONFIG}:variant=tiny",
          f"--workdir={workdir}", f"--config.data.tokenizer={tokenizer}",
          f"--config.train.num_steps={num_steps}", "--config.train.log_every_steps=3",
          "--config.train.warmup_steps=1", "--config.train.progress_bar=False",
          "--config.eval.every_steps=3", "--config.eval.num_batches=2",
          "--config.checkpoint.every_steps=3", "--config.mesh.data=2", "--config.mesh.fsdp=-1"]


def _run_two_processes(command: list[str]) -> None:
  """Runs `command` as processes 0 and 1 of one JAX job (2 CPU devices each); both must pass."""
  port = _free_port()
  procs = [subprocess.Popen(command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(2, R1JAX_COORDINATOR=f"127.0.0.1:{port}",
                                     R1JAX_NUM_PROCESSES="2", R1JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"


@pytest.mark.slow
def test_two_processes_match_one_and_share_checkpoints(tmp_path):
  """Log, eval and checkpoint every 3 steps: the loop runs steps 1-3 and 4-6 as one jitted call
  each (train.steps_per_call's automatic choice), so the stacked batches are assembled across
  processes too; the continued run's steps 7 and 8 are single calls."""
  tokenizer = str(tmp_path / "tokenizer.model")
  tokenizer_lib.Tokenizer.train(builtin.texts("general"), 1000).save(tokenizer)
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  done = subprocess.run(_command(single, tokenizer, 6), env=_env(4), capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  _run_two_processes(_command(multi, tokenizer, 6))

  # Same global batch (rows split by process), same 2x2 mesh: same losses up to reduction order.
  one = metrics.read_metrics(single)
  two = metrics.read_metrics(multi)
  assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
  for a, b in zip(one, two):
    for key in ("loss", "mlm_loss", "nsp_loss"):
      assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], a["split"], key)
  with open(os.path.join(multi, "config.json")) as f:
    assert json.load(f)["resolved"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  # Both processes wrote their own data-iterator state into the shared checkpoint.
  data_dir = os.path.join(multi, "checkpoints", "6", "data")
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  # Continue to step 8: both processes restore step 6 together, then train on.
  _run_two_processes(_command(multi, tokenizer, 8))
  with open(os.path.join(multi, "summary.json")) as f:
    summary = json.load(f)
  assert summary["resumed_from_step"] == 6 and summary["step"] == 8
  assert summary["steps_per_call"] == 3
  steps = [r["step"] for r in metrics.read_metrics(multi, "train")]
  assert steps == [3, 6, 8]


@pytest.mark.slow
def test_two_processes_finetune_on_length_buckets(tmp_path):
  """Each process cuts its own rows' padding, but a jitted step needs one width on every process:
  Engine.trim agrees on the longest row across processes (an allgather), or the run would fail
  assembling the global batch."""
  tokenizer = str(tmp_path / "tokenizer.model")
  tokenizer_lib.Tokenizer.train(builtin.texts("domain"), 1000).save(tokenizer)
  workdir = str(tmp_path / "ft")
  command = [sys.executable, "-m", "r1jax.main",
             f"--config={os.path.join(ROOT, 'configs', 'finetune.py')}:variant=tiny",
             f"--workdir={workdir}", f"--config.task.tokenizer={tokenizer}",
             "--config.task.seq_len=512", "--config.task.length_buckets=8",
             "--config.schedule=full", "--config.train.num_steps=12",
             "--config.train.log_every_steps=6", "--config.eval.every_steps=6",
             "--config.checkpoint.every_steps=6", "--config.train.progress_bar=False",
             "--config.report.linear_baseline=False", "--config.report.latency_repeats=2",
             "--config.mesh.data=2", "--config.mesh.fsdp=-1"]
  _run_two_processes(command)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["step"] == 12
  # The task's texts fill under a third of 512 positions; cut batches hold mostly real tokens.
  train = [r for r in metrics.read_metrics(workdir, "train") if "real_token_fraction" in r]
  assert train and all(r["real_token_fraction"] > 0.5 for r in train)


# Each process opens the shards and notes the documents its rows read in epoch 0 (see
# test_data_shards.epoch_zero_reads), with jax.process_index() / process_count() as pretraining
# passes them.
_READS = """
import json, sys
import jax
from r1jax import distributed
from r1jax.data import pretraining, shards, tokenizer
import test_data_shards
distributed.maybe_initialize()
pretraining._DOC_CACHE_SIZE = 0
docs = shards.TokenizedCorpus(sys.argv[1])
reads = test_data_shards.epoch_zero_reads(docs, tokenizer.Tokenizer.load(sys.argv[2]),
                                          jax.process_index(), jax.process_count(), batch_size=8)
with open(f"{sys.argv[3]}/reads_{jax.process_index()}.json", "w") as f:
  json.dump({"reads": reads, "count": jax.process_count(), "documents": len(docs)}, f)
"""


@pytest.mark.slow
def test_two_processes_read_disjoint_shard_records_covering_an_epoch(tmp_path):
  clean = tmp_path / "clean"
  clean.mkdir()
  texts = builtin.texts("domain")[:150]
  for i, part in enumerate((texts[:60], texts[60:])):
    with open(clean / f"part-{i:05d}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in part)
  tokenizer = str(tmp_path / "tokenizer.model")
  tokenizer_lib.Tokenizer.train(texts, 600).save(tokenizer)
  out = str(tmp_path / "tokenized")
  shards.write_shards(sources.expand_spec(str(clean)), tokenizer, out, worker_count=0,
                      progress=False)
  env_path = os.path.join(ROOT, "tests")
  _run_two_processes([sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r})\n" +
                      _READS, out, tokenizer, str(tmp_path)])
  parts = []
  for p in range(2):
    with open(tmp_path / f"reads_{p}.json") as f:
      result = json.load(f)
    assert result["count"] == 2 and result["documents"] == 150
    parts.append(set(result["reads"]))
  assert parts[0] and parts[1] and not parts[0] & parts[1]
  assert parts[0] | parts[1] == set(range(150))
