r"""Training throughput of r1jax next to the PyTorch stacks users would otherwise pick.

    python bench/train_throughput.py                  # full table on this machine (~10 min, 2 cores)
    python bench/train_throughput.py --toy            # tiny sizes in about a minute (smoke test)
    python bench/train_throughput.py --gpu            # adds the GPU section when a GPU is visible

Every row is measured in the same run:

* the machine's ceiling: the best large float32 and bfloat16 matmul through JAX, in FLOP/s;
* r1jax MLM+NSP training steps through the engine's real jitted steps (`steps.Engine`: loss,
  gradients, clipping, AdamW, NaN guard), bidirectional Transformer-XL with memory off
  (mem_len 0, the same work as BERT) and on (mem_len 128), at the small size, and the base variant
  for a short run: tokens/s, MFU, peak memory, compile time. Like `r1jax.main`, they run
  `train.steps_per_call` optimizer steps per jitted call (`Engine.train_steps`, its automatic
  choice for configs/pretrain.py: 10 on CPU); one more row runs one step per call;
* HuggingFace PyTorch `BertForPreTraining` (MLM+NSP) at the same size and batch, trained the usual
  way (AdamW, clipping at 1.0);
* a plain Flax BERT (nn.Dense, nn.MultiHeadDotProductAttention, MLM logits at every position)
  at the same size: the "straightforward Flax BERT step" the issue quotes as the MFU reference,
  its MFU counted from its own FLOPs (`bert_flops_per_step`);
* HuggingFace PyTorch `TransfoXLLMHeadModel` against r1jax in causal-LM mode with the same memory
  length (mem_len 128), both predicting every position over the full vocabulary;
* the ratios r1jax / peer.

Method. Each peer runs in its own process, pinned to the same `--threads` cores
(`os.sched_setaffinity`); PyTorch gets `torch.set_num_threads(threads)` (one inter-op thread) and
XLA's CPU client sizes its intra-op pool from the same affinity mask, so every peer computes with
exactly `threads` threads. The processes of one comparison (r1jax memory off / HF BERT / r1jax
memory on, then r1jax LM / HF TransfoXL) are started one after the other, each doing its warm-up
steps alone (the first r1jax call includes compilation: compile time = first call - its steps x
median step), and then take their timed steps in lockstep: one timed call of each in turn (one
step, or one jitted call of several steps, its time divided by their number), never two at once.
On a shared machine every peer's steps thus sit next to each other in time and see the same
background load. Figures are medians of the timed steps. Peak memory is each process's
resident-set high-water mark (`ru_maxrss`) minus its resident set after imports and runtime
start-up, i.e. what building the model and training adds (compilation included for JAX), measured
the same way for every peer.
MFU = the model's training FLOPs (`r1jax.train.metrics.pretrain_flops_per_step`: attention over
memory + segment counted in full, not halved) / the float32 matmul ceiling sampled in the same
process before, between and after its timed steps (the median of the samples).
`mfu_small_vs_best_ceiling` divides the same FLOP rate by the run's highest float32 ceiling sample
instead, a stricter figure that a single low in-process median cannot raise.

The table ends with the CPU's model and vector extensions (`steps.host_cpu`, from /proc/cpuinfo):
the ratios move from one CPU to another. The last line printed is one JSON object with every
figure (see `summary_json`), the CPU included.
"""
from __future__ import annotations

import os
import sys

# Running `python bench/x.py` puts bench/ first on sys.path, where sibling scripts could shadow
# modules that jax imports (e.g. a bench/compression.py hides `compression.zstd`): drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

REPO = os.path.dirname(_HERE)
PREFIX = "BENCH "  # worker -> parent protocol lines: "BENCH <KIND> <json>"

# Same-size settings (issue 9): d_model 256, 4 layers, 4 heads, sequence 128, batch 32, vocab 8k.
SMALL = dict(d_model=256, n_layer=4, n_head=4, d_head=64, d_inner=1024, vocab_size=8000)
TOY = dict(d_model=32, n_layer=2, n_head=2, d_head=16, d_inner=64, vocab_size=200)
DROPOUT = 0.1     # hidden dropout on both sides
DROPATT = 0.0     # attention-probability dropout on both sides (Transformer-XL's default)
MLM_PROB = 0.15
LM_CHUNK = 32     # causal-LM rows: positions per chunk of [B, chunk, V] logits (losses.causal_lm_loss_fn)


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


def _pretrain_config() -> Any:
  """configs/pretrain.py's default config (its log/eval/checkpoint periods set steps_per_call)."""
  from r1jax import configlib  # pylint: disable=g-import-not-at-top
  return configlib.load_config(os.path.join(REPO, "configs", "pretrain.py"))


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


