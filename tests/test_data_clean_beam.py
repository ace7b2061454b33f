"""The Apache Beam cleaning pipeline (r1jax.data.clean_beam) gives the Grain path's output and report.

The corpus is tiny and messy: exact and near duplicates (a chain of them), invalid UTF-8, terminal
colour codes with and without their ESC, mojibake, HTML entities, a filler reply, other languages.
Beam's local runner starts in seconds; the two-worker-process run through the data stage is slow.
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import pytest

from r1jax import configlib
from r1jax.data import clean
from r1jax.data import clean_beam
from r1jax.data import clean_grain
from r1jax.data import clean_steps
from r1jax.data import readers
from r1jax.data import sources
from r1jax.stages import data as data_stage

WORDS = ("memory segment recurrence attention cache layer token vocabulary gradient optimizer "
         "schedule shard kernel compiler network packet router protocol scheduler process thread "
         "database index table query").split()


def _doc(seed, n=60):
  return " ".join(WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] + str(i % 9)
                  for i in range(n)) + "."


def _change(text, *positions):
  words = text.split()
  for p in positions:
    words[p] = "changed" + str(p)
  return " ".join(words)


def messy_lines():
  """JSONL lines (bytes) of the messy corpus."""
  a = _doc(5)
  b = _change(a, 10)          # near duplicate of a
  c = _change(b, 45)          # near duplicate of b only: dropped too (a ~ b ~ c, a !~ c)
  texts = [a, _doc(2), b, _doc(3).upper(), c, _doc(3), _doc(2) + "  ", "ok",
           "\x1b[37;1m3.关于本文档\x1b[;m\x1b[33m 这是一段关于操作系统内存管理和进程调度的说明文字。",
           "[37;1m4.安装说明[;m[33m 安装前请确认网络连接正常，并准备好足够的磁盘空间。",
           "The cafÃ© menu lists crÃ¨me brÃ»lÃ©e &amp; espresso for every guest today.",
           "Die Speicherverwaltung teilt den Prozessen Seiten zu und lagert selten benutzte aus.",
           _doc(4), _change(_doc(4), 5), _doc(6)]
  lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False).encode("utf-8")
           for i, t in enumerate(texts)]
  # Invalid UTF-8 inside a text (repaired: the bad bytes are dropped and counted).
  lines.insert(6, b'{"text": "A kernel fuses elementwise operations \xff\xfe into one launch.", '
                  b'"id": 99}')
  lines.insert(9, b'{"text": "broken')  # malformed JSON
  return lines


@pytest.fixture(name="corpus")
def corpus_fixture(tmp_path):
  path = tmp_path / "messy.jsonl"
  path.write_bytes(b"\n".join(messy_lines()) + b"\n")
  return str(path)


def _grain(src, config, **kwargs):
  report = clean.CleaningReport(clean.rule_names(config, with_quality="quality_scorer" in kwargs))
  kept = [readers.public_fields(r) for r in map(report.add, clean_grain.cleaning_dataset(
      src, config, **kwargs)) if not r.get("_drop")]
  return kept, report.to_dict()


def test_beam_matches_grain_on_a_messy_corpus(corpus, tmp_path):
  src = sources.open_source(corpus)
  config = clean.CleanConfig(languages=("en", "zh"))
  kept, report = _grain(src, config)
  out = str(tmp_path / "beam")
  beam_report = clean_beam.clean_with_beam(src, config, out, num_workers=0, shard_docs=7)
  beam_kept = [readers.public_fields(r) for r in clean_beam.records_in_order(out)]
  assert beam_kept == kept
  assert beam_report.to_dict() == report
  # Grain with its deduplication index on disk (clean.dedup_index) too.
  assert _grain(src, dataclasses.replace(config, dedup_index="disk"),
                index_dir=str(tmp_path / "index")) == (kept, report)
  dropped = {k: v for k, v in report["dropped"].items() if v}
  assert dropped == {"malformed_json": 1, "duplicate": 2, "near_duplicate": 3,
                     "low_quality:meaningless": 1, "language": 1}
  assert report["repaired"]["ftfy"] == 3 and report["repaired"]["undecodable"] == 1
  assert report["languages"] == {"en": 12, "zh": 2, "de": 1}
  texts = [r["text"] for r in kept]
  assert "3.关于本文档这是一段关于操作系统内存管理和进程调度的说明文字。" in texts
  assert any(t.startswith("4.安装说明安装前请确认网络连接正常，") for t in texts)
  assert any("café" in t and "crème brûlée & espresso" in t for t in texts)
  # Shards hold source ranges of 7 records, in order; together the kept documents once.
  assert sorted(os.listdir(out)) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]


def test_near_duplicate_chain_is_decided_by_source_order(tmp_path):
  a = _doc(5)
  b = _change(a, 10)
  c = _change(b, 45)
  config = clean.CleanConfig()
  for order in ([a, b, c], [c, b, a]):
    kept, report = clean_grain.clean_records(order, config)
    assert [r["text"] for r in kept] == order[:1]
    assert report["dropped"]["near_duplicate"] == 2
    beam_report = clean_beam.clean_with_beam(
        [{"text": t, "_file": "<memory>", "_line": i + 1} for i, t in enumerate(order)], config,
        str(tmp_path / str(len(order[0]) + len(os.listdir(tmp_path)))), num_workers=0)
    assert beam_report.to_dict() == report


def test_local_runner_leaves_no_temp_directory(tmp_path, monkeypatch):
  """The DirectRunner runs Beam's FnApiRunner directly: Beam's own DirectRunner first tries
  PrismRunner, which offline left an empty beam-temp* directory in the temp dir on every run."""
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  report = clean_beam.clean_with_beam([{"text": _doc(i), "_file": "<memory>", "_line": i + 1}
                                       for i in range(3)], clean.CleanConfig(),
                                      str(tmp_path / "out"), num_workers=0)
  assert report.to_dict()["documents_out"] == 3
  assert [p for p in os.listdir(temp) if p.startswith("beam-temp")] == []


def test_beam_workers_import_neither_jax_nor_grain(corpus, tmp_path, monkeypatch):
  """What the pipeline hands its workers (every function given to Map/FlatMap, with the steps, the
  scorers and the source recipe inside, or the source) unpickles and runs in a fresh process without importing
  JAX or Grain: their imports were most of a local Beam run's start-up cost."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top  # the [beam] extra
  from apache_beam.internal import pickler  # pylint: disable=g-import-not-at-top
  sent = []
  for name in ("Map", "FlatMap"):
    real = getattr(beam, name)
    monkeypatch.setattr(beam, name, lambda fn, *a, _real=real, **k: sent.append(fn) or _real(
        fn, *a, **k))
  config = clean.CleanConfig(languages=("en", "zh"), min_quality=0.1)
  scorer = clean_steps.QualityClassifier.train([_doc(i) for i in range(8)],
                                               ["buy now cheap", "lol lol lol", "asdf qwer"])
  out = str(tmp_path / "beam")
  clean_beam.clean_with_beam(sources.open_source(corpus), config, out, num_workers=0,
                             reopen=sources.reopener(corpus), quality_scorer=scorer)
  cleaner = clean_beam._CleanBlock  # pylint: disable=protected-access
  block = [i for i, fn in enumerate(sent) if isinstance(fn, cleaner)]
  assert len(block) == 1 and len(sent) >= 8, sent
  # Without a recipe, the source itself travels.
  (tmp_path / "sent.pickle").write_bytes(pickler.dumps(sent + [sources.open_source(corpus)]))
  code = ("import sys\n"
          "from apache_beam.internal import pickler\n"
          f"fns = pickler.loads(open({str(tmp_path / 'sent.pickle')!r}, 'rb').read())\n"
          f"outputs = list(fns[{block[0]}](0))  # cleans the first block: every step runs\n"
          "print(len(outputs), 'jax' in sys.modules, 'grain' in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[1:] == ["False", "False"], result.stdout
  assert int(result.stdout.split()[0]) >= 2  # spilled records and dedup keys came out


def test_missing_beam_names_the_extra():
  code = ("import sys; sys.modules['apache_beam'] = None\n"
          "from r1jax.data import clean, clean_beam\n"
          "clean_beam.clean_with_beam(['x'], clean.CleanConfig(), '/tmp/unused')\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
  assert result.returncode != 0
  assert 'pip install "r1jax[beam]"' in result.stderr.strip().splitlines()[-1]


def _stage_config(inputs, workdir_engine, **overrides):
  config = configlib.load_config(
      os.path.join(os.path.dirname(__file__), "..", "configs", "data.py") + ":variant=tiny")
  config.data.inputs = inputs
  config.data.progress_bar = False
  config.data.engine = workdir_engine
  config.tokenizer.train = False
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def test_language_filter_that_keeps_nothing_is_a_clear_error(corpus, tmp_path):
  config = _stage_config(corpus, "grain", **{"clean.languages": "fr,ja"})
  with pytest.raises(ValueError, match=r"clean.languages='fr,ja' kept none of the 15 documents"
                                       r".*en 12, zh 2, de 1"):
    data_stage.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "data" / "clean")
  bad = _stage_config(corpus, "grain", **{"clean.languages": "english"})
  with pytest.raises(ValueError, match="clean.languages"):
    data_stage.run(bad, str(tmp_path / "bad"))


@pytest.mark.slow
def test_stage_beam_with_two_worker_processes_matches_grain(corpus, tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("\n".join(_doc(i) for i in range(20, 30)) + "\n", encoding="utf-8")
  bad = tmp_path / "bad.txt"
  bad.write_text("\n".join(["buy now cheap cheap $$$ click", "win free money now now now",
                            "asdf qwer zxcv asdf", "lol lol lol lol lol lol"]) + "\n",
                 encoding="utf-8")
  results = []
  for engine in ("grain", "beam"):
    workdir = str(tmp_path / engine)
    config = _stage_config(corpus, engine, **{
        "clean.quality_good": str(good), "clean.quality_bad": str(bad),
        "clean.languages": "en,zh", "beam.num_workers": 2, "data.shard_docs": 5})
    summary = data_stage.run(config, workdir)
    with open(os.path.join(workdir, "data", "report.json"), encoding="utf-8") as f:
      report = json.load(f)
    for key in ("seconds", "docs_per_sec"):
      report.pop(key)
    kept = [readers.public_fields(r)
            for r in sources.read_records(os.path.join(workdir, "data", "clean"))]
    results.append((kept, report, summary["documents_out"]))
  assert results[0] == results[1]
  assert results[0][1]["dropped"]["low_quality:model"] >= 1


@pytest.mark.slow
def test_near_dedup_scale_bench_at_a_tiny_size(tmp_path):
  """bench/near_dedup_scale.py end to end at 3,000 documents: both engines (Grain with either
  dedup index) find the planted near duplicates, drop nothing else, and keep the same documents."""
  out = tmp_path / "scale.json"
  script = os.path.join(os.path.dirname(__file__), "..", "bench", "near_dedup_scale.py")
  proc = subprocess.run([sys.executable, script, "--docs", "3000", "--index", "memory,disk",
                         "--out", str(out)],
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["engines_agree"] and result["reports_agree"]
  for engine in ("grain:memory", "grain:disk", "beam"):
    assert result[engine]["recall"] >= 0.95 and result[engine]["precision"] >= 0.99, result
