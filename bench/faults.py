r"""Fault campaign: kills, preemption, corrupt checkpoints, concurrent runs, NaN, bad configs, fuzz.

    python bench/faults.py                 # the full campaign, fixed seed (~10 min on 2 busy cores)
    python bench/faults.py --kills 4 --corruptions 8 --fuzz 40 --configs 30 --nan 1 --races 1

The command line of `tests/fault_harness/campaign.py`, which describes each section. The scenarios
are test code (pytest / hypothesis assertions on the real command) and live in
`tests/fault_harness/`: `tests/test_faults.py` and `tests/test_fuzz.py` run them with a small fixed
budget, this script with many randomized trials, printing the counts and writing them to --out as
JSON. The dependency goes one way: this script imports the harness; no test imports bench/.

Measured 2026-11-28 (seed 0, defaults: 64 steps, 24 interruptions; 536 s on the 2-core development
machine at load average 6-9), after the fixes this campaign prompted (fallback past a corrupt step,
digests for the JSON items, the stale-lock race):
  kills survived / tried              20 / 20 (9 left a half-written checkpoint; the finished run
                                      was bitwise the uninterrupted one)
  preemptions saved+exited in grace   4 / 4; grace too short: 1 / 1 exited (143) at once
  second runs on a held workdir       5 / 5 refused, workdir untouched
  corrupt-and-rerun end to end        2 / 2 fell back naming both steps, finished bitwise identical
  corruptions detected / tried        17 / 40, the other 23 harmless (bytes nothing reads, e.g.
                                      commit_success.txt, superseded OCDBT files: restored values
                                      identical); 0 silent, 0 crashes
  NaN injections caught / tried       2 / 2 (step and last good checkpoint named)
  invalid configs failed well         125 / 125 (before compiling or writing, key named)
  lock races with exactly one winner  4 / 4 (6 processes each)
  fuzz inputs tried                   3,000 (500 per property); documents in 7,554 = out 3,773 +
                                      dropped 3,781 (with reasons); lost 0
Before the fixes the same campaign found: a rerun after falling back past a corrupt checkpoint
crashed at that step (StepAlreadyExistsError); a damaged data/ or meta/ JSON, or a deleted data/
item, was restored silently (wrong data position / log window); two contenders could both take over
a stale lock; a JSONL lone-surrogate escape crashed cleaning; a non-UTF-8 knowledge file raised a
bare UnicodeDecodeError.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, bench/ comes first on sys.path, where a module named like a standard-library one
# (e.g. `compression`, which jax imports on Python 3.14) would shadow it.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.join(ROOT, "bench"):
  sys.path.pop(0)
for path in (os.path.join(ROOT, "tests"), ROOT):  # the harness package, and the checkout
  if path not in sys.path:
    sys.path.insert(0, path)

from fault_harness import campaign  # noqa: E402  (after the sys.path set-up)

if __name__ == "__main__":
  campaign.main()
