r"""Data stage: sources -> cleaning -> (augmentation) -> tokenizer, as Grain pipelines.

    python -m r1jax.main --config=configs/data.py --workdir=DIR

Outputs (see configs/data.py): DIR/data/clean/part-NNNNN.jsonl, DIR/data/report.json,
DIR/data/augmented/part-NNNNN.jsonl (augmentation on), DIR/tokenizer.model, DIR/config.json,
DIR/summary.json, and DIR/data/tokenized/ (shards.enabled with a trained tokenizer: the cleaned
documents as token ids in ArrayRecord shards with manifest.json, `r1jax.data.shards`; written in
parallel, resumable shard by shard, and checked again, damaged shards rewritten, when a finished
stage is rerun). The cleaned shards are written to DIR/data/clean.tmp and renamed at the end, so
an interrupted run leaves no half-written corpus; rerunning an interrupted run starts over, and
rerunning a finished one with the same config returns its summary without doing anything.

report.json:
  {"documents_in": int, "documents_out": int, "dropped": {rule: count}, "repaired": {rule: count},
   "augmented": int, "augment_unchanged": int, "samples": {rule: [{"text", "file", "line",
   "detail"}]}, "inputs": spec, "seconds": float, "docs_per_sec": float}
with documents_in == documents_out + sum(dropped.values()) (checked before writing).
"""
import glob
import itertools
import json
import os
import re
import shlex
import shutil
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import tqdm

