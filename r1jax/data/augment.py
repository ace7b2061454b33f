r"""Augmentation: synonyms, random insert/delete/swap, back-translation, mixup and SMOTE.

Text (EDA-style, Wei & Zou 2019), English and Chinese:

    aug = augment.TextAugmenter(augment.SynonymLexicon.wordnet(), augment.AugmentConfig())
    ds = augment.augment_dataset(records, aug, seed=0, copies=1)  # Grain MapDataset of records
    # each output: {"text": new text, <metadata>, "augment_ops": [...], "augment_source": i}

  synonym  each word with a synonym is replaced with probability `synonym_prob`
  insert   round(insert_prob * words) synonyms of random words inserted at random places
  delete   each word deleted with probability `delete_prob` (never all of them)
  swap     round(swap_prob * words) swaps of two random words
Words are Latin-script runs and, in Chinese text, lexicon words found by forward maximum matching;
Chinese characters outside lexicon words are left alone (there is no segmenter, and moving single
characters garbles Chinese), so a Chinese lexicon defines what the operations act on.
Synonyms: `SynonymLexicon.wordnet()` is the table shipped with the package (built from WordNet 3.0
by builtin/build_corpus.py: the lemmas of each word's most frequent sense; nothing is downloaded),
`SynonymLexicon.from_file(path)` reads a user lexicon for any language: one word per line followed
by its synonyms, separated by tabs or commas (`电脑<TAB>计算机<TAB>微机`).

Back-translation: `BackTranslator(translator, "en", "zh")` sends texts to the pivot language and back.
`Translator` is a one-method interface; `MarianTranslator` runs HuggingFace MarianMT models from
local directories (e.g. Helsinki-NLP/opus-mt-en-zh saved with `save_pretrained`; never downloaded).
`ReversibleTestTranslator` is a deterministic stand-in for tests, not a translation engine.

Feature space, for minority classes: `smote(features, labels, ...)` interpolates between a sample
and one of its k nearest same-class neighbours (Chawla et al. 2002) until each class reaches the
target count; `mixup(features, labels, ...)` mixes pairs with Beta(alpha, alpha) weights and soft
labels (Zhang et al. 2018), optionally only within chosen classes.
"""
import dataclasses
import gzip
import os
import re
from typing import Any, Protocol, Sequence

import grain
import numpy as np

from r1jax import errors
from r1jax.data import builtin

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_PIECE_RE = re.compile(rf"(?P<latin>[^\W\d_{_CJK}]+(?:['’][^\W\d_{_CJK}]+)*)|(?P<cjk>[{_CJK}]+)|"
                       rf"(?P<other>[^\w{_CJK}]+|[\d_]+)")
