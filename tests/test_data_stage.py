"""End-to-end tests of the data stage (r1jax.stages.data) and configs/data.py.

Inputs are built in the test: a tiny TFDS dataset prepared locally as ArrayRecord (no download),
a JSONL file with bad rows, and a CSV with missing values and a ragged row.
"""
import json
import os
import random

import numpy as np
import pytest
import tensorflow_datasets as tfds

from r1jax import configlib
from r1jax import errors
from r1jax.data import pretraining
from r1jax.data import shards
from r1jax.data import sources
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.stages import data as data_stage
from r1jax.stages import pretrain

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "data.py")
TOPICS = ["compilers translate source code into machine code",
          "routers forward packets between networks",
          "a cache keeps recently used data close to the processor",
          "the scheduler decides which process runs next",
          "databases store records in tables with indexes"]


def _doc(i):
  return (f"Note {i}: {TOPICS[i % 5]}, and section {i} adds detail number {i * 7} about "
          f"{TOPICS[(i + 2) % 5]}.")


class R1jaxTinyCorpus(tfds.core.GeneratorBasedBuilder):
  """Twenty short documents with a class label, prepared locally."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(), "topic": tfds.features.ClassLabel(names=["a", "b"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(20):
      yield i, {"text": _doc(i), "topic": i % 2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  tfds_dir = str(root / "tfds")
  R1jaxTinyCorpus(data_dir=tfds_dir, file_format="array_record").download_and_prepare()
  jsonl = root / "extra.jsonl"
  rows = [{"text": _doc(100 + i), "source": "web"} for i in range(10)]
  lines = [json.dumps(r) for r in rows]
  lines.insert(3, '{"text": "broken')           # malformed_json at line 4
  lines.insert(6, '{"body": "no text field"}')  # missing_text at line 7
  lines.append(json.dumps({"text": _doc(100)}))  # exact duplicate of line 1
  lines.append(json.dumps({"text": "ok"}))       # meaningless reply
  jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
  csv = root / "table.csv"
  csv.write_text("text,rating,site\n" + "".join(
      f'"{_doc(200 + i)}",{"" if i == 1 else i},{"" if i == 2 else "x"}\n' for i in range(5)) +
                 "ragged,row,with,extra,fields\n", encoding="utf-8")
  return {"tfds": f"tfds:r1jax_tiny_corpus/train@{tfds_dir}", "jsonl": str(jsonl),
          "csv": str(csv)}


def _config(inputs, **overrides):
  config = configlib.load_config(f"{CONFIG}:variant=tiny")
  config.data.inputs = ",".join([inputs["tfds"], inputs["jsonl"], inputs["csv"]])
  config.data.progress_bar = False
  config.tokenizer.vocab_size = 300
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def test_tfds_dataset_reads_through_the_source_path(inputs):
  records = list(sources.read_records(inputs["tfds"]))
  assert len(records) == 20
  assert {r["topic"] for r in records} == {"a", "b"}  # ClassLabel ids become names
  assert sorted(r["text"] for r in records) == sorted(_doc(i) for i in range(20))


def test_stage_end_to_end(inputs, tmp_path):
  workdir = str(tmp_path / "run")
  summary = data_stage.run(_config(inputs), workdir)
  with open(os.path.join(workdir, "data", "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  # 20 TFDS + 14 JSONL lines + 6 CSV rows.
  assert report["documents_in"] == 40
  dropped = {k: v for k, v in report["dropped"].items() if v}
  assert dropped == {"malformed_json": 1, "missing_text": 1, "duplicate": 1,
                     "low_quality:meaningless": 1, "ragged_row": 1}
  assert report["documents_out"] == 35 == summary["documents_out"]
  assert report["documents_in"] == report["documents_out"] + sum(report["dropped"].values())
  assert report["repaired"] == {"missing_values": 2}  # CSV rows 2 (rating) and 3 (site)
  assert {(s["file"], s["line"]) for s in report["samples"]["malformed_json"]} == {
      (inputs["jsonl"], 4)}
  assert report["samples"]["ragged_row"][0]["line"] == 7
  # Cleaned shards: metadata kept, missing CSV values imputed (rating: median of 0, 2, 3, 4).
  clean = list(sources.read_records(os.path.join(workdir, "data", "clean")))
  assert len(clean) == 35
  by_text = {r["text"]: r for r in clean}
  assert by_text[_doc(3)]["topic"] == "b" and by_text[_doc(101)]["source"] == "web"
  assert by_text[_doc(201)]["rating"] == 2.5 and by_text[_doc(202)]["site"] == "x"
  shard_dir = os.path.join(workdir, "data", "clean")
  for name in os.listdir(shard_dir):
    with open(os.path.join(shard_dir, name), encoding="utf-8") as f:
      assert not any(k.startswith("_") for line in f for k in json.loads(line))
  # Tokenizer next to the data, loadable, used by the pretraining pipeline.
  tok = tokenizer_lib.Tokenizer.load(workdir)
  assert tok.vocab_size == 300 == summary["vocab_size"]
  batch = next(pretraining.pretrain_iterator(os.path.join(workdir, "data", "clean"), tok,
                                             seq_len=32, batch_size=2))
  assert batch["tokens"].shape == (2, 32)
  # The same documents tokenized into ArrayRecord shards for pretraining to stream.
  tokenized = shards.TokenizedCorpus(summary["tokenized_dir"])
  assert len(tokenized) == 35 and tokenized.num_tokens == summary["tokens"]
  np.testing.assert_array_equal(tokenized.tokens(3), tok.encode(clean[3]["text"]))
  assert not os.path.exists(os.path.join(workdir, "data", "augmented"))
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["stage"] == "data"

  # Rerun: a no-op that returns the same summary and rewrites nothing.
  stamp = os.path.getmtime(os.path.join(workdir, "summary.json"))
  assert data_stage.run(_config(inputs), workdir) == summary
  assert os.path.getmtime(os.path.join(workdir, "summary.json")) == stamp
  with pytest.raises(ValueError, match="different config"):
    data_stage.run(_config(inputs, **{"clean.min_chars": 20}), workdir)
  # A damaged shard: the rerun rewrites it from the cleaned JSONL.
  shard = os.path.join(summary["tokenized_dir"], "part-00000.array_record")
  with open(shard, "r+b") as f:
    f.truncate(100)
  with pytest.raises(errors.BadInput, match="part-00000.array_record"):
    shards.TokenizedCorpus(summary["tokenized_dir"])
  assert data_stage.run(_config(inputs), workdir) == summary
  assert len(shards.TokenizedCorpus(summary["tokenized_dir"])) == 35


def test_tokenizer_extra_inputs_shape_the_vocabulary_only(inputs, tmp_path):
  """Text named in tokenizer.extra_inputs gives its terms pieces of their own, and stays out of
  the cleaned corpus."""
  extra = tmp_path / "domain.txt"
  extra.write_text("".join(f"hypervisor paravirtualization hypervisor {i}\n" for i in range(300)))
  base = data_stage.run(_config(inputs, **{"tokenizer.vocab_size": 450}), str(tmp_path / "base"))
  wide = data_stage.run(_config(inputs, **{"tokenizer.extra_inputs": str(extra),
                                           "tokenizer.vocab_size": 450}), str(tmp_path / "wide"))
  pieces = lambda d: len(tokenizer_lib.Tokenizer.load(d).encode("hypervisor paravirtualization"))
  assert pieces(str(tmp_path / "wide")) < pieces(str(tmp_path / "base")) / 2
  assert wide["documents_out"] == base["documents_out"]


def test_stage_with_augmentation_and_domain_filter(inputs, tmp_path):
  lexicon = tmp_path / "lexicon.txt"
  lexicon.write_text("packets\nnetworks\nrouters\n", encoding="utf-8")
  workdir = str(tmp_path / "aug")
  summary = data_stage.run(_config(inputs, **{
      "augment.enabled": True, "augment.copies": 2, "augment.synonym_prob": 0.5,
      "clean.domain_lexicon": str(lexicon), "clean.min_domain_score": 1.0,
      "tokenizer.train": False, "clean.dedup_index": "disk"}), workdir)
  with open(os.path.join(workdir, "data", "report.json"), encoding="utf-8") as f:
    report = json.load(f)
  kept = report["documents_out"]
  assert report["dropped"]["off_domain"] > 0 and kept > 0
  augmented = list(sources.read_records(os.path.join(workdir, "data", "augmented")))
  assert len(augmented) == report["augmented"] == summary["augmented"]
  assert report["augmented"] + report["augment_unchanged"] == 2 * kept
  assert all(r["augment_ops"] for r in augmented)
  clean_texts = {r["text"] for r in sources.read_records(os.path.join(workdir, "data", "clean"))}
  assert len(clean_texts) == kept  # augmented texts are not mixed into clean/
  assert not os.path.exists(os.path.join(workdir, "tokenizer.model"))
  # The deduplication index on disk was a scratch file in data/, gone with the run.
  assert sorted(os.listdir(os.path.join(workdir, "data"))) == ["augmented", "clean", "report.json"]


def test_configs_load_and_validate(inputs, tmp_path):
  for variant in ("tiny", "small", "base"):
    config = configlib.load_config(f"{CONFIG}:variant={variant}")
    assert config.stage == "data"
    data_stage.validate(config)
  assert configlib.load_config(f"{CONFIG}:variant=small").tokenizer.vocab_size == 8000
  bad = _config(inputs, **{"clean.max_url_fraction": 3.0, "data.format": "xml",
                           "tokenizer.vocab_size": 10, "clean.dedup_index": "ssd"})
  with pytest.raises(configlib.ConfigError) as e:
    data_stage.validate(bad)
  message = str(e.value)
  assert "clean.max_url_fraction" in message and "data.format" in message
  assert "tokenizer.vocab_size" in message
  assert "clean.dedup_index: 'ssd' is not one of ('auto', 'memory', 'disk')" in message
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    data_stage.run(_config(inputs, **{"data.inputs": str(tmp_path / "missing.jsonl")}),
                   str(tmp_path / "w"))


def _small_mixed_corpus(path, lines=2700):
  """A corpus of the size a new user tries first: English lines and one Chinese line in five,
  written with 1,500 distinct characters (more than a 1,000-piece vocabulary holds)."""
  rng = random.Random(0)
  words = " ".join(TOPICS).split()
  chinese = [chr(0x4E00 + 7 * i) for i in range(1500)]
  rows = []
  for i in range(lines):
    if i % 5 == 0:
      rows.append("".join(rng.choice(chinese) for _ in range(rng.randint(15, 40))))
    else:
      rows.append(" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + f" {i}.")
  path.write_text("\n".join(rows) + "\n", encoding="utf-8")
  return str(path)


@pytest.mark.parametrize("variant", ["base", "tiny"])
def test_small_corpus_gets_a_vocabulary_that_fits(variant, tmp_path):
  """The README's data command on a 2,700-line corpus: the base variant asks for 50,000 pieces
  (more than the corpus supports), tiny for 1,000 (fewer than its characters need). Both finish,
  and a pretraining model built on the tokenizer takes its piece count."""
  config = configlib.load_config(f"{CONFIG}:variant={variant}")
  config.data.inputs = _small_mixed_corpus(tmp_path / "my_corpus.txt")
  config.data.progress_bar = False
  summary = data_stage.run(config, str(tmp_path / "w"))
  asked = config.tokenizer.vocab_size
  tok = tokenizer_lib.Tokenizer.load(str(tmp_path / "w"))
  assert summary["vocab_size"] == tok.vocab_size and summary["vocab_size_requested"] == asked
  if variant == "base":
    assert asked == 50_000 and tokenizer_lib.NUM_SPECIAL + 256 < tok.vocab_size < asked
  else:
    assert tok.vocab_size == asked == 1000
  rare = chr(0x4E00 + 7 * 1499) + chr(0x4E00 + 7 * 1498)
  for text in ("routers forward packets", rare + chr(0x4E00) * 3):
    assert tok.decode(tok.encode(text)) == text  # rare characters come back through bytes
  pretrain_config = configlib.load_config(
      os.path.join(os.path.dirname(CONFIG), "pretrain.py") + f":variant={variant}")
  assert pretrain.model_config(pretrain_config, vocab_size=tok.vocab_size).vocab_size == (
      tok.vocab_size)
