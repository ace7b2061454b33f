r"""Pretraining (MLM + NSP + knowledge) and classification batches as Grain pipelines.

Pretraining:

    it = examples.pretrain_iterator("builtin:domain", tok, seq_len=128, batch_size=32, seed=0,
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
file, every mention of a known entity is one unit too (whole-entity masking), so "Sun Microsystems"
is masked entirely or not at all. Units are taken in random order while they fit in k.

Streaming layout for Transformer-XL: the global batch has `batch_size` rows; row r owns an endless
stream of documents (positions r, r + B, r + 2B, ... of the concatenation of per-epoch shuffles of
the corpus). At each step row r takes the next tokens of its current document, so row r of step
t + 1 continues exactly where row r of step t stopped and the model's memory holds the real preceding
text. A step never crosses a document boundary: when a document runs out the row is padded, and the
next step starts the row's next document with `reset_memory[r] = True` (the engine clears that row's
memory before the step; memory never mixes two documents). With NSP, A is the continuation of the
row's document; a true B (label 0) is the text right after A and is consumed too; a random B
(label 1) is a window of another document and is not consumed, so the next step continues after A.
Step 0 of every row has reset_memory=True.

Process sharding: process p of n builds rows [p * B/n, (p + 1) * B/n) of the global batch; the
document order is computed from the seed alone, so all processes agree without communicating.
Workers: `worker_count > 0` builds rows in Grain worker processes (`mp_prefetch`); worker w builds the
rows w, w + workers, ... of this process, so the output is identical for any worker count. A worker
sends its rows of several consecutive steps per message (at least MESSAGE_ROWS rows): finished
numpy arrays, reassembled into batches in the main process.
Determinism: every random choice of row r at step t comes from `np.random.default_rng([seed, r, t])`,
so the stream depends only on (corpus, tokenizer, options, seed), never on timing.

Classification:

    labels = examples.LabelVocab.from_names(builtin.labels())
    it = examples.classification_batches(builtin.load("task", "train"), tok, labels=labels,
                                         seq_len=128, batch_size=32, seed=0)
  tokens int32 [B, Q] ([CLS] text [SEP]), token_mask bool [B, Q], label int32 [B] (or float32 [B, C]
  multi-hot with multi_label=True); with `pad_final_batch=True` (evaluation) also
  example_mask bool [B], False on padding rows.
"""
import collections
import dataclasses
import io
import math
import os
import re
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib

PAD_ID, CLS_ID, SEP_ID, MASK_ID = (tokenizer_lib.PAD_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID,
                                   tokenizer_lib.MASK_ID)
