r"""Training throughput of r1jax next to the PyTorch stacks users would otherwise pick.

    python bench/train_throughput.py                  # full table on this machine (~5-10 min, 2 cores)
    python bench/train_throughput.py --toy            # seconds: tiny sizes, for the smoke test
    python bench/train_throughput.py --gpu            # adds the GPU section when a GPU is visible

Every row is measured in the same run, each in its own subprocess so the peers cannot disturb each
other's memory figures:

* the machine's ceiling: the best large float32 and bfloat16 matmul through JAX, in FLOP/s;
* r1jax MLM+NSP training steps through the engine's real jitted step (`steps.Engine.train_step`:
  loss, gradients, clipping, AdamW, NaN guard), bidirectional Transformer-XL with memory off
  (mem_len 0, the same work as BERT) and on (mem_len 128), at the small size, and the base variant
  for a short run: tokens/s, MFU, peak memory, compile time;
* HuggingFace PyTorch `BertForPreTraining` (MLM+NSP) at the same size and batch;
* HuggingFace PyTorch `TransfoXLLMHeadModel` against r1jax in causal-LM mode with the same memory
  length (mem_len 128), both predicting every position over the full vocabulary;
* the ratios r1jax / peer.

Method. Each measurement runs in a fresh process pinned to the same `--threads` cores
(`os.sched_setaffinity`); PyTorch gets `torch.set_num_threads(threads)` (and one inter-op thread);
XLA's CPU client sizes its intra-op thread pool from the same affinity mask, so both stacks use
exactly `threads` compute threads. The first steps (compilation for JAX) are excluded; the
figures are medians of the timed steps, pooled over `--rounds` rounds in which r1jax and its peers
alternate (the machine may be shared: alternating spreads any background load over both sides).
Peak memory is the process's resident-set high-water mark (`ru_maxrss`) minus its resident set
after imports, i.e. what building the model and training adds, measured the same way for every
peer. MFU = the model's training FLOPs (`r1jax.train.metrics.pretrain_flops_per_step`: encoder
attention over memory + segment counted in full) / the float32 matmul ceiling measured in the same
process, interleaved with the timed steps.

The last line printed is one JSON object with every figure (see `summary_json`).
"""
from __future__ import annotations

import os
import sys

# Running `python bench/x.py` puts bench/ first on sys.path, where sibling scripts could shadow
# modules that jax imports (e.g. a bench/compression.py hides `compression.zstd`): drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

REPO = os.path.dirname(_HERE)
RESULT_PREFIX = "BENCH_RESULT "

# Same-size settings (issue 9): d_model 256, 4 layers, 4 heads, sequence 128, batch 32, vocab 8k.
SMALL = dict(d_model=256, n_layer=4, n_head=4, d_head=64, d_inner=1024, vocab_size=8000)
TOY = dict(d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64, vocab_size=200)
DROPOUT = 0.1     # hidden dropout on both sides
DROPATT = 0.0     # attention-probability dropout on both sides (Transformer-XL's default)
MLM_PROB = 0.15


# --------------------------------------------------------------------------------------------------
# Shared helpers (worker side).


def _rss_kib() -> int:
  """Current resident set of this process in KiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1])
  return 0


def _peak_rss_kib() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _num_predictions(seq_len: int) -> int:
  return max(1, math.ceil(seq_len * MLM_PROB))


def mlm_batches(rng: np.random.RandomState, n: int, *, batch: int, seq_len: int, vocab: int
                ) -> list[dict[str, np.ndarray]]:
  """`n` random MLM+NSP batches in the engine's pretraining layout (numpy, host side)."""
  p = _num_predictions(seq_len)
  out = []
  for _ in range(n):
    tokens = rng.randint(5, vocab, (batch, seq_len)).astype(np.int32)
    positions = np.sort(np.stack([rng.choice(np.arange(1, seq_len), p, replace=False)
                                  for _ in range(batch)]), axis=1).astype(np.int32)
    out.append(dict(
        tokens=tokens, token_mask=np.ones((batch, seq_len), bool),
        token_types=np.broadcast_to(np.arange(seq_len) >= seq_len // 2,
                                    (batch, seq_len)).astype(np.int32),
        mlm_positions=positions, mlm_ids=np.take_along_axis(tokens, positions, axis=1),
        mlm_weights=np.ones((batch, p), np.float32),
        nsp_label=rng.randint(0, 2, batch).astype(np.int32),
        reset_memory=np.zeros(batch, bool)))
  return out


