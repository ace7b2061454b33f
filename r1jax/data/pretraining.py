r"""Pretraining batches (MLM + NSP + knowledge) as a Grain pipeline.

    it = pretraining.pretrain_iterator("builtin:domain", tok, seq_len=128, batch_size=32, seed=0,
                                       knowledge_path=builtin.path("knowledge"))
    batch = next(it)             # dict of numpy arrays, this process's rows of the global batch
    state = it.get_state()       # save with the checkpoint; it.set_state(state) resumes exactly

Batch (B = batch_size // process_count rows on this process, Q = seq_len, P = max_predictions,
T = kg_seq_len):
  tokens        int32 [B, Q]   [CLS] A [SEP] B [SEP] [PAD]...  (no NSP: [CLS] A [SEP] [PAD]...)
  token_mask    bool  [B, Q]   True on real tokens
  token_types   int32 [B, Q]   0 on [CLS] A [SEP] and padding, 1 on B [SEP]
  mlm_positions int32 [B, P]   positions of the predicted tokens, ascending; 0 in unused slots
  mlm_ids       int32 [B, P]   the original token at each position; 0 in unused slots
  mlm_weights   float32 [B, P] 1.0 for a real prediction, 0.0 for an unused slot
  nsp_label     int32 [B]      1 = B is a random segment of another document, 0 = true next
                               segment (always 0 when nsp=False)
  reset_memory  bool  [B]      the row starts a new document at this step: clear its memory first
  epoch         int32 [B]      how many passes over the corpus this row has completed
  kg_tokens     int32 [B, T]   [CLS] head [SEP] relation [SEP] tail [SEP] (with a knowledge file)
  kg_token_mask bool  [B, T]
  kg_label      int32 [B]      1 = a true triple from the file, 0 = a corrupted one

Masking (BERT style, fixed count per sequence): each row predicts k = round(n * mlm_prob) of its n
maskable tokens, rounding stochastically so the expected rate is exactly mlm_prob, capped at P.
[CLS], [SEP] and [PAD] are never maskable. Each chosen token becomes [MASK] (80%), a random
non-special token (10%) or stays unchanged (10%). With `whole_word=True`, pieces of one word (see
`Tokenizer.word_start_table`; every CJK piece is its own word) are chosen together; with a knowledge
file (`r1jax.data.knowledge`), every mention of a known entity is one unit too (whole-entity
masking), so "Sun Microsystems" is masked entirely or not at all. Units are taken in random order
while they fit in k.

Streaming layout for Transformer-XL: the global batch has `batch_size` rows; row r owns an endless
stream of documents (positions r, r + B, r + 2B, ... of the concatenation of per-epoch shuffles of
the corpus; `doc_order`, which with `row_groups` > 1 gives each block of rows its own contiguous
part of the corpus to shuffle: "Row groups" below). At each step row r takes the next tokens of its current document, so row r of step
t + 1 continues exactly where row r of step t stopped and the model's memory holds the real preceding
text. A step never crosses a document boundary: when a document runs out the row is padded, and the
next step starts the row's next document with `reset_memory[r] = True` (the engine clears that row's
memory before the step; memory never mixes two documents). With NSP, A is the continuation of the
row's document; a true B (label 0) is the text right after A and is consumed too; a random B
(label 1) is a window of another document and is not consumed, so the next step continues after A.
Step 0 of every row has reset_memory=True.

Packing (`pack=True`, no NSP): a row is filled instead of padded. When its document ends with room
left, a [SEP] follows and the row's next document starts in the same row: [CLS] d1 [SEP] d2 [SEP]
d3... [SEP]. A document that does not fit continues at the next step. The row is then one stream
of documents separated by [SEP], as Transformer-XL reads a concatenated corpus: memory carries over
document boundaries (reset_memory only at step 0) and attention crosses the separators (RoBERTa's
FULL-SENTENCES packing). On corpora of short documents (definitions, questions, reviews) padding
otherwise takes most of the positions: `bench/NOTES_quality.md` measures the real-token fraction.

Process sharding: process p of n builds rows [p * B/n, (p + 1) * B/n) of the global batch; the
document order is computed from the seed alone, so all processes agree without communicating and
the global batch is the same for any process count. Within an epoch the rows read disjoint sets of
documents that together cover the corpus once (NSP's random B segments are the exception: any
document of the row's group). From tokenized shards (`shards.TokenizedCorpus`, written by the data
stage) a process reads only its rows' records, through Grain's ArrayRecord source, and resident
memory grows only by the permutation's 4 bytes per document; from texts, every process holds all
texts. Both give bitwise the same batches.
Row groups (`row_groups`, default 1): the rows are split into that many blocks of consecutive rows,
and block q reads only the documents [q * N // row_groups, (q + 1) * N // row_groups), shuffled
per epoch (`doc_order`). With row_groups a multiple of the process count, a process's rows read
one contiguous 1/n of the corpus, so of shards in a bucket it fetches only the files holding it
(`doc_order.records_read`, `shards.TokenizedCorpus.fetch`); with 1, every row reads everywhere.
Workers: `worker_count > 0` builds rows in Grain worker processes (`mp_prefetch`); worker w builds the
rows w, w + workers, ... of this process, so the output is identical for any worker count. A worker
sends its rows of several consecutive steps per message (at least MESSAGE_ROWS rows): finished
numpy arrays, reassembled into batches in the main process.
Determinism: every random choice of row r at step t comes from `np.random.default_rng([seed, r, t])`,
so the stream depends only on (corpus, tokenizer, options, seed), never on timing.
"""
import collections
import dataclasses
import math
import os
from typing import Any, Sequence

