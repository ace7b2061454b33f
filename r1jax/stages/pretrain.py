"""Pretraining stage: MLM + NSP (+ knowledge) on a streamed corpus, with Transformer-XL memory.

    python -m r1jax.main --config=configs/pretrain.py:variant=tiny --workdir=DIR

`run(config, workdir)` validates the config (before anything is compiled), takes the workdir lock,
prepares the tokenizer (DIR/tokenizer.model: kept from an earlier attempt, copied from
`data.tokenizer` or `init_from`, or trained on the training documents), builds the model, the mesh
and the engine, restores the newest good checkpoint (or initialises, from `init_from`'s parameters
for domain-adaptive pretraining), trains with periodic held-out eval and checkpoints, and writes
DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/, DIR/summary.json.

Held-out data: every `data.eval_every_nth_doc`-th document of the corpus (by position, so the split
does not move with the seed) is kept out of training and streamed the same way for eval.

Input (`data.input`, see `open_corpus`): the data stage's tokenized shards (DIR/data/tokenized,
found from data.corpus=DIR/data/clean or named directly), streamed from ArrayRecord without
tokenizing, each process reading only its rows' documents; or the texts, read into memory and
tokenized as rows need them. Both give the same batches; one log line says which was used and why.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from typing import Any, Callable, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r1jax import configlib
from r1jax import errors
from r1jax import remote
from r1jax import run_dir
from r1jax.data import builtin
from r1jax.data import doc_order
from r1jax.data import pretraining
from r1jax.data import shards
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl
from r1jax.train import checkpoint as ckpt_lib
from r1jax.train import loop as loop_lib
from r1jax.train import mesh as mesh_lib
from r1jax.train import metrics as metrics_lib
from r1jax.train import optim
from r1jax.train import schedule as schedule_lib
from r1jax.train import steps as steps_lib



def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int | None = None) -> configlib.Validator:
  """All checks that need no data or compilation; raises ConfigError naming each bad key."""
  def extra(v: configlib.Validator) -> None:
    v.stage("pretrain")
    try:
      vocab = model_config(config).vocab_size
    except (ValueError, TypeError) as e:
      v.add("model", str(e))
    else:
      smallest = tokenizer_lib.NUM_SPECIAL + 256 + 2
      if not config.data.get("tokenizer") and not config.get("init_from") and vocab < smallest:
        v.add("model.vocab_size", f"{vocab} is too small to train the tokenizer (5 specials + 256 "
              f"byte pieces + at least 1 more = {smallest}); raise it or name one with "
              f"data.tokenizer.")
    v.int_at_least("data.seq_len", 8, allow=(-1,))
    v.number_in("data.mlm_prob", 0.0, 1.0, low_open=True, high_open=True)
    v.int_at_least("data.max_predictions", 1, allow=(-1,))
    v.boolean("data.whole_word")
    v.boolean("data.nsp")
    if v.boolean("data.pack") and config.data.get("nsp"):
      v.add("data.pack", "True needs data.nsp=False (a packed row holds several documents, so "
            "there are no next-segment pairs); set --config.data.nsp=False.")
    v.string("data.corpus")
    v.choice("data.input", INPUTS)
    v.choice("data.tokenizer_type", tokenizer_lib.MODEL_TYPES)
    tok = v.string("data.tokenizer")
    if tok:
      v.require(os.path.isfile(os.path.expanduser(tok)), "data.tokenizer",
                f"{tok!r} is not a file; name a tokenizer.model or '' to train one.")
    kg = v.string("data.knowledge_file")
    if kg and kg != "builtin":
      v.require(os.path.isfile(os.path.expanduser(kg)), "data.knowledge_file",
                f"{kg!r} is not a file; name an entity/triple TSV, 'builtin', or ''.")
    v.int_at_least("data.kg_seq_len", 8)
    v.number_in("data.kg_weight", 0.0, 1e3)
    v.int_at_least("data.eval_every_nth_doc", 2)
    workers = v.int_at_least("data.worker_count", 0)
    batch = config.train.get("batch_size")
    groups = v.int_at_least("data.row_groups", 1)
    if groups and isinstance(batch, int) and batch > 0 and batch % groups:
      v.add("data.row_groups", f"{groups} does not divide train.batch_size={batch} (each group is "
            "a block of whole rows); use a divisor of it, e.g. the process count.")
    if workers and isinstance(batch, int) and batch > 0 and (batch // v.process_count) % workers:
      v.add("data.worker_count", f"{workers} does not divide the per-process batch "
            f"{batch // v.process_count} (each worker builds a fixed subset of its rows); use a "
            f"divisor of it, or 0.")
    seq_len = seq_len_of(config)
    max_pred = config.data.get("max_predictions", -1)
    if isinstance(max_pred, int) and seq_len and max_pred > seq_len:
      v.add("data.max_predictions", f"{max_pred} exceeds data.seq_len={seq_len}.")
  return configlib.validate_training(config, num_devices=num_devices, process_count=process_count,
                                     extra=extra)


def seq_len_of(config: ml_collections.ConfigDict) -> int:
  seq_len = config.data.get("seq_len", -1)
  if seq_len == -1:
    return txl.SEGMENT_LEN.get(config.model.variant, 0)
  return seq_len


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None
                 ) -> txl.TransformerXLConfig:
  """The TransformerXLConfig: variant + overrides, then init_from's architecture fields the
  config does not set (continued pretraining keeps the model it starts from); segment types on
  for NSP pairs."""
  pretrained = None
  source = os.path.expanduser(config.get("init_from") or "")
  if source and os.path.isdir(os.path.join(source, run_dir.CHECKPOINTS_DIR)):
    pretrained = run_dir.architecture_of(source)
  overrides = configlib.model_overrides(config.model, pretrained)
  if config.data.get("nsp", True) and "n_token_types" not in overrides:
    overrides["n_token_types"] = 2
  if vocab_size is not None:
    overrides["vocab_size"] = vocab_size
  return txl.get_variant(config.model.variant, **overrides)


def knowledge_path(config: ml_collections.ConfigDict) -> str | None:
  path = config.data.knowledge_file
  if not path:
    return None
  if path == "builtin":
    return builtin.path("knowledge")
  return os.path.expanduser(path)


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                      train_texts: list[str] | None, default_source: str = ""
                      ) -> tokenizer_lib.Tokenizer:
  """DIR/tokenizer.model: kept if present, else copied (data.tokenizer, init_from, else
  `default_source`: the tokenized shards' tokenizer) or trained on `train_texts`."""
  source = config.data.tokenizer or ""
  if not source and config.init_from:
    source = run_dir.tokenizer_of(config.init_from)
  source = source or default_source

  def train() -> tokenizer_lib.Tokenizer:
    vocab = model_config(config).vocab_size
    logging.info("Training a %s tokenizer (vocab_size %d at most) on %d documents.",
                 config.data.tokenizer_type, vocab, len(train_texts))
    return tokenizer_lib.Tokenizer.train(train_texts, vocab, model_type=config.data.tokenizer_type)
  return run_dir.provide_tokenizer(workdir, source=source, train=train)


def estimate_steps_per_epoch(token_counts: Iterable[np.ndarray], *, seq_len: int,
                             batch_size: int, nsp: bool, pack: bool = False) -> int:
  """Steps for one pass over documents of these token counts (arrays, e.g. one per shard): each
  row takes one document at a time, ~0.75 (NSP: a true pair consumes A and B, a random pair only
  A) or all of its seq_len - 2 content slots per step; packed rows fill those slots with documents
  and one separator after each."""
  per_step = 0.75 * (seq_len - 3) if nsp else seq_len - 2
  slots = row_steps = 0
  for counts in token_counts:
    counts = np.asarray(counts, np.int64)
    slots += int((counts + 1).sum())
    row_steps += int(np.maximum(1, np.ceil(counts / per_step)).sum())
  if pack:
    return max(1, math.ceil(slots / (seq_len - 2) / batch_size))
  return max(1, math.ceil(row_steps / batch_size))


INPUTS = ("auto", "shards", "memory")


@dataclasses.dataclass(frozen=True)
class Corpus:
  """What pretraining reads: the training and held-out documents (texts, or views of tokenized
  shards), the run's tokenizer, and which input was chosen ("shards" | "memory")."""
  train: Any
  held_out: Any
  tokenizer: tokenizer_lib.Tokenizer
  input: str

  def token_counts(self) -> Iterable[np.ndarray]:
    """The training documents' lengths in tokens (read from the shards, or tokenized now)."""
    if self.input == "shards":
      return self.train.token_counts()
    return [np.asarray([len(ids) for ids in self.tokenizer.sp.encode(self.train)])]


def _split(docs, every: int, spec: str):
  train, held = pretraining.split_documents(docs, every)
  if len(train) < 2 or not len(held):
    raise errors.BadInput(f"data.corpus={spec!r} has {len(docs)} documents; need enough for a "
                          f"training set and every {every}-th as held-out.")
  return train, held


def open_corpus(config: ml_collections.ConfigDict, workdir: str) -> Corpus:
  """The corpus, split, with the run's tokenizer (DIR/tokenizer.model, see prepare_tokenizer).

  data.input=auto streams tokenized shards when data.corpus has them (DIR/data/tokenized, or
  DIR/data/clean beside it), no knowledge file is used (entity mentions are found in the text)
  and the run's tokenizer is the one they were made with; "shards" requires all that and says
  what is missing; "memory" always reads the texts. A damaged shard or manifest is an error in
  both auto and shards modes (the fix: rerun the data stage, or data.input=memory).
  """
  d = config.data
  every = d.eval_every_nth_doc
  manifest = shards.find_manifest(d.corpus)
  if manifest is None and d.input == "shards":
    raise errors.InputNotFound(
        f"data.input=shards, but data.corpus={d.corpus!r} has no tokenized shards (the data "
        "stage's DIR/data/tokenized/manifest.json, found from DIR/data/clean or named directly). "
        "Run the data stage with shards.enabled=True, or set --config.data.input=auto.")
  text_spec, tokenized, tokenizer_default = d.corpus, None, ""
  if manifest is not None:
    tokenizer_default = shards.tokenizer_file(manifest)
    named, where = str(d.corpus).strip().rstrip("/"), manifest
    if not remote.is_remote(named):
      named, where = os.path.abspath(os.path.expanduser(named)), os.path.abspath(manifest)
    if named in (os.path.dirname(where), where):
      text_spec = shards.source_of(manifest)  # the corpus names the shards: texts are their source
    if d.input != "memory":
      tokenized = shards.TokenizedCorpus(manifest)

  if d.input == "memory":
    why = "data.input=memory"
  elif tokenized is None:
    why = f"no tokenized shards at data.corpus={d.corpus!r}"
  elif knowledge_path(config):
    why = "data.knowledge_file finds entity mentions in the text, which the shards do not keep"
    if d.input == "shards":
      raise errors.BadInput(f"data.input=shards cannot be used with data.knowledge_file: {why}. "
                            "Set --config.data.input=memory.")
  else:
    tok = prepare_tokenizer(config, workdir, None, default_source=tokenizer_default)
    if d.input == "shards":
      tokenized.check_tokenizer(tok, os.path.join(workdir, run_dir.TOKENIZER_FILE))
    if shards.tokenizer_sha256(tok) == tokenized.tokenizer_sha256:
      train, held = _split(tokenized, every, d.corpus)
      p, n, groups = jax.process_index(), jax.process_count(), d.get("row_groups", 1)
      if tokenized.remote and groups % n:
        logging.warning("data.row_groups=%d is not a multiple of the %d processes: each process "
                        "reads from most of the corpus and copies most of its shards; "
                        "--config.data.row_groups=%d copies only its part.", groups, n, n)
      tokenized.fetch(doc_order.records_read(
          [train, held], batch_size=config.train.batch_size, row_groups=groups,
          process_index=p, process_count=n), who=f"process {p} of {n}")
      logging.info("Pretraining input: tokenized shards %s (%d documents, %d tokens); no "
                   "tokenizing at start, each process reads only its rows' documents.",
                   tokenized.directory, len(tokenized), tokenized.num_tokens)
      return Corpus(train, held, tok, "shards")
    why = (f"the tokenized shards in {tokenized.directory} were made with another tokenizer "
           f"than this run's ({tokenized.tokenizer_path})")
  texts = pretraining.resolve_texts(text_spec)
  train, held = _split(texts, every, d.corpus)
  tok = prepare_tokenizer(config, workdir, train, default_source=tokenizer_default)
  logging.info("Pretraining input: texts in memory (%d documents, tokenized as rows need them): "
               "%s.", len(texts), why)
  return Corpus(train, held, tok, "memory")


def _batches(config, texts, tok, *, seq_len, seed, knowledge):
  d = config.data
  return pretraining.pretrain_iterator(
      texts, tok, seq_len=seq_len, batch_size=config.train.batch_size, seed=seed,
      mlm_prob=d.mlm_prob, max_predictions=None if d.max_predictions == -1 else d.max_predictions,
      whole_word=d.whole_word, nsp=d.nsp, pack=d.get("pack", False), knowledge_path=knowledge,
      kg_seq_len=d.kg_seq_len, row_groups=d.get("row_groups", 1),
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=d.worker_count)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_eval: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
  """Runs (or resumes, or returns the summary of a finished) pretraining in `workdir`.

  `on_eval(step, eval_metrics)` is called after each held-out eval; returning True stops the run
  early (`loop.fit`'s hook, e.g. an optuna pruner)."""
  validate(config)
  return run_dir.run_once(config, workdir, lambda c, w: _run(c, w, on_eval))


def _run(config: ml_collections.ConfigDict, workdir: str,
         on_eval: Callable[[int, dict[str, float]], bool] | None) -> dict[str, Any]:
  started = time.time()
  seq_len = seq_len_of(config)
  corpus = open_corpus(config, workdir)
  train_texts, eval_texts, tok = corpus.train, corpus.held_out, corpus.tokenizer
  mcfg = model_config(config, vocab_size=tok.vocab_size)
  knowledge = knowledge_path(config)
  model = heads.PretrainModel(mcfg, num_kg_labels=2 if knowledge else 0)
  batch_size = config.train.batch_size

  num_steps = config.train.num_steps
  steps_per_epoch = None
  if num_steps == -1:
    steps_per_epoch = estimate_steps_per_epoch(corpus.token_counts(), seq_len=seq_len,
                                               batch_size=batch_size, nsp=config.data.nsp,
                                               pack=config.data.get("pack", False))
    num_steps = max(1, int(round(config.train.num_epochs * steps_per_epoch)))
    logging.info("num_steps=%d (%.2f epochs x ~%d steps/epoch)", num_steps,
                 config.train.num_epochs, steps_per_epoch)

  def init_params(rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = model.init({"params": rng}, tokens, token_types=(
        jnp.zeros_like(tokens) if mcfg.n_token_types else None))
    return variables["params"]

  abstract_params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  mesh = mesh_lib.make_mesh(config.mesh)

  def make_engine(steps: int) -> steps_lib.Engine:
    return loop_lib.engine_for(
        config, mesh=mesh, num_steps=steps, init_params=init_params,
        tx=optim.build_optimizer(config.train, abstract_params, num_steps=steps,
                                 adjustable_lr=schedule_lib.lowers_lr(on_eval)),
        loss_fn=losses.pretrain_loss_fn(model, label_smoothing=config.train.label_smoothing,
                                        kg_weight=config.data.kg_weight, nsp=config.data.nsp),
        init_extras=lambda: {"memory": txl.init_memory(mcfg, batch_size)})

  engine = make_engine(num_steps)

  def step_rate() -> float:
    probe = _batches(config, train_texts, tok, seq_len=seq_len, seed=config.seed + 1,
                     knowledge=knowledge)
    return loop_lib.measure_step_rate(engine, engine.init_state(jax.random.PRNGKey(0)), probe)

  planned = num_steps
  num_steps, budget = loop_lib.budget_steps(config, workdir, num_steps, step_rate, started)
  if num_steps != planned:
    engine = make_engine(num_steps)

  def init_state():
    rng = jax.random.PRNGKey(config.seed)
    if not config.init_from:
      return engine.init_state(rng)
    params, step = ckpt_lib.restore_params(os.path.expanduser(config.init_from),
                                           engine.abstract_state().params)
    logging.info("Initialised parameters from %s (step %d).", config.init_from, step)
    return engine.init_state_from(rng, params)  # every parameter restored: no init compiled

  train_iter = _batches(config, train_texts, tok, seq_len=seq_len, seed=config.seed,
                        knowledge=knowledge)

  def evaluate(params):
    # The same held-out stream every time (fixed seed), memory carried across its batches.
    batches = _batches(config, eval_texts, tok, seq_len=seq_len, seed=0, knowledge=knowledge)
    return engine.evaluate(params, itertools.islice(batches, config.eval.num_batches))

  num_predictions = (config.data.max_predictions if config.data.max_predictions > 0 else
                     max(1, math.ceil(seq_len * config.data.mlm_prob)))
  flops = metrics_lib.pretrain_flops_per_step(mcfg, batch_size=batch_size, seq_len=seq_len,
                                              num_predictions=num_predictions)
  n_params = optim.count_params(abstract_params)["total"]
  if jax.process_index() == 0:
    configlib.write_config_json(config, workdir, num_steps=num_steps, seq_len=seq_len,
                                steps_per_epoch=steps_per_epoch, vocab_size=tok.vocab_size,
                                mesh=dict(mesh.shape), num_params=n_params, budget=budget,
                                train_docs=len(train_texts), eval_docs=len(eval_texts),
                                input=corpus.input)
  logging.info("Pretraining %s model (%d params, vocabulary %d) for %d steps on mesh %s: %d "
               "training documents, %d held out (every %d-th).", config.model.variant, n_params,
               mcfg.vocab_size, num_steps, dict(mesh.shape), len(train_texts), len(eval_texts),
               config.data.eval_every_nth_doc)
  return loop_lib.train_and_evaluate(
      config, workdir, engine=engine, train_iter=train_iter, init_state=init_state,
      num_steps=num_steps, evaluate=evaluate, on_eval=on_eval, flops_per_step=flops,
      deadline=loop_lib.deadline_of(config, started),
      summary_extra={"num_params": n_params, "model": config.model.variant,
                     "vocab_size": tok.vocab_size, "seq_len": seq_len,
                     "train_flops_per_step": flops,
                     "mlm_chance_accuracy": 1.0 / tok.vocab_size})
