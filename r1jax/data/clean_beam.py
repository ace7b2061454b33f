r"""Cleaning as an Apache Beam pipeline: the steps of `clean.py`, on any Beam runner.

    report = clean_beam.clean_with_beam(sources.open_source("corpus/*.jsonl"), clean.CleanConfig(),
                                        "out/clean", runner="DirectRunner", num_workers=2)
    report.to_dict()  # the same report as the Grain path's, key for key

Needs the `[beam]` extra (apache-beam). The default runner is Beam's local one (DirectRunner, here
with `num_workers` worker processes); `runner="DataflowRunner"` (or FlinkRunner, SparkRunner,
PortableRunner, PrismRunner) with that runner's `options` (Beam's command-line flags, e.g.
["--project=P", "--region=R", "--temp_location=gs://B/tmp", "--setup_file=./setup.py"]) runs
the same pipeline on a cluster, whose workers must be able to read the inputs and write `out_dir`.

The per-document steps are the Grain path's (`clean.parallel_steps`: one implementation of each
rule: plain classes that import neither Grain nor JAX, so neither do the workers); only the two
cross-document decisions are written again, as groupings by key:
  exact duplicates   documents grouped by their `_dedup_key`; in each group the first in source
                     order is kept, the others are `duplicate` ("same as" the first).
  near duplicates    the survivors' MinHash LSH band keys grouped by key give the candidate pairs;
                     each pair's signature agreement is computed once; a document with an earlier
                     partner (source order) at >= the threshold is a `near_duplicate` ("similar
                     to" its most similar earlier partner, the first on ties).
Both decide from source positions only, never from the order the runner delivers documents in, and
both are exactly `ExactDedup` and `NearDedup` applied in source order: the kept documents and the
report (counts, repairs, languages, and the first samples of each rule) equal the Grain path's.

Records travel in batches: a block of BLOCK_DOCS source records is read, cleaned and split by
output shard in one element, and the dedup keys, band keys and signatures move as lists per
partition (a stable hash of the key), so the runner's per-element cost is paid per batch, and no
worker holds more than one partition: memory per worker does not grow with the corpus. The texts
themselves do not travel through the runner at all: each block's cleaned records are written to
`out_dir/_blocks/` and read back by the worker that writes their output shard (removed at the end).

Output: `out_dir/part-NNNNN.jsonl` holds the kept documents of source records
[NNNNN * shard_docs, (NNNNN + 1) * shard_docs) in source order (a range with none kept writes no
file), so the shards read in name order give the Grain path's documents in its order.
"""
import collections
import functools
import json
import math
import os
import pickle
import zlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from r1jax import errors
from r1jax.data import clean
from r1jax.data import clean_steps
from r1jax.data import dedup
from r1jax.data import readers

BLOCK_DOCS = 1024  # source records read and cleaned per element
PARTITION_DOCS = 8192  # documents per dedup partition (keys, bands, signatures)
RUNNERS = ("DirectRunner", "PrismRunner", "DataflowRunner", "FlinkRunner", "SparkRunner",
           "PortableRunner")
_REPORT_FILE = "_report.pickle"
_SPILL_DIR = "_blocks"  # cleaned records by source block and shard, until the shards are written


def _beam():
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.missing_extra(e, extra="beam", what="Cleaning with Apache Beam") from e
  return apache_beam


def _part(key: bytes, n: int) -> int:
  """A stable partition of `key` (Python's hash() differs between worker processes)."""
  return zlib.crc32(key) % n


