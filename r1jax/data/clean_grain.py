r"""Cleaning as a Grain pipeline: the steps of `clean.py`, in this process or Grain workers.

    steps = clean.CleanConfig(min_chars=10, near_dup_threshold=0.8)
    ds = clean_grain.cleaning_dataset(sources.open_source("corpus/*.jsonl"), steps, worker_count=2)
    report = clean.CleaningReport()
    kept = [r for r in map(report.add, ds) if not r.get("_drop")]
    report.to_dict()  # {"documents_in", "documents_out", "dropped", "repaired", "samples", ...}

`clean.py` says which steps run and counts what they did; this module is the only place the
cleaning meets Grain (the steps are plain classes, so the Beam path, `clean_beam`, runs them
without importing Grain). Records move in chunks of CHUNK_SIZE, one Grain element per chunk, so
Grain's per-element bookkeeping and a worker's per-message cost are paid per chunk.
bench/data_throughput.py measures the result.
"""
from typing import Any, Callable, Sequence

import grain

from r1jax.data import clean
from r1jax.data import clean_steps
from r1jax.data import grain_ops
from r1jax.data import readers

CHUNK_SIZE = 64


def cleaning_dataset(source, config: clean.CleanConfig, *, impute: bool | None = None,
                     domain_scorer: Callable[[str], float] | None = None,
                     quality_scorer: Callable[[str], float] | None = None,
                     process_index: int = 0, process_count: int = 1,
                     worker_count: int = 0, index_dir: str | None = None) -> grain.IterDataset:
  """Grain pipeline over a random-access source: every record, marked, in source order.

  Args:
    source: a `sources.RecordSource` (or any random-access sequence of records).
    config: thresholds; see clean.CleanConfig.
    impute: fit and apply ImputeMissing to tabular inputs (default: config.impute_missing);
      fitting reads the CSV/Parquet inputs once more.
    domain_scorer: optional callable text -> in-domain score (replaces the lexicon score).
    quality_scorer: optional callable text -> quality score, kept inside
      [config.min_quality, config.max_quality] (see clean_steps.QualityFilter).
    process_index, process_count: this process reads records process_index::process_count.
    worker_count: Grain worker processes for the per-record steps (0: this process).
    index_dir: where a deduplication index on disk keeps its scratch files (None: the temp dir).
  """
  ds = grain.MapDataset.source(source)
  if process_count > 1:
    ds = ds[process_index::process_count]
  num_docs = len(ds)
  imputer = clean.fit_imputer(source, config, impute, ds)
  # Records travel in chunks of CHUNK_SIZE, and each Grain element is a chunk: Grain's per-element
  # bookkeeping (a few microseconds per element and transform) and a worker's per-message cost are
  # paid once per chunk, not once per record and step. The steps themselves still run record by
  # record, in order, so the output is the same as mapping each step over each record, with or
  # without workers.
  ds = ds.batch(CHUNK_SIZE, batch_fn=list)
  ds = ds.map(ForEachRecord(clean.parallel_steps(config, imputer, domain_scorer, quality_scorer)))
  # No reader threads: the steps are pure Python (threads would only contend for the GIL, and
  # Grain's thread prefetch costs more per element than a step); parallelism comes from workers.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count:
    ds = grain_ops.worker_prefetch(ds, worker_count)
  sequential = clean.sequential_steps(config, num_docs, index_dir)
  if sequential:
    ds = ds.map(ForEachRecord(sequential))
  return grain_ops.FlattenIterDataset(ds)


class ForEachRecord(grain.transforms.Map):
  """Applies `steps` (clean_steps.Step) to every record of a chunk (a list of records), in order:
  `clean_steps.map_chunk` as a Grain transform."""

  def __init__(self, steps: Sequence[clean_steps.Step]):
    self.steps = tuple(steps)

  def map(self, element):
    return clean_steps.map_chunk(self.steps, element)


def clean_records(records: Sequence[dict[str, Any]] | Sequence[str],
                  config: clean.CleanConfig | None = None, **kwargs):
  """In-memory convenience: -> (kept records with public fields only, report dict)."""
  config = config or clean.CleanConfig()
  records = [{"text": r, "_line": i + 1, "_file": "<memory>"} if isinstance(r, str) else
             dict(r, _line=r.get("_line", i + 1), _file=r.get("_file", "<memory>"))
             for i, r in enumerate(records)]
  for r in records:
    if not isinstance(r.get("text"), str) and not r.get("_error"):
      r["_error"] = "missing_text" if r.get("text") is None else "bad_text_type"
  report = clean.CleaningReport(clean.rule_names(config, kwargs.get("domain_scorer") is not None,
                                                 kwargs.get("quality_scorer") is not None))
  kept = [readers.public_fields(r) for r in map(report.add, cleaning_dataset(records, config,
                                                                              **kwargs))
          if not r.get("_drop")]
  return kept, report.to_dict()