_CJK_CLASS = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# Entity matching units: one CJK character, a run of other word characters, or one symbol.
_MATCH_TOKEN_RE = re.compile(rf"[{_CJK_CLASS}]|[^\W{_CJK_CLASS}]+|[^\w\s]")
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
  Empty and whitespace-only texts are dropped; rows the source flags as bad are skipped.
  """
  if isinstance(docs_or_paths, (str, os.PathLike)):
    records = sources.read_records(os.fspath(docs_or_paths))
    texts = [r["text"] for r in records if not r.get("_error")]
  else:
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


class KnowledgeBase:
  """Entities and triples from a knowledge TSV.

  Lines are `entity<TAB>type` or `head<TAB>relation<TAB>tail`; blank lines and lines starting with
  '#' are skipped. Every `entity<TAB>type` line also yields the triple (entity, "type", type), so
  either kind of line feeds the triple-validity stream. Entity names (entities, heads, tails) are
  matched in text for whole-entity masking: case-sensitive, on word boundaries, longest match first;
  CJK names match inside unsegmented Chinese text.
  """

  def __init__(self, entity_types: dict[str, str], relations: Sequence[tuple[str, str, str]]):
    """entity_types: entity -> type; relations: explicit (head, relation, tail) triples."""
    self.entity_types = dict(entity_types)
    typed = [(e, "type", t) for e, t in self.entity_types.items()]
    self.triples = list(dict.fromkeys(typed + [tuple(r) for r in relations]))
    self._true = set(self.triples)
    # Type names ("language") are not entities: masking every "language" would be word masking.
    names = set(self.entity_types)
    for h, _, t in relations:
      names.update((h, t))
    self.entities = sorted(names)
    # Candidates for corruption: the heads and tails seen with each relation (type-consistent).
    self._heads = collections.defaultdict(list)
    self._tails = collections.defaultdict(list)
    for h, r, t in self.triples:
      self._heads[r].append(h)
      self._tails[r].append(t)
    self._index = collections.defaultdict(list)
    for name in self.entities:
      key = tuple(_MATCH_TOKEN_RE.findall(name))
      if key:
        self._index[key[0]].append(key)
    for first in self._index:
      self._index[first].sort(key=len, reverse=True)

  @classmethod
  def from_file(cls, path: str) -> "KnowledgeBase":
    import gzip  # pylint: disable=g-import-not-at-top
    if not os.path.exists(path):
      raise FileNotFoundError(f"Knowledge file {path} does not exist.")
    opener = gzip.open if path.endswith(".gz") else open
    entity_types, relations = {}, []
    with opener(path, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      line_no = data[:e.start].count(b"\n") + 1
      raise ValueError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start}); knowledge "
                       "files are UTF-8 text.") from None
    for line_no, line in enumerate(io.StringIO(text, newline=None), 1):
      line = line.rstrip("\n").rstrip("\r")
      if not line.strip() or line.startswith("#"):
        continue
      fields = [x.strip() for x in line.split("\t")]
      if len(fields) == 2 and all(fields):
        entity_types.setdefault(fields[0], fields[1])
      elif len(fields) == 3 and all(fields):
        relations.append(tuple(fields))
      else:
        raise ValueError(f"{path}:{line_no}: expected `entity<TAB>type` or "
                         f"`head<TAB>relation<TAB>tail`, got {len(fields)} field(s): {line[:80]!r}")
    if not entity_types and not relations:
      raise ValueError(f"Knowledge file {path} has no entries.")
    return cls(entity_types, relations)

  def find_mentions(self, text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of entity mentions, longest first, non-overlapping."""
    tokens = [(m.group(), m.start(), m.end()) for m in _MATCH_TOKEN_RE.finditer(text)]
    spans, i = [], 0
    while i < len(tokens):
      matched = 0
      for key in self._index.get(tokens[i][0], ()):
        n = len(key)
        # Word-character runs are whole tokens, so "Ada" never matches inside "Adam".
        if i + n <= len(tokens) and all(tokens[i + j][0] == key[j] for j in range(1, n)):
          matched = n
          break
      if matched:
        spans.append((tokens[i][1], tokens[i + matched - 1][2]))
        i += matched
      else:
        i += 1
    return spans

  def is_true(self, triple) -> bool:
    return tuple(triple) in self._true

  def sample(self, rng: np.random.Generator):
    """A (head, relation, tail, label) with label 1 = true, 0 = corrupted; 50/50."""
    h, r, t = self.triples[int(rng.integers(len(self.triples)))]
    if rng.random() < 0.5:
      return h, r, t, 1
    for _ in range(10):
      if rng.random() < 0.5:
        pool = self._heads[r]
        candidate = (pool[int(rng.integers(len(pool)))], r, t)
      else:
        pool = self._tails[r]
        candidate = (h, r, pool[int(rng.integers(len(pool)))])
      if candidate not in self._true:
        return (*candidate, 0)
    # Relation with a single head/tail value: corrupt with any entity instead.
    for _ in range(100):
      candidate = (h, r, self.entities[int(rng.integers(len(self.entities)))])
      if candidate not in self._true:
        return (*candidate, 0)
    return h, r, t, 1  # every combination is true: nothing to corrupt