from absl import logging
import grain
import numpy as np

from r1jax import errors
from r1jax.data import doc_order
from r1jax.data import grain_ops
from r1jax.data import knowledge as knowledge_lib
from r1jax.data import shards
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib

PAD_ID, CLS_ID, SEP_ID, MASK_ID = (tokenizer_lib.PAD_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID,
                                   tokenizer_lib.MASK_ID)
_DOC_CACHE_SIZE = 4096


# -------------------------------------------------------------------------------------------------
# Corpus


def resolve_texts(docs_or_paths) -> list[str]:
  """Document texts from any of the accepted corpus forms.

  - a single string is an input spec for `r1jax.data.sources.read_records`: a path, glob, directory
    (e.g. the data stage's DIR/data/clean), "builtin:general", "builtin:domain",
    "builtin:task:train", "tfds:NAME/SPLIT", or several of these separated by commas;
  - an `os.PathLike` is a path;
  - a list holds texts (str), records with a "text" field (dict), or PathLike paths.
  Empty and whitespace-only texts are dropped; rows the source flags as bad are skipped. An input
  spec logs one line: how many documents, how they were parsed, and the rows skipped.
  """
  if isinstance(docs_or_paths, (str, os.PathLike)):
    spec = os.fspath(docs_or_paths)
    source = sources.open_source(spec)
    texts, skipped = [], collections.Counter()
    for i in range(len(source)):
      record = source[i]
      text = shards.document_text(record)
      if text is not None:
        texts.append(text)
      else:
        skipped[record.get("_error") or "empty"] += 1
    logging.info("Corpus %s: %d documents, read as %s%s.", spec, len(texts), source.describe(),
                 f"; rows skipped: {dict(skipped)}" if skipped else "")
    return texts
  texts = []
  for item in docs_or_paths:
    if isinstance(item, dict):
      texts.append(item["text"])
    elif isinstance(item, os.PathLike):
      texts.extend(resolve_texts(item))
    elif isinstance(item, str):
      texts.append(item)
    else:
      raise TypeError(f"Corpus item of type {type(item).__name__} is not a text, record or path.")
  return [t for t in texts if isinstance(t, str) and t.strip()]


