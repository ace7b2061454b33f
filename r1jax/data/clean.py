r"""Cleaning: small Grain transforms with one job each, and an exact report of what they did.

    steps = clean.CleanConfig(min_chars=10, near_dup_threshold=0.8)
    ds = clean.cleaning_dataset(sources.open_source("corpus/*.jsonl"), steps, worker_count=2)
    report = clean.CleaningReport()
    kept = [r for r in map(report.add, ds) if not r.get("_drop")]
    report.to_dict()  # {"documents_in", "documents_out", "dropped", "repaired", "samples", ...}

How dropping and counting work: a filter step does not remove a record, it marks it with
`"_drop": rule` (and `"_detail"`, the score that decided) and later steps pass marked records
through untouched. The consumer counts every record once with `CleaningReport.add`, so
documents_in = documents_out + sum(dropped) holds by construction, the counts are exact with any
number of Grain workers (workers' transform objects are copies; counting in them would split the
counts), and every drop keeps a sample with its file and line. Repairs (NFKC changed the text,
control characters removed, ...) are counted per rule in "repaired".

Steps, in pipeline order (the rule name is the report key):
  source errors        malformed_json, missing_text, bad_text_type, ragged_row, too_long,
                       undecodable: rows the source flagged (see sources.py)
  undecodable          repair: remove U+FFFD left by invalid UTF-8
  nfkc                 repair: Unicode NFKC (full-width ASCII -> ASCII, compatibility forms)
  control_chars        repair: remove control and format characters except newline and tab
  whitespace           repair: collapse spaces, strip lines, at most one blank line, no spaces
                       between two CJK characters
  missing_values       repair: fill missing metadata values: numeric columns with the median,
                       others with the mode (as the seed's pandas code does); fitted on the data
  low_quality:meaningless   the whole text is a filler reply ("ok", "thanks", "+1", "顶", "沙发")
  too_short            fewer than min_chars characters, not counting spaces, punctuation and
                       symbols (so "!!!!!!!!!!" is short; a CJK character counts as one)
  low_quality:urls     share of characters inside URLs above max_url_fraction
  low_quality:contact  phone numbers, e-mail addresses, WeChat/QQ ids per 100 words above
                       max_contact_density (and at least 3 of them)
  low_quality:symbols  share of non-space characters that are symbols or unusual punctuation
                       above max_symbol_fraction
  low_quality:repetition   share of repeated word 3-grams (character 3-grams for CJK) above
                       max_repetition (texts with at least 10 3-grams)
  low_quality:phrases  at least max_phrase_hits spam/boilerplate phrases (configurable lists in
                       English and Chinese), or one in a text under 20 words
  off_domain           domain filter: lexicon hits per 100 words below min_domain_score (only when
                       a lexicon or a scorer is given)
  duplicate            exact duplicate after lowercasing and whitespace collapsing (main process)
  near_duplicate       MinHash (num_perm permutations, LSH bands) estimated Jaccard similarity of
                       5-unit shingles >= near_dup_threshold with an earlier kept text (main process)
Word counts are CJK-aware: a Latin/digit run is one word, a CJK character 1/1.5 of one.

Where the work runs: every per-document computation (repairs, scores, the exact-duplicate hash,
shingling and the MinHash signature) is in `parallel_steps`, which run in Grain worker processes
when worker_count > 0; the main process keeps only `sequential_steps`, the cross-document lookups
of deduplication (one dict lookup, and one per LSH band: about 5 us per text). Records move in
chunks of CHUNK_SIZE, one Grain element per chunk, so Grain's per-element bookkeeping and a
worker's per-message cost are paid per chunk. bench/data_throughput.py measures the result.
"""
import collections
import dataclasses
import hashlib
import re
import statistics
import unicodedata
import zlib
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np

from r1jax.data import examples
from r1jax.data import sources

SOURCE_ERRORS = ("malformed_json", "missing_text", "bad_text_type", "ragged_row", "too_long",
                 "undecodable")

