"""The train/eval steps and the engine every training stage shares.

A stage plugs in a loss function (`r1jax.model.losses.LossFn`, where the contract and every loss
live) and reuses everything else:

    loss_fn(params, batch, extras, rng, deterministic) -> (loss, (metrics, new_extras))

Metrics are {name: (sum, count)} float32 scalars (`losses.metric`); `add_metrics` sums them over
steps and micro-batches, and the host divides (`normalize`), so averages are exact.

`train_step`/`eval_step` are pure module-level functions; `Engine` jits them once with explicit
in/out shardings and donates the state. Nothing in a step syncs with the host: the NaN/inf check is
a flag in the metrics (the update is not applied when it is set), read on the host at log time.
"""
from __future__ import annotations

import functools
import os
import platform as platform_lib
from typing import Any, Callable, Mapping, Sequence

from flax import traverse_util
from flax.core import meta
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from r1jax.data import grain_ops
from r1jax.model import losses
from r1jax.model.losses import LossFn
from r1jax.train import mesh as mesh_lib
from r1jax.train import optim
from r1jax.train import state as state_lib
from r1jax.train.state import TrainState


def add_metrics(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.add, a, b)


def normalize(metrics: Mapping[str, Sequence[Any]]) -> dict[str, float]:
  """Host side: {name: (sum, count)} -> {name: sum / count} as Python floats."""
  out = {}
  for name, (total, count) in metrics.items():
    count = float(count)
    out[name] = float(total) / count if count else float("nan")
  return out


# ------------------------------------------------------------------------------------------------
# Steps.


def split_rows(tree: Any, k: int) -> Any:
  """[B, ...] -> [k, B/k, ...] with micro-batch m = rows m, m+k, m+2k, ... (so each device keeps
  its own rows: the batch axis stays split the same way)."""
  def one(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.moveaxis(x, 1, 0)
  return jax.tree.map(one, tree)


def merge_rows(tree: Any) -> Any:
  """Inverse of split_rows: [k, B/k, ...] -> [B, ...]."""
  def one(x):
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return jax.tree.map(one, tree)


def _where(cond: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, loss_fn: LossFn,
               tx: optax.GradientTransformation, accum_steps: int = 1,
               lr_schedule: optax.Schedule | None = None) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step (gradients averaged over `accum_steps` micro-batches of the rows).

  A step whose loss or gradient norm is NaN/inf is not applied (params, optimizer state and extras
  stay as they were) and reports `nonfinite` = 1; the host decides to stop or to count a skip.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(batch_m, extras_m, rng_m):
    (loss, (metrics, new_extras)), grads = grad_fn(state.params, batch_m, extras_m, rng_m, False)
    return grads, dict(metrics, loss=losses.metric(loss)), new_extras

  if accum_steps == 1:
    grads, metrics, new_extras = micro(batch, state.extras, rng)
  else:
    batches = split_rows(batch, accum_steps)
    extras = split_rows(state.extras, accum_steps)
    rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(accum_steps))
    first = jax.tree.map(lambda x: x[0], (batches, extras, rngs))
    shapes = jax.eval_shape(micro, *first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:2])

    def body(carry, xs):
      grads_m, metrics_m, extras_m = micro(*xs)
      return add_metrics(carry, (grads_m, metrics_m)), extras_m
    (grads, metrics), new_extras = jax.lax.scan(body, zeros, (batches, extras, rngs))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    new_extras = merge_rows(new_extras)

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm)

  def apply(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, new_extras

  def skip(_):
    return state.params, state.opt_state, state.extras

  if jax.default_backend() == "gpu":
    # An XLA:GPU conditional reads its predicate on the host: a sync inside the step.
    params, opt_state, extras = _where(finite, apply(None), skip(None))
  else:
    # XLA:CPU copies every parameter and moment for the select form (the old and new values are
    # both live; bench/NOTES.md 'Kernel notes'); the conditional updates them in place.
    params, opt_state, extras = jax.lax.cond(finite, apply, skip, None)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, extras=extras,
      nonfinite_skips=state.nonfinite_skips + (~finite).astype(jnp.int32))
  metrics = dict(metrics, grad_norm=losses.metric(grad_norm),
                 nonfinite=losses.metric((~finite).astype(jnp.float32)))
  if lr_schedule is not None:  # the rate this step used: the schedule's, times any lowering
    metrics["learning_rate"] = losses.metric(lr_schedule(state.step) *
                                             optim.lr_factor(state.opt_state))
  return new_state, metrics


