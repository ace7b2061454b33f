r"""Knowledge for pretraining: entities and triples from a TSV file, and triple-validity examples.

    kb = knowledge.KnowledgeBase.from_file(builtin.path("knowledge"))
    kb.find_mentions(text)  # [(start, end), ...]: character spans of entity mentions
    triples = knowledge.TripleExamples(kb, tok, seq_len=32)
    triples.sample(rng)     # {"kg_tokens" int32 [T], "kg_token_mask" bool [T], "kg_label" int32 []}

File format: lines `entity<TAB>type` or `head<TAB>relation<TAB>tail` (UTF-8, optionally gzipped);
blank lines and lines starting with '#' are skipped. The pretraining stream
(`r1jax.data.pretraining`) masks every mention of a known entity as one unit and adds one triple
example per row: [CLS] head [SEP] relation [SEP] tail [SEP], label 1 for a true triple from the
file, 0 for a corrupted one (50/50).
"""
import collections
import gzip
import io
import os
import re
from typing import Sequence

import numpy as np

from r1jax import errors
from r1jax.data import tokenizer as tokenizer_lib

_CJK_CLASS = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
# Entity matching units: one CJK character, a run of other word characters, or one symbol.
_MATCH_TOKEN_RE = re.compile(rf"[{_CJK_CLASS}]|[^\W{_CJK_CLASS}]+|[^\w\s]")


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
    if not os.path.exists(path):
      raise errors.InputNotFound(f"Knowledge file {path} does not exist.")
    opener = gzip.open if path.endswith(".gz") else open
    entity_types, relations = {}, []
    with opener(path, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      line_no = data[:e.start].count(b"\n") + 1
      raise errors.BadInput(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start}); "
                            "knowledge files are UTF-8 text.") from None
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
        raise errors.BadInput(f"{path}:{line_no}: expected `entity<TAB>type` or "
                              f"`head<TAB>relation<TAB>tail`, got {len(fields)} field(s): "
                              f"{line[:80]!r}")
    if not entity_types and not relations:
      raise errors.BadInput(f"Knowledge file {path} has no entries.")
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


class TripleExamples:
  """KnowledgeBase samples -> token arrays of T = seq_len tokens:
  [CLS] head [SEP] relation [SEP] tail [SEP], each part cut to (T - 4) // 3 tokens, then padding.
  Relation names read as words ("see_also" -> "see also"). Token ids of the parts are cached."""

  def __init__(self, kb: KnowledgeBase, tokenizer: tokenizer_lib.Tokenizer, seq_len: int):
    self.knowledge = kb
    self._tokenizer = tokenizer
    self._seq_len = seq_len
    self._cache = {}

  def _encode(self, text):
    ids = self._cache.get(text)
    if ids is None:
      ids = self._tokenizer.encode(text)
      self._cache[text] = ids
    return ids

  def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{"kg_tokens" int32 [T], "kg_token_mask" bool [T], "kg_label" int32 []: 1 = true triple}."""
    t = self._seq_len
    head, relation, tail, label = self.knowledge.sample(rng)
    part = (t - 4) // 3
    tokens = [tokenizer_lib.CLS_ID]
    for text in (head, relation.replace("_", " "), tail):  # "see_also" reads as "see also"
      tokens += self._encode(text)[:part] + [tokenizer_lib.SEP_ID]
    kg_tokens = np.zeros(t, np.int32)
    kg_tokens[:len(tokens)] = tokens
    return {"kg_tokens": kg_tokens, "kg_token_mask": np.arange(t) < len(tokens),
            "kg_label": np.int32(label)}