from r1jax import configlib
from r1jax import distributed
from r1jax import errors
from r1jax.data import augment
from r1jax.data import clean
from r1jax.data import clean_beam
from r1jax.data import clean_grain
from r1jax.data import clean_steps
from r1jax.data import dedup_index
from r1jax.data import shards
from r1jax.data import readers
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises configlib.ConfigError listing every bad value."""
  v = configlib.Validator(config)
  v.choice("stage", ("data",))
  v.int_at_least("seed", 0)
  v.string("data.inputs")
  if v.has("data.inputs") and not str(config.data.inputs).strip():
    v.add("data.inputs", "is empty; name files, globs, builtin:general|domain or tfds:NAME/SPLIT.")
  v.choice("data.format", readers.FORMATS)
  v.string("data.text_field")
  v.choice("data.text_mode", readers.TEXT_MODES)
  v.string("data.csv_delimiter")
  v.choice("data.on_undecodable", readers.UNDECODABLE_POLICIES)
  v.positive_int("data.max_chars")
  v.positive_int("data.shard_docs")
  v.int_at_least("data.worker_count", 0)
  v.boolean("data.progress_bar")
  for key in ("fix_text", "nfkc", "remove_control_chars", "normalize_whitespace", "impute_missing",
              "default_phrases", "meaningless_replies", "dedup_exact"):
    v.boolean(f"clean.{key}")
  v.string("clean.languages")
  for lang in _list_or_file(config.clean.get("languages", "") or ""):
    if not re.fullmatch(r"[a-z]{2,3}", lang):
      v.add("clean.languages", f"{lang!r} is not an ISO 639 code such as en, zh, de.")
  v.string("clean.quality_good")
  v.string("clean.quality_bad")
  if v.has("clean.quality_good") and (not config.clean.quality_good.strip()) != (
      not config.clean.quality_bad.strip()):
    v.add("clean.quality_good", "the quality classifier needs both quality_good and quality_bad "
          "(input specs of good and bad example texts).")
  for key in ("min_quality", "max_quality"):
    if v.has(f"clean.{key}") and config.clean[key] != -1:
      v.number_in(f"clean.{key}", -1e9, 1e9)
  v.choice("data.engine", ("grain", "beam"))
  v.string("beam.runner")
  v.int_at_least("beam.num_workers", 0)
  v.string("beam.options")
  v.int_at_least("clean.min_chars", 0, allow=(-1,))
  for key in ("max_url_fraction", "max_symbol_fraction", "max_repetition", "near_dup_threshold"):
    if v.has(f"clean.{key}") and config.clean[key] != -1:
      v.number_in(f"clean.{key}", 0.0, 1.0)
  if v.has("clean.max_contact_density") and config.clean.max_contact_density != -1:
    v.number_in("clean.max_contact_density", 0.0, 1e6)
  v.int_at_least("clean.max_phrase_hits", 1, allow=(-1,))
  v.number_in("clean.min_domain_score", 0.0, 1e6)
  num_perm = v.int_at_least("clean.num_perm", 8)
  if num_perm and num_perm % 4:
    v.add("clean.num_perm", f"{num_perm} must be a multiple of 4.")
  v.positive_int("clean.shingle_size")
  v.choice("clean.dedup_index", dedup_index.INDEXES)
  v.int_at_least("clean.max_samples", 0)
  v.boolean("augment.enabled")
  v.positive_int("augment.copies")
  for key in ("synonym_prob", "insert_prob", "delete_prob", "swap_prob"):
    v.number_in(f"augment.{key}", 0.0, 1.0)
  v.string("augment.synonyms")
  v.string("augment.back_translation.model_dirs")
  v.positive_int("augment.back_translation.batch_size")
  v.boolean("tokenizer.train")
  v.int_at_least("tokenizer.vocab_size", tokenizer_lib.NUM_SPECIAL + 258)
  v.choice("tokenizer.model_type", tokenizer_lib.MODEL_TYPES)
  v.number_in("tokenizer.character_coverage", 0.9, 1.0)
  v.positive_int("tokenizer.max_sentences")
  if "extra_inputs" in config.get("tokenizer", {}):
    v.string("tokenizer.extra_inputs")
  if "shards" in config:
    v.boolean("shards.enabled")
    v.int_at_least("shards.worker_count", 0, allow=(-1,))
  v.raise_if_any("data config")


def _list_or_file(value: str) -> tuple[str, ...]:
  """"a,b,c" -> items; a path to an existing file -> its non-empty lines."""
  value = value.strip()
  if not value:
    return ()
  if os.path.isfile(os.path.expanduser(value)):
    with open(os.path.expanduser(value), encoding="utf-8") as f:
      return tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))
  return tuple(item.strip() for item in value.split(",") if item.strip())


def clean_config(config: ml_collections.ConfigDict) -> clean.CleanConfig:
  c = config.clean

  def threshold(value):
    return None if value == -1 else value

  phrases = (clean.DEFAULT_SPAM_PHRASES if c.default_phrases else ()) + _list_or_file(
      c.extra_phrases)
  return clean.CleanConfig(
      nfkc=c.nfkc, remove_control_chars=c.remove_control_chars,
      normalize_whitespace=c.normalize_whitespace, impute_missing=c.impute_missing,
      min_chars=threshold(c.min_chars), max_url_fraction=threshold(c.max_url_fraction),
      max_contact_density=threshold(c.max_contact_density),
      max_symbol_fraction=threshold(c.max_symbol_fraction),
      max_repetition=threshold(c.max_repetition), spam_phrases=phrases,
      max_phrase_hits=threshold(c.max_phrase_hits),
      meaningless_replies=clean.DEFAULT_MEANINGLESS_REPLIES if c.meaningless_replies else (),
      domain_lexicon=_list_or_file(c.domain_lexicon), min_domain_score=c.min_domain_score,
      dedup_exact=c.dedup_exact, near_dup_threshold=threshold(c.near_dup_threshold),
      num_perm=c.num_perm, shingle_size=c.shingle_size, seed=config.seed,
      dedup_index=c.dedup_index,
      fix_text=c.fix_text, languages=_list_or_file(c.languages),
      min_quality=threshold(c.min_quality), max_quality=threshold(c.max_quality))


def quality_scorer(config: ml_collections.ConfigDict):
  """The classifier trained from clean.quality_good / quality_bad example texts, or None."""
  c = config.clean
  if not c.quality_good.strip():
    return None
  texts = {}
  for side in ("quality_good", "quality_bad"):
    records = sources.read_records(c[side], text_field=config.data.text_field)
    texts[side] = [str(r["text"]) for r in records
                   if not r.get("_error") and str(r.get("text") or "").strip()]
    if not texts[side]:
      raise errors.BadInput(f"clean.{side}={c[side]!r} holds no text to train the quality "
                            "classifier on.")
  logging.info("Quality classifier: %d good and %d bad examples.", len(texts["quality_good"]),
               len(texts["quality_bad"]))
  return clean_steps.QualityClassifier.train(texts["quality_good"], texts["quality_bad"],
                                             seed=config.seed)


def _write_json(path: str, data: Any) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class _ShardWriter:
  """Writes records' public fields to DIR/part-NNNNN.jsonl, `shard_docs` per file."""

  def __init__(self, directory: str, shard_docs: int):
    self.directory = directory
    self.shard_docs = shard_docs
    self.count = 0
    self.paths = []
    self._file = None
    os.makedirs(directory, exist_ok=True)

  def write(self, record: dict[str, Any]) -> None:
    if self.count % self.shard_docs == 0:
      self.close()
      path = os.path.join(self.directory, f"part-{len(self.paths):05d}.jsonl")
      self._file = open(path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
      self.paths.append(path)
    self._file.write(json.dumps(readers.public_fields(record), ensure_ascii=False) + "\n")
    self.count += 1

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def _progress(total: int, enabled: bool, desc: str):
  return tqdm.tqdm(total=total, unit="doc", unit_scale=True, desc=desc, disable=not enabled,
              smoothing=0.1, mininterval=0.5)


def _run_cleaning(config, source, out_dir, reopen, index_dir):
  cfg = clean_config(config)
  scorer = quality_scorer(config)
  if config.data.engine == "beam":
    b = config.beam
    logging.info("Cleaning with Apache Beam (%s, %d workers).", b.runner, b.num_workers)
    start = time.perf_counter()
    report = clean_beam.clean_with_beam(
        source, cfg, out_dir, shard_docs=config.data.shard_docs, runner=b.runner,
        num_workers=b.num_workers, options=shlex.split(b.options), reopen=reopen,
        quality_scorer=scorer, max_samples=config.clean.max_samples)
    paths = sorted(glob.glob(os.path.join(out_dir, "part-*.jsonl")))
    return report, paths, time.perf_counter() - start
  report = clean.CleaningReport(clean.rule_names(cfg, with_quality=scorer is not None),
                                max_samples=config.clean.max_samples)
  writer = _ShardWriter(out_dir, config.data.shard_docs)
  ds = clean_grain.cleaning_dataset(source, cfg, worker_count=config.data.worker_count,
                                    quality_scorer=scorer, index_dir=index_dir)
  start = time.perf_counter()
  with _progress(len(source), config.data.progress_bar, "clean") as bar:
    for record in ds:
      report.add(record)
      if not record.get("_drop"):
        writer.write(record)
      bar.update(1)
  writer.close()
  seconds = time.perf_counter() - start
  return report, writer.paths, seconds


def _translator(config):
  spec = config.augment.back_translation.model_dirs.strip()
  if not spec:
    return None
  dirs = {}
  for item in spec.split(","):
    pair, sep, path = item.partition("=")
    if not sep:
      raise configlib.ConfigError(
          f"augment.back_translation.model_dirs item {item!r} must be PAIR=DIR, e.g. "
          "en-zh=/models/opus-mt-en-zh.")
    dirs[pair.strip()] = os.path.expanduser(path.strip())
  bt = config.augment.back_translation
  return augment.BackTranslator(augment.MarianTranslator(dirs, batch_size=bt.batch_size),
                                bt.source_lang, bt.pivot_lang)


def _run_augmentation(config, clean_dir, out_dir, back):
  """-> (written, unchanged); `back`: the BackTranslator, or None."""
  a = config.augment
  records = sources.open_source(clean_dir)
  aug = augment.TextAugmenter(augment.SynonymLexicon.from_spec(a.synonyms), augment.AugmentConfig(
      synonym_prob=a.synonym_prob, insert_prob=a.insert_prob, delete_prob=a.delete_prob,
      swap_prob=a.swap_prob))
  writer = _ShardWriter(out_dir, config.data.shard_docs)
  unchanged = 0
  ds = augment.augment_dataset(records, aug, seed=config.seed, copies=a.copies)
  with _progress(len(ds), config.data.progress_bar, "augment") as bar:
    for record in ds:
      if record.get("_unchanged"):
        unchanged += 1
      else:
        writer.write(record)
      bar.update(1)
  if back is not None:
    size = a.back_translation.batch_size
    with _progress(len(records), config.data.progress_bar, "back-translate") as bar:
      for start in range(0, len(records), size):
        batch = [records[i] for i in range(start, min(start + size, len(records)))]
        for i, (record, new) in enumerate(zip(batch, back([r["text"] for r in batch]))):
          if new is None:
            unchanged += 1
            continue
          out = readers.public_fields(record)
          out.update(text=new, augment_ops=["back_translation"], augment_source=start + i)
          writer.write(out)
        bar.update(len(batch))
  writer.close()
  return writer.count, unchanged


def _iter_texts(paths):
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line in f:
        yield json.loads(line)["text"]


def _write_tokenized(config, clean_dir: str, tokenizer_path: str, out_dir: str) -> dict[str, Any]:
  """DIR/data/tokenized from the cleaned JSONL (shards already written are kept)."""
  paths = sources.expand_spec(clean_dir)
  logging.info("Tokenizing %d cleaned shards into %s", len(paths), out_dir)
  start = time.perf_counter()
  manifest = shards.write_shards(paths, tokenizer_path, out_dir,
                                 worker_count=config.shards.worker_count,
                                 progress=config.data.progress_bar)
  seconds = time.perf_counter() - start
  logging.info("Tokenized %d documents, %d tokens, in %d shards (%.1f s, %.0f tokens/s): %s",
               manifest["documents"], manifest["tokens"], len(manifest["shards"]), seconds,
               manifest["tokens"] / max(seconds, 1e-9), os.path.join(out_dir, shards.MANIFEST))
  return manifest


def _tokenized_damaged(out_dir: str) -> bool:
  try:
    shards.TokenizedCorpus(out_dir)
  except errors.BadInput as e:
    logging.warning("%s Rewriting the damaged shards.", e)
    return True
  return False


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the data stage in `workdir` (see module docstring); returns the summary.

  With several jax processes (a multi-host launch), process 0 does the work on the shared workdir
  and the others wait for it and return the same summary.
  """
  index, count = jax.process_index(), jax.process_count()
  if count > 1:
    summary = _run(config, workdir) if index == 0 else None
    distributed.sync("r1jax_data_stage")
    if summary is None:
      with open(os.path.join(os.path.abspath(os.path.expanduser(workdir)), "summary.json"),
                encoding="utf-8") as f:
        summary = json.load(f)
    return summary
  return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, "summary.json")
  config_dict = configlib.to_dict(config)
  if os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    if summary.get("status") == "complete":
      with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        previous = json.load(f)
      previous.pop("resolved", None)
      if previous != config_dict:
        raise errors.BadInput(f"{workdir} holds a finished data stage with a different config; "
                              "use a new --workdir (or delete this one) to run with the new "
                              "settings.")
      if summary.get("tokenized_dir") and _tokenized_damaged(summary["tokenized_dir"]):
        _write_tokenized(config, summary["clean_dir"], summary["tokenizer"],
                         summary["tokenized_dir"])
      else:
        logging.info("Data stage in %s already complete; nothing to do.", workdir)
      return summary
  configlib.write_config_json(config, workdir)

  data_dir = os.path.join(workdir, "data")
  clean_dir = os.path.join(data_dir, "clean")
  tmp_dir = clean_dir + ".tmp"
  for stale in (clean_dir, tmp_dir, os.path.join(data_dir, "augmented")):
    shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier attempt
  started = time.perf_counter()

  d = config.data
  reopen = sources.reopener(d.inputs, text_field=d.text_field, format=d.format,
                            text_mode=d.text_mode, on_undecodable=d.on_undecodable,
                            max_chars=d.max_chars, csv_delimiter=d.csv_delimiter)
  source = reopen()
  # Models and optional packages are checked now, not after the cleaning.
  back = _translator(config) if config.augment.enabled else None
  logging.info("Cleaning %d documents from %s", len(source), d.inputs)
  # A deduplication index on disk (clean.dedup_index) is a scratch file in data/, unlinked as
  # soon as it is open: nothing to resume from, an interrupted run rebuilds it as it starts over.
  report, shard_paths, clean_seconds = _run_cleaning(config, source, tmp_dir, reopen, data_dir)
  report_dict = report.to_dict()  # asserts documents_in == documents_out + sum(dropped)
  keep = set(_list_or_file(config.clean.languages))
  if report.dropped.get("language") and not keep & set(report.languages):
    seen = ", ".join(f"{lang} {n}" for lang, n in report.languages.most_common(8))
    raise errors.BadInput(
        f"clean.languages={config.clean.languages!r} kept none of the "
        f"{sum(report.languages.values())} documents it checked; their languages: {seen}. Add the "
        "ones to keep to clean.languages, or set it to '' to keep every language.")
  if report.documents_out == 0:
    raise errors.BadInput(
        f"Cleaning kept no document of {report.documents_in} from {d.inputs!r}; dropped: "
        f"{ {k: v for k, v in report.dropped.items() if v} }. Check the inputs, text_field and "
        "thresholds (samples in the error above).")
  os.replace(tmp_dir, clean_dir)
  shard_paths = [os.path.join(clean_dir, os.path.basename(p)) for p in shard_paths]

  augmented = unchanged = 0
  if config.augment.enabled:
    augmented, unchanged = _run_augmentation(config, clean_dir, os.path.join(data_dir, "augmented"),
                                             back)

  tokenizer_path = None
  vocab_size = None
  extra = []
  if config.tokenizer.train:
    t = config.tokenizer
    logging.info("Training a %s tokenizer (vocab_size %d at most) on the cleaned documents.",
                 t.model_type, t.vocab_size)
    extra = [spec.strip() for spec in str(t.get("extra_inputs", "")).split(",") if spec.strip()]
    if extra:
      logging.info("The tokenizer also learns from %s (not cleaned, not in the corpus).", extra)
    texts = itertools.chain(_iter_texts(shard_paths), *(
        (str(r.get("text") or "") for r in sources.read_records(spec, text_field=d.text_field)
         if not r.get("_error")) for spec in extra))
    tok = tokenizer_lib.Tokenizer.train(
        texts, t.vocab_size, model_type=t.model_type,
        character_coverage=t.character_coverage, max_sentences=t.max_sentences)
    tokenizer_path = tok.save(os.path.join(workdir, TOKENIZER_FILE))
    vocab_size = tok.vocab_size

  tokenized_dir, tokens = None, None
  if tokenizer_path and config.get("shards", {}).get("enabled"):
    tokenized_dir = os.path.join(data_dir, "tokenized")
    tokens = _write_tokenized(config, clean_dir, tokenizer_path, tokenized_dir)["tokens"]
  elif config.get("shards", {}).get("enabled"):
    logging.info("No tokenized shards: tokenizer.train is off (pretraining tokenizes the cleaned "
                 "text with its own tokenizer).")

  report_dict.update(augmented=augmented, augment_unchanged=unchanged, inputs=d.inputs,
                     seconds=round(clean_seconds, 3),
                     docs_per_sec=round(report.documents_in / max(clean_seconds, 1e-9), 1))
  _write_json(os.path.join(data_dir, "report.json"), report_dict)
  summary = {
      "stage": "data", "status": "complete", "inputs": d.inputs,
      "documents_in": report.documents_in, "documents_out": report.documents_out,
      "dropped": sum(report.dropped.values()), "augmented": augmented,
      "clean_dir": clean_dir, "clean_shards": len(shard_paths),
      "report": os.path.join(data_dir, "report.json"), "tokenizer": tokenizer_path,
      "vocab_size": vocab_size,
      "vocab_size_requested": config.tokenizer.vocab_size if config.tokenizer.train else None,
      "tokenizer_extra_inputs": ",".join(extra) or None,
      "tokenized_dir": tokenized_dir, "tokens": tokens,
      "docs_per_sec": report_dict["docs_per_sec"],
      "seconds": round(time.perf_counter() - started, 3),
  }
  _write_json(summary_path, summary)
  logging.info("Data stage done: %d of %d documents kept, %d augmented; %s", report.documents_out,
               report.documents_in, augmented, summary_path)
  return summary