DEFAULT_SPAM_PHRASES = (
    # English ads, spam and boilerplate.
    "click here", "buy now", "order now", "call now", "act now", "limited time offer",
    "free shipping", "100% free", "risk free", "earn money", "make money fast", "work from home",
    "add to cart", "subscribe now", "sign up now", "special promotion", "best price",
    "cheap viagra", "casino bonus", "all rights reserved", "cookie policy", "privacy policy",
    "terms of service", "terms and conditions", "unsubscribe", "follow us on",
    # Chinese ads, spam and boilerplate.
    "点击这里", "点击链接", "点击下载", "立即购买", "马上抢购", "免费领取", "加微信", "加我微信",
    "扫码关注", "扫一扫", "关注公众号", "限时优惠", "全场包邮", "代开发票", "低价出售", "兼职赚钱",
    "日赚", "版权所有", "免责声明", "未经授权", "转载请注明",
)
DEFAULT_MEANINGLESS_REPLIES = (
    "ok", "okay", "k", "thanks", "thank you", "thx", "ty", "lol", "lmao", "haha", "+1", "same",
    "bump", "first", "nice", "cool", "great", "agreed", "me too", "yes", "no", "mark", "up",
    "顶", "沙发", "路过", "谢谢", "谢谢分享", "好的", "哈哈", "支持", "赞", "同意", "收藏", "收藏了",
    "楼上说得对", "不错", "学习了", "mark一下", "前排",
)

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
    import sys  # pylint: disable=g-import-not-at-top
    chars = [chr(c) for c in range(sys.maxunicode + 1)
             if unicodedata.category(chr(c)) in ("Cc", "Cf") and chr(c) not in _CONTROL_KEEP]
    _control_re = re.compile("[" + "".join(re.escape(c) for c in chars) + "]")
  return _control_re


@dataclasses.dataclass(frozen=True)
class CleanConfig:
  """Which steps run and their thresholds (None disables a filter). See module docstring."""
  nfkc: bool = True
  remove_control_chars: bool = True
  normalize_whitespace: bool = True
  impute_missing: bool = True
  min_chars: int | None = 10
  max_url_fraction: float | None = 0.5
  max_contact_density: float | None = 5.0
  max_symbol_fraction: float | None = 0.25
  max_repetition: float | None = 0.5
  spam_phrases: tuple[str, ...] = DEFAULT_SPAM_PHRASES
  max_phrase_hits: int | None = 2
  meaningless_replies: tuple[str, ...] = DEFAULT_MEANINGLESS_REPLIES
  domain_lexicon: tuple[str, ...] = ()
  min_domain_score: float = 1.0
  dedup_exact: bool = True
  near_dup_threshold: float | None = 0.8
  num_perm: int = 64
  shingle_size: int = 5
  seed: int = 0

  def validate(self):
    for name in ("max_url_fraction", "max_symbol_fraction", "max_repetition",
                 "near_dup_threshold"):
      value = getattr(self, name)
      if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"clean.{name}={value} must be in [0, 1] (or None to disable).")
    if self.min_chars is not None and self.min_chars < 0:
      raise ValueError(f"clean.min_chars={self.min_chars} must be >= 0.")
    if self.num_perm < 8 or self.num_perm % 4:
      raise ValueError(f"clean.num_perm={self.num_perm} must be a multiple of 4, at least 8.")
    if self.shingle_size < 1:
      raise ValueError(f"clean.shingle_size={self.shingle_size} must be >= 1.")
    if self.min_domain_score < 0:
      raise ValueError(f"clean.min_domain_score={self.min_domain_score} must be >= 0.")


# -------------------------------------------------------------------------------------------------
# Base classes


class Repair(grain.transforms.Map):
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


class Rule(grain.transforms.Map):
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


class SourceErrors(grain.transforms.Map):
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


class NormalizeUnicode(Repair):
  """Unicode NFKC normalization."""
  name = "nfkc"

  def fix(self, text, record):
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


class RemoveControlChars(Repair):
  """Removes control (Cc) and format (Cf) characters except newline, tab, ZWNJ and ZWJ."""
  name = "control_chars"

  def __init__(self):
    # Built here, once per process: Grain workers receive the compiled pattern (a short character
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


class ImputeMissing(grain.transforms.Map):
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


# -------------------------------------------------------------------------------------------------
# Deduplication (stateful: runs in the main process, after the parallel steps)


def _dedup_key(text):
  return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=12).digest()


class DedupKey(grain.transforms.Map):
  """Adds `_dedup_key`: a 12-byte hash of the lowercased, whitespace-collapsed text.

  Pure per-record work, so it runs in the parallel part of the pipeline (in Grain workers when
  there are any); ExactDedup in the main process then only looks the key up.
  """

  def map(self, record):
    if not record.get("_drop"):
      record["_dedup_key"] = _dedup_key(record["text"])
    return record


