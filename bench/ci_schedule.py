r"""How pytest-xdist's schedulers would spread a measured test run over N workers (simulated).

    python -m pytest -q --durations=0 > run.log        # any run: per-test setup/call/teardown times
    python bench/ci_schedule.py run.log --workers 2     # the wall clock of each distribution

Reads the per-test times of a `--durations=0` log (setup + call + teardown; tests under 5 ms are not
printed and count as 0), puts the tests in name order (as pytest collects them without
tests/conftest.py's reordering) and replays xdist 3.8's schedulers on them: `loadfile` (whole files
in collection order; a worker takes the next file when it has at most 2 tests left), with xdist's
default reordering (files with the most tests first) or in the order tests/conftest.py's
HEAVY_FILES gives, or by each file's measured total; and `load` (test by test in chunks: what the
slow step uses). Each line: the simulated wall clock, each worker's end, and the mean and worst
ratio to an even split over 200 runs with every time scaled by a random factor in [0.7, 1.3] (the
noise of a shared machine). Only the order of work is modelled: no start-up, no contention.
"""
import argparse
import ast
import collections
import os
import random
import re
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Test = tuple[str, float]  # (file name, seconds)
_LINE = re.compile(r"\s*([\d.]+)s (?:setup|call|teardown)\s+(\S+?)::(.+?)\s*$")


def read_durations(path: str) -> list[Test]:
  """Per-test seconds of a --durations=0 log, in name order (file, then the log's test order)."""
  seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
  for line in open(path, encoding="utf-8"):
    m = _LINE.match(line)
    if m:
      seconds[(os.path.basename(m.group(2)), m.group(3))] += float(m.group(1))
  return sorted(((f, s) for (f, _), s in seconds.items()), key=lambda t: t[0])


def _replay(queues: list[collections.deque], on_done: Callable[[int], None]) -> list[float]:
  """Runs each worker's queue head to completion in time order; on_done(worker) may add work."""
  clock, ends, running = 0.0, [0.0] * len(queues), {}
  while True:
    for w, q in enumerate(queues):
      if q and w not in running:
        running[w] = clock + q[0]
    if not running:
      return ends
    w = min(running, key=running.get)
    clock = ends[w] = running.pop(w)
    queues[w].popleft()
    on_done(w)


def loadfile(tests: Sequence[Test], workers: int, reorder: bool) -> list[float]:
  """xdist's loadscope scheduler for module-level tests: whole files, in order."""
  files: dict[str, list[float]] = collections.OrderedDict()
  for f, s in tests:
    files.setdefault(f, []).append(s)
  units = list(files.values())
  if reorder:  # --loadscope-reorder (xdist's default): the files with the most tests first
    units.sort(key=lambda u: -len(u))
  work, queues = collections.deque(units), [collections.deque() for _ in range(workers)]

  def assign(w):
    if work and len(queues[w]) <= 2:
      queues[w].extend(work.popleft())

  for w in range(workers):  # one file each, then a second where the first is short
    if work:
      queues[w].extend(work.popleft())
  for w in range(workers):
    assign(w)
  return _replay(queues, assign)


def load(tests: Sequence[Test], workers: int) -> list[float]:
  """xdist's load scheduler: chunks of consecutive tests, refilled when a worker runs low."""
  pending, queues = collections.deque(s for _, s in tests), [collections.deque()
                                                              for _ in range(workers)]

  def send(w, n):
    for _ in range(min(n, len(pending))):
      queues[w].append(pending.popleft())

  if len(pending) < 2 * workers:
    for i in range(len(pending)):
      send(i % workers, 1)
  else:
    for w in range(workers):
      send(w, max(2, len(pending) // workers // 4))

  def refill(w):
    low, high = (max(2, len(pending) // workers // k) for k in (4, 2))
    if pending and len(queues[w]) < min(low, 2):
      send(w, high - len(queues[w]))

  return _replay(queues, refill)


def heavy_files() -> list[str]:
  """tests/conftest.py's HEAVY_FILES, read without importing it (it imports JAX)."""
  with open(os.path.join(REPO, "tests", "conftest.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == [
        "HEAVY_FILES"]:
      return list(ast.literal_eval(node.value))
  raise ValueError("tests/conftest.py defines no HEAVY_FILES")


def heavy_first(tests: Sequence[Test], names: Sequence[str]) -> list[Test]:
  rank = {n: i for i, n in enumerate(names)}
  return sorted(tests, key=lambda t: rank.get(t[0], len(rank)))


def report(name: str, tests: Sequence[Test], run: Callable[[Sequence[Test]], list[float]]) -> None:
  ends = run(tests)
  ratios = []
  for seed in range(200):
    rng = random.Random(seed)
    noisy = [(f, s * rng.uniform(0.7, 1.3)) for f, s in tests]
    ratios.append(max(run(noisy)) / (sum(s for _, s in noisy) / len(ends)))
  print(f"{name:52s} wall {max(ends):7.0f} s  workers end {[round(e) for e in ends]}  "
        f"wall / even split: mean {sum(ratios) / len(ratios):.3f}, worst {max(ratios):.3f}")


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("log", help="output of a pytest run with --durations=0")
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args(argv)
  tests = read_durations(args.log)
  if not tests:
    p.error(f"{args.log}: no '--durations=0' lines found; run pytest with --durations=0")
  totals = collections.Counter()
  for f, s in tests:
    totals[f] += s
  n = args.workers
  print(f"{len(tests)} tests, {sum(totals.values()):.0f} s summed; even split over {n} workers: "
        f"{sum(totals.values()) / n:.0f} s. Heaviest files (s): " + ", ".join(
            f"{f} {s:.0f}" for f, s in totals.most_common(12)))
  report("loadfile, xdist's reordering (most tests first)", tests, lambda t: loadfile(t, n, True))
  report("loadfile, name order", tests, lambda t: loadfile(t, n, False))
  report("loadfile, conftest.HEAVY_FILES first", heavy_first(tests, heavy_files()),
         lambda t: loadfile(t, n, False))
  report("loadfile, every file by its measured total", heavy_first(
      tests, [f for f, _ in totals.most_common()]), lambda t: loadfile(t, n, False))
  report("load (test by test), name order", tests, lambda t: load(t, n))


if __name__ == "__main__":
  main()
