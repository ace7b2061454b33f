"""The tune stage on a real PostgreSQL server (started here, `servers.postgres`): the study's lock
lives in the database, so workers that share only the URL use exactly the budget; a bad URL is one
clear error. (The SQLite and journal storages are tests/test_tune.py's.)"""
import json
import os
import subprocess
import sys
import textwrap
import time

import optuna
from optuna.trial import TrialState
import pytest

from r1jax import configlib
from r1jax.stages import tune
from r1jax.stages import tune_storage

import servers
import test_tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server():
  with servers.postgres() as s:
    yield s


def _spawn(code, *args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                                     os.environ.get("PYTHONPATH", "")]))
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env)


# A process that takes the study's database lock, says so, and holds it until told (or killed).
HOLDER = """
    import sys
    from r1jax.stages import tune_storage
    lock = tune_storage.DatabaseLock(sys.argv[1], "race").acquire()
    print("held", flush=True)
    sys.stdin.readline()
    lock.release()
    print("released", flush=True)
"""


def test_database_lock_excludes_other_processes_and_dies_with_its_holder(server):
  url = server.create_database("lock")
  holder = _spawn(HOLDER, url)
  assert holder.stdout.readline().strip() == "held", holder.stderr.read()
  mine = tune_storage.DatabaseLock(url, "race")
  other_study = tune_storage.DatabaseLock(url, "another study")
  assert other_study.acquire(timeout=5).held  # one lock per study
  other_study.release()
  assert not mine.acquire(timeout=1).held  # held by the other process
  holder.stdin.write("\n")
  holder.stdin.flush()
  assert holder.stdout.readline().strip() == "released"
  assert mine.acquire(timeout=10).held
  assert mine.acquire().held  # again while held: a no-op
  mine.release()
  assert not mine.held

  holder = _spawn(HOLDER, url)
  assert holder.stdout.readline().strip() == "held"
  assert not mine.acquire(timeout=0.5).held
  holder.kill()  # a worker killed while holding it: the server ends its session and the lock
  holder.wait()
  assert mine.acquire(timeout=10).held
  mine.release()


# A tune worker without training: `run_trials` (the tune stage's loop) with an objective that
# records its worker, releases the lock as `tune._objective` does, and takes a few milliseconds.
WORKER = """
    import os, random, sys, tempfile, time
    import ml_collections
    import optuna
    from r1jax import run_dir
    from r1jax.stages import tune_storage
    url, budget = sys.argv[1], int(sys.argv[2])
    config = ml_collections.ConfigDict(dict(storage=url, study_name="race", heartbeat_secs=0))
    workdir = tempfile.mkdtemp()  # each worker its own: only the URL is shared
    lock = tune_storage.make_lock(config, workdir)
    assert isinstance(lock, tune_storage.DatabaseLock), lock
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="race", storage=tune_storage.make_storage(config, workdir))
    print("ready", flush=True)
    sys.stdin.readline()  # all workers start together

    def objective(trial):
      try:
        trial.set_user_attr("worker", run_dir.process_info())
      finally:
        lock.release()
      time.sleep(random.uniform(0.0, 0.03))
      return trial.suggest_float("x", 0, 1)

    print(tune_storage.run_trials(study, lock, budget, objective, gc_after_trial=False), flush=True)
"""


def test_workers_sharing_only_the_url_use_exactly_the_budget(server):
  url, budget = server.create_database("budget"), 24
  optuna.create_study(study_name="race", storage=url)
  workers = [_spawn(WORKER, url, budget) for _ in range(3)]
  for w in workers:
    assert w.stdout.readline().strip() == "ready", w.stderr.read()[-3000:]
  for w in workers:
    w.stdin.write("go\n")
    w.stdin.flush()
  ran = []
  for w in workers:
    out, err = w.communicate(timeout=300)
    assert w.returncode == 0, err[-3000:]
    ran.append(int(out.split()[-1]))
  trials = optuna.load_study(study_name="race", storage=url).get_trials()
  assert len(trials) == budget and sum(ran) == budget, ran
  assert sorted(t.number for t in trials) == list(range(budget))
  assert all(t.state == TrialState.COMPLETE for t in trials)
  by_worker = {}
  for t in trials:
    by_worker.setdefault(t.user_attrs["worker"]["pid"], []).append(t.number)
  assert set(by_worker) == {w.pid for w in workers}, ran  # every worker took part
  assert sorted(len(n) for n in by_worker.values()) == sorted(ran)