class _DocStore:
  """Texts of the corpus and an LRU cache of their token ids and entity-unit spans."""

  def __init__(self, texts, tokenizer, knowledge):
    self.texts = texts
    self.tokenizer = tokenizer
    self.knowledge = knowledge
    self._cache = collections.OrderedDict()

  def __len__(self):
    return len(self.texts)

  def get(self, doc: int):
    """-> (ids int32 [N], entity_id int32 [N]: -1 or the index of the mention covering a token)."""
    hit = self._cache.get(doc)
    if hit is not None:
      self._cache.move_to_end(doc)
      return hit
    text = self.texts[doc]
    if self.knowledge is None:
      ids = np.asarray(self.tokenizer.encode(text), np.int32)
      entity = np.full(len(ids), -1, np.int32)
    else:
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
  kg_seq_len: int = 32

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
    if self.kg_seq_len < 8:
      raise ValueError(f"kg_seq_len={self.kg_seq_len} is too short; use at least 8.")


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
  base = math.floor(x)
  return base + int(rng.random() < x - base)


class _PretrainRowIterator(grain.DatasetIterator):
  """Yields, per step, this iterator's rows stacked: a dict of arrays with leading dim len(rows)."""

  def __init__(self, ds: "PretrainRowDataset"):
    super().__init__()
    self._ds = ds
    self._opt = ds.options
    self._store = _DocStore(ds.texts, ds.tokenizer, ds.knowledge)
    self._word_start = ds.tokenizer.word_start_table() if self._opt.whole_word else None
    self._vocab_size = ds.tokenizer.vocab_size
    self._perms = collections.OrderedDict()
    self._kg_cache = {}
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

  # --- document order ----------------------------------------------------------------------------
  def _doc_of(self, row: int, k: int) -> tuple[int, int]:
    """(document index, epoch) of the k-th document of global row `row`."""
    n_docs = len(self._store)
    g = k * self._opt.global_batch_size + row
    epoch = g // n_docs
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._opt.seed, epoch, 0x5EED]).permutation(n_docs)
      self._perms[epoch] = perm
      if len(self._perms) > 4:
        self._perms.popitem(last=False)
    return int(perm[g % n_docs]), epoch

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
    doc, epoch = self._doc_of(row, self._docs_started[j])
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
        other = int(rng.integers(len(self._store) - 1))
        other += other >= doc  # any document but this one
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
    else:
      label = 0
      n = min(remaining, q - 2)
      tokens = np.concatenate([[CLS_ID], ids[cursor:cursor + n], [SEP_ID]]).astype(np.int32)
      units = np.concatenate([[-1], entity[cursor:cursor + n], [-1]]).astype(np.int32)
      types = np.zeros(len(tokens), np.int32)
      consumed = n

    self._cursor[j] = cursor + consumed
    if self._cursor[j] >= len(ids):
      self._docs_started[j] += 1
      self._cursor[j] = 0

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
    if self._ds.knowledge is not None:
      out.update(self._kg_example(rng))
    return out

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

  def _encode_kg(self, text):
    ids = self._kg_cache.get(text)
    if ids is None:
      ids = self._ds.tokenizer.encode(text)
      self._kg_cache[text] = ids
    return ids

  def _kg_example(self, rng):
    t = self._opt.kg_seq_len
    head, relation, tail, label = self._ds.knowledge.sample(rng)
    part = (t - 4) // 3
    tokens = [CLS_ID]
    for text in (head, relation.replace("_", " "), tail):  # "see_also" reads as "see also"
      tokens += self._encode_kg(text)[:part] + [SEP_ID]
    kg_tokens = np.zeros(t, np.int32)
    kg_tokens[:len(tokens)] = tokens
    return {"kg_tokens": kg_tokens, "kg_token_mask": np.arange(t) < len(tokens),
            "kg_label": np.int32(label)}


class PretrainRowDataset(grain.IterDataset):
  """Pretraining rows `rows` (global row indices), one element per step: the rows stacked.

  Supports Grain's in-place slicing over rows, which is how `mp_prefetch` gives worker w the rows
  w, w + workers, ...; `_InterleaveRows` puts the workers' parts back in row order.
  """

  def __init__(self, texts: Sequence[str], tokenizer: tokenizer_lib.Tokenizer,
               options: PretrainOptions, rows: Sequence[int],
               knowledge: KnowledgeBase | None = None):
    super().__init__()
    self.texts = texts
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
    return f"PretrainRowDataset(rows={len(self.rows)}, docs={len(self.texts)})"