def train_steps(state: TrainState, batches: Mapping[str, jax.Array], **step_kwargs: Any
                ) -> tuple[TrainState, dict[str, Any]]:
  """`n` optimizer steps in one call: `train_step` under `lax.scan` over stacked batches.

  Args:
    state: as for `train_step`.
    batches: n steps' batches, every leaf stacked `[n, B, ...]`.
    **step_kwargs: `train_step`'s keyword arguments.
  Returns:
    the state after the n steps and every step's metrics, each leaf stacked `[n]`. The steps are
    exactly n `train_step` calls (each step's rng folds in its own step number), so results match
    up to float rounding. One call allocates XLA's scratch buffer once for all n steps: on XLA:CPU,
    where that buffer is mapped and page-faulted afresh at every execution, this saves a good
    part of a small model's step (bench/NOTES.md, change 20).
  """
  return jax.lax.scan(lambda s, b: train_step(s, b, **step_kwargs), state, batches)


def eval_step(params: Any, extras: Any, batch: Mapping[str, jax.Array], *,
              loss_fn: LossFn) -> tuple[dict[str, Any], Any]:
  """Deterministic loss and metrics on one batch; returns (metrics, new_extras)."""
  loss, (metrics, new_extras) = loss_fn(params, batch, extras, jax.random.PRNGKey(0), True)
  return dict(metrics, loss=losses.metric(loss)), new_extras


# ------------------------------------------------------------------------------------------------
# Engine: the jitted, sharded steps for one (model, loss, optimizer, mesh).


# The SIMD and matrix extensions a CPU step's speed depends on (x86 /proc/cpuinfo "flags", Arm
# "Features"), in the order a report lists them.
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
                "asimd", "sve", "sve2", "bf16", "i8mm")


@functools.cache
def host_cpu() -> dict[str, Any]:
  """{"model", "vector_flags" (those of VECTOR_FLAGS it has), "logical_cpus"} of this machine's
  CPU: what CPU throughput figures depend on. From /proc/cpuinfo (Linux); elsewhere the model from
  `platform` and no flags."""
  model, flags = "", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model") and not model:
          model = value
        elif key in ("flags", "Features") and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return {"model": model or platform_lib.processor() or platform_lib.machine(),
          "vector_flags": tuple(f for f in VECTOR_FLAGS if f in flags),
          "logical_cpus": os.cpu_count()}


def _cpu_has_avx512() -> bool:
  return "avx512f" in host_cpu()["vector_flags"]


def compiler_options(platform: str | None = None) -> dict[str, Any]:
  """XLA options the engine compiles its train and eval steps with on this platform.

  On a CPU with AVX-512: loops vectorised 512 bits wide (XLA prefers 256 by default, for CPUs
  that lower their clock on 512-bit code) and the concurrency-optimized scheduler (independent ops
  ordered so that more of them run side by side): faster for the small MLM step on a 2-core
  Zen 5 (bench/NOTES.md, change 33). Elsewhere none: not measured there.
  """
  if (platform or jax.default_backend()) == "cpu" and _cpu_has_avx512():
    return {"xla_cpu_prefer_vector_width": 512,
            "xla_cpu_enable_concurrency_optimized_scheduler": True}
  return {}