class _DocStore:
  """The corpus's documents and an LRU cache of their token ids and entity-unit spans.

  `docs`: texts (tokenized here, on first use) or `shards.TokenizedDocuments` (ids read from the
  shards; no knowledge: entity mentions are found in the text)."""

  def __init__(self, docs, tokenizer, knowledge):
    self.docs = docs
    self.tokenized = isinstance(docs, shards.TokenizedDocuments)
    self.tokenizer = tokenizer
    self.knowledge = knowledge
    self._cache = collections.OrderedDict()

  def __len__(self):
    return len(self.docs)

  def get(self, doc: int):
    """-> (ids int32 [N], entity_id int32 [N]: -1 or the index of the mention covering a token)."""
    hit = self._cache.get(doc)
    if hit is not None:
      self._cache.move_to_end(doc)
      return hit
    if self.tokenized:
      ids = self.docs.tokens(doc)
      entity = np.full(len(ids), -1, np.int32)
    elif self.knowledge is None:
      ids = np.asarray(self.tokenizer.encode(self.docs[doc]), np.int32)
      entity = np.full(len(ids), -1, np.int32)
    else:
      text = self.docs[doc]
      ids, starts, ends = self.tokenizer.encode_with_offsets(text)
      anchors = np.maximum(starts, ends - 1)  # "▁Ada" starts at the space: use its last character
      entity = np.full(len(ids), -1, np.int32)
      for m, (s, e) in enumerate(self.knowledge.find_mentions(text)):
        entity[(anchors >= s) & (anchors < e)] = m
    self._cache[doc] = (ids, entity)
    if len(self._cache) > _DOC_CACHE_SIZE:
      self._cache.popitem(last=False)
    return ids, entity


# -------------------------------------------------------------------------------------------------
# Pretraining


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
  """What one pretraining row looks like (see module docstring)."""
  seq_len: int
  global_batch_size: int
  seed: int = 0
  mlm_prob: float = 0.15
  max_predictions: int | None = None  # None: ceil(seq_len * mlm_prob)
  whole_word: bool = False
  nsp: bool = True
  pack: bool = False
  kg_seq_len: int = 32
  row_groups: int = 1  # rows split into this many groups, each reading its own part of the corpus

  @property
  def num_predictions(self) -> int:
    if self.max_predictions is not None:
      return self.max_predictions
    return max(1, int(math.ceil(self.seq_len * self.mlm_prob)))

  def validate(self):
    if self.seq_len < 8:
      raise ValueError(f"seq_len={self.seq_len} is too short; use at least 8.")
    if not 0.0 < self.mlm_prob < 1.0:
      raise ValueError(f"mlm_prob={self.mlm_prob} must be in (0, 1).")
    if self.num_predictions < 1 or self.num_predictions > self.seq_len:
      raise ValueError(f"max_predictions={self.max_predictions} must be in [1, seq_len].")
    if self.global_batch_size < 1:
      raise ValueError(f"batch_size={self.global_batch_size} must be positive.")
    if self.pack and self.nsp:
      raise ValueError("pack=True fills rows with several documents, which has no next-segment "
                       "pairs: set nsp=False (RoBERTa drops NSP for the same reason).")
    if self.kg_seq_len < 8:
      raise ValueError(f"kg_seq_len={self.kg_seq_len} is too short; use at least 8.")
    if self.row_groups < 1 or self.global_batch_size % self.row_groups:
      raise ValueError(f"row_groups={self.row_groups} must divide batch_size="
                       f"{self.global_batch_size} (each group is a block of whole rows).")


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
  base = math.floor(x)
  return base + int(rng.random() < x - base)


