r"""Data stage: clean the corpus, optionally augment it, train the tokenizer.

    python -m r1jax.main --config=configs/data.py --workdir=/tmp/data
    python -m r1jax.main --config=configs/data.py:variant=tiny --workdir=/tmp/data_tiny
    python -m r1jax.main --config=configs/data.py --workdir=DIR \
        --config.data.inputs='corpus/*.jsonl,notes.txt' --config.data.text_field=body \
        --config.clean.domain_lexicon=lexicon.txt --config.augment.enabled=True

Writes DIR/data/clean/part-*.jsonl ({"text": ..., <metadata>} per line), DIR/data/report.json
(documents_in = documents_out + sum(dropped), samples of every drop with file and line),
DIR/data/augmented/part-*.jsonl when augmentation is on, DIR/tokenizer.model, DIR/data/tokenized/
(the cleaned documents as token ids: ArrayRecord shards + manifest.json), DIR/config.json and
DIR/summary.json. Rerunning on a finished workdir does nothing (but rewrite damaged shards). Use the
result in pretraining with --config.data.corpus=DIR/data/clean (it reads the tokenized shards
beside it) --config.data.tokenizer=DIR/tokenizer.model.

`variant` picks the tokenizer vocabulary of the model variant it is for: tiny (1000), small (8000),
base (50000); tiny also reads only the domain corpus, to be quick.
Thresholds set to -1 disable their rule.
"""
import ml_collections

from r1jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = configlib.parse_arg(arg, variant="base").variant
  configlib.check_variant(variant)
  config = ml_collections.ConfigDict()
  config.stage = "data"
  config.seed = 0                          # augmentation and tokenizer sampling
  config.variant = variant                 # the model variant the tokenizer is for

  config.data = ml_collections.ConfigDict(dict(
      inputs="builtin:general,builtin:domain",  # comma-separated paths/globs/dirs, builtin:NAME,
                                                # tfds:NAME/SPLIT[@DATA_DIR]
      format="auto",              # auto (by extension) | text | jsonl | csv | tsv | parquet
      text_field="text",          # JSONL/CSV/Parquet/TFDS field holding the document
      text_mode="lines",          # plain text: one document per line | paragraphs (blank-line separated)
      csv_delimiter=",",          # CSV field separator
      on_undecodable="repair",    # invalid UTF-8: repair (drop the bad bytes, count) | drop the row
      max_chars=1_000_000,        # longer rows are dropped as too_long
      shard_docs=20_000,          # documents per output JSONL shard
      worker_count=0,             # Grain worker processes for the per-document steps (0: in-process)
      engine="grain",             # cleaning engine: grain (this machine) | beam (Apache Beam: the
                                  # [beam] extra; same rules, same output; runner in `beam`)
      progress_bar=True,          # tqdm bar with documents per second
  ))

  config.clean = ml_collections.ConfigDict(dict(
      fix_text=True,              # ftfy: terminal escapes, mojibake, HTML entities
      nfkc=True,                  # Unicode NFKC normalization; ,!?:; after CJK stay full width
      remove_control_chars=True,  # drop control/format characters (not newline/tab)
      normalize_whitespace=True,  # collapse spaces, strip lines, no spaces between CJK characters
      impute_missing=True,        # CSV/Parquet metadata: median (numeric) / mode (other); never labels
      min_chars=10,               # fewer letters/digits than this: too_short (-1 disables)
      max_url_fraction=0.5,       # share of characters in URLs above this: low_quality:urls
      max_contact_density=5.0,    # phones/e-mails/messenger ids per 100 words: low_quality:contact
      max_symbol_fraction=0.25,   # share of symbol characters: low_quality:symbols
      max_repetition=0.5,         # share of repeated 3-grams: low_quality:repetition
      max_phrase_hits=2,          # spam/boilerplate phrase hits: low_quality:phrases (-1 disables)
      extra_phrases="",           # more spam phrases: comma-separated, or a file with one per line
      default_phrases=True,       # use the built-in English and Chinese phrase list too
      meaningless_replies=True,   # drop filler replies ("ok", "+1", "顶", "沙发")
      languages="",               # keep-list of ISO 639 codes ("en,zh") or a file; "" keeps all
      quality_good="",            # example texts of good quality (input spec) for the classifier
      quality_bad="",             # example texts of bad quality (input spec); both or neither
      min_quality=0.5,            # keep a classifier score (P(good)) >= this (-1: no lower bound)
      max_quality=-1.0,           # and <= this (-1: no upper bound)
      domain_lexicon="",          # in-domain terms: comma-separated or a file; "" = no domain filter
      min_domain_score=1.0,       # lexicon hits per 100 words needed to keep a document
      dedup_exact=True,           # drop exact duplicates (case- and whitespace-insensitive)
      near_dup_threshold=0.8,     # MinHash Jaccard estimate for near duplicates (-1 disables)
      num_perm=64,                # MinHash permutations (multiple of 4)
      shingle_size=5,             # words (CJK: characters) per shingle
      dedup_index="auto",         # where dedup remembers seen texts: memory (fast, ~2.3 KB per
                                  # document) | disk (SQLite scratch file, bounded memory, same
                                  # result) | auto (disk above 200,000 documents); Grain engine
      max_samples=5,              # dropped examples kept per rule in report.json
  ))

  config.beam = ml_collections.ConfigDict(dict(
      runner="DirectRunner",      # DirectRunner (local processes) | DataflowRunner | FlinkRunner |
                                  # SparkRunner | PortableRunner | PrismRunner
      num_workers=2,              # DirectRunner worker processes (0: in this process)
      options="",                 # Beam flags passed through, e.g. "--project=P --region=R
                                  # --temp_location=gs://B/tmp --setup_file=./setup.py"
  ))

  config.augment = ml_collections.ConfigDict(dict(
      enabled=False,              # off by default: pretraining corpora are not augmented
      copies=1,                   # augmented versions per document
      synonym_prob=0.1,           # per word: replace with a synonym
      insert_prob=0.05,           # insert round(p * words) synonyms
      delete_prob=0.05,           # per word: delete
      swap_prob=0.05,             # round(p * words) swaps of two words
      synonyms="wordnet",         # "wordnet" (shipped table), a lexicon file, or "wordnet,FILE"
      back_translation=ml_collections.ConfigDict(dict(
          model_dirs="",          # "en-zh=/models/opus-mt-en-zh,zh-en=/models/opus-mt-zh-en" (local
                                  # MarianMT directories); "" = no back-translation
          source_lang="en",       # language of the corpus
          pivot_lang="zh",        # language translated through
          batch_size=16,          # texts per translation batch
      )),
  ))

  config.tokenizer = ml_collections.ConfigDict(dict(
      train=True,                 # train DIR/tokenizer.model on the cleaned documents
      vocab_size=configlib.variant_vocab_size(variant),  # = the model variant's vocab
      model_type="bpe",           # bpe (about a second on the embedded corpus) | unigram
      character_coverage=0.9995,  # characters covered by pieces; the rest fall back to bytes
      max_sentences=300_000,      # lines sampled for training
      extra_inputs="",            # more text for the vocabulary only (input specs, comma-separated;
                                  # read as they are): e.g. the domain and task text
  ))

  config.shards = ml_collections.ConfigDict(dict(
      enabled=True,               # tokenize the cleaned corpus into DIR/data/tokenized (ArrayRecord)
                                  # for pretraining to stream (needs tokenizer.train)
      worker_count=-1,            # processes tokenizing shards in parallel (-1: one per CPU core)
  ))

  if variant == "tiny":
    config.data.inputs = "builtin:domain"
  return config