class _CleanBlock:
  """Reads records [start, start + BLOCK_DOCS), runs the per-document steps on them.

  The cleaned records (dedup fields removed) are written to a file per output shard in
  `spill_dir`, and only that file's name travels: the texts never go through the runner's
  shuffle. Outputs (main) (shard, file name),
  ("keys") (partition, [(dedup key, index, file, line, signature)]) of the live documents when
  exact dedup is on, else ("survivors") [(index, file, line, signature)].
  """

  def __init__(self, source, steps, shard_docs, n_parts, exact, spill_dir, reopen=None):
    self.source = source
    self.spill_dir = spill_dir
    self.reopen = reopen
    self.steps = tuple(steps)
    self.shard_docs = shard_docs
    self.n_parts = n_parts
    self.exact = exact

  def __getstate__(self):
    # With a recipe to reopen the source, workers get the recipe, not the records.
    return dict(self.__dict__, source=None) if self.reopen is not None else self.__dict__

  def __call__(self, start):
    beam = _beam()
    if self.source is None:
      self.source = self.reopen()
    stop = min(start + BLOCK_DOCS, len(self.source))
    records = []
    for i in range(start, stop):
      record = dict(self.source[i])
      record["_index"] = i
      records.append(record)
    records = clean_steps.map_chunk(self.steps, records)
    shards = collections.defaultdict(list)
    keys = collections.defaultdict(list)
    survivors = []
    for r in records:
      key, sig = r.pop("_dedup_key", None), r.pop("_minhash", None)
      shards[r["_index"] // self.shard_docs].append(r)
      if r.get("_drop"):
        continue
      entry = (r["_index"], r.get("_file"), r.get("_line"), sig)
      if self.exact:
        keys[_part(key, self.n_parts)].append((key,) + entry)
      elif sig is not None:
        survivors.append(entry)
    from apache_beam.io import filesystems  # pylint: disable=g-import-not-at-top
    for shard, shard_records in shards.items():
      path = filesystems.FileSystems.join(self.spill_dir, f"block-{start:012d}-{shard:06d}.pickle")
      with filesystems.FileSystems.create(path) as f:  # a retried block rewrites the same file
        f.write(pickle.dumps(shard_records, protocol=pickle.HIGHEST_PROTOCOL))
      yield shard, path
    for part, entries in keys.items():
      yield beam.pvalue.TaggedOutput("keys", (part, entries))
    if survivors:
      yield beam.pvalue.TaggedOutput("survivors", survivors)


class _ExactGroups:
  """One partition of dedup keys -> ("decisions") (shard, (index, rule, detail)) for every later
  copy, and (main) the list of first copies that carry a signature (near dedup's input)."""

  def __init__(self, shard_docs):
    self.shard_docs = shard_docs

  def __call__(self, part_entries):
    beam = _beam()
    _, batches = part_entries
    first = {}
    for batch in batches:
      for key, index, file, line, sig in batch:
        seen = first.get(key)
        if seen is None or index < seen[0]:
          first[key] = (index, file, line, sig)
    for batch in batches:
      for key, index, file, line, sig in batch:
        keeper = first[key]
        if index != keeper[0]:
          detail = dedup.exact_detail(keeper[1], keeper[2])
          yield beam.pvalue.TaggedOutput(
              "decisions", (index // self.shard_docs, (index, "duplicate", detail)))
    survivors = [entry for entry in first.values() if entry[3] is not None]
    if survivors:
      yield survivors


class _BandKeys:
  """A list of survivors -> (band partition, (band, band hash, index) arrays) and (signature
  partition, (index array, signatures [k, num_perm], files, lines)).

  A band's key is its rows folded into 64 bits (FNV-1a style, with the band number): two texts
  whose band rows are equal always share it, and a false match (2^-64 per pair) only adds a
  candidate whose signatures are then compared anyway.
  """

  def __init__(self, bands, num_perm, n_parts, block):
    self.bands = bands
    self.num_perm = num_perm
    self.n_parts = n_parts
    self.block = block

  def __call__(self, survivors):
    beam = _beam()
    index = np.array([s[0] for s in survivors], np.int64)
    sigs = np.frombuffer(b"".join(s[3] for s in survivors), np.uint32).reshape(-1, self.num_perm)
    rows = sigs.reshape(len(index), self.bands, -1).astype(np.uint64)
    h = np.broadcast_to(np.arange(self.bands, dtype=np.uint64) + _FNV_OFFSET,
                        (len(index), self.bands)).copy()
    for r in range(rows.shape[2]):
      h = (h ^ rows[:, :, r]) * _FNV_PRIME
    part = (h % np.uint64(self.n_parts)).astype(np.int64)
    band = np.broadcast_to(np.arange(self.bands, dtype=np.int8), h.shape)
    idx = np.broadcast_to(index[:, None], h.shape)
    for p in np.unique(part):
      m = part == p
      yield int(p), (band[m], h[m], idx[m])
    block = index // self.block
    for b in np.unique(block):
      m = np.flatnonzero(block == b)
      yield beam.pvalue.TaggedOutput("signatures", (int(b), (
          index[m], sigs[m], [survivors[k][1] for k in m], [survivors[k][2] for k in m])))


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _candidate_pairs(block):
  """One band partition -> (signature partition of j, (i, j) arrays) for each i < j that share a
  band key."""

  def pairs(part_entries):
    _, batches = part_entries
    batches = list(batches)
    band = np.concatenate([b[0] for b in batches])
    h = np.concatenate([b[1] for b in batches])
    idx = np.concatenate([b[2] for b in batches])
    order = np.lexsort((idx, h, band))
    band, h, idx = band[order], h[order], idx[order]
    same = (band[1:] == band[:-1]) & (h[1:] == h[:-1])
    starts = np.flatnonzero(~np.concatenate([[False], same]))  # first entry of each bucket
    ends = np.append(starts[1:], len(idx))
    found = set()
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
      members = idx[s:e].tolist()  # ascending
      for n, j in enumerate(members):
        for i in members[:n]:
          found.add((i, j))
    if not found:
      return
    ij = np.array(sorted(found), np.int64)
    for b in np.unique(ij[:, 1] // block):
      m = ij[:, 1] // block == b
      yield int(b), ij[m]

  return pairs


def _rows(index_arrays, wanted):
  """Positions of `wanted` indices in the concatenation of `index_arrays`."""
  index = np.concatenate(index_arrays)
  order = np.argsort(index)
  return order[np.searchsorted(index, wanted, sorter=order)]


def _joined(groups):
  """A partition's {"sigs", "pairs"} -> (pair batches, signature batches, signatures [n, num_perm],
  rows of `wanted` indices: a function), or None when it has no pairs."""
  pairs = list(groups["pairs"])
  if not pairs:
    return None
  batches = list(groups["sigs"])
  sigs = np.concatenate([s[1] for s in batches])
  return pairs, batches, sigs, functools.partial(_rows, [s[0] for s in batches])


def _attach_later(block):
  """(signature partition of j, {"sigs", "pairs"}) -> (partition of i, (i, j, signatures of j))."""

  def attach(part_groups):
    joined = _joined(part_groups[1])
    if joined is None:
      return
    pairs, _, sigs, rows_of = joined
    ij = np.concatenate(pairs)
    sig_j = sigs[rows_of(ij[:, 1])]
    for b in np.unique(ij[:, 0] // block):
      m = ij[:, 0] // block == b
      yield int(b), (ij[m], sig_j[m])

  return attach


def _similar(threshold):
  """(partition of i, {"sigs", "pairs"}) -> (j, (similarity, i, file_i, line_i)) at >= threshold.

  The similarity is NearDedup's: the share of equal signature values, in float64."""

  def similar(part_groups):
    joined = _joined(part_groups[1])
    if joined is None:
      return
    pairs, sig_batches, sigs, rows_of = joined
    files = [f for s in sig_batches for f in s[2]]
    lines = [line for s in sig_batches for line in s[3]]
    ij = np.concatenate([p[0] for p in pairs])
    sig_j = np.concatenate([p[1] for p in pairs])
    rows = rows_of(ij[:, 0])
    sim = (sigs[rows] == sig_j).mean(axis=1)
    for k in np.flatnonzero(sim >= threshold):
      i, j, row = int(ij[k, 0]), int(ij[k, 1]), int(rows[k])
      yield j, (float(sim[k]), i, files[row], lines[row])

  return similar


def _near_decision(shard_docs):
  """(j, [(similarity, i, file, line)]) -> (shard, (j, "near_duplicate", detail)): the most similar
  earlier partner, the first one in source order on ties (as NearDedup's candidate loop)."""

  def decide(j_matches):
    j, matches = j_matches
    sim, _, file, line = max(matches, key=lambda m: (m[0], -m[1]))
    return j // shard_docs, (j, "near_duplicate", dedup.near_detail(sim, file, line))

  return decide


class _WriteShard:
  """(shard, {"records": block files, "decisions"}) -> writes out_dir/part-{shard}.jsonl;
  -> (shard, report)."""

  def __init__(self, out_dir, rules, max_samples):
    self.out_dir = out_dir
    self.rules = tuple(rules)
    self.max_samples = max_samples

  def __call__(self, shard_groups):
    from apache_beam.io import filesystems  # pylint: disable=g-import-not-at-top
    shard, groups = shard_groups
    decisions = {index: (rule, detail) for index, rule, detail in groups["decisions"]}
    records = []
    for path in groups["records"]:
      with filesystems.FileSystems.open(path) as f:
        records.extend(pickle.loads(f.read()))
    records.sort(key=lambda r: r["_index"])
    report = clean.CleaningReport(self.rules, max_samples=self.max_samples)
    lines = []
    for r in records:
      decision = decisions.get(r["_index"])
      if decision is not None and not r.get("_drop"):
        r["_drop"], r["_detail"] = decision
      report.add(r)
      if not r.get("_drop"):
        lines.append(json.dumps(readers.public_fields(r), ensure_ascii=False) + "\n")
    if lines:
      path = filesystems.FileSystems.join(self.out_dir, f"part-{shard:05d}.jsonl")
      with filesystems.FileSystems.create(path) as f:
        f.write("".join(lines).encode("utf-8"))
    return shard, report


def _write_report(path):
  """All shards' (shard, report) -> the merged report, pickled to `path`."""

  def write(shard_reports):
    from apache_beam.io import filesystems  # pylint: disable=g-import-not-at-top
    shard_reports = sorted(shard_reports, key=lambda sr: sr[0])
    if not shard_reports:
      return
    total = shard_reports[0][1]
    for _, report in shard_reports[1:]:
      total.merge(report)
    with filesystems.FileSystems.create(path) as f:
      f.write(pickle.dumps(total))

  return write


def pipeline_options(runner: str = "DirectRunner", num_workers: int = 2,
                     options: Sequence[str] = ()):
  """Beam PipelineOptions: `runner`, Beam's flags `options` passed through, and for the local
  DirectRunner `num_workers` worker processes (0: in this process)."""
  beam = _beam()
  if runner not in RUNNERS:
    raise errors.BadInput(f"beam runner {runner!r} is not one of {RUNNERS}.")
  kwargs = {"runner": runner}
  if runner == "DirectRunner" and num_workers > 0:
    kwargs.update(direct_num_workers=num_workers, direct_running_mode="multi_processing")
  elif runner == "DirectRunner":
    kwargs.update(direct_running_mode="in_memory")
  return beam.options.pipeline_options.PipelineOptions(list(options), **kwargs)


def local_runner(opts):
  """-> Beam's FnApiRunner as DirectRunner builds it (its workers see `opts`), or None (not the
  DirectRunner: Beam makes the runner `opts` names).

  Beam's DirectRunner first tries PrismRunner, which downloads a Go binary from GitHub; offline
  that fails and it falls back to this runner, but leaves an empty /tmp/beam-temp* directory
  behind on every run (Beam 2.78's PrismJobServer makes it before the download and never removes
  it). Online it would run on Prism instead, not the multi-process runner configured here. Asking
  for the fallback directly runs what the tests and benches measure and leaves nothing behind;
  PrismRunner remains a runner of its own."""
  if opts.view_as(_beam().options.pipeline_options.StandardOptions).runner != "DirectRunner":
    return None
  # pylint: disable=g-import-not-at-top
  from apache_beam.portability.api import beam_provision_api_pb2  # the [beam] extra
  from apache_beam.runners.portability import portable_runner  # the [beam] extra
  from apache_beam.runners.portability.fn_api_runner import fn_runner  # the [beam] extra
  encoded = portable_runner.JobServiceHandle.encode_pipeline_options(opts.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def clean_with_beam(source, config: clean.CleanConfig, out_dir: str, *,
                    shard_docs: int = 20_000, runner: str = "DirectRunner", num_workers: int = 2,
                    options: Sequence[str] = (), reopen: Callable[[], Any] | None = None,
                    impute: bool | None = None,
                    domain_scorer: Callable[[str], float] | None = None,
                    quality_scorer: Callable[[str], float] | None = None,
                    max_samples: int = 5) -> clean.CleaningReport:
  """Runs the cleaning pipeline on `runner`; writes out_dir/part-NNNNN.jsonl; -> the report.

  Args: as `clean_grain.cleaning_dataset`, plus `out_dir` (a local or runner-reachable path),
  `shard_docs` (source records per output shard), the runner, its worker count (DirectRunner) and
  Beam flags `options`; `reopen`: a picklable callable that opens `source` again in a worker
  (`sources.reopener(spec, ...)`, which keeps JAX out of the workers), so that workers read the
  inputs themselves instead of receiving the records in the pipeline's description. The scorers
  are pickled to the workers.
  """
  beam = _beam()
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=g-import-not-at-top
  opts = pipeline_options(runner, num_workers, options)
  n = len(source)
  imputer = clean.fit_imputer(source, config, impute)
  steps = clean.parallel_steps(config, imputer, domain_scorer, quality_scorer)
  rules = clean.rule_names(config, domain_scorer is not None, quality_scorer is not None)
  n_parts = max(1, math.ceil(n / PARTITION_DOCS))
  exact = config.dedup_exact
  near = config.near_dup_threshold is not None
  if not FileSystems.exists(out_dir):
    FileSystems.mkdirs(out_dir)
  if n == 0:
    return clean.CleaningReport(rules, max_samples=max_samples)
  report_path = FileSystems.join(out_dir, _REPORT_FILE)
  spill_dir = FileSystems.join(out_dir, _SPILL_DIR)
  if not FileSystems.exists(spill_dir):
    FileSystems.mkdirs(spill_dir)

  with beam.Pipeline(runner=local_runner(opts), options=opts) as p:
    cleaned = (p | "Blocks" >> beam.Create(list(range(0, n, BLOCK_DOCS)))
               | "Spread" >> beam.Reshuffle()
               | "Clean" >> beam.FlatMap(_CleanBlock(source, steps, shard_docs, n_parts, exact,
                                                          spill_dir, reopen))
               .with_outputs("keys", "survivors", main="records"))
    decisions = []
    survivors = cleaned.survivors
    if exact:
      groups = (cleaned.keys | "GroupKeys" >> beam.GroupByKey()
                | "Exact" >> beam.FlatMap(_ExactGroups(shard_docs))
                .with_outputs("decisions", main="survivors"))
      decisions.append(groups.decisions)
      survivors = groups.survivors
    if near:
      bands = dedup.lsh_bands(config.near_dup_threshold, config.num_perm)
      banded = (survivors | "Bands" >> beam.FlatMap(
          _BandKeys(bands, config.num_perm, n_parts, PARTITION_DOCS))
          .with_outputs("signatures", main="bands"))
      pairs = (banded.bands | "GroupBands" >> beam.GroupByKey()
               | "Pairs" >> beam.FlatMap(_candidate_pairs(PARTITION_DOCS)))
      with_later = ({"sigs": banded.signatures, "pairs": pairs}
                    | "JoinLater" >> beam.CoGroupByKey()
                    | "AttachLater" >> beam.FlatMap(_attach_later(PARTITION_DOCS)))
      near_decisions = ({"sigs": banded.signatures, "pairs": with_later}
                        | "JoinEarlier" >> beam.CoGroupByKey()
                        | "Similar" >> beam.FlatMap(_similar(config.near_dup_threshold))
                        | "GroupMatches" >> beam.GroupByKey()
                        | "Decide" >> beam.Map(_near_decision(shard_docs)))
      decisions.append(near_decisions)
    all_decisions = (decisions | "Decisions" >> beam.Flatten()) if decisions else (
        p | "NoDecisions" >> beam.Create([]))
    _ = ({"records": cleaned.records, "decisions": all_decisions}
         | "JoinShards" >> beam.CoGroupByKey()
         | "Write" >> beam.Map(_WriteShard(out_dir, rules, max_samples))
         | "Reports" >> beam.combiners.ToList()
         | "Report" >> beam.Map(_write_report(report_path)))

  with FileSystems.open(report_path) as f:
    report = pickle.loads(f.read())
  FileSystems.delete([report_path, spill_dir])
  return report


def records_in_order(out_dir: str) -> Iterable[dict[str, Any]]:
  """The kept records of a Beam output directory, in source order (shards by name)."""
  paths = [os.path.join(out_dir, p) for p in sorted(os.listdir(out_dir))
           if p.startswith("part-") and p.endswith(".jsonl")]
  if paths:
    yield from readers.RecordSource(paths)