def lm_batches(rng: np.random.RandomState, n: int, *, batch: int, seq_len: int, vocab: int
               ) -> list[dict[str, np.ndarray]]:
  """`n` consecutive segments of random token streams: tokens [B, Q] and next tokens [B, Q]."""
  stream = rng.randint(5, vocab, (batch, n * seq_len + 1)).astype(np.int32)
  return [dict(tokens=stream[:, i * seq_len:(i + 1) * seq_len],
               labels=stream[:, i * seq_len + 1:(i + 1) * seq_len + 1],
               reset_memory=np.zeros(batch, bool)) for i in range(n)]


def time_steps(step: Callable[[int], Any], warmup: int, steps: int,
               between: Callable[[], None] | None = None) -> tuple[float, list[float]]:
  """Runs step(i) `warmup` times (the first one timed as `first_s`), then `steps` timed times.

  `step` must block until its result is ready. `between` (e.g. a ceiling measurement) runs after
  the warm-up, halfway and at the end, outside the timed steps. Returns (first_s, step times).
  """
  start = time.perf_counter()
  step(0)
  first = time.perf_counter() - start
  for i in range(1, warmup):
    step(i)
  if between:
    between()
  times = []
  for i in range(steps):
    start = time.perf_counter()
    step(warmup + i)
    times.append(time.perf_counter() - start)
    if between and i == steps // 2:
      between()
  if between:
    between()
  return first, times


# --------------------------------------------------------------------------------------------------
# JAX side.


class Ceiling:
  """Best matmul FLOP/s of this process, sampled several times (median of the samples' bests)."""

  def __init__(self, dtype: str = "float32", sizes: Sequence[int] = (1024, 2048), repeats: int = 3,
               device: Any = None):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.sizes, self.repeats = tuple(sizes), repeats
    self._fn = jax.jit(lambda a, b: a @ b)
    device = device or jax.devices()[0]
    self._mats = {}
    for n in self.sizes:
      key = jax.random.key(n)
      a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
      self._mats[n] = jax.device_put(a, device)
      self._fn(self._mats[n], self._mats[n]).block_until_ready()
    self.samples: list[float] = []

  def sample(self) -> float:
    best = 0.0
    for n, a in self._mats.items():
      for _ in range(self.repeats):
        start = time.perf_counter()
        self._fn(a, a).block_until_ready()
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - start))
    self.samples.append(best)
    return best

  @property
  def value(self) -> float:
    return statistics.median(self.samples) if self.samples else float("nan")


def causal_lm_loss_fn(model: Any) -> Callable[..., Any]:
  """Next-token LM loss for `heads.PretrainModel` in causal mode, with the engine's signature.

  batch: tokens [B, Q], labels [B, Q] (the next token of each position), reset_memory [B]. Every
  position is predicted over the full vocabulary (the MLM head is the LM head: its decoder is tied
  to the word embedding), as the HF Transformer-XL LM does.
  """
  from r1jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  def loss_fn(params, batch, extras, rng, deterministic):
    memory = extras["memory"].reset(batch["reset_memory"])
    outputs, new_memory = model.apply({"params": params}, batch["tokens"], memory=memory,
                                      deterministic=deterministic, rngs={"dropout": rng})
    # The loss only (no accuracy argmax over [B, Q, V]): what the HF model computes too.
    _, nll = steps_lib.cross_entropy(outputs["mlm_logits"], batch["labels"])
    loss = nll.mean()
    return loss, ({"lm_loss": steps_lib.metric(nll.sum(), nll.size)}, {"memory": new_memory})
  return loss_fn


