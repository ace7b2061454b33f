"""gs:// corpora and workdirs against a local GCS emulator (fake-gcs-server, started here): corpus
objects read through a local copy, tokenized shards in a bucket of which a process copies only the
files its rows read, the other gs:// inputs of a config (an earlier run's workdir,
tokenizer and word-list files, a directory of rounds) copied before the stage runs, the lock of a
gs:// workdir held in the bucket (one winner among contenders, stale locks taken over), a bucket
that cannot be used refused before any work, and (slow) a tiny pretraining run whose workdir is a
bucket: checkpoints written there by Orbax, metrics and summary mirrored there, a second machine
resuming from what the bucket holds, and a run starting from it (init_from=gs://...)."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

from etils import epath
import numpy as np
import pytest

from r1jax import configlib
from r1jax import errors
from r1jax import remote
from r1jax import run_dir
from r1jax.data import builtin
from r1jax.data import doc_order
from r1jax.data import pretraining
from r1jax.data import shards
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.stages import pretrain

import servers
import xla_env

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


def test_a_process_copies_only_the_shard_files_its_rows_read(gcs_env, tmp_path, caplog):
  """A data stage's workdir in a bucket, 160 documents in 4 shards: process 1 of 2 with a row
  group per process copies the last two shards only and reads from them the records a local copy
  gives; a shard missing from the bucket is named before any training."""
  caplog.set_level(logging.INFO)
  texts = [" ".join(t.split()[:15]) for t in builtin.texts("domain")[:160]]
  data = tmp_path / "ws" / "data"
  (data / "clean").mkdir(parents=True)
  for i in range(4):
    with open(data / "clean" / f"part-{i:05d}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": t}) + "\n" for t in texts[40 * i:40 * (i + 1)])
  tok = tokenizer_lib.Tokenizer.train(texts, 600)
  local = str(data / "tokenized")
  shards.write_shards(sources.expand_spec(str(data / "clean")), tok.save(str(tmp_path / "t.model")),
                      local, worker_count=0, progress=False)
  for directory in ("clean", "tokenized"):
    for name in os.listdir(data / directory):
      epath.Path(data / directory / name).copy(epath.Path(f"gs://runs/ws/data/{directory}/{name}"))
  url = "gs://runs/ws/data/tokenized"
  assert shards.find_manifest("gs://runs/ws/data/clean/") == f"{url}/manifest.json"
  assert shards.find_manifest(url) == f"{url}/manifest.json"
  assert shards.find_manifest("gs://runs/ws/data/clean/part-00000.jsonl") is None
  assert shards.source_of(f"{url}/manifest.json") == "gs://runs/ws/data/clean"

  corpus = shards.TokenizedCorpus(url)
  views = pretraining.split_documents(corpus, 7)
  opts = dict(batch_size=8, row_groups=2, process_index=1, process_count=2)
  corpus.fetch(doc_order.records_read(views, **opts), who="process 1 of 2")
  cache = tmp_path / "cache" / "runs" / "ws" / "data" / "tokenized"
  assert sorted(f for f in os.listdir(cache) if f.endswith(".array_record")) == [
      "part-00002.array_record", "part-00003.array_record"]
  total = sum(os.path.getsize(os.path.join(local, f"part-0000{i}.array_record")) for i in range(4))
  fetched = sum(os.path.getsize(cache / f"part-0000{i}.array_record") for i in (2, 3))
  assert (f"Tokenized shards {url}: process 1 of 2 reads 2 of 4 shard files ({fetched} of {total} "
          "bytes)") in caplog.text
  for view, local_view in zip(views, pretraining.split_documents(shards.TokenizedCorpus(local), 7)):
    its = [pretraining.pretrain_iterator(v, tok, seq_len=32, seed=1, **opts)
           for v in (view, local_view)]
    epoch = 0
    while not epoch:  # until each row has read all of its group's records
      a, b = next(its[0]), next(its[1])
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
      epoch = a["epoch"].min()
  with pytest.raises(ValueError, match="part-00000.array_record, which this process has not"):
    corpus.tokens(0)

  # The pretraining stage, as the only process: the bucket's shards, every file copied.
  config = configlib.load_config(f"{CONFIG}:variant=tiny")
  config.data.corpus = "gs://runs/ws/data/clean"
  config.data.eval_every_nth_doc = 7
  os.makedirs(tmp_path / "run")
  chosen = pretrain.open_corpus(config, str(tmp_path / "run"))
  assert chosen.input == "shards" and len(chosen.train) == 138
  assert f"{url}: process 0 of 1 reads 4 of 4 shard files ({total} of {total} bytes)" in caplog.text

  epath.Path(f"{url}/part-00001.array_record").unlink()
  with pytest.raises(errors.BadInput, match=rf"^Tokenized shard {url}/part-00001.array_record: "
                     r"missing in the bucket\. Copy the data stage's DIR/data/tokenized"):
    pretrain.open_corpus(config, str(tmp_path / "run"))


def _write(url: str, text: str = "x") -> None:
  epath.Path(url).write_text(text)


def _files(directory) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), directory) for d, _, fs in os.walk(directory)
          for f in fs}


def test_gs_inputs_of_a_config_are_read_from_local_copies(gcs_env, tmp_path):
  src = "gs://runs/src"
  for name in ("config.json", "tokenizer.model", "summary.json", ".lock", "checkpoints/4/params/a",
               "checkpoints/8/params/a", "checkpoints/8/_CHECKPOINT_METADATA",
               "checkpoints/9.orbax-checkpoint-tmp-1/params/a", "phase_0/checkpoints/2/params/a",
               "phase_0/checkpoints/3/params/a"):
    _write(f"{src}/{name}", name)
  for name in ("tok.model", "syn.txt", "langs.txt", "rounds/week1.jsonl", "rounds/week2.jsonl"):
    _write(f"gs://runs/files/{name}", name)
  cache = tmp_path / "cache" / "runs"
  config = configlib.load_config(f"{os.path.join(ROOT, 'configs', 'finetune.py')}:variant=tiny")
  config.init_from = src + "/"
  config.task.tokenizer = "gs://runs/files/tok.model"
  config.task.train = "gs://runs/files/train*.jsonl"  # an input spec: sources.expand_spec's
  config.augment.synonyms = "wordnet,gs://runs/files/syn.txt"
  changed = remote.localize_inputs(config)
  assert config.init_from == str(cache / "src")
  assert config.task.tokenizer == str(cache / "files" / "tok.model")
  assert open(config.task.tokenizer).read() == "tok.model"
  assert config.augment.synonyms == f"wordnet,{cache / 'files' / 'syn.txt'}"
  assert config.task.train == "gs://runs/files/train*.jsonl"
  assert set(changed) == {"init_from", "task.tokenizer", "augment.synonyms"}
  # The earlier run: its files and the newest step of each checkpoints/, not its lock, older steps
  # or Orbax's unfinished temporary directory; nothing else (the cache's stamps live apart).
  assert _files(cache / "src") == {"config.json", "tokenizer.model", "summary.json",
                                   "checkpoints/8/params/a", "checkpoints/8/_CHECKPOINT_METADATA",
                                   "phase_0/checkpoints/3/params/a"}

  data = configlib.load_config(f"{os.path.join(ROOT, 'configs', 'data.py')}:variant=tiny")
  data.clean.languages = "gs://runs/files/langs.txt"
  data.beam.options = "--temp_location=gs://runs/tmp"  # Beam's own flag: passed on as it is
  continual = configlib.load_config(f"{os.path.join(ROOT, 'configs', 'continual.py')}:variant=tiny")
  continual.stream.rounds = "gs://runs/files/rounds"  # a directory: copied whole
  remote.localize_inputs(data)
  remote.localize_inputs(continual)
  assert data.clean.languages == str(cache / "files" / "langs.txt")
  assert data.beam.options == "--temp_location=gs://runs/tmp"
  assert continual.stream.rounds == str(cache / "files" / "rounds")
  assert _files(continual.stream.rounds) == {"week1.jsonl", "week2.jsonl"}

  config = configlib.load_config(f"{os.path.join(ROOT, 'configs', 'finetune.py')}:variant=tiny")
  config.task.tokenizer = "gs://runs/files/missing.model"
  with pytest.raises(errors.InputNotFound, match=r"^--config.task.tokenizer: gs://runs/files/"
                     r"missing.model is neither an object nor a directory in the bucket"):
    remote.localize_inputs(config)
  config.task.tokenizer, config.init_from = "", "gs://runs/no-run"
  with pytest.raises(errors.InputNotFound, match=r"^gs://runs/no-run: no object under it; name an "
                     r"existing gs:// workdir of an earlier run"):
    remote.localize_inputs(config)


def _lock_holder(url: str) -> dict:
  held = remote.read_object(url)
  return json.loads(held[0]) if held else {}


def test_the_lock_of_a_gs_workdir_lives_in_the_bucket(gcs_env, tmp_path, monkeypatch):
  url, lock_url = "gs://runs/locked", "gs://runs/locked/.lock"
  monkeypatch.setenv("R1JAX_STAGING_DIR", str(tmp_path / "machine1"))
  with remote.StagedWorkdir(url) as local1:
    first = run_dir.WorkdirLock(local1).acquire()
    assert _lock_holder(lock_url)["pid"] == os.getpid()
    # Another machine (its own staging directory, another host name) is refused by the bucket.
    monkeypatch.setenv("R1JAX_STAGING_DIR", str(tmp_path / "machine2"))
    with remote.StagedWorkdir(url) as local2:
      second = run_dir.WorkdirLock(local2)
      second.bucket.info["host"] = "machine-2"
      with pytest.raises(run_dir.WorkdirLocked, match=(
          rf"^gs://runs/locked is in use by pid {os.getpid()} on host {socket.gethostname()} \(its "
          rf"lock {lock_url} was refreshed \d+ s ago\)\. .*R1JAX_LOCK_STALE_SECS.*gcloud storage "
          rf"rm {lock_url}$")):
        second.acquire()
      assert not os.path.exists(os.path.join(local2, ".lock"))  # its local lock given back
      # The first machine is gone (it stopped refreshing): its lock is taken over once stale.
      second.bucket.stale_secs = 1.0
      while remote.read_object(lock_url)[2] <= 1.0:
        time.sleep(0.2)
      second.acquire()
      assert _lock_holder(lock_url)["host"] == "machine-2"
      first.release()  # the first run's end leaves the lock it lost alone
      assert _lock_holder(lock_url)["host"] == "machine-2"
      second.release()
      assert remote.read_object(lock_url) is None

  # On the owner's own host a lock whose process is gone is taken over at once.
  dead = subprocess.Popen(["true"])
  dead.wait()
  remote.write_object(lock_url, json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                            "start_time": "1"}).encode(), if_generation=0)
  lock = run_dir.BucketLock(lock_url).acquire()
  assert _lock_holder(lock_url)["pid"] == os.getpid()
  lock.release()


def test_one_of_many_machines_starting_a_gs_workdir_at_once_wins(gcs_env):
  """Create-if-absent (ifGenerationMatch=0), which the emulator honours on uploads: of eight
  contenders that start together exactly one holds the lock."""
  locks = [run_dir.BucketLock("gs://runs/race/.lock") for _ in range(8)]
  for i, lock in enumerate(locks):
    lock.info["host"] = f"machine-{i}"
  barrier, outcome = threading.Barrier(len(locks)), {}

  def contend(i):
    barrier.wait()
    try:
      locks[i].acquire()
      outcome[i] = "held"
    except run_dir.WorkdirLocked:
      outcome[i] = "refused"

  threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(locks))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [i for i, o in outcome.items() if o == "held"]
  assert len(outcome) == 8 and len(winners) == 1, outcome
  assert _lock_holder("gs://runs/race/.lock")["host"] == f"machine-{winners[0]}"
  locks[winners[0]].release()


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
  config.init_from = "gs://runs/general"  # from Python, not localized first: refused, naming how
  with pytest.raises(configlib.ConfigError, match=r"init_from: 'gs://runs/general': a gs:// run is "
                     r"read from a local copy, which r1jax.main makes; from Python, call "
                     r"r1jax.remote.localize_inputs\(config\) first"):
    pretrain.validate(config, num_devices=1, process_count=1)


def test_a_gs_workdir_in_use_on_another_machine_is_refused_and_left_alone(gcs_env, tmp_path):
  lock = {"pid": 4242, "host": "machine-2", "start_time": "1"}
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             R1JAX_STAGING_DIR=str(tmp_path / "staging"))
  remote.write_object("gs://runs/busy/.lock", json.dumps(lock).encode(), if_generation=0)
  proc = subprocess.run([sys.executable, "-m", "r1jax.main", f"--config={CONFIG}:variant=tiny",
                         "--workdir=gs://runs/busy"], env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("r1jax: gs://runs/busy is in use by pid 4242 on host machine-2 (its lock "
                         "gs://runs/busy/.lock was refreshed "), last
  assert "Traceback" not in proc.stderr
  assert [p.name for p in epath.Path("gs://runs/busy").iterdir()] == [".lock"]  # nothing written
  assert _lock_holder("gs://runs/busy/.lock") == lock


def _pretrain(gcs, staging, *overrides, workdir="gs://runs/pretrain"):
  env = dict(os.environ, **gcs.env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             R1JAX_STAGING_DIR=staging, R1JAX_SYNC_SECS="2", XLA_FLAGS=xla_env.flags(1))
  proc = subprocess.run(
      [sys.executable, "-m", "r1jax.main", f"--config={CONFIG}:variant=tiny",
       f"--workdir={workdir}", "--config.data.corpus=gs://runs/corpus/",
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

  # A run on a third machine starts from the bucket's run (continued pretraining, init_from=gs://):
  # read from a local copy of its files and newest checkpoint, its parameters and tokenizer used.
  third = str(tmp_path / "machine3")
  proc = _pretrain(gcs_env, third, "--config.train.num_steps=4", "--config.init_from=gs://runs/"
                   "pretrain", workdir="gs://runs/dapt")
  copy = str(tmp_path / "cache" / "runs" / "pretrain")
  assert f"Initialised parameters from {copy} (step 12)" in proc.stderr, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["12"]
  assert json.loads(gcs_env.read("gs://runs/dapt/summary.json"))["step"] == 4
  assert (gcs_env.read("gs://runs/dapt/tokenizer.model") ==
          gcs_env.read("gs://runs/pretrain/tokenizer.model"))
  assert remote.read_object("gs://runs/dapt/.lock") is None  # released at the end