class R1jaxTrainer:
  """r1jax MLM+NSP (or causal LM) training through `steps.Engine`, warmed up on construction."""

  def __init__(self, spec: dict[str, Any]):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from r1jax import configlib  # pylint: disable=g-import-not-at-top
    from r1jax.model import axes, heads, losses  # pylint: disable=g-import-not-at-top
    from r1jax.model import transformer_xl as txl  # pylint: disable=g-import-not-at-top
    from r1jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    from r1jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    from r1jax.train import loop as loop_lib  # pylint: disable=g-import-not-at-top
    from r1jax.train import optim  # pylint: disable=g-import-not-at-top
    from r1jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
    self._jax, self._steps = jax, steps_lib
    self.mode = spec["mode"]  # "mlm" | "lm"
    batch, seq_len = spec["batch"], spec["seq_len"]
    self.tokens_per_step = batch * seq_len
    cfg = self.cfg = txl.get_variant(spec["variant"], **spec["model"])
    model = heads.PretrainModel(cfg)
    self.ceiling = Ceiling(spec.get("ceiling_dtype", "float32"),
                           spec.get("ceiling_sizes", (1024, 2048)))
    self.rss0 = _rss_kib()  # after imports, runtime start-up and the ceiling's matrices

    def init_params(rng):
      tokens = jnp.zeros((1, 8), jnp.int32)
      types = jnp.zeros_like(tokens) if cfg.n_token_types else None
      return model.init({"params": rng}, tokens, token_types=types)["params"]

    train_cfg = configlib.train_section(num_steps=1000, batch_size=batch, learning_rate=3e-4,
                                        warmup_steps=10, weight_decay=0.01, grad_clip_norm=1.0)
    tx = optim.build_optimizer(train_cfg, jax.eval_shape(init_params, jax.random.PRNGKey(0)),
                               num_steps=1000)
    mesh = mesh_lib.make_mesh(configlib.mesh_section(), devices=jax.devices()[:1])
    # LM mode: the engine's causal LM loss, logits made LM_CHUNK positions at a time.
    loss_fn = (losses.pretrain_loss_fn(model) if self.mode == "mlm"
               else losses.causal_lm_loss_fn(model, chunk_size=min(LM_CHUNK, seq_len)))
    # Optimizer steps per jitted call: what `r1jax.main --config=configs/pretrain.py` picks on
    # this platform (loop.steps_per_call), unless the row fixes it.
    per_call = spec.get("engine_steps_per_call") or loop_lib.steps_per_call(
        _pretrain_config(), jax.default_backend())
    self.engine = steps_lib.Engine(
        mesh=mesh, rules=axes.DEFAULT_RULES, loss_fn=loss_fn, tx=tx, init_params=init_params,
        init_extras=lambda: {"memory": txl.init_memory(cfg, batch)}, batch_size=batch,
        lr_schedule=optim.make_schedule(train_cfg, 1000), steps_per_call=per_call)
    rng = np.random.RandomState(0)
    if self.mode == "mlm":
      self.batches = mlm_batches(rng, 4, batch=batch, seq_len=seq_len, vocab=cfg.vocab_size)
    else:  # consecutive segments, so the memory carries real context
      self.batches = lm_batches(rng, (spec["warmup"] + spec["steps"]) * per_call, batch=batch,
                                seq_len=seq_len, vocab=cfg.vocab_size)
    # The LM head (= the MLM head) runs on all Q positions in LM mode.
    self.flops_per_step = metrics_lib.pretrain_flops_per_step(
        cfg, batch_size=batch, seq_len=seq_len,
        num_predictions=_num_predictions(seq_len) if self.mode == "mlm" else seq_len)
    self.state = self.engine.init_state(jax.random.PRNGKey(0))
    self.metrics = None
    self.i = 0
    self.steps_per_call = int(spec.get("steps_per_call", 1))
    self.first_steps = 0

  def step(self) -> int:
    """One timed sample, then one wait; returns how many training steps it ran.

    With the engine's steps_per_call = n > 1 (the CPU rows by default), a sample is one jitted
    call of n steps (`Engine.train_steps`), as `r1jax.main`'s loop runs them. Otherwise it is
    `steps_per_call` single-step calls dispatched back to back: on a GPU a wait after every step
    would leave the device idle while the host dispatches the next one, which no training loop
    does (r1jax's loop only fetches metrics at log steps), so the GPU rows time a few at a time.
    """
    k = self.engine.steps_per_call
    if k > 1:
      n = k
      self.state, self.metrics = self.engine.train_steps(
          self.state, [self.batches[(self.i + j) % len(self.batches)] for j in range(k)])
      self.i += k
    else:
      n = 1 if self.i == 0 else self.steps_per_call  # the first call (compilation) runs one step
      for _ in range(n):
        self.state, self.metrics = self.engine.train_step(
            self.state, self.batches[self.i % len(self.batches)])
        self.i += 1
    self._jax.block_until_ready(self.metrics)
    self.first_steps = self.first_steps or n
    return n

  def profile(self, out_dir: str, steps: int = 3) -> dict[str, Any]:
    """Traces `steps` steps with jax.profiler; returns the device-side time by kernel."""
    jax = self._jax
    os.makedirs(out_dir, exist_ok=True)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
      for _ in range(steps):
        self.state, self.metrics = self.engine.train_step(
            self.state, self.batches[self.i % len(self.batches)])
        self.i += 1
      jax.block_until_ready(self.metrics)
    return summarize_trace(out_dir, steps)

  def sample_ceiling(self) -> float:
    return self.ceiling.sample()

  def summary(self, times: Sequence[float], first_s: float) -> dict[str, Any]:
    metrics = self._jax.device_get(self.metrics)
    if self.engine.steps_per_call > 1:  # each step's metrics stacked: the last step's
      metrics = self._jax.tree.map(lambda x: x[-1], metrics)
    final = self._steps.normalize(metrics)
    if not math.isfinite(final["loss"]):
      raise FloatingPointError(f"r1jax {self.mode} loss is {final['loss']}")
    median = statistics.median(times)
    device = self._jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    extra = {}
    if stats and "peak_bytes_in_use" in stats:  # accelerator memory (host RSS says little there)
      extra["peak_device_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
    from r1jax import host_memory  # pylint: disable=g-import-not-at-top
    return dict(**extra, attention_impl=self.cfg.attention_impl, host_malloc=host_memory.status(),
                steps_per_call=self.steps_per_call,
                engine_steps_per_call=self.engine.steps_per_call,
                compile_s=max(first_s - self.first_steps * median, 0.0),
                flops_per_step=self.flops_per_step,
                achieved_flops=self.flops_per_step / median, ceiling_flops=self.ceiling.value,
                ceiling_samples=self.ceiling.samples,
                mfu=self.flops_per_step / median / self.ceiling.value, loss=final["loss"],
                platform=device.platform, device=device.device_kind, dtype=str(self.cfg.dtype))


KERNEL_KINDS = (  # (kind, substrings of a GPU kernel's name), first match wins
    ("attention (cuDNN)", ("fmha", "cudnn", "flash")),
    ("matmul", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "wgmma", "triton_gemm", "dot")),
    ("memcpy", ("memcpy", "memset")),
)