def run_r1jax(spec: dict[str, Any]) -> dict[str, Any]:
  """One r1jax training run through `steps.Engine`; returns the measured figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from r1jax import configlib  # pylint: disable=g-import-not-at-top
  from r1jax.model import axes, heads  # pylint: disable=g-import-not-at-top
  from r1jax.model import transformer_xl as txl  # pylint: disable=g-import-not-at-top
  from r1jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from r1jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from r1jax.train import optim  # pylint: disable=g-import-not-at-top
  from r1jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  mode = spec["mode"]  # "mlm" | "lm"
  batch, seq_len = spec["batch"], spec["seq_len"]
  cfg = txl.get_variant(spec["variant"], **spec["model"])
  model = heads.PretrainModel(cfg)
  ceiling = Ceiling(spec.get("ceiling_dtype", "float32"), spec.get("ceiling_sizes", (1024, 2048)))
  ceiling.sample()
  rss0 = _rss_kib()  # after imports, backend start-up and the ceiling's matrices

  def init_params(rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    types = jnp.zeros_like(tokens) if cfg.n_token_types else None
    return model.init({"params": rng}, tokens, token_types=types)["params"]

  train_cfg = configlib.train_section(num_steps=1000, batch_size=batch, learning_rate=3e-4,
                                      warmup_steps=10, weight_decay=0.01, grad_clip_norm=1.0)
  tx = optim.build_optimizer(train_cfg, jax.eval_shape(init_params, jax.random.PRNGKey(0)),
                             num_steps=1000)
  mesh = mesh_lib.make_mesh(configlib.mesh_section(), devices=jax.devices()[:1])
  loss_fn = (steps_lib.pretrain_loss_fn(model) if mode == "mlm" else causal_lm_loss_fn(model))
  engine = steps_lib.Engine(
      mesh=mesh, rules=axes.DEFAULT_RULES, loss_fn=loss_fn, tx=tx, init_params=init_params,
      init_extras=lambda: {"memory": txl.init_memory(cfg, batch)}, batch_size=batch,
      lr_schedule=optim.make_schedule(train_cfg, 1000))
  rng = np.random.RandomState(0)
  n_batches = spec["warmup"] + spec["steps"]
  make = mlm_batches if mode == "mlm" else lm_batches
  batches = make(rng, min(n_batches, 4) if mode == "mlm" else n_batches, batch=batch,
                 seq_len=seq_len, vocab=cfg.vocab_size)
  state = engine.init_state(jax.random.PRNGKey(0))
  holder = {"state": state}

  def step(i):
    holder["state"], metrics = engine.train_step(holder["state"], batches[i % len(batches)])
    jax.block_until_ready(metrics)
    holder["metrics"] = metrics

  first, times = time_steps(step, spec["warmup"], spec["steps"], ceiling.sample)
  final = steps_lib.normalize(jax.device_get(holder["metrics"]))
  if not math.isfinite(final["loss"]):
    raise FloatingPointError(f"r1jax {mode} loss is {final['loss']}")
  median = statistics.median(times)
  # LM mode runs the same model with the MLM head (= LM head) at all Q positions.
  flops = metrics_lib.pretrain_flops_per_step(
      cfg, batch_size=batch, seq_len=seq_len,
      num_predictions=_num_predictions(seq_len) if mode == "mlm" else seq_len)
  peak = _peak_rss_kib()
  return dict(
      tokens_per_s=batch * seq_len / median, step_s=median, step_times=times,
      compile_s=max(first - median, 0.0), first_step_s=first, flops_per_step=flops,
      achieved_flops=flops / median, ceiling_flops=ceiling.value, ceiling_samples=ceiling.samples,
      mfu=flops / median / ceiling.value, peak_rss_mib=(peak - rss0) / 1024.0,
      peak_rss_abs_mib=peak / 1024.0,
      loss=final["loss"], platform=jax.devices()[0].platform,
      device=jax.devices()[0].device_kind, dtype=str(cfg.dtype))


def run_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
  """The machine's matmul ceiling through JAX: float32 and bfloat16."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {"platform": jax.devices()[0].platform, "device": jax.devices()[0].device_kind}
  for dtype in ("float32", "bfloat16"):
    c = Ceiling(dtype, spec["sizes"], repeats=spec.get("repeats", 3))
    for _ in range(spec.get("samples", 3)):
      c.sample()
    out[dtype] = max(c.samples)
    out[dtype + "_samples"] = c.samples
  return out


