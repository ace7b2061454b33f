"""Domain-shift diagnostic: held-out MLM loss matches pretraining's own eval, tokenizer and
vocabulary statistics by hand, report files, and clear errors."""
import collections
import json
import os

import numpy as np
import pytest

from r1jax import configlib
from r1jax.data import builtin
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.stages import diagnose
from r1jax.stages import pretrain

from test_finetune import make_config as load  # pylint: disable=g-bad-import-order


def write_jsonl(path, texts):
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("corpora")
  general = write_jsonl(tmp / "general.jsonl", builtin.texts("general")[:400])
  # The domain: FOLDOC entries plus Greek text the general tokenizer has no pieces for.
  domain_texts = [t + " αβγδε λόγος" for t in builtin.texts("domain")[:400]]
  return general, write_jsonl(tmp / "domain.jsonl", domain_texts)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpora):
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  pretrain.run(load("pretrain.py", **{
      "model.d_model": 32, "model.n_layer": 1, "model.n_head": 2, "model.d_head": 16,
      "model.d_inner": 64, "model.vocab_size": 400, "data.corpus": corpora[0],
      "data.seq_len": 16, "data.eval_every_nth_doc": 10, "train.batch_size": 16,
      "train.num_steps": 6, "train.warmup_steps": 1, "eval.every_steps": 6, "eval.num_batches": 3,
      "checkpoint.every_steps": 6}), workdir)
  return workdir


@pytest.fixture(scope="module")
def diagnosed(pretrained, corpora, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("diag"))
  config = load("diagnose.py", init_from=pretrained, general=corpora[0], domain=corpora[1],
                batch_size=16, num_batches=3, max_docs=0)
  return workdir, diagnose.run(config, workdir)


def test_general_mlm_loss_matches_the_pretraining_eval(diagnosed, pretrained):
  """Same held-out documents, seed, segment length and batches as pretraining's own eval."""
  _, summary = diagnosed
  with open(os.path.join(pretrained, "summary.json")) as f:
    final_eval = json.load(f)["final_eval"]
  assert summary["general"]["mlm_loss"] == pytest.approx(final_eval["mlm_loss"], rel=1e-5)
  assert summary["general"]["perplexity"] == pytest.approx(np.exp(final_eval["mlm_loss"]), rel=1e-5)
  assert summary["general"]["held_out_documents"] == 40 and summary["held_out_every_nth"] == 10
  assert summary["seq_len"] == 16 and summary["checkpoint_step"] == 6


def test_tokenizer_and_overlap_statistics(diagnosed, pretrained, corpora):
  _, summary = diagnosed
  g, d, o = summary["general"], summary["domain"], summary["overlap"]
  # Greek is not in the general vocabulary: it comes out as byte pieces in the domain only.
  assert d["byte_fallback_rate"] > g["byte_fallback_rate"]
  assert d["unknown_piece_rate"] == pytest.approx(d["unk_rate"] + d["byte_fallback_rate"])
  assert summary["shift"]["unknown_piece_rate_ratio"] > 1
  tok = tokenizer_lib.Tokenizer.load(os.path.join(pretrained, "tokenizer.model"))
  general_texts = [json.loads(l)["text"] for l in open(corpora[0])]
  domain_texts = [json.loads(l)["text"] for l in open(corpora[1])]
  ids = [i for t in domain_texts for i in tok.encode(t)]
  assert d["pieces"] == len(ids)
  assert d["byte_fallback_rate"] == pytest.approx(np.mean([tok.sp.is_byte(i) for i in ids]))
  # Word overlap by hand.
  gw = collections.Counter(w.lower() for t in general_texts for w in diagnose._WORD_RE.findall(t))
  dw = collections.Counter(w.lower() for t in domain_texts for w in diagnose._WORD_RE.findall(t))
  shared = set(gw) & set(dw)
  assert o["word_type_overlap"] == pytest.approx(len(shared) / len(dw))
  assert o["word_token_coverage"] == pytest.approx(sum(dw[w] for w in shared) / sum(dw.values()))
  missing = [w for w, _ in o["top_missing_domain_words"]]
  assert "λόγος" in missing and all(w not in gw for w in missing)
  for key in ("piece_type_overlap", "piece_token_coverage", "word_jaccard"):
    assert 0.0 < o[key] <= 1.0


def test_report_and_summary_files(diagnosed):
  workdir, summary = diagnosed
  report = open(os.path.join(workdir, "report.md")).read()
  assert "perplexity" in report and "Verdict" in report and summary["verdict"] in report
  with open(os.path.join(workdir, "summary.json")) as f:
    saved = json.load(f)
  assert saved["shift"]["perplexity_ratio"] == pytest.approx(
      summary["domain"]["perplexity"] / summary["general"]["perplexity"])
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_verdict_levels():
  assert diagnose.verdict({"perplexity_ratio": 2.0}, 0.99).startswith("large shift")
  assert diagnose.verdict({"perplexity_ratio": 1.0}, 0.5).startswith("large shift")
  assert diagnose.verdict({"perplexity_ratio": 1.2}, 0.99).startswith("moderate shift")
  assert diagnose.verdict({"perplexity_ratio": 1.05}, 0.99).startswith("small shift")
  assert diagnose.verdict({"perplexity_ratio": 0.3}, 0.5).startswith("no shift for this checkpoint")
  # The thresholds are settings (configs/diagnose.py): the same numbers, another level.
  assert diagnose.shift_level({"perplexity_ratio": 1.2}, 0.99) == "moderate"
  assert diagnose.shift_level({"perplexity_ratio": 1.2}, 0.99, moderate=1.3, large=2.0) == "small"
  assert diagnose.verdict({"perplexity_ratio": 1.2}, 0.99, low_coverage=1.0).startswith("large")


def test_sample_docs_is_even_and_deterministic():
  texts = [str(i) for i in range(100)]
  assert diagnose.sample_docs(texts, 5) == ["0", "25", "50", "74", "99"]
  assert diagnose.sample_docs(texts, 0) == texts


def test_errors(tmp_path):
  with pytest.raises(configlib.ConfigError, match="init_from is empty"):
    diagnose.run(load("diagnose.py"), str(tmp_path))
  with pytest.raises(configlib.ConfigError, match="batch_size: 12 is not divisible"):
    diagnose.validate(load("diagnose.py", batch_size=12), num_devices=8, process_count=1)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
    diagnose.run(load("diagnose.py", init_from=str(tmp_path / "empty")), str(tmp_path / "w"))