def summarize_trace(out_dir: str, steps: int, top: int = 25) -> dict[str, Any]:
  """Device time by kernel from the perfetto trace `jax.profiler.trace` wrote under `out_dir`.

  Kernels are the complete ("X") events of the trace's device processes (`/device:...`); on a
  CPU-only run, where XLA has no device timeline, the events of every process are summed instead.
  Returns per-step milliseconds: total, by kind (matmul / cuDNN attention / copies / other, i.e.
  XLA's fusions), and the `top` kernels.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(out_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    return {"error": f"no perfetto_trace.json.gz under {out_dir}"}
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in names.items() if "/device:" in name}
  by_name: dict[str, float] = {}
  for e in events:
    if e.get("ph") == "X" and (not device_pids or e.get("pid") in device_pids):
      by_name[e.get("name", "?")] = by_name.get(e.get("name", "?"), 0.0) + float(e.get("dur", 0))
  by_kind: dict[str, float] = {}
  for name, us in by_name.items():
    low = name.lower()
    kind = next((k for k, keys in KERNEL_KINDS if any(x in low for x in keys)), "other (fusions)")
    by_kind[kind] = by_kind.get(kind, 0.0) + us
  per_step = lambda us: round(us / steps / 1e3, 3)  # noqa: E731
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
  return {"device_events": bool(device_pids), "total_ms": per_step(sum(by_name.values())),
          "by_kind_ms": {k: per_step(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
          "top_ms": [[name[:120], per_step(us)] for name, us in ranked], "trace": paths[-1]}


def bert_flops_per_step(size: dict[str, int], *, batch: int, seq_len: int) -> float:
  """Training FLOPs (3x forward) of a plain BERT step with the MLM decoder at every position.

  Per token and layer: QKV + output projections 8 d^2, feed-forward 4 d d_inner, scores and
  values 4 Q d; heads: MLM transform 2 d^2 and decoder 2 d V per token, NSP pooler per row.
  """
  d, f, v, n = size["d_model"], size["d_inner"], size["vocab_size"], size["n_layer"]
  per_token = n * (8 * d * d + 4 * d * f + 4 * seq_len * d) + 2 * d * d + 2 * d * v
  return 3.0 * batch * (seq_len * per_token + 2 * d * d + 4 * d)


class FlaxBertTrainer:
  """The straightforward Flax BERT the issue names as the MFU reference: nn.Embed, learned
  positions, nn.MultiHeadDotProductAttention, nn.Dense, exact GELU, MLM logits at every position
  (as HF computes them), optax AdamW + clipping, one jax.jit step. Not r1jax code: a baseline."""

  def __init__(self, spec: dict[str, Any]):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    size, batch, seq_len = spec["size"], spec["batch"], spec["seq_len"]
    d, heads = size["d_model"], size["n_head"]
    self._jax = jax
    self.ceiling = Ceiling("float32", spec.get("ceiling_sizes", (1024, 2048)))
    self.rss0 = _rss_kib()

    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, mask, train):
        a = nn.MultiHeadDotProductAttention(heads, dropout_rate=DROPATT, deterministic=not train)(
            x, x, mask=mask)
        x = nn.LayerNorm(epsilon=1e-12)(x + nn.Dropout(DROPOUT, deterministic=not train)(a))
        y = nn.gelu(nn.Dense(size["d_inner"])(x), approximate=False)
        y = nn.Dropout(DROPOUT, deterministic=not train)(nn.Dense(d)(y))
        return nn.LayerNorm(epsilon=1e-12)(x + y)

    class Bert(nn.Module):
      @nn.compact
      def __call__(self, tokens, types, token_mask, train):
        word = nn.Embed(size["vocab_size"], d)
        x = (word(tokens) + nn.Embed(max(512, seq_len), d)(jnp.arange(tokens.shape[1]))[None]
             + nn.Embed(2, d)(types))
        x = nn.Dropout(DROPOUT, deterministic=not train)(nn.LayerNorm(epsilon=1e-12)(x))
        mask = nn.make_attention_mask(token_mask, token_mask)
        for _ in range(size["n_layer"]):
          x = Layer()(x, mask, train)
        h = nn.LayerNorm(epsilon=1e-12)(nn.gelu(nn.Dense(d)(x), approximate=False))
        mlm = word.attend(h) + self.param("mlm_bias", nn.initializers.zeros, (size["vocab_size"],))
        nsp = nn.Dense(2)(jnp.tanh(nn.Dense(d)(x[:, 0])))
        return mlm, nsp

    model = Bert()
    self.batches = []
    for b in mlm_batches(np.random.RandomState(0), 4, batch=batch, seq_len=seq_len,
                         vocab=size["vocab_size"]):
      labels = np.zeros(b["tokens"].shape, np.int32)
      weights = np.zeros(b["tokens"].shape, np.float32)
      np.put_along_axis(labels, b["mlm_positions"], b["mlm_ids"], axis=1)
      np.put_along_axis(weights, b["mlm_positions"], 1.0, axis=1)
      self.batches.append(jax.device_put(dict(
          tokens=b["tokens"], types=b["token_types"], mask=b["token_mask"], labels=labels,
          weights=weights, nsp=b["nsp_label"])))
    b0 = self.batches[0]
    params = model.init(jax.random.key(0), b0["tokens"], b0["types"], b0["mask"], False)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.01))

    def loss_fn(params, batch, rng):
      mlm, nsp = model.apply(params, batch["tokens"], batch["types"], batch["mask"], True,
                             rngs={"dropout": rng})
      ce = optax.softmax_cross_entropy_with_integer_labels(mlm, batch["labels"])
      mlm_loss = (ce * batch["weights"]).sum() / batch["weights"].sum()
      return mlm_loss + optax.softmax_cross_entropy_with_integer_labels(nsp, batch["nsp"]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, rng):
      loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self.params, self.opt_state, self._step = params, tx.init(params), step
    self.tokens_per_step = batch * seq_len
    self.flops_per_step = bert_flops_per_step(size, batch=batch, seq_len=seq_len)
    self.loss = None
    self.i = 0

  def step(self) -> int:
    rng = self._jax.random.fold_in(self._jax.random.key(1), self.i)
    self.params, self.opt_state, self.loss = self._step(
        self.params, self.opt_state, self.batches[self.i % len(self.batches)], rng)
    self.loss.block_until_ready()
    self.i += 1
    return 1

  def sample_ceiling(self) -> float:
    return self.ceiling.sample()

  def summary(self, times: Sequence[float], first_s: float) -> dict[str, Any]:
    median = statistics.median(times)
    return dict(compile_s=max(first_s - median, 0.0), flops_per_step=self.flops_per_step,
                ceiling_flops=self.ceiling.value, ceiling_samples=self.ceiling.samples,
                mfu=self.flops_per_step / median / self.ceiling.value, loss=float(self.loss))


class _TorchTrainer:
  """The usual PyTorch loop around `self.forward(i) -> loss`: backward, clip to 1.0, AdamW."""

  def __init__(self, spec: dict[str, Any]):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(spec["threads"])
    try:
      torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
      pass
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    self.torch, self.transformers = torch, transformers
    self.rss0 = _rss_kib()  # after imports
    self.model = self.build(spec)
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.01)
    self.tokens_per_step = spec["batch"] * spec["seq_len"]
    self.losses: list[float] = []
    self.i = 0

  def build(self, spec: dict[str, Any]) -> Any:
    raise NotImplementedError

  def forward(self, i: int) -> Any:
    raise NotImplementedError

  def step(self) -> None:
    loss = self.forward(self.i)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.losses.append(float(loss.detach()))
    self.i += 1

  sample_ceiling = None

  def summary(self, times: Sequence[float], first_s: float) -> dict[str, Any]:
    del times, first_s
    return dict(loss=self.losses[-1], torch_threads=self.torch.get_num_threads(),
                torch_version=self.torch.__version__,
                transformers_version=self.transformers.__version__)


class HFBertTrainer(_TorchTrainer):
  """HF PyTorch BertForPreTraining (MLM + NSP; MLM logits at every position, as HF computes)."""

  def build(self, spec):
    size, batch, seq_len = spec["size"], spec["batch"], spec["seq_len"]
    torch = self.torch
    config = self.transformers.BertConfig(
        vocab_size=size["vocab_size"], hidden_size=size["d_model"],
        num_hidden_layers=size["n_layer"], num_attention_heads=size["n_head"],
        intermediate_size=size["d_inner"], max_position_embeddings=max(512, seq_len),
        type_vocab_size=2, hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPATT,
        hidden_act="gelu")
    self.batches = []
    for b in mlm_batches(np.random.RandomState(0), 4, batch=batch, seq_len=seq_len,
                         vocab=size["vocab_size"]):
      labels = np.full(b["tokens"].shape, -100, np.int64)
      np.put_along_axis(labels, b["mlm_positions"], b["mlm_ids"], axis=1)
      self.batches.append(dict(
          input_ids=torch.from_numpy(b["tokens"].astype(np.int64)),
          attention_mask=torch.from_numpy(b["token_mask"].astype(np.int64)),
          token_type_ids=torch.from_numpy(b["token_types"].astype(np.int64)),
          labels=torch.from_numpy(labels),
          next_sentence_label=torch.from_numpy(b["nsp_label"].astype(np.int64))))
    return self.transformers.BertForPreTraining(config)

  def forward(self, i):
    return self.model(**self.batches[i % len(self.batches)]).loss


class HFTransfoXLTrainer(_TorchTrainer):
  """HF PyTorch TransfoXLLMHeadModel, memory carried between segments, one full-softmax cluster."""

  def build(self, spec):
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.filterwarnings("ignore")  # the model is deprecated in transformers 4.37
    size, batch, seq_len = spec["size"], spec["batch"], spec["seq_len"]
    config = self.transformers.TransfoXLConfig(
        vocab_size=size["vocab_size"], cutoffs=[], d_model=size["d_model"],
        d_embed=size["d_model"], n_head=size["n_head"], d_head=size["d_head"],
        d_inner=size["d_inner"], div_val=1, n_layer=size["n_layer"], mem_len=spec["mem_len"],
        clamp_len=-1, same_length=False, dropout=DROPOUT, dropatt=DROPATT, pre_lnorm=False,
        untie_r=True, adaptive=True, tie_word_embeddings=True)
    self.segments = [self.torch.from_numpy(b["tokens"].astype(np.int64)) for b in lm_batches(
        np.random.RandomState(0), spec["warmup"] + spec["steps"], batch=batch, seq_len=seq_len,
        vocab=size["vocab_size"])]
    self.mems = None
    return self.transformers.TransfoXLLMHeadModel(config)

  def forward(self, i):
    out = self.model(input_ids=self.segments[i], labels=self.segments[i], mems=self.mems)
    self.mems = out.mems  # carried to the next segment (HF detaches them)
    return out.loss


TRAINERS = {"r1jax": R1jaxTrainer, "hf_bert": HFBertTrainer, "hf_transfo_xl": HFTransfoXLTrainer,
            "flax_bert": FlaxBertTrainer}


def _emit(kind: str, payload: Any) -> None:
  print(f"{PREFIX}{kind} {json.dumps(payload)}", flush=True)


def serve(kind: str, spec: dict[str, Any]) -> None:
  """Worker process: build and warm up, then obey the parent's "step" / "ceiling" / "finish"
  lines on stdin, answering each with one protocol line on stdout."""
  if kind == "ceiling":
    _emit("RESULT", measure_ceilings(spec))
    return
  trainer = TRAINERS[kind](spec)
  start = time.perf_counter()
  trainer.step()
  first_s = time.perf_counter() - start
  for _ in range(1, spec["warmup"]):
    trainer.step()
  _emit("READY", {"first_s": first_s})
  times: list[float] = []
  for line in sys.stdin:
    command = line.strip()
    if command == "step":
      start = time.perf_counter()
      n = trainer.step() or 1
      times.append((time.perf_counter() - start) / n)
      _emit("STEP", times[-1])
    elif command.startswith("profile "):
      _emit("PROF", trainer.profile(command.split(" ", 1)[1]))
    elif command == "ceiling":
      _emit("CEIL", trainer.sample_ceiling() if trainer.sample_ceiling else None)
    elif command == "finish":
      median = statistics.median(times)
      peak = _peak_rss_kib()
      result = dict(trainer.summary(times, first_s), step_times=times, step_s=median,
                    tokens_per_s=trainer.tokens_per_step / median, first_step_s=first_s,
                    peak_rss_mib=(peak - trainer.rss0) / 1024.0, peak_rss_abs_mib=peak / 1024.0)
      _emit("RESULT", result)
      return
    else:
      raise ValueError(f"unknown command {command!r}")


def measure_ceilings(spec: dict[str, Any]) -> dict[str, Any]:
  """The machine's matmul ceiling through JAX: float32 and bfloat16, best of a few samples."""
  import jax  # pylint: disable=g-import-not-at-top
  from r1jax.train import steps as steps_lib  # pylint: disable=g-import-not-at-top
  out = {"platform": jax.devices()[0].platform, "device": jax.devices()[0].device_kind,
         "cpu": steps_lib.host_cpu()}
  for dtype in ("float32", "bfloat16"):
    c = Ceiling(dtype, spec["sizes"], repeats=spec.get("repeats", 3))
    for _ in range(spec.get("samples", 3)):
      c.sample()
    out[dtype] = max(c.samples)
    out[dtype + "_samples"] = c.samples
  return out