# --------------------------------------------------------------------------------------------------
# PyTorch side.


def _torch_setup(threads: int):
  rss0 = _rss_kib()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:  # already set
    pass
  torch.manual_seed(0)
  return torch, max(rss0, _rss_kib())


def _torch_train(torch, model, forward: Callable[[int], Any], spec: dict[str, Any], rss0: int,
                 tokens_per_step: int) -> dict[str, Any]:
  """Times the usual PyTorch step: forward(i) -> loss, backward, clip to 1.0, AdamW, zero grads."""
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
  losses = []

  def step(i):
    loss = forward(i)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))

  first, times = time_steps(step, spec["warmup"], spec["steps"])
  median = statistics.median(times)
  peak = _peak_rss_kib()
  return dict(tokens_per_s=tokens_per_step / median, step_s=median, step_times=times,
              first_step_s=first, peak_rss_mib=(peak - rss0) / 1024.0,
              peak_rss_abs_mib=peak / 1024.0, loss=losses[-1],
              torch_threads=torch.get_num_threads())


def run_hf_bert(spec: dict[str, Any]) -> dict[str, Any]:
  """HF PyTorch BertForPreTraining (MLM + NSP), the user's usual training loop."""
  torch, _ = _torch_setup(spec["threads"])
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()
  rss0 = _rss_kib()
  size, batch, seq_len = spec["size"], spec["batch"], spec["seq_len"]
  config = transformers.BertConfig(
      vocab_size=size["vocab_size"], hidden_size=size["d_model"],
      num_hidden_layers=size["n_layer"], num_attention_heads=size["n_head"],
      intermediate_size=size["d_inner"], max_position_embeddings=max(512, seq_len),
      type_vocab_size=2, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPATT,
      hidden_act="gelu")
  model = transformers.BertForPreTraining(config)
  model.train()
  rng = np.random.RandomState(0)
  batches = []
  for b in mlm_batches(rng, 4, batch=batch, seq_len=seq_len, vocab=size["vocab_size"]):
    labels = np.full(b["tokens"].shape, -100, np.int64)
    np.put_along_axis(labels, b["mlm_positions"], b["mlm_ids"], axis=1)
    batches.append(dict(input_ids=torch.from_numpy(b["tokens"].astype(np.int64)),
                        attention_mask=torch.from_numpy(b["token_mask"].astype(np.int64)),
                        token_type_ids=torch.from_numpy(b["token_types"].astype(np.int64)),
                        labels=torch.from_numpy(labels),
                        next_sentence_label=torch.from_numpy(b["nsp_label"].astype(np.int64))))
  result = _torch_train(torch, model, lambda i: model(**batches[i % len(batches)]).loss, spec,
                        rss0, batch * seq_len)
  result.update(torch_version=torch.__version__, transformers_version=transformers.__version__)
  return result


def run_hf_transfo_xl(spec: dict[str, Any]) -> dict[str, Any]:
  """HF PyTorch TransfoXLLMHeadModel with memory carried between segments (full softmax)."""
  torch, _ = _torch_setup(spec["threads"])
  import warnings  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.logging.set_verbosity_error()
  warnings.filterwarnings("ignore")
  rss0 = _rss_kib()
  size, batch, seq_len, mem_len = spec["size"], spec["batch"], spec["seq_len"], spec["mem_len"]
  config = transformers.TransfoXLConfig(
      vocab_size=size["vocab_size"], cutoffs=[], d_model=size["d_model"], d_embed=size["d_model"],
      n_head=size["n_head"], d_head=size["d_head"], d_inner=size["d_inner"], div_val=1,
      n_layer=size["n_layer"], mem_len=mem_len, clamp_len=-1, same_length=False,
      dropout=DROPOUT, dropatt=DROPATT, pre_lnorm=False, untie_r=True, adaptive=True,
      tie_word_embeddings=True)
  model = transformers.TransfoXLLMHeadModel(config)
  model.train()
  rng = np.random.RandomState(0)
  n = spec["warmup"] + spec["steps"]
  segments = [torch.from_numpy(b["tokens"].astype(np.int64))
              for b in lm_batches(rng, n, batch=batch, seq_len=seq_len, vocab=size["vocab_size"])]
  mems = [None]

  def forward(i):
    out = model(input_ids=segments[i], labels=segments[i], mems=mems[0])
    mems[0] = out.mems  # carried to the next segment (HF detaches them)
    return out.loss

  return _torch_train(torch, model, forward, spec, rss0, batch * seq_len)