def test_a_bad_database_url_is_one_error_naming_it_masked(server, tmp_path):
  good = server.create_database("study")
  cases = [  # (storage URL, what the error says)
      (server.url("study", password="wrong-pw"), "password authentication failed"),
      (server.url("nowhere"), 'database "nowhere" does not exist'),
      (f"postgresql://{servers.USER}:secret-pw@127.0.0.1:{servers.free_port()}/study",
       "Connection refused"),
  ]
  for url, answer in cases:
    workdir = str(tmp_path / "w")
    with pytest.raises(configlib.ConfigError) as e:
      tune.run(test_tune.tiny_config(storage=url), workdir)
    message = str(e.value)
    assert tune_storage.masked(url) in message and answer in message, message
    assert "pw@" not in message and "--config.storage" in message, message
    assert not os.path.exists(workdir)  # refused before any file was written
  assert tune_storage.masked(good) == good.replace(server.password, "***")
  with pytest.raises(configlib.ConfigError, match=r"write postgresql://"):
    tune.validate(test_tune.tiny_config(storage="postgres://u:p@h/db"))


def test_a_missing_driver_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "psycopg", None)
  problem = tune_storage.url_problem("postgresql://u:secret@h/db")
  assert problem.startswith("The study database postgresql://u:***@h/db needs psycopg"), problem
  assert 'pip install "r1jax[postgres]"' in problem


@pytest.mark.slow
def test_two_tune_workers_on_one_postgres_study(server, tmp_path):
  """Two CLI workers, each with its own workdir, sharing only the database URL: together they run
  exactly the budget, each trial once."""
  url = server.create_database("tune")
  dirs = [str(tmp_path / f"worker{i}") for i in range(2)]
  started = time.time()
  procs = [subprocess.Popen(test_tune._cli(d, n_trials=4, storage=url,  # pylint: disable=protected-access
                                           **{"base.train.num_steps": 8}),
                            cwd=ROOT, env=test_tune._env(), stdout=subprocess.PIPE,  # pylint: disable=protected-access
                            stderr=subprocess.STDOUT, text=True) for d in dirs]
  outputs = [p.communicate(timeout=1800)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "Traceback" not in out and server.password not in out
  trials = optuna.load_study(study_name="tune", storage=url).get_trials()
  assert len(trials) == 4 and tune_storage.budget_used(trials) == 4
  assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
  assert {t.user_attrs["worker"]["pid"] for t in trials} == {p.pid for p in procs}
  for t in trials:  # one run per trial, in the workdir of the worker that ran it
    tdir = t.user_attrs["worker"]["workdir"]
    assert os.path.dirname(os.path.dirname(tdir)) in dirs
    with open(os.path.join(tdir, "metrics.jsonl")) as f:
      evals = [json.loads(line)["step"] for line in f if '"eval"' in line]
    assert evals == sorted(set(evals)) and evals[-1] == (8 if t.state == TrialState.COMPLETE
                                                        else t.user_attrs["pruned_at_step"])
  for d in dirs:
    with open(os.path.join(d, "summary.json")) as f:
      summary = json.load(f)
    assert summary["budget_used"] == 4 and server.password not in summary["storage"]
    assert {row["workdir"] for row in summary["trials"]} == {
        t.user_attrs["worker"]["workdir"] for t in trials}
  print(f"two workers (postgresql): 4 trials in {time.time() - started:.0f} s")