# --------------------------------------------------------------------------------------------------
# Orchestration (parent side).


def choose_cpus(parser: argparse.ArgumentParser, threads: int) -> list[int]:
  """The first `threads` cores this process may use (all of them for 0); else a parser error."""
  available = sorted(os.sched_getaffinity(0))
  if threads < 0 or threads > len(available):
    parser.error(f"--threads={threads}: this process may use {len(available)} cores "
                 f"({available}); choose 1..{len(available)} or 0 for all")
  return available[:threads] if threads else available


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
  env.pop("R1JAX_HOST_MALLOC", None)  # rows that want it say so in their spec's "env"
  return env


class Worker:
  """One measurement process (this script with --worker) driven line by line."""

  def __init__(self, kind: str, spec: dict[str, Any], *, cpus: Sequence[int], label: str,
               platform: str = "cpu", timeout: float = 1800.0):
    self.label, self.timeout = label, timeout
    threads = len(cpus) if platform == "cpu" else len(os.sched_getaffinity(0))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--spec",
           json.dumps(dict(spec, threads=threads))]
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if platform == "cpu" else None
    self._stderr = tempfile.TemporaryFile(mode="w+")
    self.start = time.perf_counter()
    env = dict(_worker_env(threads, platform), **spec.get("env", {}))
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                 preexec_fn=preexec)

  def _read(self, expected: str) -> Any:
    deadline = time.perf_counter() + self.timeout
    for line in self.proc.stdout:
      if line.startswith(PREFIX):
        kind, payload = line[len(PREFIX):].split(" ", 1)
        if kind != expected:
          raise RuntimeError(f"{self.label}: expected {expected}, got {line.strip()}")
        return json.loads(payload)
      if time.perf_counter() > deadline:
        break
    self.proc.wait(timeout=60)
    self._stderr.seek(0)
    tail = "\n".join(self._stderr.read().splitlines()[-25:])
    raise RuntimeError(f"benchmark worker {self.label} failed (exit {self.proc.returncode}):\n"
                       f"{tail}")

  def send(self, command: str, answer: str) -> Any:
    self.proc.stdin.write(command + "\n")
    self.proc.stdin.flush()
    return self._read(answer)

  def ready(self) -> dict[str, Any]:
    info = self._read("READY")
    print(f"  {self.label}: ready after {time.perf_counter() - self.start:.0f}s", file=sys.stderr,
          flush=True)
    return info

  def finish(self) -> dict[str, Any]:
    result = self.send("finish", "RESULT")
    self.proc.stdin.close()
    self.proc.wait(timeout=120)
    self._stderr.close()
    return result