WORKERS = {"ceiling": run_ceiling, "r1jax": run_r1jax, "hf_bert": run_hf_bert,
           "hf_transfo_xl": run_hf_transfo_xl}


def worker_main(kind: str, spec_json: str) -> None:
  spec = json.loads(spec_json)
  result = WORKERS[kind](spec)
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Orchestration (parent side).


def _worker_env(threads: int, platform: str) -> dict[str, str]:
  env = dict(os.environ)
  # Our own XLA settings: drop any forced host device count (one CPU device, all its threads).
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = platform
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[name] = str(threads)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_worker(kind: str, spec: dict[str, Any], *, cpus: Sequence[int], platform: str = "cpu",
               timeout: float = 3600.0, label: str = "") -> dict[str, Any]:
  """Runs one measurement in a fresh process pinned to `cpus`; returns its result dict."""
  threads = len(cpus) if platform == "cpu" else len(os.sched_getaffinity(0))
  spec = dict(spec, threads=threads)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--spec", json.dumps(spec)]
  preexec = (lambda: os.sched_setaffinity(0, cpus)) if platform == "cpu" else None
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=_worker_env(threads, platform), capture_output=True, text=True,
                        timeout=timeout, preexec_fn=preexec, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if proc.returncode != 0 or not lines:
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"benchmark worker {label or kind} failed (exit {proc.returncode}):\n{tail}")
  result = json.loads(lines[-1][len(RESULT_PREFIX):])
  result["wall_s"] = time.perf_counter() - start
  print(f"  {label or kind}: done in {result['wall_s']:.0f}s", file=sys.stderr, flush=True)
  return result


