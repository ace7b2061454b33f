"""gs:// corpora and workdirs against a local GCS emulator (fake-gcs-server, started here): corpus
objects read through a local copy, a bucket that cannot be used refused before any work, and
(slow) a tiny pretraining run whose workdir is a bucket: checkpoints written there by Orbax,
metrics and summary mirrored there, and a second machine resuming from what the bucket holds."""
import json
import os
import subprocess
import sys

from etils import epath
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax import remote
from r1jax.data import builtin
from r1jax.data import sources
from r1jax.stages import pretrain

import servers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrain.py")


@pytest.fixture(scope="module")
def gcs():
  with servers.gcs_emulator() as emulator:
    emulator.create_bucket("runs")
    yield emulator


@pytest.fixture
def gcs_env(gcs, monkeypatch, tmp_path):
  for key, value in gcs.env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("R1JAX_CACHE_DIR", str(tmp_path / "cache"))
  return gcs


def test_gs_corpus_files_directories_and_globs_are_read_through_local_copies(gcs_env, tmp_path):
  texts = [" ".join(t.split()) for t in builtin.texts("domain")[:20]]
  for i, name in enumerate(("a.txt", "b.jsonl", "notes.md", ".hidden.txt")):
    epath.Path(f"gs://runs/corpus/{name}").write_text(
        "\n\n".join(texts[:10]) if i != 1 else
        "\n".join(json.dumps({"text": t}) for t in texts[10:]))
  files = sources.expand_spec("gs://runs/corpus/")  # a directory: its text-like files
  assert [os.path.basename(f) for f in files] == ["a.txt", "b.jsonl"]
  assert all(f.startswith(str(tmp_path / "cache" / "runs" / "corpus")) for f in files)
  assert sources.expand_spec("gs://runs/corpus/*.md") == [
      str(tmp_path / "cache" / "runs" / "corpus" / "notes.md")]
  records = sources.read_records("gs://runs/corpus/a.txt,gs://runs/corpus/b.jsonl")
  assert [r["text"] for r in records] == texts
  epath.Path("gs://runs/corpus/a.txt").write_text("changed")  # a new generation: fetched again
  assert open(sources.expand_spec("gs://runs/corpus/a.txt")[0]).read() == "changed"
  with pytest.raises(errors.InputNotFound, match="matches no object"):
    sources.expand_spec("gs://runs/corpus/*.csv")


def test_a_bucket_that_cannot_be_used_is_refused_before_any_work(gcs, tmp_path):
  env = dict(os.environ, **gcs.env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             R1JAX_STAGING_DIR=str(tmp_path / "staging"))
  proc = subprocess.run([sys.executable, "-m", "r1jax.main", f"--config={CONFIG}:variant=tiny",
                         "--workdir=gs://no-such-bucket/run"], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("r1jax: Cannot write to gs://no-such-bucket/run: no such bucket"), last
  assert "gcloud auth application-default login" in last and "gcsfuse" in last
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "staging")  # nothing staged, nothing trained
  with pytest.raises(errors.BadInput, match="mount it"):
    remote.StagedWorkdir("s3://bucket/run")
  config = configlib.load_config(f"{CONFIG}:variant=tiny")
  config.init_from = "gs://runs/general"  # reading another run from a bucket: the gcsfuse route
  with pytest.raises(configlib.ConfigError, match=r"init_from: 'gs://runs/general': an earlier "
                     r"run is read from a local or mounted path; mount the bucket \(gcsfuse"):
    pretrain.validate(config, num_devices=1, process_count=1)


def _pretrain(gcs, staging, *overrides):
  env = dict(os.environ, **gcs.env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             R1JAX_STAGING_DIR=staging, R1JAX_SYNC_SECS="2")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.main", f"--config={CONFIG}:variant=tiny",
       "--workdir=gs://runs/pretrain", "--config.data.corpus=gs://runs/corpus/",
       "--config.train.progress_bar=False", "--config.checkpoint.every_steps=4",
       "--config.eval.every_steps=4", "--config.eval.num_batches=2",
       "--config.train.log_every_steps=2", "--config.train.warmup_steps=2",
       "--config.model.n_layer=1", "--config.model.vocab_size=1000", *overrides],
      env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.slow
def test_pretraining_round_trip_through_a_bucket(gcs_env, tmp_path):
  epath.Path("gs://runs/corpus/general.txt").write_text(
      "\n\n".join(builtin.texts("general")[:2000]))
  first = str(tmp_path / "machine1")
  _pretrain(gcs_env, first, "--config.train.num_steps=8")
  run = epath.Path("gs://runs/pretrain")
  names = {p.name for p in run.iterdir()}
  assert {"checkpoints", "config.json", "metrics.jsonl", "summary.json", "tokenizer.model",
          "tensorboard"} <= names, names
  summary = json.loads(gcs_env.read("gs://runs/pretrain/summary.json"))
  assert summary["step"] == 8 and summary["checkpoint"] == "gs://runs/pretrain/checkpoints/8"
  steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 8 and (run / "checkpoints" / "8" / "params").exists()
  # Orbax wrote the checkpoints to the bucket itself: none in the staging directory.
  assert not os.path.exists(os.path.join(first, "runs", "pretrain", "checkpoints"))

  # Another machine (an empty staging directory) continues the run from the bucket.
  second = str(tmp_path / "machine2")
  _pretrain(gcs_env, second, "--config.train.num_steps=12")
  summary = json.loads(gcs_env.read("gs://runs/pretrain/summary.json"))
  assert summary["step"] == 12 and summary["resumed_from_step"] == 8
  records = [json.loads(line) for line in
             gcs_env.read("gs://runs/pretrain/metrics.jsonl").decode().splitlines()]
  train_steps = [r["step"] for r in records if r.get("split") == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[0] == 2 and train_steps[-1] == 12
  assert [r["step"] for r in records if r.get("split") == "eval"] == [4, 8, 12]