class ExactDedup(grain.transforms.Map):
  """Drops a text identical (after lowercasing and whitespace collapsing) to an earlier one.

  Uses `_dedup_key` from DedupKey when present (and removes it), else hashes the text itself.
  """
  name = "duplicate"

  def __init__(self):
    self._seen = {}

  def map(self, record):
    key = record.pop("_dedup_key", None)
    if record.get("_drop"):
      return record
    if key is None:
      key = _dedup_key(record["text"])
    first = self._seen.get(key)
    if first is None:
      self._seen[key] = (record.get("_file"), record.get("_line"))
    else:
      record["_drop"] = self.name
      record["_detail"] = f"same as {first[0]}:{first[1]}"
    return record


_PRIME = np.uint64((1 << 31) - 1)  # a < p and h < p keep a * h + b below 2^63: no overflow


class MinHashSignature(grain.transforms.Map):
  """Adds `_minhash`: MinHash of the text's shingles (n consecutive units), uint32 [num_perm] as bytes
  (bytes rather than an array, so Grain workers pass it back without a shared-memory block each).

  Units are lowercased Latin/digit words and single CJK characters, so the same code works for
  English and Chinese. Shingles are hashed with CRC32; permutations are (a * h + b) mod (2^31 - 1).
  Pure numpy; runs in the parallel part of the pipeline.
  """

  def __init__(self, num_perm: int = 64, shingle_size: int = 5, seed: int = 0):
    rng = np.random.default_rng([seed, 0x4D48])
    self.a = rng.integers(1, int(_PRIME), num_perm, dtype=np.uint64)
    self.b = rng.integers(0, int(_PRIME), num_perm, dtype=np.uint64)
    self.shingle_size = shingle_size

  def signature(self, text: str) -> np.ndarray:
    units = _UNIT_RE.findall(text.lower())
    n = self.shingle_size
    if len(units) < n:
      shingles = {" ".join(units)}
    else:
      shingles = {" ".join(units[i:i + n]) for i in range(len(units) - n + 1)}
    h = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), np.uint64, len(shingles))
    h %= _PRIME
    values = (self.a[:, None] * h[None, :] + self.b[:, None]) % _PRIME  # [num_perm, shingles]
    return values.min(axis=1).astype(np.uint32)

  def map(self, record):
    if not record.get("_drop"):
      record["_minhash"] = self.signature(record["text"]).tobytes()
    return record


class NearDedup(grain.transforms.Map):
  """Drops a text whose MinHash estimate of Jaccard similarity with a kept text is >= threshold.

  Locality-sensitive hashing with `bands` bands of num_perm / bands rows finds candidates; the
  signature agreement decides. Needs `_minhash` (bytes) from MinHashSignature. This step holds the
  only cross-document state, so it runs in the main process: it works on the signature's bytes
  directly (band keys are byte slices, no array per record) and decodes signatures to arrays only
  for the rare candidates.
  """
  name = "near_duplicate"

  def __init__(self, threshold: float, num_perm: int = 64):
    self.threshold = threshold
    # The fewest bands whose LSH S-curve midpoint (1/b)^(1/r) sits well below the threshold: pairs
    # at the threshold are almost surely candidates, unrelated pairs rarely are.
    fitting = [b for b in (2, 4, 8, 16, 32, 64) if num_perm % b == 0 and
               (1 / b) ** (b / num_perm) <= threshold - 0.1]
    self.bands = min(fitting) if fitting else num_perm
    self.rows = num_perm // self.bands
    self._band_bytes = [(i * self.rows * 4, (i + 1) * self.rows * 4) for i in range(self.bands)]
    self._buckets = [dict() for _ in range(self.bands)]
    self._kept = []  # (signature bytes, (file, line)) of every kept text, by doc id

  def map(self, record):
    sig = record.pop("_minhash", None)
    if record.get("_drop") or sig is None:
      return record
    keys = [sig[a:b] for a, b in self._band_bytes]
    candidates = set()
    for bucket, key in zip(self._buckets, keys):
      hit = bucket.get(key)
      if hit is not None:
        if isinstance(hit, list):
          candidates.update(hit)
        else:
          candidates.add(hit)
    if candidates:
      mine = np.frombuffer(sig, np.uint32)
      best, best_id = 0.0, None
      for c in sorted(candidates):
        sim = float(np.mean(np.frombuffer(self._kept[c][0], np.uint32) == mine))
        if sim > best:
          best, best_id = sim, c
      if best >= self.threshold:
        record["_drop"] = self.name
        where = self._kept[best_id][1]
        record["_detail"] = f"~{best:.2f} similar to {where[0]}:{where[1]}"
        return record
    doc_id = len(self._kept)
    self._kept.append((sig, (record.get("_file"), record.get("_line"))))
    # A bucket holds the doc id of its only text, or a list once a second text shares the key:
    # almost every key is unique, and a list per key and band would cost more than the lookups
    # (allocation and garbage-collector traversal of 16 lists per text).
    for bucket, key in zip(self._buckets, keys):
      hit = bucket.setdefault(key, doc_id)
      if hit != doc_id:
        if isinstance(hit, list):
          hit.append(doc_id)
        else:
          bucket[key] = [hit, doc_id]
    return record