def _pool(results: Sequence[dict[str, Any]], *, tokens_per_step: int) -> dict[str, Any]:
  """Pools rounds of one peer: median over all timed steps; memory: the largest peak."""
  times = [t for r in results for t in r["step_times"]]
  median = statistics.median(times)
  pooled = dict(results[0])
  pooled.update(step_s=median, tokens_per_s=tokens_per_step / median, rounds=len(results),
                round_tokens_per_s=[r["tokens_per_s"] for r in results],
                peak_rss_mib=max(r["peak_rss_mib"] for r in results),
                step_times=times)
  if "flops_per_step" in pooled:
    ceilings = [c for r in results for c in r["ceiling_samples"]]
    pooled["ceiling_flops"] = statistics.median(ceilings)
    pooled["achieved_flops"] = pooled["flops_per_step"] / median
    pooled["mfu"] = pooled["achieved_flops"] / pooled["ceiling_flops"]
    pooled["compile_s"] = statistics.median(r["compile_s"] for r in results)
  return pooled


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=0,
                 help="compute threads (= pinned cores) for every peer; 0 = all available cores")
  p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (JAX: compilation)")
  p.add_argument("--rounds", type=int, default=2,
                 help="rounds alternating r1jax and its peers; medians pool all rounds")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--mem-len", type=int, default=128, help="memory length of the 'on' rows")
  p.add_argument("--base-batch", type=int, default=2, help="rows per step of the base variant run")
  p.add_argument("--base-seq-len", type=int, default=512)
  p.add_argument("--base-steps", type=int, default=2, help="timed steps of the base variant run")
  p.add_argument("--base-dtype", default="float32",
                 help="compute dtype of the CPU base run (bf16 matmuls are slower on most CPUs)")
  p.add_argument("--skip-base", action="store_true", help="leave out the base variant run")
  p.add_argument("--skip-hf", action="store_true", help="leave out the PyTorch peers")
  p.add_argument("--toy", action="store_true",
                 help="tiny sizes and few steps (seconds; the smoke test); figures are meaningless")
  p.add_argument("--gpu", action="store_true",
                 help="also run the GPU section (base variant, seq 512, bf16) when a GPU is visible")
  p.add_argument("--gpu-batch", type=int, default=16)
  p.add_argument("--json-out", default="", help="also write the final JSON object to this file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--spec", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.toy:
    args.batch, args.seq_len, args.mem_len = 4, 16, 16
    args.base_batch, args.base_seq_len = 2, 16
    args.steps, args.warmup, args.base_steps = min(args.steps, 3), 1, 1
    args.rounds = 1
  for name in ("steps", "warmup", "rounds", "batch", "seq_len", "base_batch", "base_seq_len",
               "base_steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
  available = sorted(os.sched_getaffinity(0))
  if args.threads < 0 or args.threads > len(available):
    p.error(f"--threads={args.threads}: this process may use {len(available)} cores "
            f"({available}); choose 1..{len(available)} or 0 for all")
  args.cpus = available[:args.threads] if args.threads else available
  return args


def _fmt_mem(mib: float) -> str:
  return f"{mib:,.0f} MiB"


def _row(name: str, r: dict[str, Any] | None, extra: str = "") -> str:
  if r is None:
    return f"| {name} | - | - | - | - | {extra} |"
  mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
  comp = f"{r['compile_s']:.1f} s" if "compile_s" in r else "-"
  return (f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {_fmt_mem(r['peak_rss_mib'])} | {comp} |"
          f" {extra} |")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.worker:
    worker_main(args.worker, args.spec)
    return {}
  size = TOY if args.toy else SMALL
  cpus = args.cpus
  steps = dict(warmup=args.warmup, steps=args.steps)
  sizes = (128, 256) if args.toy else (1024, 2048)
  model_common = dict(size, dropout=DROPOUT, dropatt=DROPATT)
  variant = "tiny" if args.toy else "small"

  def r1jax_spec(mode: str, mem_len: int) -> dict[str, Any]:
    extra = dict(n_token_types=2) if mode == "mlm" else dict(attention="causal")
    return dict(steps, mode=mode, variant=variant, batch=args.batch, seq_len=args.seq_len,
                model=dict(model_common, mem_len=mem_len, **extra), ceiling_sizes=sizes)

  print(f"# r1jax training throughput: {len(cpus)} threads pinned to cores {cpus}", file=sys.stderr)
  ceiling = run_worker("ceiling", dict(sizes=sizes), cpus=cpus, label="matmul ceiling")
  rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in
                                             ("mlm_off", "mlm_on", "bert", "lm", "txl")}
  for i in range(args.rounds):
    tag = f" (round {i + 1}/{args.rounds})"
    rounds["mlm_off"].append(run_worker("r1jax", r1jax_spec("mlm", 0), cpus=cpus,
                                        label="r1jax MLM+NSP, memory off" + tag))
    if not args.skip_hf:
      rounds["bert"].append(run_worker("hf_bert", dict(steps, size=size, batch=args.batch,
                                                       seq_len=args.seq_len),
                                       cpus=cpus, label="HF BertForPreTraining" + tag))
    rounds["mlm_on"].append(run_worker("r1jax", r1jax_spec("mlm", args.mem_len), cpus=cpus,
                                       label="r1jax MLM+NSP, memory on" + tag))
    rounds["lm"].append(run_worker("r1jax", r1jax_spec("lm", args.mem_len), cpus=cpus,
                                   label="r1jax causal LM" + tag))
    if not args.skip_hf:
      rounds["txl"].append(run_worker(
          "hf_transfo_xl", dict(steps, size=size, batch=args.batch, seq_len=args.seq_len,
                                mem_len=args.mem_len),
          cpus=cpus, label="HF TransfoXLLMHeadModel" + tag))
  tokens = args.batch * args.seq_len
  res = {k: _pool(v, tokens_per_step=tokens) if v else None for k, v in rounds.items()}

  base = None
  if not args.skip_base:
    base_model = dict(n_token_types=2, dtype=args.base_dtype)
    if args.toy:
      base_model.update(TOY, n_layer=2)
    base = run_worker("r1jax", dict(
        mode="mlm", variant="tiny" if args.toy else "base", batch=args.base_batch,
        seq_len=args.base_seq_len, model=base_model, warmup=1, steps=args.base_steps,
        ceiling_sizes=sizes), cpus=cpus, label="r1jax base variant")

  gpu = run_gpu_section(args) if args.gpu else None
  summary = summary_json(args, ceiling, res, base, gpu)
  print_table(args, ceiling, res, base, gpu, summary)
  line = json.dumps(summary, sort_keys=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)
  return summary


def run_gpu_section(args: argparse.Namespace) -> dict[str, Any]:
  """Base variant at sequence 512 in bf16 on the first GPU, MFU vs its measured bf16 matmul."""
  probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices('gpu')[0].device_kind)"],
                         env=_worker_env(1, "cuda,cpu"), capture_output=True, text=True,
                         check=False)
  if probe.returncode != 0:
    print("  GPU section: no GPU visible to JAX; skipped", file=sys.stderr)
    return {"available": False}
  kind = probe.stdout.strip().splitlines()[-1]
  sizes = (1024, 2048) if args.toy else (8192, 16384)
  model = dict(n_token_types=2, dtype="bfloat16")
  seq = 16 if args.toy else 512
  if args.toy:
    model.update(TOY, n_layer=2)
  result = run_worker("r1jax", dict(
      mode="mlm", variant="tiny" if args.toy else "base", batch=args.gpu_batch, seq_len=seq,
      model=model, warmup=2, steps=max(args.steps, 5), ceiling_sizes=sizes,
      ceiling_dtype="bfloat16"), cpus=(), platform="cuda", label=f"GPU base bf16 ({kind})")
  result.update(available=True, device=kind, seq_len=seq, batch=args.gpu_batch)
  return result


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
  if a is None or b is None or not b[key]:
    return None
  return a[key] / b[key]