def _local_rows(batch_size, process_index, process_count):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (global) must be divisible by "
                     f"process_count={process_count}.")
  per = batch_size // process_count
  return per, range(process_index * per, (process_index + 1) * per)


def worker_prefetch(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  """Grain worker processes; outside an absl app (tests, notebooks) Grain's flags need parsing.

  Arrays under 1 MiB are pickled with their element instead of getting a shared-memory block each
  (one block per small array costs more than the copy). Each element crossing the process boundary
  costs the main process a few hundred microseconds of Grain and multiprocessing bookkeeping
  (measured), so callers send chunks: lists of records, groups of steps.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  ds = grain.experimental.WithOptionsIterDataset(
      ds, grain.experimental.DatasetOptions(min_shm_size=1 << 20))
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


class FlattenIterDataset(grain.IterDataset):
  """Elements that are lists -> their items, in order; checkpointable.

  State: the parent's state before the current list (None while in the first list: the parent's
  initial state) and how many of the list's items were taken, like Grain's FlatMapIterDataset.
  That one, though, asks its parent for its state before the first element, and Grain's
  multiprocessing prefetch, asked before it started, creates its worker iterators unstarted (worker
  k's process then starts only when its first element is requested: the start-ups, 0.6 s each on
  the 2-core development machine, ran one after another) and answers with a state that does not
  name the worker's slice. This iterator never asks the parent for its state before it started.
  """

  def __iter__(self):
    return _FlattenIterator(self._parent)

  def __str__(self):
    return "FlattenIterDataset"


class _FlattenIterator(grain.DatasetIterator):
  """State: {"parent": the parent's state before the current list or None, "index": items taken}."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent.__iter__())
    self._parent_ds = parent
    self._items = []
    self._index = 0
    self._items_state = None  # the parent's state before self._items; None: its initial state
    self._parent_moved = False  # False while the parent is at its initial state

  def __next__(self):
    while self._index >= len(self._items):
      self._items_state = self._parent.get_state() if self._parent_moved else None
      self._parent_moved = True
      self._items = next(self._parent)
      self._index = 0
    item = self._items[self._index]
    self._index += 1
    return item

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._items_state, "index": self._index}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["parent"] is not None:
      self._parent.set_state(state["parent"])
      self._parent_moved = True
    elif self._parent_moved:  # back to the very start: a fresh parent iterator
      self._parent.close()
      self._parents = (self._parent_ds.__iter__(),)
      self._parent_moved = False
    self._items_state = state["parent"]
    self._items, self._index = [], 0
    if state["index"]:
      self._items = next(self._parent)
      self._parent_moved = True
      self._index = state["index"]


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
                     nsp: bool = True, knowledge_path: str | None = None, kg_seq_len: int = 32,
                     process_index: int = 0, process_count: int = 1,
                     worker_count: int = 0) -> grain.IterDataset:
  """An endless Grain dataset of pretraining batches (see module docstring for the layout).

  Args:
    docs_or_paths: corpus in any form `resolve_texts` accepts.
    tokenizer: the project's Tokenizer.
    seq_len: Q, tokens per row including [CLS]/[SEP].
    batch_size: the GLOBAL batch size; this process yields batch_size // process_count rows.
    seed: fixes document order and all masking choices.
    mlm_prob: fraction of maskable tokens predicted per row.
    max_predictions: P, prediction slots per row (default ceil(seq_len * mlm_prob)).
    whole_word: mask whole words (and CJK characters) instead of single pieces.
    nsp: build [CLS] A [SEP] B [SEP] pairs with 50% random B; otherwise [CLS] A [SEP].
    knowledge_path: TSV of `entity<TAB>type` / `head<TAB>relation<TAB>tail` lines: enables
      whole-entity masking and the kg_* triple-validity arrays.
    kg_seq_len: T, tokens per triple sequence.
    process_index, process_count: this process's share of the global batch rows.
    worker_count: Grain worker processes building rows (0: in this process).
  """
  options = PretrainOptions(seq_len=seq_len, global_batch_size=batch_size, seed=seed,
                            mlm_prob=mlm_prob, max_predictions=max_predictions,
                            whole_word=whole_word, nsp=nsp, kg_seq_len=kg_seq_len)
  options.validate()
  local_batch, rows = _local_rows(batch_size, process_index, process_count)
  _check_workers(worker_count, local_batch)
  texts = resolve_texts(docs_or_paths)
  if not texts:
    raise ValueError("The pretraining corpus has no non-empty documents.")
  if nsp and len(texts) < 2:
    raise ValueError("NSP needs at least 2 documents to draw random next segments; got 1. "
                     "Pass nsp=False or more documents.")
  knowledge = KnowledgeBase.from_file(knowledge_path) if knowledge_path else None
  ds = PretrainRowDataset(texts, tokenizer, options, rows, knowledge)
  if worker_count:
    # Worker w builds rows w, w + k, ... and sends `group` consecutive steps of them per message
    # (one message per step cost the main process more than assembling the batch); k consecutive
    # messages hold one group of steps of all rows.
    group = _steps_per_message(local_batch // worker_count)
    ds = worker_prefetch(ds.batch(group), worker_count).batch(worker_count)
    ds = FlattenIterDataset(ds.map(_InterleaveRows()))
  return ds


def pretrain_iterator(docs_or_paths, tokenizer, **kwargs) -> grain.DatasetIterator:
  """`iter(pretrain_dataset(...))`: a checkpointable iterator (get_state()/set_state())."""
  return iter(pretrain_dataset(docs_or_paths, tokenizer, **kwargs))


# -------------------------------------------------------------------------------------------------
# Classification


@dataclasses.dataclass(frozen=True)
class LabelVocab:
  """Class names <-> ids. Single-label: one name per record; multi-label: a list of names (or a
  comma-separated string) per record."""
  names: tuple[str, ...]

  def __post_init__(self):
    if not self.names:
      raise ValueError("LabelVocab needs at least one class name.")
    if len(set(self.names)) != len(self.names):
      raise ValueError(f"Duplicate class names in {self.names}.")

  @classmethod
  def from_names(cls, names: Iterable[str]) -> "LabelVocab":
    return cls(tuple(str(n) for n in names))

  @classmethod
  def from_records(cls, records, label_field: str = "label",
                   multi_label: bool = False) -> "LabelVocab":
    """Sorted set of the labels found in the records."""
    found = set()
    for r in records:
      found.update(_label_names(r.get(label_field), multi_label))
    return cls(tuple(sorted(found)))

  @classmethod
  def load(cls, path: str) -> "LabelVocab":
    with open(path, encoding="utf-8") as f:
      return cls(tuple(line.rstrip("\n") for line in f if line.strip()))

  def save(self, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
      f.write("".join(n + "\n" for n in self.names))
    return path

  def __len__(self):
    return len(self.names)

  def index(self, name) -> int:
    try:
      return self.names.index(str(name))
    except ValueError:
      raise ValueError(f"Unknown label {name!r}; known labels: {list(self.names)}.") from None

  def encode(self, value, multi_label: bool = False):
    """A record's label value -> int32 id, or float32 [C] multi-hot."""
    names = _label_names(value, multi_label)
    if multi_label:
      out = np.zeros(len(self.names), np.float32)
      for n in names:
        out[self.index(n)] = 1.0
      return out
    if len(names) != 1:
      raise ValueError(f"Single-label classification needs exactly one label, got {value!r}.")
    return np.int32(self.index(names[0]))


def _label_names(value, multi_label):
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return []
  if isinstance(value, (list, tuple, np.ndarray)):
    return [str(v) for v in value]
  value = str(value)
  if multi_label:
    return [v.strip() for v in value.split(",") if v.strip()]
  return [value]


class EncodeClassification(grain.transforms.Map):
  """Record -> {tokens [Q], token_mask [Q], label [] or [C]}: [CLS] text [SEP], truncated, padded."""

  def __init__(self, tokenizer, labels: LabelVocab, seq_len: int, text_field: str,
               label_field: str, multi_label: bool):
    self._tokenizer = tokenizer
    self._labels = labels
    self._seq_len = seq_len
    self._text_field = text_field
    self._label_field = label_field
    self._multi_label = multi_label

  def map(self, record):
    q = self._seq_len
    valid = not record.get("_padding", False)
    ids = self._tokenizer.encode(record[self._text_field])[:q - 2] if valid else []
    tokens = np.zeros(q, np.int32)
    tokens[:len(ids) + 2] = [CLS_ID, *ids, SEP_ID]
    if valid:
      label = self._labels.encode(record[self._label_field], self._multi_label)
    else:
      label = (np.zeros(len(self._labels), np.float32) if self._multi_label else np.int32(0))
    return {"tokens": tokens, "token_mask": np.arange(q) < len(ids) + 2, "label": label,
            "example_mask": np.bool_(valid)}


class _DropKey(grain.transforms.Map):
  """Removes one key from each element (the padding flag when batches are not padded)."""

  def __init__(self, key):
    self._key = key

  def map(self, element):
    element.pop(self._key)
    return element


def classification_dataset(records_or_path, tokenizer: tokenizer_lib.Tokenizer, *, seq_len: int,
                           batch_size: int, labels: LabelVocab | Sequence[str] | None = None,
                           text_field: str = "text", label_field: str = "label",
                           multi_label: bool = False, shuffle: bool = True, seed: int = 0,
                           num_epochs: int | None = None, drop_remainder: bool = True,
                           pad_final_batch: bool = False, process_index: int = 0,
                           process_count: int = 1, worker_count: int = 0) -> grain.IterDataset:
  """Grain dataset of classification batches.

  Args:
    records_or_path: list of records with text and label fields, or a path/spec read by
      `r1jax.data.sources` ("builtin:task:train" works).
    labels: the class names (LabelVocab or list); default: sorted labels found in the records.
      Unknown labels raise a ValueError naming them.
    batch_size: GLOBAL batch size; this process yields batch_size // process_count rows.
    num_epochs: None repeats forever (training); 1 for one evaluation pass.
    shuffle: reshuffled every epoch from `seed`.
    drop_remainder: drop the last partial batch (ignored with pad_final_batch).
    pad_final_batch: pad the data with empty rows to a multiple of the global batch, and add
      `example_mask` bool [B] (False on padding): every process gets the same number of full
      batches, which multi-host evaluation needs.
  """
  local_batch, _ = _local_rows(batch_size, process_index, process_count)
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count} must be >= 0.")
  if isinstance(records_or_path, (str, os.PathLike)):
    records = [r for r in sources.read_records(str(records_or_path)) if not r.get("_error")]
  else:
    records = list(records_or_path)
  if not records:
    raise ValueError("classification_dataset got no records.")
  for i, r in enumerate(records):
    if not isinstance(r.get(text_field), str):
      raise ValueError(f"Record {i} has no string field {text_field!r}: {str(r)[:120]}")
    if label_field not in r:
      raise ValueError(f"Record {i} has no label field {label_field!r}: {str(r)[:120]}")
  if labels is None:
    labels = LabelVocab.from_records(records, label_field, multi_label)
  elif not isinstance(labels, LabelVocab):
    labels = LabelVocab.from_names(labels)
  for r in records:  # fail before training starts, not at the first bad batch
    labels.encode(r[label_field], multi_label)
  if pad_final_batch:
    if num_epochs != 1:
      raise ValueError("pad_final_batch is for one evaluation pass: set num_epochs=1.")
    records = records + [{"_padding": True}] * (-len(records) % batch_size)
  ds = grain.MapDataset.source(records)
  ds = ds[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(EncodeClassification(tokenizer, labels, seq_len, text_field, label_field,
                                   multi_label))
  if not pad_final_batch:
    ds = ds.map(_DropKey("example_mask"))
  # No reader threads: encoding is Python under the GIL; parallelism comes from workers.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count:
    ds = worker_prefetch(ds, worker_count)
  return ds.batch(local_batch, drop_remainder=drop_remainder and not pad_final_batch)


def classification_batches(records_or_path, tokenizer, **kwargs) -> grain.DatasetIterator:
  """`iter(classification_dataset(...))`."""
  return iter(classification_dataset(records_or_path, tokenizer, **kwargs))