class Engine:
  """Owns the mesh, the shardings and the compiled steps; shared by every training stage.

      engine = Engine(mesh=mesh, rules=rules, loss_fn=loss_fn, tx=tx, init_params=init_params,
                      init_extras=init_extras, batch_size=B)
      state = engine.init_state(jax.random.PRNGKey(seed))
      state, metrics = engine.train_step(state, local_batch)       # dispatch only, no host sync
      state, metrics = engine.train_steps(state, local_batches)    # steps_per_call steps, one call
      totals = engine.evaluate(state.params, batches)               # {name: value}, one host sync

  With `length_buckets=n` (batches with a `token_mask [B, Q]`), `trim` cuts a batch, or a call's
  batches together, to the smallest of n widths (multiples of Q/n) that holds the longest row, the
  same width on every process: a batch of short texts does not pay for Q positions, and each width
  compiles once. The training loop trims what it feeds; `evaluate` trims each batch. The loss must
  not depend on Q (a classifier's does not).
  """

  SEQUENCE_KEYS = ("tokens", "token_mask", "token_types")  # the keys with a position axis

  def __init__(self, *, mesh: Mesh, rules: Sequence[tuple[str, Any]], loss_fn: LossFn,
               tx: optax.GradientTransformation, init_params: Callable[[jax.Array], Any],
               init_extras: Callable[[], Any], batch_size: int, accum_steps: int = 1,
               lr_schedule: optax.Schedule | None = None, eval_loss_fn: LossFn | None = None,
               steps_per_call: int = 1, length_buckets: int = 0):
    if steps_per_call < 1:
      raise ValueError(f"steps_per_call={steps_per_call}: need >= 1 optimizer steps per call "
                       f"(train.steps_per_call = 0 picks it automatically).")
    self.mesh = mesh
    self.steps_per_call = steps_per_call
    self.length_buckets = length_buckets
    self.rules = tuple(rules)
    self.tx = tx
    self.lr_schedule = lr_schedule
    self.batch_size = batch_size
    self._init_params = init_params
    init = state_lib.init_state_fn(init_params, tx, init_extras)
    abstract, self.state_shardings = state_lib.abstract_state(init, mesh, self.rules, batch_size)
    self._abstract = abstract
    self._init = state_lib.sharded_init(init, self.state_shardings)
    bad = [x.shape for x in jax.tree.leaves(abstract.extras)
           if accum_steps > 1 and (x.ndim == 0 or x.shape[0] != batch_size)]
    if bad:
      raise ValueError(f"grad_accum_steps={accum_steps} needs every extras leaf to be per-row "
                       f"[{batch_size}, ...]; got shapes {bad}.")
    batch_sh = mesh_lib.batch_sharding(mesh)
    rep = mesh_lib.replicated(mesh)
    sh = self.state_shardings
    step_kwargs = dict(loss_fn=loss_fn, tx=tx, accum_steps=accum_steps, lr_schedule=lr_schedule)
    options = compiler_options()
    self._train = jax.jit(functools.partial(train_step, **step_kwargs),
                          in_shardings=(sh, batch_sh), out_shardings=(sh, rep), donate_argnums=(0,),
                          compiler_options=options)
    self._train_many = jax.jit(
        functools.partial(train_steps, **step_kwargs),
        in_shardings=(sh, mesh_lib.batch_sharding(mesh, stacked=True)), out_shardings=(sh, rep),
        donate_argnums=(0,), compiler_options=options)
    self._eval = jax.jit(
        functools.partial(eval_step, loss_fn=eval_loss_fn or loss_fn),
        in_shardings=(sh.params, sh.extras, batch_sh), out_shardings=(rep, sh.extras),
        compiler_options=options)
    self._new_extras = jax.jit(init_extras, out_shardings=sh.extras)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings for every state leaf (a restore target)."""
    return self._abstract

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state, every leaf created directly in its sharding."""
    with mesh_lib.mesh_context(self.mesh, self.rules):
      return self._init(rng)

  def init_state_from(self, rng: jax.Array, restored: Mapping[str, Any]) -> TrainState:
    """`init_state(rng)` with the parameters in `restored` (a partial params tree, e.g.
    {"backbone": ...} restored from a pretraining checkpoint) in place of their initial values.
    Only the other parameters are initialised, with the values `init_state(rng)` gives them, so
    only their init compiles (XLA drops the rest): a pretrained model's full init took 30-40 s to
    compile on the loaded 2-core CPU, to be thrown away (bench/NOTES_auto_schedule.md)."""
    keep = traverse_util.flatten_dict(restored)
    params_rng, _ = jax.random.split(rng)  # as state_lib.init_state_fn splits it

    def fresh(r):
      flat = traverse_util.flatten_dict(meta.unbox(self._init_params(r)))
      return {k: v for k, v in flat.items() if k not in keep}

    missing = set(traverse_util.flatten_dict(self._abstract.params)) - set(keep)
    with mesh_lib.mesh_context(self.mesh, self.rules):
      new = jax.jit(fresh)(params_rng) if missing else {}
    return self.state_from_params(traverse_util.unflatten_dict({**new, **keep}), rng)

  def state_from_params(self, params: Any, rng: jax.Array) -> TrainState:
    """A fresh state (step 0, new optimizer state and extras) around existing sharded `params`:
    `init_state` would also initialise (and compile the init of) parameters only to replace them."""
    sh = self.state_shardings
    opt_state = jax.jit(self.tx.init, out_shardings=sh.opt_state)(params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       rng=jax.random.split(rng)[1], extras=self.new_extras(),
                       nonfinite_skips=jnp.zeros((), jnp.int32))
    expected = jax.tree.structure(self._abstract)
    if jax.tree.structure(state) != expected:
      raise AssertionError(f"train state structure {jax.tree.structure(state)} differs from the "
                           f"engine's {expected}")
    return jax.device_put(state, sh)

  def learning_rate(self, state: TrainState) -> float | None:
    """The learning rate `state`'s next step uses (the logged schedule times the optimizer's
    learning-rate factor, `optim.lr_factor`); None without a schedule."""
    if self.lr_schedule is None:
      return None
    return float(jax.device_get(self.lr_schedule(state.step) * optim.lr_factor(state.opt_state)))

  def new_extras(self) -> Any:
    with mesh_lib.mesh_context(self.mesh, self.rules):
      return self._new_extras()

  def trim(self, local_batches: Sequence[Mapping[str, np.ndarray]]
           ) -> list[Mapping[str, np.ndarray]]:
    """`local_batches` cut to one bucket width (`length_buckets`; unchanged when it is 0)."""
    if not self.length_buckets or "token_mask" not in local_batches[0]:
      return list(local_batches)
    width = np.asarray(local_batches[0]["token_mask"]).shape[-1]
    longest = max(int(np.asarray(b["token_mask"]).sum(-1).max(initial=0)) for b in local_batches)
    if jax.process_count() > 1:  # every process must compile and feed the same shape
      longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    length = grain_ops.bucket_length(longest, width, self.length_buckets,
                                     grain_ops.MIN_BUCKET_STRIDE)
    if length == width:
      return list(local_batches)
    return [grain_ops.trim_to_length(b, length, self.SEQUENCE_KEYS) for b in local_batches]

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return mesh_lib.global_batch(dict(local_batch), self.mesh)

  def train_step(self, state: TrainState, local_batch: Mapping[str, np.ndarray]
                 ) -> tuple[TrainState, dict[str, Any]]:
    batch = self.shard_batch(local_batch)
    with mesh_lib.mesh_context(self.mesh, self.rules):
      return self._train(state, batch)

  def train_steps(self, state: TrainState, local_batches: Sequence[Mapping[str, np.ndarray]]
                  ) -> tuple[TrainState, dict[str, Any]]:
    """len(local_batches) steps in one jitted call (`train_steps`); metrics stacked `[n]`.

    Each distinct n compiles once; the training loop only uses n = `steps_per_call`.
    """
    if not local_batches:
      raise ValueError("train_steps() got no batches.")
    stacked = {k: np.stack([np.asarray(b[k]) for b in local_batches])
               for k in local_batches[0]}
    batches = mesh_lib.global_batch(stacked, self.mesh, stacked=True)
    with mesh_lib.mesh_context(self.mesh, self.rules):
      return self._train_many(state, batches)

  def eval_step(self, params: Any, extras: Any, local_batch: Mapping[str, np.ndarray]
                ) -> tuple[dict[str, Any], Any]:
    batch = self.shard_batch(local_batch)
    with mesh_lib.mesh_context(self.mesh, self.rules):
      return self._eval(params, extras, batch)

  def evaluate(self, params: Any, batches: Any) -> dict[str, float]:
    """Sums metrics over `batches` (local numpy batches) from fresh extras; one host fetch."""
    extras = self.new_extras()
    totals = None
    for batch in batches:
      metrics, extras = self.eval_step(params, extras, self.trim([batch])[0])
      totals = metrics if totals is None else add_metrics(totals, metrics)
    if totals is None:
      raise ValueError("evaluate() got no batches; check the eval data and eval.num_batches.")
    return normalize(jax.device_get(totals))


def tokens_in(batch: Mapping[str, np.ndarray]) -> int:
  """Real tokens in a local batch: token_mask sum, else tokens size, else the number of rows."""
  if "token_mask" in batch:
    return int(np.asarray(batch["token_mask"]).sum())
  if "tokens" in batch:
    return int(np.asarray(batch["tokens"]).size)
  return int(np.shape(next(iter(batch.values())))[0])