def summary_json(args, ceiling, res, base, gpu) -> dict[str, Any]:
  """The machine-checkable figures (the script's last line)."""
  def r3(x):
    return None if x is None else round(float(x), 4)
  out = {
      "threads": len(args.cpus), "toy": bool(args.toy), "rounds": args.rounds,
      "timed_steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
      "mem_len": args.mem_len,
      "ceiling_f32_flops": r3(ceiling["float32"]), "ceiling_bf16_flops": r3(ceiling["bfloat16"]),
      "r1jax_mlm_tokens_per_s": r3(res["mlm_off"]["tokens_per_s"]),
      "r1jax_mlm_mem_tokens_per_s": r3(res["mlm_on"]["tokens_per_s"]),
      "r1jax_lm_mem_tokens_per_s": r3(res["lm"]["tokens_per_s"]),
      "hf_bert_tokens_per_s": r3(res["bert"]["tokens_per_s"]) if res["bert"] else None,
      "hf_transfo_xl_tokens_per_s": r3(res["txl"]["tokens_per_s"]) if res["txl"] else None,
      "ratio_vs_hf_bert": r3(_ratio(res["mlm_off"], res["bert"], "tokens_per_s")),
      "ratio_mem_on_vs_hf_bert": r3(_ratio(res["mlm_on"], res["bert"], "tokens_per_s")),
      "ratio_vs_hf_transfo_xl": r3(_ratio(res["lm"], res["txl"], "tokens_per_s")),
      "mfu_small": r3(res["mlm_off"]["mfu"]),
      "mfu_small_mem": r3(res["mlm_on"]["mfu"]),
      "mfu_lm": r3(res["lm"]["mfu"]),
      "peak_memory_mib_r1jax": r3(res["mlm_off"]["peak_rss_mib"]),
      "peak_memory_mib_hf_bert": r3(res["bert"]["peak_rss_mib"]) if res["bert"] else None,
      "peak_memory_ratio_vs_hf_bert": r3(_ratio(res["mlm_off"], res["bert"], "peak_rss_mib")),
      "peak_memory_ratio_vs_hf_transfo_xl": r3(_ratio(res["lm"], res["txl"], "peak_rss_mib")),
      "compile_seconds_small": r3(res["mlm_off"]["compile_s"]),
      "base_compile_seconds": r3(base["compile_s"]) if base else None,
      "base_tokens_per_s": r3(base["tokens_per_s"]) if base else None,
      "base_mfu": r3(base["mfu"]) if base else None,
      "base_peak_memory_mib": r3(base["peak_rss_mib"]) if base else None,
  }
  if gpu is not None:
    out["gpu_available"] = bool(gpu.get("available"))
    if gpu.get("available"):
      out.update(gpu_device=gpu["device"], gpu_bf16_matmul_flops=r3(gpu["ceiling_flops"]),
                 gpu_base_mfu=r3(gpu["mfu"]), gpu_base_tokens_per_s=r3(gpu["tokens_per_s"]),
                 gpu_base_compile_seconds=r3(gpu["compile_s"]))
  return out