def run_once(kind: str, spec: dict[str, Any], *, cpus: Sequence[int], label: str,
             platform: str = "cpu") -> dict[str, Any]:
  """A worker that measures on its own and exits (the ceiling)."""
  worker = Worker(kind, spec, cpus=cpus, label=label, platform=platform)
  result = worker._read("RESULT")  # pylint: disable=protected-access
  worker.proc.wait(timeout=120)
  print(f"  {label}: done", file=sys.stderr, flush=True)
  return result


def measure_lockstep(peers: Sequence[tuple[str, str, dict[str, Any]]], *, steps: int,
                     cpus: Sequence[int], platform: str = "cpu",
                     profile_dir: str = "") -> dict[str, dict[str, Any]]:
  """Starts the peers (label, kind, spec) one after the other (each warms up alone), then times
  `steps` steps of each in turn; JAX peers sample their matmul ceiling before, halfway and after.
  With `profile_dir` (a single JAX peer), a few more steps are then traced there.
  Returns {label: result}."""
  workers = []
  try:
    for label, kind, spec in peers:
      worker = Worker(kind, spec, cpus=cpus, label=label, platform=platform)
      workers.append(worker)
      worker.ready()
    for i in range(steps):
      if i in (0, steps // 2):
        for w in workers:
          w.send("ceiling", "CEIL")
      for w in workers:
        w.send("step", "STEP")
    for w in workers:
      w.send("ceiling", "CEIL")
    profiles = {w.label: w.send(f"profile {profile_dir}", "PROF") for w in workers} if profile_dir \
        else {}
    results = {w.label: w.finish() for w in workers}
    for label, prof in profiles.items():
      results[label]["profile"] = prof
    return results
  finally:
    for w in workers:
      if w.proc.poll() is None:
        w.proc.kill()


def _int_list(text: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 16,32")
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1, e.g. 16,32")
  return values


def _str_list(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=0,
                 help="compute threads (= pinned cores) for every peer; 0 = all available cores")
  p.add_argument("--steps", type=int, default=10,
                 help="timed calls per peer (medians; an r1jax call may run several steps)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls first (JAX: compilation)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--mem-len", type=int, default=128, help="memory length of the memory-on rows")
  p.add_argument("--base-batch", type=int, default=2, help="rows per step of the base variant run")
  p.add_argument("--base-seq-len", type=int, default=512)
  p.add_argument("--base-steps", type=int, default=2, help="timed steps of the base variant run")
  p.add_argument("--base-dtype", default="float32",
                 help="compute dtype of the CPU base run (bf16 matmuls are slower on this CPU)")
  p.add_argument("--skip-base", action="store_true", help="leave out the base variant run")
  p.add_argument("--skip-hf", action="store_true", help="leave out the PyTorch peers")
  p.add_argument("--toy", action="store_true",
                 help="tiny sizes and few steps (the smoke test); the figures mean nothing")
  p.add_argument("--gpu", action="store_true",
                 help="also run the GPU section (base variant, seq 512, bf16) when a GPU is visible")
  p.add_argument("--gpu-only", action="store_true",
                 help="run only the GPU section (implies --gpu; no CPU rows)")
  p.add_argument("--gpu-batch", type=_int_list, default=[16, 32],
                 help="GPU batch sizes to measure, comma-separated")
  p.add_argument("--gpu-attention", type=_str_list, default=["einsum", "cudnn"],
                 help="attention implementations (TransformerXLConfig.attention_impl) to measure "
                      "on the GPU, comma-separated")
  p.add_argument("--gpu-steps-per-call", type=int, default=5,
                 help="GPU steps dispatched back to back per timed sample (see R1jaxTrainer.step)")
  p.add_argument("--gpu-profile", default="",
                 help="also trace 3 steps of each GPU row under this folder and print the device "
                      "time by kernel")
  p.add_argument("--gpu-platform", default="cuda", help=argparse.SUPPRESS)  # "cpu" to test the path
  p.add_argument("--json-out", default="", help="also write the final JSON object to this file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--spec", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.toy:
    args.batch, args.seq_len, args.mem_len = 4, 16, 16
    args.base_batch, args.base_seq_len = 2, 16
    args.steps, args.warmup, args.base_steps = min(args.steps, 3), 1, 1
    args.gpu_batch = [4]
  if args.gpu_platform == "cpu":  # the CPU check of the GPU code path: no cuDNN there
    args.gpu_attention = ["sdpa" if a == "cudnn" else a for a in args.gpu_attention]
  for name in ("steps", "warmup", "batch", "seq_len", "base_batch", "base_seq_len", "base_steps",
               "gpu_steps_per_call"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
  args.cpus = choose_cpus(p, args.threads)
  args.gpu = args.gpu or args.gpu_only
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.worker:
    serve(args.worker, json.loads(args.spec))
    return {}
  size = TOY if args.toy else SMALL
  cpus = args.cpus
  sizes = (128, 256) if args.toy else (1024, 2048)
  variant = "tiny" if args.toy else "small"
  common = dict(warmup=args.warmup, steps=args.steps, batch=args.batch, seq_len=args.seq_len)

  def r1jax(mode: str, mem_len: int) -> dict[str, Any]:
    extra = dict(n_token_types=2) if mode == "mlm" else dict(attention="causal")
    return dict(common, mode=mode, variant=variant, ceiling_sizes=sizes,
                model=dict(size, dropout=DROPOUT, dropatt=DROPATT, mem_len=mem_len, **extra))

  res = dict.fromkeys(("mlm_off", "bert", "flax_bert", "mlm_on", "mlm_one", "lm", "txl"))
  ceiling = base = None
  if not args.gpu_only:
    ceiling, base = _cpu_rows(args, res, r1jax, common, size, sizes)
  gpu = run_gpu_section(args) if args.gpu else None
  summary = summary_json(args, ceiling, res, base, gpu)
  print_table(args, ceiling, res, base, gpu, summary)
  line = json.dumps(summary, sort_keys=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)
  return summary


def _cpu_rows(args, res, r1jax, common, size, sizes):
  """Fills `res` with the lockstep comparisons; returns (ceiling, base run)."""
  cpus = args.cpus
  print(f"# r1jax training throughput: {len(cpus)} threads pinned to cores {cpus}", file=sys.stderr)
  ceiling = run_once("ceiling", dict(sizes=sizes), cpus=cpus, label="matmul ceiling")
  hf = not args.skip_hf
  mlm_peers = [("mlm_off", "r1jax", r1jax("mlm", 0))]
  mlm_peers += [("bert", "hf_bert", dict(common, size=size))] if hf else []
  mlm_peers += [("flax_bert", "flax_bert", dict(common, size=size, ceiling_sizes=sizes))]
  mlm_peers += [("mlm_on", "r1jax", r1jax("mlm", args.mem_len))]
  # One optimizer step per jitted call (train.steps_per_call=1): what the CPU rows gain from n.
  mlm_peers += [("mlm_one", "r1jax", dict(r1jax("mlm", 0), engine_steps_per_call=1))]
  lm_peers = [("lm", "r1jax", r1jax("lm", args.mem_len))]
  lm_peers += [("txl", "hf_transfo_xl", dict(common, size=size, mem_len=args.mem_len))] if hf else []
  res.update(measure_lockstep(mlm_peers, steps=args.steps, cpus=cpus))
  res.update(measure_lockstep(lm_peers, steps=args.steps, cpus=cpus))

  base = None
  if not args.skip_base:
    base_model = dict(n_token_types=2, dtype=args.base_dtype)
    if args.toy:
      base_model.update(TOY, n_layer=2)
    base = measure_lockstep([("base", "r1jax", dict(
        mode="mlm", variant="tiny" if args.toy else "base", batch=args.base_batch,
        seq_len=args.base_seq_len, model=base_model, warmup=1, steps=args.base_steps,
        ceiling_sizes=sizes))], steps=args.base_steps, cpus=cpus)["base"]
  return ceiling, base


def run_gpu_section(args: argparse.Namespace) -> dict[str, Any]:
  """Base variant, sequence 512, bf16 on the first GPU; MFU vs that GPU's measured bf16 matmul.

  One row per (attention implementation, batch) in --gpu-attention x --gpu-batch, each in its own
  process; the summary quotes the row with the best MFU and names its settings.
  """
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"],
      env=_worker_env(1, args.gpu_platform), capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    print("  GPU section: no GPU visible to JAX; skipped", file=sys.stderr)
    return {"available": False}
  kind = probe.stdout.strip().splitlines()[-1]
  seq = 16 if args.toy else 512
  steps = max(args.steps, 5)
  rows = []
  for impl in args.gpu_attention:
    for batch in args.gpu_batch:
      model = dict(n_token_types=2, dtype="bfloat16", attention_impl=impl, dropatt=DROPATT)
      if args.toy:
        model.update(TOY, n_layer=2)
      label = f"gpu_{impl}_b{batch}"
      spec = dict(mode="mlm", variant="tiny" if args.toy else "base", batch=batch, seq_len=seq,
                  model=model, warmup=2, steps=steps, ceiling_dtype="bfloat16",
                  steps_per_call=args.gpu_steps_per_call, engine_steps_per_call=1,
                  ceiling_sizes=(128, 256) if args.toy else (8192, 16384))
      try:
        result = measure_lockstep([(label, "r1jax", spec)], steps=steps, cpus=args.cpus,
                                  platform=args.gpu_platform,
                                  profile_dir=(os.path.join(args.gpu_profile, label)
                                               if args.gpu_profile else ""))[label]
      except RuntimeError as e:  # e.g. cuDNN refusing a shape: report it, keep the other rows
        print(f"  {label}: failed: {e}", file=sys.stderr, flush=True)
        rows.append(dict(available=False, attention_impl=impl, batch=batch, error=str(e)[-2000:]))
        continue
      result.update(available=True, device=kind, seq_len=seq, batch=batch)
      rows.append(result)
      if "profile" in result:
        print(f"  {label} profile (ms per step): {json.dumps(result['profile'])}",
              file=sys.stderr, flush=True)
  ok = [r for r in rows if r.get("available")]
  if not ok:
    return {"available": False, "rows": rows, "device": kind}
  best = max(ok, key=lambda r: r["mfu"])
  return dict(best, rows=rows)


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
  if a is None or b is None or not b[key]:
    return None
  return a[key] / b[key]


def summary_json(args, ceiling, res, base, gpu) -> dict[str, Any]:
  """The machine-checkable figures (the script's last line)."""
  def r(x, digits=4):
    return None if x is None else round(float(x), digits)

  def get(key, field):
    return r(res[key][field]) if res[key] else None

  # The strictest denominator of the run: the highest float32 ceiling sample anywhere in it (the
  # ceiling process's best and every sample taken inside the r1jax MLM process). A matmul only
  # gets slower through noise, so this guards the MFU against one low in-process median.
  mlm = res["mlm_off"] or {}
  best = max(([ceiling["float32"]] if ceiling else []) + list(mlm.get("ceiling_samples") or []),
             default=None)
  cpu = (ceiling or {}).get("cpu") or {}
  out = {
      "cpu_model": cpu.get("model"), "cpu_vector_flags": list(cpu.get("vector_flags") or []),
      "threads": len(args.cpus), "toy": bool(args.toy), "timed_steps": args.steps,
      "batch": args.batch, "seq_len": args.seq_len, "mem_len": args.mem_len,
      "ceiling_f32_flops": r(ceiling["float32"], 0) if ceiling else None,
      "ceiling_bf16_flops": r(ceiling["bfloat16"], 0) if ceiling else None,
      "r1jax_mlm_tokens_per_s": get("mlm_off", "tokens_per_s"),
      "r1jax_mlm_mem_tokens_per_s": get("mlm_on", "tokens_per_s"),
      "r1jax_lm_mem_tokens_per_s": get("lm", "tokens_per_s"),
      "hf_bert_tokens_per_s": get("bert", "tokens_per_s"),
      "hf_transfo_xl_tokens_per_s": get("txl", "tokens_per_s"),
      "ratio_vs_hf_bert": r(_ratio(res["mlm_off"], res["bert"], "tokens_per_s")),
      "ratio_mem_on_vs_hf_bert": r(_ratio(res["mlm_on"], res["bert"], "tokens_per_s")),
      "ratio_vs_hf_transfo_xl": r(_ratio(res["lm"], res["txl"], "tokens_per_s")),
      "mfu_small": get("mlm_off", "mfu"), "mfu_small_mem": get("mlm_on", "mfu"),
      "steps_per_call": (res["mlm_off"] or {}).get("engine_steps_per_call"),
      "r1jax_mlm_one_step_per_call_tokens_per_s": get("mlm_one", "tokens_per_s"),
      "mfu_small_one_step_per_call": get("mlm_one", "mfu"),
      "ratio_one_step_per_call_vs_hf_bert": r(_ratio(res["mlm_one"], res["bert"], "tokens_per_s")),
      "peak_memory_mib_r1jax_one_step_per_call": get("mlm_one", "peak_rss_mib"),
      "flax_bert_tokens_per_s": get("flax_bert", "tokens_per_s"),
      "mfu_flax_bert": get("flax_bert", "mfu"),
      "ratio_vs_flax_bert": r(_ratio(res["mlm_off"], res["flax_bert"], "tokens_per_s")),
      "peak_memory_mib_flax_bert": get("flax_bert", "peak_rss_mib"),
      "mfu_lm": get("lm", "mfu"),
      "ceiling_f32_flops_in_r1jax_mlm": get("mlm_off", "ceiling_flops"),
      "ceiling_f32_flops_best_in_run": r(best, 0),
      "mfu_small_vs_best_ceiling": (r(mlm["achieved_flops"] / best)
                                    if best and mlm.get("achieved_flops") else None),
      "peak_memory_mib_r1jax": get("mlm_off", "peak_rss_mib"),
      "peak_memory_mib_hf_bert": get("bert", "peak_rss_mib"),
      "peak_memory_mib_r1jax_lm": get("lm", "peak_rss_mib"),
      "peak_memory_mib_hf_transfo_xl": get("txl", "peak_rss_mib"),
      "peak_memory_ratio_vs_hf_bert": r(_ratio(res["mlm_off"], res["bert"], "peak_rss_mib")),
      "peak_memory_ratio_vs_hf_transfo_xl": r(_ratio(res["lm"], res["txl"], "peak_rss_mib")),
      "compile_seconds_small": get("mlm_off", "compile_s"),
      "base_compile_seconds": r(base["compile_s"]) if base else None,
      "base_tokens_per_s": r(base["tokens_per_s"]) if base else None,
      "base_mfu": r(base["mfu"]) if base else None,
      "base_peak_memory_mib": r(base["peak_rss_mib"]) if base else None,
  }
  if gpu is not None:
    out["gpu_available"] = bool(gpu.get("available"))
    if gpu.get("available"):
      out.update(gpu_device=gpu["device"], gpu_bf16_matmul_flops=r(gpu["ceiling_flops"], 0),
                 gpu_base_mfu=r(gpu["mfu"]), gpu_base_tokens_per_s=r(gpu["tokens_per_s"]),
                 gpu_base_compile_seconds=r(gpu["compile_s"]), gpu_batch=gpu["batch"],
                 gpu_attention_impl=gpu["attention_impl"],
                 gpu_peak_device_mib=r(gpu.get("peak_device_mib")),
                 gpu_rows=[{k: (r(v) if isinstance(v, float) else v) for k, v in row.items()
                            if k in ("attention_impl", "batch", "mfu", "tokens_per_s",
                                     "peak_device_mib", "compile_s", "loss", "error")}
                           for row in gpu["rows"]])
  return out


def _row(name: str, r: dict[str, Any] | None, extra: str = "") -> str:
  if r is None:
    return f"| {name} | - | - | - | - | {extra or 'skipped'} |"
  mfu = f"{100 * r['mfu']:.0f}%" if "mfu" in r else "-"
  comp = f"{r['compile_s']:.1f} s" if "compile_s" in r else "-"
  return (f"| {name} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_rss_mib']:,.0f} MiB | {comp} |"
          f" {extra} |")


def print_table(args, ceiling, res, base, gpu, summary) -> None:
  size = TOY if args.toy else SMALL
  b, q, m = args.batch, args.seq_len, args.mem_len

  def vs(key, what):
    v = summary.get(key)
    return f"{v:.2f}x {what}" if v is not None else ""
  print("\n| run | tokens/s | MFU | peak memory | compile | r1jax / peer |")
  print("|---|---:|---:|---:|---:|---|")
  if ceiling:
    print(_row("r1jax MLM+NSP, memory off", res["mlm_off"],
               f"{vs('ratio_vs_hf_bert', 'tokens/s')}, "
               f"{vs('peak_memory_ratio_vs_hf_bert', 'memory')}".strip(", ")))
    print(_row("HF PyTorch BertForPreTraining", res["bert"]))
    print(_row("plain Flax BERT (MLM logits at every position; reference)", res["flax_bert"],
               f"r1jax {vs('ratio_vs_flax_bert', 'tokens/s')}".strip()))
    print(_row(f"r1jax MLM+NSP, memory on (mem_len {m})", res["mlm_on"],
               vs("ratio_mem_on_vs_hf_bert", "HF BERT tokens/s")))
    print(_row("r1jax MLM+NSP, memory off, one step per call", res["mlm_one"],
               vs("ratio_one_step_per_call_vs_hf_bert", "HF BERT tokens/s")))
    print(_row(f"r1jax causal LM, mem_len {m}", res["lm"],
               f"{vs('ratio_vs_hf_transfo_xl', 'tokens/s')}, "
               f"{vs('peak_memory_ratio_vs_hf_transfo_xl', 'memory')}".strip(", ")))
    print(_row(f"HF PyTorch TransfoXLLMHeadModel, mem_len {m}", res["txl"]))
    if base:
      print(_row(f"r1jax base variant ({base['dtype']}), batch {args.base_batch}, sequence "
                 f"{args.base_seq_len}", base,
                 f"{args.base_steps} timed calls of {base['engine_steps_per_call']} steps"))
  if gpu and gpu.get("available"):
    for row in gpu["rows"]:
      name = (f"GPU {gpu['device']}: base, bfloat16, {row['attention_impl']} attention, batch "
              f"{row['batch']}, sequence {gpu['seq_len']}")
      if not row.get("available"):
        print(_row(name, None, f"failed: {row['error'].splitlines()[-1][:150]}"))
        continue
      mem = (f"; device peak {row['peak_device_mib']:,.0f} MiB" if "peak_device_mib" in row
             else "")
      print(_row(name, row, f"MFU vs measured bf16 matmul {row['ceiling_flops'] / 1e12:,.0f} "
                 f"TFLOP/s{mem}"))
  elif gpu is not None and gpu.get("rows"):
    for row in gpu["rows"]:
      print(_row(f"GPU {gpu['device']}: {row['attention_impl']} attention, batch {row['batch']}",
                 None, f"failed: {row['error'].splitlines()[-1][:150]}"))
  elif gpu is not None:
    print(_row("GPU section", None, "no GPU visible: skipped"))
  print()
  if ceiling:
    sizes = "128, 256" if args.toy else "1024, 2048"
    cpu = ceiling["cpu"]
    # The ratios move with the CPU model and its vector units: every table names its machine.
    print(f"CPU: {cpu['model']}, {cpu['logical_cpus']} logical CPUs; vector extensions: "
          f"{' '.join(cpu['vector_flags']) or 'none reported'}.")
    print(f"CPU rows: {len(args.cpus)} threads for every peer, float32, batch {b}, sequence {q}, "
          f"d_model {size['d_model']}, {size['n_layer']} layers, {size['n_head']} heads, vocab "
          f"{size['vocab_size']}, dropout {DROPOUT}; medians of {args.steps} timed calls per peer, "
          f"peers alternating call by call, after {args.warmup} warm-up calls. Matmul ceiling "
          f"through JAX (best of n = {sizes}): float32 {ceiling['float32'] / 1e9:,.0f} GFLOP/s, "
          f"bfloat16 {ceiling['bfloat16'] / 1e9:,.0f} GFLOP/s. MFU: model training FLOPs / the "
          "float32 ceiling sampled in the same process (r1jax MLM memory-off process: "
          f"{res['mlm_off']['ceiling_flops'] / 1e9:,.0f} GFLOP/s, the median of its samples; "
          "against the run's highest float32 sample, "
          f"{summary['ceiling_f32_flops_best_in_run'] / 1e9:,.0f} GFLOP/s, its MFU is "
          f"{summary['mfu_small_vs_best_ceiling']:.1%}). Peak memory: ru_maxrss minus "
          "the resident set after imports, per process. r1jax rows run "
          f"{summary['steps_per_call']} optimizer steps per jitted call (train.steps_per_call's "
          "automatic choice for configs/pretrain.py on CPU) except the one-step-per-call row; "
          "host allocator: glibc defaults.\n", flush=True)


if __name__ == "__main__":
  main()