# -------------------------------------------------------------------------------------------------
# Assembly and report


def parallel_steps(config: CleanConfig, impute: ImputeMissing | None = None,
                   domain_scorer: Callable[[str], float] | None = None) -> list[grain.transforms.Map]:
  """The per-record steps (safe to run in Grain workers), in pipeline order."""
  config.validate()
  steps = [SourceErrors(), RepairUndecodable()]
  if config.nfkc:
    steps.append(NormalizeUnicode())
  if config.remove_control_chars:
    steps.append(RemoveControlChars())
  if config.normalize_whitespace:
    steps.append(NormalizeWhitespace())
  if impute is not None and impute.fill_values:
    steps.append(impute)
  if config.meaningless_replies:
    steps.append(MeaninglessReply(config.meaningless_replies))
  if config.min_chars:
    steps.append(TooShort(config.min_chars))
  if config.max_url_fraction is not None:
    steps.append(UrlDensity(config.max_url_fraction))
  if config.max_contact_density is not None:
    steps.append(ContactSpam(config.max_contact_density))
  if config.max_symbol_fraction is not None:
    steps.append(SymbolDensity(config.max_symbol_fraction))
  if config.max_repetition is not None:
    steps.append(Repetition(config.max_repetition))
  if config.max_phrase_hits is not None and config.spam_phrases:
    steps.append(SpamPhrases(config.spam_phrases, config.max_phrase_hits))
  if config.domain_lexicon or domain_scorer is not None:
    steps.append(DomainFilter(config.domain_lexicon, config.min_domain_score, domain_scorer))
  # Per-document halves of deduplication: hashing here, the stateful lookups in sequential_steps.
  if config.dedup_exact:
    steps.append(DedupKey())
  if config.near_dup_threshold is not None:
    steps.append(MinHashSignature(config.num_perm, config.shingle_size, config.seed))
  return steps


def sequential_steps(config: CleanConfig) -> list[grain.transforms.Map]:
  """The stateful steps (deduplication), run in the main process in record order."""
  steps = []
  if config.dedup_exact:
    steps.append(ExactDedup())
  if config.near_dup_threshold is not None:
    steps.append(NearDedup(config.near_dup_threshold, config.num_perm))
  return steps


def rule_names(config: CleanConfig, with_domain: bool = False) -> list[str]:
  """Report keys for the drop rules this config can apply (so zero counts are reported too)."""
  names = list(SOURCE_ERRORS)
  for step in parallel_steps(config) + sequential_steps(config):
    if isinstance(step, (Rule, ExactDedup, NearDedup)):
      names.append(step.name)
  if with_domain and "off_domain" not in names:
    names.append("off_domain")
  return names