_CJK_CHAR_RE = re.compile(f"[{_CJK}]")
# Function words are never replaced or used for insertion (WordNet lists "are" as a unit of area).
ENGLISH_STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being
below between both but by can cannot could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself let
me more most my myself no nor not of off on once only or other ought our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these they
this those through to too under until up very was we were what when where which while who whom why
with would you your yours yourself yourselves also just may might must shall will one two get got
""".split())
CHINESE_STOPWORDS = frozenset("的 了 和 是 在 也 就 都 而 及 与 或 一个 没有 我们 你们 他们 这 那 之 其 被 把".split())


# -------------------------------------------------------------------------------------------------
# Synonyms and word pieces


class SynonymLexicon:
  """word -> synonyms, for any language; also segments Chinese text by its words."""

  def __init__(self, table: dict[str, Sequence[str]]):
    self.table = {w: tuple(dict.fromkeys(s for s in syns if s and s != w))
                  for w, syns in table.items()}
    self.table = {w: s for w, s in self.table.items() if s}
    self.max_cjk_len = max((len(w) for w in self.table if _CJK_CHAR_RE.search(w)), default=1)

  @classmethod
  def from_file(cls, path: str) -> "SynonymLexicon":
    """Lines `word<TAB>syn<TAB>syn...` (tabs or commas); '#' comments and blank lines skipped."""
    if not os.path.exists(path):
      raise errors.InputNotFound(f"Synonym lexicon {path} does not exist.")
    opener = gzip.open if path.endswith(".gz") else open
    table = {}
    with opener(path, "rt", encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip() or line.startswith("#"):
          continue
        fields = [x.strip() for x in re.split(r"[\t,，]", line.strip()) if x.strip()]
        if len(fields) < 2:
          raise errors.BadInput(f"{path}:{line_no}: expected a word and at least one synonym "
                                f"separated by tabs or commas, got {line.strip()[:80]!r}")
        table.setdefault(fields[0], []).extend(fields[1:])
    return cls(table)

  @classmethod
  def wordnet(cls) -> "SynonymLexicon":
    """The English table shipped with the package (WordNet 3.0, most frequent sense)."""
    return cls.from_file(builtin.path("synonyms"))

  @classmethod
  def from_spec(cls, spec: str) -> "SynonymLexicon":
    """Comma-separated sources merged: "wordnet" (the shipped table) and/or lexicon files."""
    lexicon = cls({})
    for item in filter(None, (s.strip() for s in spec.split(","))):
      lexicon = lexicon.merged(cls.wordnet() if item == "wordnet" else
                               cls.from_file(os.path.expanduser(item)))
    return lexicon

  def merged(self, other: "SynonymLexicon") -> "SynonymLexicon":
    table = {w: list(s) for w, s in self.table.items()}
    for w, s in other.table.items():
      table.setdefault(w, []).extend(s)
    return SynonymLexicon(table)

  def synonyms(self, word: str) -> tuple[str, ...]:
    found = self.table.get(word)
    if found is None and word[:1].isupper():
      found = self.table.get(word.lower())
    return found or ()

  def split_cjk(self, run: str) -> list[tuple[str, bool]]:
    """Forward maximum matching of a CJK run: [(text, is a lexicon word)], other characters
    grouped into non-word chunks."""
    out, i, chunk = [], 0, ""
    while i < len(run):
      for n in range(min(self.max_cjk_len, len(run) - i), 0, -1):
        if run[i:i + n] in self.table:
          if chunk:
            out.append((chunk, False))
            chunk = ""
          out.append((run[i:i + n], True))
          i += n
          break
      else:
        chunk += run[i]
        i += 1
    if chunk:
      out.append((chunk, False))
    return out


@dataclasses.dataclass
class _Piece:
  text: str
  kind: str  # "latin", "cjk" (a word) or "other" (spaces, punctuation, digits)


def _pieces(text: str, lexicon: SynonymLexicon) -> list[_Piece]:
  out = []
  for m in _PIECE_RE.finditer(text):
    if m.lastgroup == "cjk":
      out.extend(_Piece(w, "cjk" if is_word else "other") for w, is_word in
                 lexicon.split_cjk(m.group()))
    else:
      out.append(_Piece(m.group(), m.lastgroup))
  return out


def _join(pieces: list[_Piece]) -> str:
  text = "".join(p.text for p in pieces)
  text = re.sub(r"[ \t]{2,}", " ", text)
  return re.sub(r" +([,.;:!?])", r"\1", text).strip()


def _is_content(piece: _Piece) -> bool:
  if piece.kind == "latin":
    return piece.text.lower() not in ENGLISH_STOPWORDS
  return piece.kind == "cjk" and piece.text not in CHINESE_STOPWORDS


def _match_case(new: str, old: str) -> str:
  if old[:1].isupper() and new[:1].islower():
    return new[:1].upper() + new[1:]
  return new


# -------------------------------------------------------------------------------------------------
# Text operations


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities of the EDA operations (0 disables one)."""
  synonym_prob: float = 0.1
  insert_prob: float = 0.05
  delete_prob: float = 0.05
  swap_prob: float = 0.05

  def validate(self):
    for name in ("synonym_prob", "insert_prob", "delete_prob", "swap_prob"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"augment.{name}={value} must be in [0, 1].")


