r"""A/B of r1jax training-step variants inside one process, calls alternated.

    python bench/ab_step.py --model dropout=0.1,0.0                 # a model field, two values
    python bench/ab_step.py --steps-per-call 10,20                  # optimizer steps per jitted call
    python bench/ab_step.py --mode lm --model mem_len=0,128           # causal LM, memory off / on
    python bench/ab_step.py --code /tmp/base,.                      # two source trees of r1jax

Why. Two processes running the same code on this 2-core VM differ by 3-5% in step time (memory
placement, clock and neighbour load at start-up), more than most single changes move it; a
one-core trace taken an hour later can drift as much. Here every variant is built and compiled in
the same process, then their timed calls alternate (A B B A ...), so they share the process, the
allocator's state and the machine's moment, and the difference between medians is the variant's
(bench/NOTES.md, session 7: the same model A/B'd against itself differs by 0.2%).

Each variant trains the small model (`train_throughput.SMALL`; `--toy` for tiny sizes) through
`steps.Engine` exactly as the throughput bench's r1jax rows do, with the default hidden dropout
and the model fields given. One `--model` or `--steps-per-call` option takes several
comma-separated values (the variants); any other `--model` field has one value for all of them.
Values are Python literals (`0.1`, `True`, `"causal"`), or plain strings. The same value twice
(`--model dropout=0.1,0.1`) is an A/A run: its spread is the noise floor.

`--code TREE1,TREE2` compares whole versions of the code: each tree's `r1jax/` package and
`bench/train_throughput.py` are copied under a name of their own (`r1jax_v0`, `r1jax_v1`, imports
rewritten to match) and imported side by side, so a refactor's step time is measured against the
commit before it in one process (e.g. `git worktree add /tmp/base HEAD~1`).

The last line printed is one JSON object: per variant its median and fastest seconds per step,
tokens/s, loss after the run, and the ratio of its median to the first variant's.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import ast  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", default=[], metavar="FIELD=V1[,V2...]",
                 help="a TransformerXLConfig field and its value(s); repeatable")
  p.add_argument("--steps-per-call", default="10", metavar="N1[,N2...]",
                 help="optimizer steps per jitted call (default 10, r1jax.main's CPU choice)")
  p.add_argument("--code", default="", metavar="TREE1,TREE2",
                 help="source trees (repository roots) to compare, each loaded as its own package")
  p.add_argument("--mode", choices=("mlm", "lm"), default="mlm",
                 help="MLM+NSP (bidirectional) or causal LM")
  p.add_argument("--rounds", type=int, default=10, help="timed calls per variant (default 10)")
  p.add_argument("--threads", type=int, default=0,
                 help="pin to this many cores before JAX starts (0: all available)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--toy", action="store_true", help="tiny model and batch (smoke test)")
  args = p.parse_args(argv)

  swept = []
  args.fixed = {}
  for item in args.model:
    field, sep, values = item.partition("=")
    if not sep or not field or not values:
      p.error(f"--model {item!r}: use FIELD=VALUE or FIELD=V1,V2 (e.g. --model dropout=0.1,0.0)")
    parsed = [_parse_value(v) for v in values.split(",")]
    if len(parsed) > 1:
      swept.append((field, parsed))
    else:
      args.fixed[field] = parsed[0]
  try:
    per_call = [int(v) for v in args.steps_per_call.split(",")]
  except ValueError:
    p.error(f"--steps-per-call {args.steps_per_call!r}: use positive integers, e.g. 10 or 10,20")
  if any(n < 1 for n in per_call):
    p.error(f"--steps-per-call {args.steps_per_call!r}: each value must be >= 1")
  if len(per_call) > 1:
    swept.append(("steps_per_call", per_call))
  if args.code:
    trees = [os.path.abspath(t) for t in args.code.split(",")]
    missing = [t for t in trees if not os.path.isfile(os.path.join(t, "r1jax", "__init__.py"))]
    if len(trees) < 2 or missing:
      p.error(f"--code {args.code!r}: name two or more repository roots with an r1jax/ package "
              f"(not found in {missing})")
    swept.append(("code", trees))
  if len(swept) != 1:
    names = ", ".join(name for name, _ in swept) or "none"
    p.error(f"exactly one option must take several comma-separated values (the variants); got "
            f"{names}. E.g. --model dropout=0.1,0.0 or --steps-per-call 10,20.")
  args.swept_field, args.swept_values = swept[0]
  args.per_call = per_call[0]
  if args.rounds < 2:
    p.error(f"--rounds {args.rounds}: use at least 2 timed calls per variant")
  args.cpus = _load_throughput_module().choose_cpus(p, args.threads)
  return args


def _load_tree(tree: str, index: int, into: str):
  """`tree`'s bench/train_throughput.py, importing `tree`'s own r1jax package renamed r1jax_v<index>
  (copied into `into`, every `r1jax` import rewritten), so two versions live in one process."""
  name = f"r1jax_v{index}"
  rename = functools.partial(re.sub, r"\br1jax(?=[.\s]|$)", name)
  target = os.path.join(into, name)
  shutil.copytree(os.path.join(tree, "r1jax"), target,
                  ignore=shutil.ignore_patterns("__pycache__"))
  for root, _, files in os.walk(target):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        with open(path) as fh:
          text = fh.read()
        with open(path, "w") as fh:
          fh.write("\n".join(rename(line) if re.match(r"\s*(from|import) r1jax", line) else line
                             for line in text.split("\n")))
  with open(os.path.join(tree, "bench", "train_throughput.py")) as fh:
    text = fh.read()
  # Not in `into` itself: train_throughput.py drops its own folder from sys.path.
  os.makedirs(os.path.join(into, "bench"), exist_ok=True)
  path = os.path.join(into, "bench", f"train_throughput_v{index}.py")
  with open(path, "w") as fh:
    fh.write("\n".join(rename(line) if re.match(r"\s*(from|import) r1jax", line) else line
                       for line in text.split("\n")))
  if into not in sys.path:
    sys.path.insert(0, into)
  importlib.invalidate_caches()
  spec = importlib.util.spec_from_file_location(f"r1jax_bench_train_throughput_v{index}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@functools.cache
def _load_throughput_module():
  """bench/train_throughput.py as a module (its top level imports no JAX: pinning still works)."""
  spec = importlib.util.spec_from_file_location(
      "r1jax_bench_train_throughput", os.path.join(_HERE, "train_throughput.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = _parse_args(argv)
  # XLA's CPU client sizes its thread pool from the affinity mask when JAX starts: pin first.
  os.sched_setaffinity(0, args.cpus)
  tt = _load_throughput_module()
  from r1jax.model import transformer_xl as txl  # pylint: disable=g-import-not-at-top

  size = tt.TOY if args.toy else tt.SMALL
  batch, seq_len = (4, 16) if args.toy else (args.batch, args.seq_len)
  fields = {f.name for f in dataclasses.fields(txl.TransformerXLConfig)}
  unknown = sorted(({args.swept_field} - {"steps_per_call", "code"} | set(args.fixed)) - fields)
  if unknown:
    raise SystemExit(f"ab_step.py: unknown model field(s) {unknown}; TransformerXLConfig has "
                     f"{sorted(fields)}.")
  extra = dict(n_token_types=2) if args.mode == "mlm" else dict(attention="causal")
  print(f"# ab_step: {len(args.cpus)} threads pinned to cores {args.cpus}; {args.mode}, batch "
        f"{batch}, sequence {seq_len}; varying {args.swept_field} over {args.swept_values}",
        file=sys.stderr)

  trainers = {}
  tmp = tempfile.mkdtemp(prefix="ab_step_code_") if args.swept_field == "code" else ""
  for index, value in enumerate(args.swept_values):
    model = {**size, "dropout": tt.DROPOUT, "dropatt": tt.DROPATT, "mem_len": 0, **extra,
             **args.fixed}
    per_call = args.per_call
    tree_tt = tt
    if args.swept_field == "steps_per_call":
      per_call = value
    elif args.swept_field == "code":
      tree_tt = _load_tree(value, index, tmp)
    else:
      model[args.swept_field] = value
    spec = dict(mode=args.mode, variant="tiny" if args.toy else "small", batch=batch,
                seq_len=seq_len, warmup=2, steps=args.rounds, engine_steps_per_call=per_call,
                ceiling_sizes=(64,), model=model, threads=len(args.cpus))
    start = time.perf_counter()
    trainer = tree_tt.R1jaxTrainer(spec)
    for _ in range(2):  # the first call compiles
      trainer.step()
    name = repr(value)
    if name in trainers:  # the same value twice: an A/A run, which shows the noise floor
      name = f"{name} #{sum(k.split(' #')[0] == name for k in trainers) + 1}"
    trainers[name] = trainer
    print(f"# {args.swept_field}={value!r}: built and warmed up in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

  order = list(trainers)
  times: dict[str, list[float]] = {name: [] for name in order}
  for r in range(args.rounds):
    for name in (order if r % 2 == 0 else order[::-1]):
      start = time.perf_counter()
      n = trainers[name].step()
      times[name].append((time.perf_counter() - start) / n)

  first = statistics.median(times[order[0]])
  results = {}
  print(f"| {args.swept_field} | s/step (median) | fastest | tokens/s | vs {order[0]} | loss |")
  print("|---|---:|---:|---:|---:|---:|")
  for name in order:
    median = statistics.median(times[name])
    trainer = trainers[name]
    loss = trainer.summary(times[name], 0.0)["loss"]
    results[name] = dict(median_s=round(median, 5), fastest_s=round(min(times[name]), 5),
                         tokens_per_s=round(trainer.tokens_per_step / median, 1),
                         ratio_to_first=round(median / first, 4), loss=round(loss, 5))
    print(f"| {name} | {median:.4f} | {min(times[name]):.4f} | "
          f"{trainer.tokens_per_step / median:,.0f} | {median / first:.3f}x | {loss:.4f} |")
  if tmp:
    shutil.rmtree(tmp, ignore_errors=True)
  summary = dict(field=args.swept_field, mode=args.mode, threads=len(args.cpus),
                 rounds=args.rounds, toy=bool(args.toy), variants=results)
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