def cleaning_dataset(source, config: CleanConfig, *, impute: bool | None = None,
                     domain_scorer: Callable[[str], float] | None = None,
                     process_index: int = 0, process_count: int = 1,
                     worker_count: int = 0) -> grain.IterDataset:
  """Grain pipeline over a random-access source: every record, marked, in source order.

  Args:
    source: a `sources.RecordSource` (or any random-access sequence of records).
    config: thresholds; see CleanConfig.
    impute: fit and apply ImputeMissing to tabular inputs (default: config.impute_missing);
      fitting reads the CSV/Parquet inputs once more.
    domain_scorer: optional callable text -> in-domain score (replaces the lexicon score).
    process_index, process_count: this process reads records process_index::process_count.
    worker_count: Grain worker processes for the per-record steps (0: this process).
  """
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  imputer = None
  if impute is None:
    impute = config.impute_missing
  if impute:
    tables = getattr(source, "tabular_files", None)
    if tables is None:  # an in-memory list: every record's columns count
      imputer = ImputeMissing.fit(ds[i] for i in range(len(ds)))
    elif tables:  # only CSV/Parquet tables have columns to impute
      imputer = ImputeMissing.fit(f.record(i) for f in tables for i in range(len(f)))
  # Records travel in chunks of CHUNK_SIZE, and each Grain element is a chunk: Grain's per-element
  # bookkeeping (a few microseconds per element and transform) and a worker's per-message cost are
  # paid once per chunk, not once per record and step. The steps themselves still run record by
  # record, in order, so the output is the same as mapping each step over each record, with or
  # without workers.
  ds = ds.batch(CHUNK_SIZE, batch_fn=list)
  ds = ds.map(ForEachRecord(parallel_steps(config, imputer, domain_scorer)))
  # No reader threads: the steps are pure Python (threads would only contend for the GIL, and
  # Grain's thread prefetch costs more per element than a step); parallelism comes from workers.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count:
    ds = examples.worker_prefetch(ds, worker_count)
  sequential = sequential_steps(config)
  if sequential:
    ds = ds.map(ForEachRecord(sequential))
  return examples.FlattenIterDataset(ds)


CHUNK_SIZE = 64


class ForEachRecord(grain.transforms.Map):
  """Applies `steps` (per-record Map transforms) to every record of a chunk (a list of records).

  Step by step over the chunk: each step sees the records in order, so a stateful step (the
  deduplication) behaves exactly as when it is mapped over the records one by one.
  """

  def __init__(self, steps: Sequence[grain.transforms.Map]):
    self.steps = tuple(steps)

  def map(self, element):
    for step in self.steps:
      element = [step.map(record) for record in element]
    return element


class CleaningReport:
  """Counts records by outcome; `add` returns the record so it can sit inside a loop."""

  def __init__(self, rules: Sequence[str] = (), max_samples: int = 5):
    self.documents_in = 0
    self.documents_out = 0
    self.dropped = collections.Counter({r: 0 for r in rules})
    self.repaired = collections.Counter()
    self.samples = collections.defaultdict(list)
    self.max_samples = max_samples

  def add(self, record: dict[str, Any]) -> dict[str, Any]:
    self.documents_in += 1
    for name in record.get("_repaired", ()):
      self.repaired[name] += 1
    rule = record.get("_drop")
    if rule:
      self.dropped[rule] += 1
      if len(self.samples[rule]) < self.max_samples:
        self.samples[rule].append({"text": str(record.get("text", ""))[:200],
                                   "file": record.get("_file"), "line": record.get("_line"),
                                   "detail": record.get("_detail", "")})
    else:
      self.documents_out += 1
    return record

  def to_dict(self) -> dict[str, Any]:
    assert self.documents_in == self.documents_out + sum(self.dropped.values())
    return {"documents_in": self.documents_in, "documents_out": self.documents_out,
            "dropped": dict(self.dropped), "repaired": dict(self.repaired),
            "samples": {k: list(v) for k, v in self.samples.items()}}


def clean_records(records: Sequence[dict[str, Any]] | Sequence[str],
                  config: CleanConfig | None = None, **kwargs):
  """In-memory convenience: -> (kept records with public fields only, report dict)."""
  config = config or CleanConfig()
  records = [{"text": r, "_line": i + 1, "_file": "<memory>"} if isinstance(r, str) else
             dict(r, _line=r.get("_line", i + 1), _file=r.get("_file", "<memory>"))
             for i, r in enumerate(records)]
  for r in records:
    if not isinstance(r.get("text"), str) and not r.get("_error"):
      r["_error"] = "missing_text" if r.get("text") is None else "bad_text_type"
  report = CleaningReport(rule_names(config, kwargs.get("domain_scorer") is not None))
  kept = [sources.public_fields(r) for r in map(report.add, cleaning_dataset(records, config,
                                                                              **kwargs))
          if not r.get("_drop")]
  return kept, report.to_dict()