class TextAugmenter:
  """Applies the EDA operations to one text with a given numpy Generator."""

  def __init__(self, lexicon: SynonymLexicon, config: AugmentConfig = AugmentConfig()):
    config.validate()
    self.lexicon = lexicon
    self.config = config

  def synonym_replace(self, pieces, rng):
    changed = False
    for p in pieces:
      if _is_content(p) and rng.random() < self.config.synonym_prob:
        options = self.lexicon.synonyms(p.text)
        if options:
          p.text = _match_case(options[int(rng.integers(len(options)))], p.text)
          changed = True
    return pieces, changed

  def random_insert(self, pieces, rng):
    sources = [p.text for p in pieces if _is_content(p) and self.lexicon.synonyms(p.text)]
    n = int(round(self.config.insert_prob * sum(p.kind != "other" for p in pieces)))
    if not n or not sources:
      return pieces, False
    for _ in range(n):
      options = self.lexicon.synonyms(sources[int(rng.integers(len(sources)))])
      new = options[int(rng.integers(len(options)))]
      words = [i for i, p in enumerate(pieces) if p.kind != "other"]
      at = words[int(rng.integers(len(words)))]
      if _CJK_CHAR_RE.search(new):
        pieces.insert(at, _Piece(new, "cjk"))
      else:
        pieces[at:at] = [_Piece(new, "latin"), _Piece(" ", "other")]
    return pieces, True

  def random_delete(self, pieces, rng):
    words = [i for i, p in enumerate(pieces) if p.kind != "other"]
    if len(words) < 2 or not self.config.delete_prob:
      return pieces, False
    drop = {i for i in words if rng.random() < self.config.delete_prob}
    if len(drop) == len(words):
      drop.discard(words[int(rng.integers(len(words)))])
    return [p for i, p in enumerate(pieces) if i not in drop], bool(drop)

  def random_swap(self, pieces, rng):
    words = [i for i, p in enumerate(pieces) if p.kind != "other"]
    n = int(round(self.config.swap_prob * len(words)))
    if len(words) < 2 or not n:
      return pieces, False
    for _ in range(n):
      a, b = rng.choice(len(words), 2, replace=False)
      i, j = words[a], words[b]
      pieces[i], pieces[j] = pieces[j], pieces[i]
    return pieces, True

  def augment(self, text: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    """-> (new text, names of the operations that changed it)."""
    pieces = _pieces(text, self.lexicon)
    ops = []
    for name, op in (("synonym", self.synonym_replace), ("insert", self.random_insert),
                     ("delete", self.random_delete), ("swap", self.random_swap)):
      pieces, changed = op(pieces, rng)
      if changed:
        ops.append(name)
    new = _join(pieces)
    return (new, ops) if new != text else (text, [])


class AugmentRecord(grain.transforms.RandomMap):
  """Record -> augmented copy: text replaced, `augment_ops` added; unchanged copies are marked
  `_unchanged` so the writer can skip and count them."""

  def __init__(self, augmenter: TextAugmenter, text_field: str = "text"):
    self.augmenter = augmenter
    self.text_field = text_field

  def random_map(self, element, rng):
    index, record = element
    new, ops = self.augmenter.augment(record[self.text_field], rng)
    out = {k: v for k, v in record.items() if not k.startswith("_")}
    out[self.text_field] = new
    out["augment_ops"] = ops
    out["augment_source"] = index
    if not ops:
      out["_unchanged"] = True
    return out


class AugmentText(grain.transforms.RandomMap):
  """Record -> the record with its text augmented, with probability `prob`, else unchanged.

  For training on the fly: placed after `repeat`, each epoch draws new operations for every
  example (Grain seeds each element from its index, so the stream is deterministic and resumes
  exactly). Padding records pass through."""

  def __init__(self, augmenter: TextAugmenter, prob: float, text_field: str = "text"):
    if not 0.0 <= prob <= 1.0:
      raise ValueError(f"augment prob={prob} must be in [0, 1].")
    self.augmenter = augmenter
    self.prob = prob
    self.text_field = text_field

  def random_map(self, record, rng):
    if record.get("_padding") or rng.random() >= self.prob:
      return record
    new, _ = self.augmenter.augment(record[self.text_field], rng)
    return {**record, self.text_field: new}


def augment_dataset(records: Sequence[dict[str, Any]], augmenter: TextAugmenter, *, seed: int = 0,
                    copies: int = 1, text_field: str = "text") -> grain.MapDataset:
  """Grain MapDataset of `copies` augmented versions of each record (record-major order).

  Element i * copies + c is copy c of record i; each has its own random stream from `seed`, so
  the result does not depend on worker count or read order.
  """
  if copies < 1:
    raise ValueError(f"copies={copies} must be >= 1.")
  pairs = [(i, r) for i, r in enumerate(records) for _ in range(copies)]
  return grain.MapDataset.source(pairs).random_map(AugmentRecord(augmenter, text_field), seed=seed)


# -------------------------------------------------------------------------------------------------
# Back-translation


class Translator(Protocol):
  """Translates a batch of texts between two languages (ISO 639-1 codes, e.g. "en", "zh")."""

  def translate(self, texts: Sequence[str], source_lang: str, target_lang: str) -> list[str]:
    ...


def _translation_packages():
  """(torch, transformers), the `[translate]` extra; MissingExtra naming it when absent."""
  try:
    # Lazy: torch and transformers are heavy, and only back-translation needs them.
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.missing_extra(e, extra="translate", what="Back-translation (MarianMT)") from e
  return torch, transformers


class MarianTranslator:
  """HuggingFace MarianMT models from local directories, one per direction.

  Args:
    model_dirs: {"en-zh": "/models/opus-mt-en-zh", "zh-en": "/models/opus-mt-zh-en"}; each a
      directory written by `save_pretrained` (config, weights, source.spm, target.spm, vocab).
      Nothing is downloaded (`local_files_only=True`).
    batch_size, max_length, num_beams: generation settings.
    device: torch device string.
  """

  def __init__(self, model_dirs: dict[str, str], *, batch_size: int = 16, max_length: int = 256,
               num_beams: int = 4, device: str = "cpu"):
    for pair, path in model_dirs.items():
      if not re.fullmatch(r"[a-z]{2,3}-[a-z]{2,3}", pair):
        raise errors.BadInput(f"Model key {pair!r} must look like 'en-zh' (source-target).")
      if not os.path.isdir(path):
        raise errors.InputNotFound(f"MarianMT model directory {path} for {pair} does not exist; "
                                   "save one with MarianMTModel.save_pretrained (no download "
                                   "happens).")
    _translation_packages()  # a missing extra is reported now, not after the data is cleaned
    self.model_dirs = dict(model_dirs)
    self.batch_size = batch_size
    self.max_length = max_length
    self.num_beams = num_beams
    self.device = device
    self._loaded = {}

  def _model(self, pair):
    if pair not in self.model_dirs:
      raise ValueError(f"No MarianMT model for {pair}; configured: {sorted(self.model_dirs)}.")
    if pair not in self._loaded:
      _, transformers = _translation_packages()
      path = self.model_dirs[pair]
      tokenizer = transformers.MarianTokenizer.from_pretrained(path, local_files_only=True)
      model = transformers.MarianMTModel.from_pretrained(path, local_files_only=True)
      model = model.to(self.device).eval()
      self._loaded[pair] = (tokenizer, model)
    return self._loaded[pair]

  def translate(self, texts, source_lang, target_lang):
    tokenizer, model = self._model(f"{source_lang}-{target_lang}")
    torch, _ = _translation_packages()
    out = []
    for start in range(0, len(texts), self.batch_size):
      batch = tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                        padding=True, truncation=True, max_length=self.max_length).to(self.device)
      with torch.no_grad():
        generated = model.generate(**batch, max_length=self.max_length, num_beams=self.num_beams)
      out.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
    return out


