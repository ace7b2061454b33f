"""Hostile input: property tests over sources, cleaning, tokenizer and example builders.

The strategies (random bytes and random Unicode: CJK, kana/hangul, RTL scripts and bidi controls,
emoji sequences, combining marks, control and format characters, odd whitespace, full-width forms,
very long lines) and the checks (nothing crashes, the output is valid, nothing is lost) live in
`tests/fault_harness/hostile_input.py`, which the fault campaign (`bench/faults.py`) runs with a
much larger budget; here each property gets a few dozen examples.
"""
import tempfile

import hypothesis
from hypothesis import strategies as st
import pytest

from r1jax.data import clean
from r1jax.data import knowledge
from r1jax.data import tokenizer as tokenizer_lib

from fault_harness.hostile_input import CORPUS
from fault_harness.hostile_input import FILE_BYTES
from fault_harness.hostile_input import LONG_LINE
from fault_harness.hostile_input import SHORT_TEXT
from fault_harness.hostile_input import TEXT
from fault_harness.hostile_input import check_classification
from fault_harness.hostile_input import check_cleaning
from fault_harness.hostile_input import check_knowledge
from fault_harness.hostile_input import check_pretrain_stream
from fault_harness.hostile_input import check_source_file
from fault_harness.hostile_input import check_tokenizer
from fault_harness.hostile_input import small_tokenizer

SETTINGS = hypothesis.settings(max_examples=60, deadline=None, database=None,
                               suppress_health_check=list(hypothesis.HealthCheck))

# --------------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def tok():
  return small_tokenizer()


@hypothesis.given(CORPUS)
@SETTINGS
def test_cleaning_never_crashes_and_counts_every_document(items):
  check_cleaning(items)


@hypothesis.given(CORPUS, st.sampled_from([
    clean.CleanConfig(min_chars=None, near_dup_threshold=None),
    clean.CleanConfig(nfkc=False, remove_control_chars=True, min_chars=1),
    clean.CleanConfig(domain_lexicon=("compiler", "编译器"), min_domain_score=0.5)]))
@SETTINGS
def test_cleaning_other_configs(items, config):
  check_cleaning(items, config)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "tsv"])
@hypothesis.given(data=FILE_BYTES)
@hypothesis.settings(SETTINGS, max_examples=30)
def test_source_files_of_any_bytes(fmt, data):
  with tempfile.TemporaryDirectory() as d:
    check_source_file(data, fmt, d)


@hypothesis.given(TEXT)
@SETTINGS
def test_tokenizer_on_any_text(tok, text):
  check_tokenizer(tok, text)


@hypothesis.given(st.lists(SHORT_TEXT, min_size=1, max_size=6))
@hypothesis.settings(SETTINGS, max_examples=8)
def test_tokenizer_training_on_hostile_corpus(texts):
  try:
    tok = tokenizer_lib.Tokenizer.train(texts * 5, 300)
  except ValueError as e:
    assert "vocab_size" in str(e) or "no text" in str(e), str(e)
    return
  for text in texts:
    check_tokenizer(tok, text)


@hypothesis.given(st.lists(st.one_of(SHORT_TEXT, SHORT_TEXT, LONG_LINE.map(lambda t: t[:600])),
                           max_size=7),
                  st.integers(8, 24), st.integers(1, 4), st.booleans(), st.booleans(),
                  st.floats(0.05, 0.95), st.integers(0, 2**31 - 1))
@SETTINGS
def test_pretrain_stream_loses_no_document(tok, texts, seq_len, batch_size, nsp, whole_word,
                                           mlm_prob, seed):
  check_pretrain_stream(tok, texts, seq_len=seq_len, batch_size=batch_size, nsp=nsp,
                        whole_word=whole_word, mlm_prob=mlm_prob, seed=seed, max_steps=2000)


@hypothesis.given(st.lists(st.fixed_dictionaries({"text": TEXT, "label": st.sampled_from("ab")}),
                           min_size=1, max_size=10))
@SETTINGS
def test_classification_eval_pass_keeps_every_record(tok, records):
  check_classification(tok, records)


@hypothesis.given(st.lists(SHORT_TEXT, max_size=6), TEXT)
@SETTINGS
def test_knowledge_matching_on_any_names(names, text):
  check_knowledge(names, text)


@hypothesis.given(st.binary(max_size=300))
@hypothesis.settings(SETTINGS, max_examples=30)
def test_knowledge_file_of_any_bytes(tmp_path_factory, data):
  path = str(tmp_path_factory.mktemp("kb") / "kb.tsv")
  with open(path, "wb") as f:
    f.write(data)
  try:
    kb = knowledge.KnowledgeBase.from_file(path)
  except ValueError as e:  # not UTF-8, a bad line, no entries: the message names the file
    assert path in str(e), str(e)
    return
  assert kb.triples and all(all(part.strip() for part in t) for t in kb.triples)


def test_lone_surrogate_escape_in_jsonl_is_repaired_not_a_crash(tmp_path):
  """JSON may spell a lone UTF-16 surrogate ("\\ud800"); Python decodes it to a str that cannot be
  encoded as UTF-8, which used to crash deduplication and the shard writer."""
  path = tmp_path / "x.jsonl"
  path.write_text('{"text": "a long enough \\ud800 document", "src": "\\udfff"}\n'
                  '{"text": "\\ud83d\\ude00 a valid pair is one emoji here"}\n')
  counts = check_source_file(path.read_bytes(), "jsonl", str(tmp_path))
  assert counts == {"in": 2, "out": 2, "dropped": 0, "rejected_files": 0}