def print_table(args, ceiling, res, base, gpu, summary) -> None:
  size = TOY if args.toy else SMALL
  b, q, m = args.batch, args.seq_len, args.mem_len
  print(f"\nr1jax training throughput ({len(args.cpus)} threads for every peer, float32, batch {b}, "
        f"sequence {q}, d_model {size['d_model']}, {size['n_layer']} layers, {size['n_head']} "
        f"heads, vocab {size['vocab_size']}, dropout {DROPOUT}; medians of {args.steps} timed steps "
        f"x {args.rounds} round(s) after {args.warmup} warm-up)\n")
  print(f"Matmul ceiling through JAX: float32 {ceiling['float32'] / 1e9:,.1f} GFLOP/s, bfloat16 "
        f"{ceiling['bfloat16'] / 1e9:,.1f} GFLOP/s (best of sizes {', '.join(map(str, (128, 256) if args.toy else (1024, 2048)))})\n")
  print("| run | tokens/s | MFU | peak memory | compile | vs peer |")
  print("|---|---:|---:|---:|---:|---|")

  def vs(key):
    v = summary.get(key)
    return f"{v:.2f}x" if v is not None else "-"
  print(_row("r1jax MLM+NSP, memory off", res["mlm_off"],
             f"{vs('ratio_vs_hf_bert')} HF BERT tokens/s, "
             f"{vs('peak_memory_ratio_vs_hf_bert')} its memory"))
  print(_row("HF PyTorch BertForPreTraining", res["bert"], "(MLM logits at every position)"))
  print(_row(f"r1jax MLM+NSP, memory on (mem_len {m})", res["mlm_on"],
             f"{vs('ratio_mem_on_vs_hf_bert')} HF BERT tokens/s"))
  print(_row(f"r1jax causal LM, mem_len {m}", res["lm"],
             f"{vs('ratio_vs_hf_transfo_xl')} HF TransfoXL tokens/s, "
             f"{vs('peak_memory_ratio_vs_hf_transfo_xl')} its memory"))
  print(_row(f"HF PyTorch TransfoXLLMHeadModel, mem_len {m}", res["txl"], "(full softmax)"))
  if base:
    print(_row(f"r1jax base variant ({base['dtype']}), batch {args.base_batch}, sequence "
               f"{args.base_seq_len}, mem_len 512", base, "short run"))
  if gpu and gpu.get("available"):
    print(_row(f"GPU {gpu['device']}: base, bf16, batch {gpu['batch']}, sequence {gpu['seq_len']}",
               gpu, f"MFU vs measured bf16 matmul {gpu['ceiling_flops'] / 1e12:,.0f} TFLOP/s"))
  elif gpu is not None:
    print("| GPU section | - | - | - | - | no GPU visible: skipped |")
  print(f"\nMFU: model training FLOPs / float32 matmul ceiling measured in the same process "
        f"(r1jax MLM rows {res['mlm_off']['ceiling_flops'] / 1e9:,.0f} GFLOP/s). Peak memory: "
        "ru_maxrss high-water mark minus the resident set after imports, per process.\n",
        flush=True)


if __name__ == "__main__":
  main()