class ReversibleTestTranslator:
  """A deterministic STAND-IN for tests; it does not translate.

  "Translating" wraps the text as `<tgt>…</tgt>` with its words in reverse order; translating back
  undoes that exactly, then applies `paraphrases` (word -> word) so a test can see a change.
  """

  def __init__(self, paraphrases: dict[str, str] | None = None):
    self.paraphrases = dict(paraphrases or {})
    self.calls = []

  def translate(self, texts, source_lang, target_lang):
    self.calls.append((source_lang, target_lang, len(texts)))
    out = []
    for text in texts:
      m = re.fullmatch(rf"<{source_lang}>(.*)</{source_lang}>", text, re.S)
      if m:  # coming back from the pivot language
        words = m.group(1).split(" ")[::-1]
        out.append(" ".join(self.paraphrases.get(w, w) for w in words))
      else:
        out.append(f"<{target_lang}>" + " ".join(text.split(" ")[::-1]) + f"</{target_lang}>")
    return out


class BackTranslator:
  """texts -> source -> pivot -> source, in batches; unchanged results are returned as None."""

  def __init__(self, translator: Translator, source_lang: str, pivot_lang: str):
    if source_lang == pivot_lang:
      raise ValueError(f"pivot_lang must differ from source_lang (both {source_lang!r}).")
    self.translator = translator
    self.source_lang = source_lang
    self.pivot_lang = pivot_lang

  def __call__(self, texts: Sequence[str]) -> list[str | None]:
    pivot = self.translator.translate(list(texts), self.source_lang, self.pivot_lang)
    back = self.translator.translate(pivot, self.pivot_lang, self.source_lang)
    if len(back) != len(texts):
      raise ValueError(f"Translator returned {len(back)} texts for {len(texts)}.")
    return [b if b.strip() and b.strip() != t.strip() else None for t, b in zip(texts, back)]


