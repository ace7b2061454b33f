r"""Fault campaign: kills, preemption, corrupt checkpoints, concurrent runs, NaN, bad configs, fuzz.

The scenarios of this package, randomized and with many trials; `bench/faults.py` is its command
line (`main`). Everything runs the real command, `python -m r1jax.main
--config=configs/pretrain.py:variant=tiny --workdir=W` with a smaller model and a short schedule,
in subprocesses on 8 forced CPU devices (mesh 2x2x2, so checkpoints are sharded), sharing a JAX
persistent compilation cache so that a restart costs an import, not a compile. Random choices come
from `--seed`.

  kills        SIGKILL at random moments (at a random training step, the instant a checkpoint's
               tmp directory appears, i.e. mid-save, or at a random time after start: import,
               compile, restore), SIGTERM preemptions with the configured grace and with a grace too
               short to finish the save, and a second run started on the workdir while the first is
               held (SIGSTOP) - then the same command again, until done. Every restart must resume
               from the newest finalized checkpoint (never a half-written one) and take over the
               stale lock; the finished run must match an uninterrupted one bitwise: metrics.jsonl
               (timing fields aside), the checksums of every state leaf and the parameters.
  corruptions  one random file of the newest checkpoint of a real run truncated, emptied,
               bit-flipped, overwritten, appended to or deleted (or a whole item directory
               deleted), then restored through `Checkpointer.restore`: it must fall back to the
               previous step and say so naming both, or restore values identical to the intact
               checkpoint ("harmless"); anything else is "silent" (restored wrong values) or
               "crash". Plus end-to-end trials: corrupt a killed run's newest checkpoint, rerun the
               command, match the reference.
  nan          NaN mlm_weights / out-of-vocabulary token ids injected into the batch of a random
               step (through `r1jax.data.pretraining.pretrain_iterator`): the run must stop naming
               that step and the last good checkpoint, keep only checkpoints before it, and resume
               with train.skip_nonfinite=True to completion with one skip counted.
  configs      random invalid `--config.*` overrides parsed by the real flag parser: each must fail
               before anything is compiled or written, with a message naming the key.
  races        several processes take over the same stale workdir lock at the same instant: exactly
               one may win.
  fuzz         the hostile-input properties of tests/test_fuzz.py with --fuzz examples each.

Prints the counts (kills survived / tried, corruptions detected / tried, fuzz inputs tried,
documents lost) and returns them (and writes them to --out as JSON).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from typing import Any

from fault_harness import source


def main(argv=None) -> dict[str, Any]:
  """Runs the campaign that `argv` (the command line's flags) asks for; prints and returns the
  results: per section the counts and a list of "problems" (empty when everything held)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kills", type=int, default=24)
  parser.add_argument("--steps", type=int, default=64, help="num_steps of the pretraining run")
  parser.add_argument("--corruptions", type=int, default=40)
  parser.add_argument("--e2e-corruptions", type=int, default=2)
  parser.add_argument("--nan", type=int, default=2, help="NaN injection trials")
  parser.add_argument("--configs", type=int, default=120)
  parser.add_argument("--races", type=int, default=4, help="lock race trials (6 contenders)")
  parser.add_argument("--fuzz", type=int, default=500, help="examples per fuzz property")
  parser.add_argument("--workdir", default="", help="keep everything here (default: a temp dir)")
  parser.add_argument("--out", default="", help="write the results as JSON here")
  parser.add_argument("--no-snapshot", action="store_true",
                      help="test the checkout as it is now (default: a copy taken at the start)")
  args = parser.parse_args(argv)
  source.set_cpu_devices(8)

  rng = random.Random(args.seed)
  root = args.workdir or tempfile.mkdtemp(prefix="r1jax_faults_")
  os.makedirs(root, exist_ok=True)
  if not args.no_snapshot:
    source.snapshot_source(os.path.join(root, "src"))
  # Imported only now: they import r1jax (and jax), which must come from the code under test chosen
  # just above, with the device count set.
  from fault_harness import bad_inputs  # pylint: disable=g-import-not-at-top
  from fault_harness import command  # pylint: disable=g-import-not-at-top
  from fault_harness import corruption  # pylint: disable=g-import-not-at-top
  from fault_harness import hostile_input  # pylint: disable=g-import-not-at-top
  from fault_harness import kills  # pylint: disable=g-import-not-at-top
  results: dict[str, Any] = {"seed": args.seed}
  started = time.time()

  def section(name):
    print(f"[{time.time() - started:7.1f} s] {name}", flush=True)

  tokenizer = command.prepare_tokenizer(os.path.join(root, "tokenizer.model"))
  harness = command.Harness(tokenizer=tokenizer, cache_dir=os.path.join(root, "jax_cache"),
                            num_steps=args.steps)
  section("reference run (uninterrupted)")
  reference = os.path.join(root, "reference")
  shutil.rmtree(reference, ignore_errors=True)
  t = time.time()
  code, text = harness.run(reference, os.path.join(root, "reference.log"))
  if code != 0:
    raise RuntimeError(f"reference run failed:\n{text[-3000:]}")
  results["reference_secs"] = round(time.time() - t, 1)

  if args.kills:
    section(f"kill campaign: {args.kills} interruptions")
    workdir, snapshot = os.path.join(root, "killed"), os.path.join(root, "killed_snapshot")
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(snapshot, ignore_errors=True)
    campaign = kills.run_kill_campaign(harness, reference, workdir,
                                       os.path.join(root, "kill_logs"), kills=args.kills, rng=rng,
                                       snapshot_to=snapshot,
                                       typical_secs=results.get("reference_secs", 20.0))
    c = campaign.counts
    results["kills"] = {
        "tried": c["kills_tried"],
        "survived": campaign.survived(),
        "final_run_identical_to_reference": not campaign.final_problems,
        "finished_before_all_kills": campaign.finished_early,
        "left_half_written_checkpoint": c["kills_leaving_half_written_checkpoint"],
        "preemptions_saved_and_exited_in_grace": f"{c['sigterm_ok']}/{c['sigterm_tried']}",
        "preemptions_over_grace_exited": (f"{c['sigterm_short_grace_ok']}/"
                                          f"{c['sigterm_short_grace_tried']}"),
        "second_runs_refused": f"{c['second_run_refused']}/{c['second_run_tried']}",
        "attempts": [dataclasses.asdict(a) for a in campaign.attempts],
        "problems": campaign.problems}
    if args.e2e_corruptions:
      section(f"end-to-end corruption: {args.e2e_corruptions} reruns")
      problems = []
      if not os.path.exists(snapshot):  # no interruption left two finalized checkpoints
        problems.append("no interrupted run with two finalized checkpoints to corrupt:\n" +
                        campaign.describe())
      for i in range(args.e2e_corruptions if not problems else 0):
        kind = ("truncate", "flip_bytes", "delete_item")[i % 3]
        problems += corruption.end_to_end_corruption(
            harness, snapshot, reference, os.path.join(root, f"e2e_corrupt{i}"), rng, kind)
      results["e2e_corruptions"] = {"tried": args.e2e_corruptions, "problems": problems}

  if args.corruptions:
    section(f"corruption campaign: {args.corruptions} trials")
    results["corruptions"] = corruption.run_corruption_campaign(
        os.path.join(reference, "checkpoints"), args.corruptions, rng)

  if args.nan:
    section(f"NaN injection: {args.nan} trials")
    problems = []
    for i in range(args.nan):
      kind = ("nan_weights", "bad_tokens")[i % 2]
      problems += bad_inputs.nan_trial(harness, reference, root, kind,
                                       rng.randint(2, args.steps - 1))
    results["nan"] = {"tried": args.nan, "caught": args.nan if not problems else None,
                      "problems": problems}

  if args.configs:
    section(f"invalid configs: {args.configs} random overrides")
    results["configs"] = bad_inputs.run_config_campaign(args.configs, rng,
                                                        os.path.join(root, "configs"))

  if args.races:
    section(f"lock races: {args.races} trials")
    results["lock_races"] = kills.run_lock_races(6, args.races, root)

  if args.fuzz:
    section(f"fuzz: {args.fuzz} examples per property")
    results["fuzz"] = hostile_input.run_fuzz(args.fuzz, args.seed)

  results["wall_secs"] = round(time.time() - started, 1)
  print_summary(results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2, default=str)
  return results


def print_summary(r: dict[str, Any]) -> None:
  print("\n=== fault campaign (seed %d, %.0f s) ===" % (r["seed"], r["wall_secs"]))
  if "kills" in r:
    k = r["kills"]
    print(f"kills survived / tried:            {k['survived']} / {k['tried']} "
          f"({k['left_half_written_checkpoint']} left a half-written checkpoint; final run "
          f"{'identical to' if k['final_run_identical_to_reference'] else 'DIFFERENT from'} the "
          f"uninterrupted one)")
    print(f"preemptions saved+exited in grace: {k['preemptions_saved_and_exited_in_grace']}; "
          f"over-grace exits: {k['preemptions_over_grace_exited']}")
    print(f"second runs refused:               {k['second_runs_refused']}")
  if "e2e_corruptions" in r:
    e = r["e2e_corruptions"]
    print(f"end-to-end corrupt-and-rerun:      {e['tried'] - len(e['problems'])} / {e['tried']} ok")
  if "corruptions" in r:
    c = r["corruptions"]
    print(f"corruptions detected / tried:      {c['detected']} / {c['tried']} "
          f"(outcomes {c['outcomes']})")
  if "nan" in r:
    n = r["nan"]
    caught = n["caught"] if n["caught"] is not None else "NOT ALL"
    print(f"NaN injections caught / tried:     {caught} / {n['tried']}")
  if "configs" in r:
    c = r["configs"]
    print(f"invalid configs failed well:       {c['failed_well']} / {c['tried']}")
  if "lock_races" in r:
    lr = r["lock_races"]
    print(f"lock races with exactly 1 winner:  {lr['exactly_one_winner']} / {lr['trials']} "
          f"({lr['contenders']} contenders)")
  if "fuzz" in r:
    f = r["fuzz"]
    print(f"fuzz inputs tried:                 {f['inputs_tried']} {f['per_property']}")
    print(f"documents in / out / dropped / lost: {f['documents_in']} / {f['documents_out']} / "
          f"{f['documents_dropped']} / {f['documents_lost']}")
  for name in ("kills", "e2e_corruptions", "corruptions", "nan", "configs", "lock_races", "fuzz"):
    for p in (r.get(name) or {}).get("problems", []):
      print(f"PROBLEM [{name}] {p}")
