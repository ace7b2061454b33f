r"""Tuning workers on one PostgreSQL study: what the lock in the database costs, and trials/minute
with 1 and 2 real workers.

    python bench/tune_workers.py                  # both parts (~6 min on 2 busy cores)
    python bench/tune_workers.py --real_trials 0  # the lock part only (~1 min)

Starts a throwaway PostgreSQL server (tests/servers.py: Debian's `postgresql` package, as the
tests do), then:
1. coordination: N worker processes (1, 2, 4) run `tune_storage.run_trials` (the tune stage's loop:
   lock, count the budget, create the trial) with an objective that does nothing, so trials/s is
   the ceiling the study's bookkeeping puts on a search; the same with SQLite + DIR/study.lock
   (workers sharing a directory) beside it. Every run must end with exactly the budget.
2. real trials: the tune CLI (configs/tune.py:variant=tiny, 1-layer model, 8 finetuning steps)
   with 1 worker and then 2 workers (each its own --workdir, sharing only the URL), trials per
   minute of wall time for the same budget.
Prints one table per part and a JSON line. bench/NOTES_distributed.md has the measured figures.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import optuna  # noqa: E402

import servers  # noqa: E402  (tests/servers.py: the throwaway PostgreSQL server)

TUNE = os.path.join(ROOT, "configs", "tune.py")

WORKER = """
    import sys, time
    import ml_collections
    import optuna
    from r1jax import run_dir
    from r1jax.stages import tune_storage
    storage, workdir, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = ml_collections.ConfigDict(dict(storage=storage, study_name="bench", heartbeat_secs=0))
    lock = tune_storage.make_lock(config, workdir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=tune_storage.make_storage(config, workdir))
    print("ready", flush=True)
    sys.stdin.readline()

    def objective(trial):
      try:
        trial.set_user_attr("worker", run_dir.process_info())
      finally:
        lock.release()
      return trial.suggest_float("x", 0, 1)

    started = time.perf_counter()
    ran = tune_storage.run_trials(study, lock, budget, objective, gc_after_trial=False)
    print(ran, time.perf_counter() - started, flush=True)
"""


def _env():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def coordination(url: str, workers: int, budget: int, workdir: str) -> dict:
  """Trials/s of `workers` processes running empty trials on the study at `url`."""
  optuna.create_study(study_name="bench", storage=url)
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), url, workdir,
                             str(budget)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_env()) for _ in range(workers)]
  for p in procs:
    assert p.stdout.readline().strip() == "ready"
  started = time.perf_counter()
  for p in procs:
    p.stdin.write("go\n")
    p.stdin.flush()
  ran = [int(p.communicate()[0].split()[0]) for p in procs]
  wall = time.perf_counter() - started
  trials = optuna.load_study(study_name="bench", storage=url).get_trials()
  assert len(trials) == budget == sum(ran), (len(trials), budget, ran)
  return {"workers": workers, "trials": budget, "per_worker": ran, "wall_s": round(wall, 2),
          "trials_per_s": round(budget / wall, 1)}


def real_search(url: str, workers: int, budget: int, root: str) -> dict:
  """Wall time of the tune CLI with `workers` workers (own workdirs) for `budget` tiny trials."""
  flags = {"n_trials": budget, "storage": url, "base.train.num_steps": 8,
           "base.eval.every_steps": 4, "base.checkpoint.every_steps": 4,
           "base.train.log_every_steps": 4, "base.model.n_layer": 1, "base.task.seq_len": 16,
           "base.report.latency_repeats": 1, "base.report.latency_warmup": 0,
           "objective.metric": "loss", "objective.direction": "minimize"}
  cmds = [[sys.executable, "-m", "r1jax.main", f"--config={TUNE}:variant=tiny",
           f"--workdir={root}/w{i}"] + [f"--config.{k}={v}" for k, v in flags.items()]
          for i in range(workers)]
  started = time.perf_counter()
  procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for c in cmds]
  for p in procs:
    err = p.communicate()[1]
    assert p.returncode == 0, err[-3000:]
  wall = time.perf_counter() - started
  trials = optuna.load_study(study_name="tune", storage=url).get_trials()
  assert len(trials) == budget, len(trials)
  per_worker = {}
  for t in trials:
    per_worker[t.user_attrs["worker"]["pid"]] = per_worker.get(t.user_attrs["worker"]["pid"], 0) + 1
  return {"workers": workers, "trials": budget, "per_worker": sorted(per_worker.values()),
          "wall_s": round(wall, 1), "trials_per_min": round(60 * budget / wall, 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget", type=int, default=200, help="empty trials per coordination run")
  parser.add_argument("--real_trials", type=int, default=6, help="tiny trials per real search "
                      "(0 = skip that part)")
  args = parser.parse_args()
  load = os.getloadavg()[0]
  print(f"load average at start {load:.2f}, {os.cpu_count()} cores")
  out = {"load_at_start": load, "coordination": [], "real": []}
  with servers.postgres() as server, tempfile.TemporaryDirectory() as tmp:
    print("\n1. coordination (empty trials; the lock, the budget count and the trial's creation)")
    print(f"{'storage':<34} {'workers':>7} {'trials/s':>9} {'per worker'}")
    for workers in (1, 2, 4):
      for kind in ("postgresql", "sqlite"):
        name = f"c{workers}{kind}"
        workdir = os.path.join(tmp, name)
        os.makedirs(workdir)
        url = (server.create_database(name) if kind == "postgresql" else
               f"sqlite:///{workdir}/study.db")
        r = coordination(url, workers, args.budget, workdir)
        r["storage"] = ("PostgreSQL, advisory lock" if kind == "postgresql"
                        else "SQLite, DIR/study.lock")
        print(f"{r['storage']:<34} {workers:>7} {r['trials_per_s']:>9} {r['per_worker']}")
        out["coordination"].append(r)
    if args.real_trials:
      print(f"\n2. real tiny trials on PostgreSQL ({args.real_trials} per search, 8 steps each)")
      print(f"{'workers':>7} {'wall s':>8} {'trials/min':>10} {'per worker'}")
      for workers in (1, 2):
        url = server.create_database(f"real{workers}")
        r = real_search(url, workers, args.real_trials, os.path.join(tmp, f"real{workers}"))
        print(f"{workers:>7} {r['wall_s']:>8} {r['trials_per_min']:>10} {r['per_worker']}")
        out["real"].append(r)
  out["load_at_end"] = os.getloadavg()[0]
  print(f"load average at end {out['load_at_end']:.2f}")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