# -------------------------------------------------------------------------------------------------
# Feature-space interpolation


def _class_targets(labels, target_count, classes):
  values, counts = np.unique(labels, return_counts=True)
  target = int(counts.max()) if target_count is None else int(target_count)
  chosen = values if classes is None else np.asarray(classes)
  return {c: target - int(counts[values == c][0]) for c in chosen
          if c in values and target > counts[values == c][0]}


def smote(features: np.ndarray, labels: np.ndarray, *, k: int = 5,
          target_count: int | None = None, classes: Sequence[Any] | None = None,
          rng: np.random.Generator | int = 0) -> tuple[np.ndarray, np.ndarray]:
  """SMOTE: new samples for classes below target_count (default: the largest class's count).

  Args:
    features: float [N, D] feature vectors or embeddings.
    labels: [N] class ids.
    k: neighbours considered per sample (within its class).
    target_count: wanted samples per class after augmentation.
    classes: only these classes (default: every class below the target).
    rng: Generator or seed.

  Returns:
    (new_features [M, D], new_labels [M]): only the synthetic samples; concatenate them with the
    originals yourself. A class with one sample gets copies of it (no neighbour to interpolate to).
  """
  rng = np.random.default_rng(rng)
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2 or len(features) != len(labels):
    raise ValueError(f"features must be [N, D] and labels [N]; got {features.shape} and "
                     f"{labels.shape}.")
  new_x, new_y = [], []
  for c, missing in _class_targets(labels, target_count, classes).items():
    x = features[labels == c]
    if len(x) == 1:
      new_x.append(np.repeat(x, missing, 0))
    else:
      d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
      np.fill_diagonal(d, np.inf)
      neighbours = np.argsort(d, axis=1)[:, :min(k, len(x) - 1)]  # [n_c, k]
      base = rng.integers(0, len(x), missing)
      pick = neighbours[base, rng.integers(0, neighbours.shape[1], missing)]
      gap = rng.random((missing, 1), dtype=np.float32)
      new_x.append(x[base] + gap * (x[pick] - x[base]))
    new_y.append(np.full(missing, c, labels.dtype))
  if not new_x:
    return np.zeros((0, features.shape[1]), np.float32), np.zeros(0, labels.dtype)
  return np.concatenate(new_x), np.concatenate(new_y)


def mixup(features: np.ndarray, labels: np.ndarray, num_classes: int, *, alpha: float = 0.2,
          classes: Sequence[int] | None = None, num_samples: int | None = None,
          rng: np.random.Generator | int = 0) -> tuple[np.ndarray, np.ndarray]:
  """mixup: x = lam * x_i + (1 - lam) * x_j, y likewise as soft labels, lam ~ Beta(alpha, alpha).

  Args:
    features: float [N, D].
    labels: int [N] class ids, or float [N, C] soft/one-hot labels.
    num_classes: C.
    classes: draw both samples of each pair from these classes (minority mixup); default any.
    num_samples: how many mixed samples (default: as many as the eligible samples).
    rng: Generator or seed.

  Returns:
    (mixed features float32 [M, D], soft labels float32 [M, C]).
  """
  rng = np.random.default_rng(rng)
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  onehot = labels.astype(np.float32) if labels.ndim == 2 else np.eye(num_classes,
                                                                     dtype=np.float32)[labels]
  eligible = np.arange(len(features))
  if classes is not None:
    eligible = eligible[np.isin(onehot.argmax(1), np.asarray(classes))]
  if len(eligible) < 2:
    raise ValueError(f"mixup needs at least 2 eligible samples, got {len(eligible)}.")
  m = len(eligible) if num_samples is None else num_samples
  i = rng.choice(eligible, m)
  j = rng.choice(eligible, m)
  lam = rng.beta(alpha, alpha, (m, 1)).astype(np.float32)
  return lam * features[i] + (1 - lam) * features[j], lam * onehot[i] + (1 - lam) * onehot[j]