class _PretrainRowIterator(grain.DatasetIterator):
  """Yields, per step, this iterator's rows stacked: a dict of arrays with leading dim len(rows)."""

  def __init__(self, ds: "PretrainRowDataset"):
    super().__init__()
    self._ds = ds
    self._opt = ds.options
    self._store = _DocStore(ds.docs, ds.tokenizer, ds.knowledge)
    self._word_start = ds.tokenizer.word_start_table() if self._opt.whole_word else None
    self._vocab_size = ds.tokenizer.vocab_size
    self._order = doc_order.DocumentOrder(len(ds.docs), ds.options.global_batch_size,
                                          ds.options.row_groups, ds.options.seed, ds.rows)
    self._triples = (knowledge_lib.TripleExamples(ds.knowledge, ds.tokenizer, self._opt.kg_seq_len)
                     if ds.knowledge is not None else None)
    rows = ds.rows
    self._step = 0
    self._docs_started = [0] * len(rows)  # k: the row's current document is its k-th
    self._cursor = [0] * len(rows)

  # --- state -------------------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "rows": list(self._ds.rows),
            "docs_started": list(self._docs_started), "cursor": list(self._cursor)}

  def set_state(self, state: dict[str, Any]) -> None:
    if list(state["rows"]) != list(self._ds.rows):
      raise ValueError(f"Iterator state is for rows {list(state['rows'])[:8]}..., this iterator "
                       f"builds rows {list(self._ds.rows)[:8]}...: batch size, process or worker "
                       "count changed since the checkpoint.")
    self._step = int(state["step"])
    self._docs_started = [int(x) for x in state["docs_started"]]
    self._cursor = [int(x) for x in state["cursor"]]

  # --- one step ----------------------------------------------------------------------------------
  def __next__(self):
    rows = self._ds.rows
    if not rows:
      raise StopIteration
    examples = [self._row_example(j, row, self._step) for j, row in enumerate(rows)]
    self._step += 1
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def _row_example(self, j: int, row: int, step: int) -> dict[str, np.ndarray]:
    opt = self._opt
    rng = np.random.default_rng([opt.seed, row, step])
    doc, epoch = self._order.doc_of(row, self._docs_started[j])
    ids, entity = self._store.get(doc)
    cursor = self._cursor[j]
    reset = cursor == 0
    remaining = len(ids) - cursor
    q = opt.seq_len
    if opt.nsp:
      content = q - 3
      label = int(rng.random() < 0.5)
      if label == 0 and min(remaining, content) < 2:
        label = 1  # one token left: there is no true next segment to pair with
      if label == 0:
        n = min(remaining, content)
        len_a = int(rng.integers(1, n))
        a = slice(cursor, cursor + len_a)
        b_ids, b_entity = ids[cursor + len_a:cursor + n], entity[cursor + len_a:cursor + n]
        consumed = n
      else:
        len_a = min(remaining, int(rng.integers(1, content)))
        a = slice(cursor, cursor + len_a)
        lo, hi = self._order.group_of(row)
        other = lo + int(rng.integers(hi - lo - 1))
        other += other >= doc  # any document of the row's group but this one
        o_ids, o_entity = self._store.get(other)
        len_b = min(content - len_a, len(o_ids))
        start = int(rng.integers(0, len(o_ids) - len_b + 1))
        b_ids = o_ids[start:start + len_b]
        b_entity = o_entity[start:start + len_b]
        b_entity = np.where(b_entity >= 0, b_entity + (1 << 20), -1)  # distinct from A's mentions
        consumed = len_a
      a_ids, a_entity = ids[a], entity[a]
      tokens = np.concatenate([[CLS_ID], a_ids, [SEP_ID], b_ids, [SEP_ID]]).astype(np.int32)
      units = np.concatenate([[-1], a_entity, [-1], b_entity, [-1]]).astype(np.int32)
      types = np.zeros(len(tokens), np.int32)
      types[len(a_ids) + 2:] = 1
    elif opt.pack:
      label = 0
      tokens, units = self._packed_row(j)
      types = np.zeros(len(tokens), np.int32)
      reset = self._step == 0            # one stream per row: memory spans documents
      consumed = None
    else:
      label = 0
      n = min(remaining, q - 2)
      tokens = np.concatenate([[CLS_ID], ids[cursor:cursor + n], [SEP_ID]]).astype(np.int32)
      units = np.concatenate([[-1], entity[cursor:cursor + n], [-1]]).astype(np.int32)
      types = np.zeros(len(tokens), np.int32)
      consumed = n

    if consumed is not None:
      self._advance(j, len(ids), consumed)

    out = self._mask(tokens, units, rng)
    length = len(tokens)
    padded = np.zeros(q, np.int32)
    padded[:length] = out["tokens"]
    out["tokens"] = padded
    out["token_mask"] = np.arange(q) < length
    out["token_types"] = np.zeros(q, np.int32)
    out["token_types"][:length] = types
    out["nsp_label"] = np.int32(label)
    out["reset_memory"] = np.bool_(reset)
    out["epoch"] = np.int32(epoch)
    if self._triples is not None:
      out.update(self._triples.sample(rng))
    return out

  def _advance(self, j: int, doc_len: int, consumed: int) -> None:
    """Moves row j's cursor `consumed` tokens on; past the document's end, to the next one."""
    self._cursor[j] += consumed
    if self._cursor[j] >= doc_len:
      self._docs_started[j] += 1
      self._cursor[j] = 0

  def _packed_row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] doc [SEP] next doc [SEP] ... [SEP]: row j's stream until the row is full.

    A document that does not fit continues at the next step (its memory carries over); a new one
    starts only when at least one of its tokens fits after the separator. Entity units are offset
    per document so mentions of two documents never merge.
    """
    room = self._opt.seq_len - 2          # [CLS] ... [SEP]
    id_parts, unit_parts, part = [[CLS_ID]], [[-1]], 0
    while True:
      doc, _ = self._order.doc_of(self._ds.rows[j], self._docs_started[j])
      ids, entity = self._store.get(doc)
      cursor = self._cursor[j]
      n = min(len(ids) - cursor, room)
      id_parts.append(ids[cursor:cursor + n])
      unit_parts.append(np.where(entity[cursor:cursor + n] >= 0,
                                 entity[cursor:cursor + n] + (part << 20), -1))
      room -= n
      self._advance(j, len(ids), n)
      if room < 2 or self._cursor[j]:     # full, or the document continues next step
        break
      id_parts.append([SEP_ID])           # a document ended: separator, then the next one
      unit_parts.append([-1])
      room -= 1
      part += 1
    id_parts.append([SEP_ID])
    unit_parts.append([-1])
    return (np.concatenate(id_parts).astype(np.int32),
            np.concatenate(unit_parts).astype(np.int32))

  def _mask(self, tokens, units, rng):
    """MLM on one sequence; `units` holds entity-mention ids (-1: none) to keep together."""
    opt = self._opt
    p = opt.num_predictions
    special = (tokens == CLS_ID) | (tokens == SEP_ID) | (tokens == PAD_ID)
    candidates = np.flatnonzero(~special)
    target = min(p, _stochastic_round(len(candidates) * opt.mlm_prob, rng))
    grouped = self._word_start is not None or bool((units >= 0).any())
    if not grouped or target == 0:
      positions = np.sort(rng.choice(candidates, target, replace=False))
    else:
      # Units: an entity mention, a whole word, or a single token; taken in random order while
      # they fit in the budget.
      prev, cur = candidates[:-1], candidates[1:]
      continues = (units[cur] >= 0) & (units[cur] == units[prev])
      if self._word_start is not None:
        continues |= ((cur == prev + 1) & ~self._word_start[tokens[cur]] &
                      (units[cur] < 0) & (units[prev] < 0))
      starts = np.flatnonzero(np.concatenate([[True], ~continues]))
      ends = np.append(starts[1:], len(candidates))
      sizes = (ends - starts).tolist()
      chosen, count = [], 0
      for g in rng.permutation(len(starts)).tolist():
        if count + sizes[g] <= target:
          chosen.append(candidates[starts[g]:ends[g]])
          count += sizes[g]
          if count == target:
            break
      positions = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    masked = tokens.copy()
    u = rng.random(len(positions))
    random_ids = rng.integers(tokenizer_lib.NUM_SPECIAL, self._vocab_size, len(positions))
    masked[positions[u < 0.8]] = MASK_ID
    use_random = (u >= 0.8) & (u < 0.9)
    masked[positions[use_random]] = random_ids[use_random]
    k = len(positions)
    mlm_positions = np.zeros(p, np.int32)
    mlm_ids = np.zeros(p, np.int32)
    mlm_weights = np.zeros(p, np.float32)
    mlm_positions[:k] = positions
    mlm_ids[:k] = tokens[positions]
    mlm_weights[:k] = 1.0
    return {"tokens": masked, "mlm_positions": mlm_positions, "mlm_ids": mlm_ids,
            "mlm_weights": mlm_weights}


class PretrainRowDataset(grain.IterDataset):
  """Pretraining rows `rows` (global row indices), one element per step: the rows stacked.

  Supports Grain's in-place slicing over rows, which is how `mp_prefetch` gives worker w the rows
  w, w + workers, ...; `_InterleaveRows` puts the workers' parts back in row order.
  """

  def __init__(self, docs: "Sequence[str] | shards.TokenizedDocuments",
               tokenizer: tokenizer_lib.Tokenizer, options: PretrainOptions, rows: Sequence[int],
               knowledge: knowledge_lib.KnowledgeBase | None = None):
    super().__init__()
    self.docs = docs
    self.tokenizer = tokenizer
    self.options = options
    self.rows = tuple(rows)
    self.knowledge = knowledge

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self.rows = self.rows[sl]

  def __iter__(self):
    return _PretrainRowIterator(self)

  def __str__(self):
    return f"PretrainRowDataset(rows={len(self.rows)}, docs={len(self.docs)})"


# Rows per message from a worker (at least): a group of steps of one worker's rows.
MESSAGE_ROWS = 64


def _steps_per_message(rows_per_worker: int) -> int:
  return max(1, -(-MESSAGE_ROWS // rows_per_worker))


class _InterleaveRows(grain.transforms.Map):
  """Workers' messages -> a list of S batches.

  In: {key: [W, S, R, ...]}: worker w's rows w, w + W, ... (R of them) for S consecutive steps.
  Out: S dicts {key: [R * W, ...]} with the rows back in order (row r * W + w is worker w's r-th).
  """

  def map(self, element):
    merged = {k: np.moveaxis(v, 0, 2) for k, v in element.items()}  # [S, R, W, ...]
    merged = {k: v.reshape(v.shape[:1] + (-1,) + v.shape[3:]) for k, v in merged.items()}
    steps = len(next(iter(merged.values())))
    return [{k: v[s] for k, v in merged.items()} for s in range(steps)]


def _check_workers(worker_count, local_batch):
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count} must be >= 0.")
  if worker_count and local_batch % worker_count:
    raise ValueError(f"worker_count={worker_count} must divide the per-process batch {local_batch} "
                     "(each worker builds a fixed subset of rows).")


def pretrain_dataset(docs_or_paths, tokenizer: tokenizer_lib.Tokenizer, *, seq_len: int,
                     batch_size: int, seed: int = 0, mlm_prob: float = 0.15,
                     max_predictions: int | None = None, whole_word: bool = False,
                     nsp: bool = True, pack: bool = False, knowledge_path: str | None = None,
                     kg_seq_len: int = 32, row_groups: int = 1,
                     process_index: int = 0, process_count: int = 1,
                     worker_count: int = 0) -> grain.IterDataset:
  """An endless Grain dataset of pretraining batches (see module docstring for the layout).

  Args:
    docs_or_paths: corpus in any form `resolve_texts` accepts, or `shards.TokenizedDocuments`
      (a tokenized corpus or its split: ids read from ArrayRecord shards, never tokenized here).
    tokenizer: the project's Tokenizer.
    seq_len: Q, tokens per row including [CLS]/[SEP].
    batch_size: the GLOBAL batch size; this process yields batch_size // process_count rows.
    seed: fixes document order and all masking choices.
    mlm_prob: fraction of maskable tokens predicted per row.
    max_predictions: P, prediction slots per row (default ceil(seq_len * mlm_prob)).
    whole_word: mask whole words (and CJK characters) instead of single pieces.
    nsp: build [CLS] A [SEP] B [SEP] pairs with 50% random B; otherwise [CLS] A [SEP].
    pack: (nsp=False) fill each row with the row's next documents, [SEP] between them, instead
      of padding after a short one (see "Packing" in the module docstring).
    knowledge_path: TSV of `entity<TAB>type` / `head<TAB>relation<TAB>tail` lines: enables
      whole-entity masking and the kg_* triple-validity arrays.
    kg_seq_len: T, tokens per triple sequence.
    row_groups: split the rows into this many blocks, each reading only its own contiguous part
      of the documents (see "Row groups" in the module docstring); must divide batch_size.
    process_index, process_count: this process's share of the global batch rows.
    worker_count: Grain worker processes building rows (0: in this process).
  """
  options = PretrainOptions(seq_len=seq_len, global_batch_size=batch_size, seed=seed,
                            mlm_prob=mlm_prob, max_predictions=max_predictions,
                            whole_word=whole_word, nsp=nsp, pack=pack, kg_seq_len=kg_seq_len,
                            row_groups=row_groups)
  options.validate()
  local_batch, rows = grain_ops.local_rows(batch_size, process_index, process_count)
  _check_workers(worker_count, local_batch)
  if isinstance(docs_or_paths, shards.TokenizedDocuments):
    docs = docs_or_paths
    docs.check_tokenizer(tokenizer, "the tokenizer given")
    if knowledge_path:
      raise ValueError("Whole-entity masking finds mentions in the text: pass the texts, not "
                       "tokenized shards, with knowledge_path.")
  else:
    docs = resolve_texts(docs_or_paths)
  if not len(docs):
    raise errors.BadInput("The pretraining corpus has no non-empty documents.")
  if nsp and len(docs) < 2:
    raise errors.BadInput("NSP needs at least 2 documents to draw random next segments; got 1. "
                          "Pass nsp=False or more documents.")
  if len(docs) // row_groups < 1 + nsp:
    raise errors.BadInput(f"The corpus has {len(docs)} documents, too few for row_groups="
                          f"{row_groups}: each group reads its own part and needs at least "
                          f"{1 + nsp} (NSP draws random segments from the part). Use fewer groups.")
  knowledge = knowledge_lib.KnowledgeBase.from_file(knowledge_path) if knowledge_path else None
  ds = PretrainRowDataset(docs, tokenizer, options, rows, knowledge)
  if worker_count:
    # Worker w builds rows w, w + k, ... and sends `group` consecutive steps of them per message
    # (one message per step cost the main process more than assembling the batch); k consecutive
    # messages hold one group of steps of all rows.
    group = _steps_per_message(local_batch // worker_count)
    ds = grain_ops.worker_prefetch(ds.batch(group), worker_count).batch(worker_count)
    ds = grain_ops.FlattenIterDataset(ds.map(_InterleaveRows()))
  return ds


def pretrain_iterator(docs_or_paths, tokenizer, **kwargs) -> grain.DatasetIterator:
  """`iter(pretrain_dataset(...))`: a checkpointable iterator (get_state()/set_state())."""
  return iter(pretrain_dataset(docs_or_paths, tokenizer, **kwargs))


def split_documents(docs, every_nth: int):
  """(train, held-out): document i is held out when i % every_nth == every_nth - 1 (pretraining's
  eval split; the diagnose stage measures the same held-out documents). Lists of texts give lists;
  a tokenized corpus gives two `shards.EveryNth` views of it."""
  if isinstance(docs, shards.TokenizedDocuments):
    return (shards.EveryNth(docs, every_nth, held_out=False),
            shards.EveryNth(docs, every_nth, held_out=True))
  held = [t for i, t in enumerate(docs) if i % every_nth == every_nth - 1]
  train = [t for i, t in enumerate(docs) if i % every_nth != every_nth - 1]
  return train, held
