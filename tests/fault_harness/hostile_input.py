"""Hostile input: hypothesis strategies and the checks the fuzz properties run on each input.

Inputs are random bytes and random Unicode (CJK, kana/hangul, RTL scripts and bidi controls, emoji
sequences, combining marks, control and format characters, odd whitespace, full-width forms, very
long lines). For every input:
  - nothing crashes (whole-file problems raise a ValueError naming the file, by design);
  - the output is valid (cleaned text is a fixed point of the repairs and encodable as UTF-8, token
    ids are in the vocabulary, batches satisfy the layout contract);
  - nothing is lost: documents in = documents out + documents dropped (with a known reason), and the
    pretraining stream carries every document's tokens exactly once per epoch.

The checks are plain functions that assert and return counts: `tests/test_fuzz.py` runs them as
properties with a few dozen examples each, `run_fuzz` (the campaign's fuzz section) with a much
larger budget, counting documents in, out, dropped and lost.
"""
import collections
import json
import os
import shutil
import tempfile
import unicodedata
from typing import Any

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from r1jax.data import builtin
from r1jax.data import clean
from r1jax.data import clean_grain
from r1jax.data import clean_steps
from r1jax.data import knowledge
from r1jax.data import pretraining
from r1jax.data import readers
from r1jax.data import sources
from r1jax.data import task
from r1jax.data import tokenizer as tokenizer_lib

SPECIAL_NON_TEXT = (tokenizer_lib.PAD_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID,
                    tokenizer_lib.MASK_ID)
_KEPT_CONTROL = {"\n", "\t", "\u200c", "\u200d"}

# --------------------------------------------------------------------------------------------------
# Strategies.

WORDS = st.sampled_from([
    "the", "Ada", "language", "compiler", "x86", "ok", "thanks", "click here", "www.example.com",
    "mail me at a@b.cn", "13912345678", "[MASK]", "[CLS]", "[SEP]", "[PAD]", "<0xE4>", "\u2581",
    "\\u0000", "{\"text\": 1}", "a,b,\"c", "NaN", "null", "\ufffd", "\ufeff", "ﬁ", "Ⅻ", "㍿",
    "顶", "沙发", "谢谢分享", "编译器", "\u200b", "e\u0301", "\u1100\u1161", "👨\u200d👩\u200d👧",
    "🇨🇳", "❤\ufe0f", "👍🏽", "\u202eevil\u202c", "שלום", "مرحبا", "\u0600\u0601",
])
PIECES = st.one_of(
    WORDS,
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),   # CJK
    st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),   # kana
    st.characters(min_codepoint=0xAC00, max_codepoint=0xD7AF),   # hangul
    st.characters(min_codepoint=0x0590, max_codepoint=0x06FF),   # Hebrew, Arabic (RTL)
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(categories=("Cc", "Cf")),                      # control and format
    st.characters(categories=("Mn", "Me")),                      # combining marks
    st.characters(min_codepoint=0xFF01, max_codepoint=0xFF5E),   # full-width ASCII
    st.sampled_from([" ", "  ", "\t", "\n", "\r", "\r\n", "\n\n\n", "\u3000", "\u00a0", "\u2028",
                     "\u2029", "\x0b", "\x0c", "\x85", "\x1c"]),
    st.text(max_size=6),                                         # anything (no lone surrogates)
)
SHORT_TEXT = st.lists(PIECES, max_size=40).map("".join)
LONG_LINE = st.tuples(SHORT_TEXT.filter(lambda t: t.strip()), st.integers(100, 2000)).map(
    lambda t: " ".join([t[0]] * t[1]))
TEXT = st.one_of(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, LONG_LINE)
# Records as a JSON source could give them: text of any JSON type, odd metadata.
RECORD = st.fixed_dictionaries(
    {"text": st.one_of(TEXT, st.none(), st.integers(), st.floats(), st.lists(st.integers(),
                                                                               max_size=3))},
    optional={"source": st.one_of(SHORT_TEXT, st.integers(), st.none(), st.floats()),
              "label": st.one_of(st.sampled_from(["a", "b"]), st.none())})
CORPUS = st.lists(st.one_of(TEXT, RECORD), max_size=12)
FILE_BYTES = st.one_of(
    st.binary(max_size=400),
    st.lists(SHORT_TEXT, max_size=12).map(lambda ls: "\n".join(ls).encode("utf-8")),
    st.lists(st.binary(max_size=40), max_size=12).map(b"\n".join),
    st.lists(st.one_of(SHORT_TEXT.map(lambda t: '{"text": %s}' % json.dumps(t)),
                       st.sampled_from(['{"text": "\\ud800 lone surrogate escape here"}',
                                        '{"text": null}', '{"text": 3}', '[1, 2]', '{"text"',
                                        '{"text": "ok", "meta": "\\udfff"}', '"just a string"']),
                       SHORT_TEXT),
             max_size=10).map(lambda ls: "\n".join(ls).encode("utf-8")),
    st.lists(st.lists(SHORT_TEXT.map(lambda t: t.replace("\n", " ")), min_size=1, max_size=4)
             .map(",".join), max_size=8).map(lambda rows: ("text,label\n" + "\n".join(rows))
                                             .encode("utf-8")),
)



# --------------------------------------------------------------------------------------------------
# Checks. Each returns {"in": n, "out": n, "dropped": n}.


def _assert_utf8(value, where):
  if isinstance(value, str):
    value.encode("utf-8")  # raises on a lone surrogate: the data stage could not write it
  elif isinstance(value, dict):
    for k, v in value.items():
      _assert_utf8(k, where)
      _assert_utf8(v, where)
  elif isinstance(value, (list, tuple)):
    for v in value:
      _assert_utf8(v, where)


def assert_clean_text(text: str, config: clean.CleanConfig) -> None:
  """A kept text is valid: repaired (a fixed point of every repair) and long enough."""
  assert isinstance(text, str)
  _assert_utf8(text, "text")
  bad = sorted({c for c in text if unicodedata.category(c) in ("Cc", "Cf")} - _KEPT_CONTROL)
  assert not bad, f"control/format characters kept: {bad!r} in {text[:80]!r}"
  assert "\r" not in text and text == text.strip() and "\n\n\n" not in text
  assert "  " not in text, repr(text[:80])
  assert all(line == line.strip() for line in text.split("\n"))
  if config.nfkc:  # NFKC, except full-width sentence punctuation after a CJK character
    folded = text.translate({ord(v): k for k, v in clean_steps.CJK_PUNCT.items()})
    assert unicodedata.is_normalized("NFKC", folded), f"not NFKC: {text[:80]!r}"
  again = {"text": text}
  for step in clean.parallel_steps(config):
    if isinstance(step, clean_steps.Repair):
      again = step.map(again)
  assert again["text"] == text, (
      f"repairs are not idempotent: {text[:80]!r} -> {again['text'][:80]!r}")
  if config.min_chars:
    assert clean_steps.content_chars(text) >= config.min_chars


def check_cleaning(items, config: clean.CleanConfig | None = None) -> dict[str, int]:
  """In-memory cleaning of texts/records: counts add up, every kept text is valid."""
  config = config or clean.CleanConfig()
  kept, report = clean_grain.clean_records(list(items), config)
  rules = set(clean.rule_names(config))
  assert report["documents_in"] == len(items)
  assert report["documents_in"] == report["documents_out"] + sum(report["dropped"].values())
  assert report["documents_out"] == len(kept)
  assert set(report["dropped"]) <= rules, set(report["dropped"]) - rules
  for record in kept:
    assert_clean_text(record["text"], config)
    _assert_utf8(record, "record")
  return {"in": report["documents_in"], "out": report["documents_out"],
          "dropped": sum(report["dropped"].values())}


def _physical_records(data: bytes, fmt: str) -> int | None:
  """Records a text/JSONL file must yield: its non-empty lines (a lone CR counts as empty)."""
  if fmt not in ("txt", "jsonl"):
    return None
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  return sum(1 for line in lines if line not in (b"", b"\r"))


def check_source_file(data: bytes, fmt: str, directory: str) -> dict[str, int]:
  """A file of arbitrary bytes: rejected whole with a message naming it, or every line/row comes
  out as a record (good or flagged), and cleaning accounts for each one."""
  path = os.path.join(directory, f"input.{fmt}")
  with open(path, "wb") as f:
    f.write(data)
  try:
    src = sources.open_source(path)
  except ValueError as e:
    assert path in str(e), str(e)
    return {"in": 0, "out": 0, "dropped": 0, "rejected_files": 1}
  expected = _physical_records(data, fmt)
  if expected is not None:
    assert len(src) == expected, (len(src), expected)
  for i in range(len(src)):
    r = src[i]
    assert r["_file"] == path and isinstance(r["_line"], int)
    if r.get("_error"):
      assert r["_error"] in clean.SOURCE_ERRORS, r
    else:
      assert isinstance(r["text"], str) and r["text"].strip()
  config = clean.CleanConfig()
  report = clean.CleaningReport(clean.rule_names(config))
  kept = [r for r in map(report.add, clean_grain.cleaning_dataset(src, config))
          if not r.get("_drop")]
  counts = report.to_dict()
  assert counts["documents_in"] == len(src)
  for record in kept:
    assert_clean_text(record["text"], config)
    _assert_utf8(readers.public_fields(record), "record")
  return {"in": counts["documents_in"], "out": counts["documents_out"],
          "dropped": sum(counts["dropped"].values()), "rejected_files": 0}


def check_tokenizer(tok: tokenizer_lib.Tokenizer, text: str) -> None:
  """Ids in range, no special piece produced by text, offsets inside the text, stable decode."""
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert not set(ids) & set(SPECIAL_NON_TEXT), ids
  with_offsets, starts, ends = tok.encode_with_offsets(text)
  assert list(with_offsets) == ids
  assert np.all(starts <= ends) and np.all(starts >= 0) and np.all(ends <= len(text))
  assert np.all(np.diff(starts) >= 0)
  decoded = tok.decode(ids)
  assert tok.decode(tok.encode(decoded)) == decoded


def _reconstruct(batches: list[dict[str, np.ndarray]], nsp: bool) -> tuple[list, list]:
  """Per row, the documents' token ids put back together from the stream: masked positions get
  their original ids back, A (and a true-next B) segments are joined until the row's next reset.
  Returns (complete documents of epoch 0, every row's epoch-0 part still open at the end)."""
  done, rows = [], collections.defaultdict(list)
  open_epoch = {}
  for b in batches:
    for r in range(b["tokens"].shape[0]):
      tokens = b["tokens"][r].copy()
      w = b["mlm_weights"][r] > 0
      tokens[b["mlm_positions"][r][w]] = b["mlm_ids"][r][w]
      n = int(b["token_mask"][r].sum())
      assert tokens[0] == tokenizer_lib.CLS_ID and tokens[n - 1] == tokenizer_lib.SEP_ID
      body = tokens[1:n - 1]
      if nsp:
        types = b["token_types"][r][1:n - 1]
        sep = int(np.flatnonzero(body == tokenizer_lib.SEP_ID)[0])
        a, b_part = body[:sep], body[sep + 1:]
        assert np.all(types[:sep + 1] == 0) and np.all(types[sep + 1:] == 1)
        content = list(a) + (list(b_part) if b["nsp_label"][r] == 0 else [])
      else:
        content = list(body)
      if b["reset_memory"][r]:
        if r in open_epoch and open_epoch[r] == 0:
          done.append(rows[r])
        rows[r] = []
        open_epoch[r] = int(b["epoch"][r])
      rows[r].extend(int(t) for t in content)
  still_open = [rows[r] for r in rows if open_epoch.get(r) == 0]
  return done, still_open


def check_batch_layout(b, *, rows: int, seq_len: int, preds: int, vocab: int) -> None:
  assert b["tokens"].shape == (rows, seq_len) and b["tokens"].dtype == np.int32
  assert b["mlm_positions"].shape == (rows, preds)
  mask = b["token_mask"]
  assert mask.dtype == np.bool_ and np.all(mask[:, 0])
  assert np.all(mask[:, :-1] >= mask[:, 1:])  # a prefix of real tokens
  assert np.all((b["tokens"] == 0) == ~mask)  # [PAD] exactly on padding
  assert np.all((b["tokens"] >= 0) & (b["tokens"] < vocab))
  assert set(np.unique(b["mlm_weights"])) <= {0.0, 1.0}
  w = b["mlm_weights"] > 0
  for r in range(rows):
    pos = b["mlm_positions"][r][w[r]]
    assert np.all(np.diff(pos) > 0) and np.all(mask[r][pos])
    assert not set(b["mlm_ids"][r][w[r]].tolist()) & set(SPECIAL_NON_TEXT)
  assert set(np.unique(b["nsp_label"])) <= {0, 1}
  assert set(np.unique(b["token_types"])) <= {0, 1}


def check_pretrain_stream(tok, texts, *, seq_len=16, batch_size=3, nsp=True, whole_word=False,
                          mlm_prob=0.15, seed=0, max_steps=400) -> dict[str, int]:
  """Every document of the corpus comes out of the MLM/NSP stream exactly once per epoch, token
  for token; every batch satisfies the layout contract."""
  docs = pretraining.resolve_texts(texts)
  if not docs or (nsp and len(docs) < 2):
    with pytest.raises(ValueError):
      pretraining.pretrain_dataset(texts, tok, seq_len=seq_len, batch_size=batch_size, nsp=nsp)
    return {"in": len(docs), "out": 0, "dropped": len(docs)}
  it = pretraining.pretrain_iterator(texts, tok, seq_len=seq_len, batch_size=batch_size,
                                     seed=seed, nsp=nsp, whole_word=whole_word, mlm_prob=mlm_prob)
  preds = max(1, int(np.ceil(seq_len * mlm_prob)))
  batches = []
  for _ in range(max_steps):
    b = next(it)
    check_batch_layout(b, rows=batch_size, seq_len=seq_len, preds=preds, vocab=tok.vocab_size)
    batches.append(b)
    if np.all(b["epoch"] > 0):
      break
  complete = bool(np.all(batches[-1]["epoch"] > 0))
  done, still_open = _reconstruct(batches, nsp)
  expected = collections.Counter(tuple(tok.encode(d)) for d in docs)
  got = collections.Counter(tuple(d) for d in done)
  assert not got - expected, "the stream made up or changed a document"
  if complete:
    assert got == expected, f"documents lost: {sum((expected - got).values())}"
  missing = expected - got
  for part in still_open:  # the step budget ran out inside a document: a prefix of it so far
    assert any(list(doc[:len(part)]) == part for doc in missing), "a document lost tokens"
  return {"in": len(docs), "out": sum(got.values()), "dropped": 0, "complete": int(complete)}


def check_classification(tok, records, *, seq_len=12, batch_size=4) -> dict[str, int]:
  """An evaluation pass yields every record exactly once (padding rows masked out)."""
  labels = ["a", "b"]
  seen, total = 0, 0
  for batch in task.classification_batches(records, tok, seq_len=seq_len, batch_size=batch_size,
                                           labels=labels, shuffle=False, num_epochs=1,
                                           pad_final_batch=True):
    total += len(batch["label"])
    seen += int(batch["example_mask"].sum())
    valid = batch["example_mask"]
    assert np.all(batch["tokens"][valid, 0] == tokenizer_lib.CLS_ID)
    lengths = batch["token_mask"].sum(axis=1)
    assert np.all(batch["tokens"][valid, lengths[valid] - 1] == tokenizer_lib.SEP_ID)
    assert np.all((batch["tokens"] >= 0) & (batch["tokens"] < tok.vocab_size))
  assert seen == len(records) and total % batch_size == 0
  return {"in": len(records), "out": seen, "dropped": 0}


def check_knowledge(names: list[str], text: str) -> int:
  """Entity matching over arbitrary names and text: sorted, non-overlapping spans in the text."""
  names = [n.replace("\t", " ").strip() for n in names]
  names = [n for n in names if n]
  if not names:
    return 0
  kb = knowledge.KnowledgeBase({n: "thing" for n in names}, [])
  spans = kb.find_mentions(text)
  prev_end = 0
  for s, e in spans:
    assert prev_end <= s < e <= len(text)
    prev_end = e
  rng = np.random.default_rng(0)
  for _ in range(5):
    h, r, t, label = kb.sample(rng)
    assert kb.is_true((h, r, t)) == bool(label)
  return len(spans)


def small_tokenizer() -> tokenizer_lib.Tokenizer:
  """The fuzz tokenizer: a small vocabulary, fast to train, on which most hostile characters fall
  back to byte pieces."""
  return tokenizer_lib.Tokenizer.train(builtin.texts("general")[:3000], 400)


# --------------------------------------------------------------------------------------------------
# The campaign's fuzz section (the properties of tests/test_fuzz.py with a bigger budget).


def run_fuzz(examples_per_property: int, seed: int) -> dict[str, Any]:
  """Each property of tests/test_fuzz.py with `examples_per_property` examples from `seed`:
  inputs tried (per property), documents in / out / dropped / lost, and the failures (minimal
  examples, as hypothesis reports them)."""
  tok = small_tokenizer()
  totals = collections.Counter()
  settings = hypothesis.settings(max_examples=examples_per_property, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))

  def count(name, result=None):
    totals["inputs"] += 1
    totals[f"inputs:{name}"] += 1
    if isinstance(result, dict):
      for k in ("in", "out", "dropped"):
        totals[f"docs_{k}"] += result.get(k, 0)
      if result.get("complete", 1):
        totals["docs_lost"] += (result.get("in", 0) - result.get("out", 0) -
                                result.get("dropped", 0))

  scratch = tempfile.mkdtemp()
  properties = {
      "cleaning": (CORPUS, check_cleaning),
      "source_files": (st.tuples(FILE_BYTES, st.sampled_from(["txt", "jsonl", "csv", "tsv"])),
                       lambda a: check_source_file(a[0], a[1], scratch)),
      "tokenizer": (TEXT, lambda text: check_tokenizer(tok, text)),
      "pretrain_stream": (
          st.tuples(st.lists(st.one_of(SHORT_TEXT, LONG_LINE.map(lambda t: t[:600])),
                             max_size=7), st.integers(8, 24), st.integers(1, 4), st.booleans(),
                    st.booleans(), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1)),
          lambda a: check_pretrain_stream(tok, a[0], seq_len=a[1], batch_size=a[2], nsp=a[3],
                                          whole_word=a[4], mlm_prob=a[5], seed=a[6],
                                          max_steps=3000)),
      "classification": (
          st.lists(st.fixed_dictionaries({"text": TEXT, "label": st.sampled_from("ab")}),
                   min_size=1, max_size=10),
          lambda records: check_classification(tok, records)),
      "knowledge": (st.tuples(st.lists(SHORT_TEXT, max_size=6), TEXT),
                    lambda a: check_knowledge(a[0], a[1])),
  }

  def make_property(name, strategy, check):
    @hypothesis.seed(seed)
    @settings
    @hypothesis.given(strategy)
    def prop(value):
      count(name, check(value))
    return prop

  failures = []
  for name, (strategy, check) in properties.items():
    try:
      make_property(name, strategy, check)()
    except Exception as e:  # pylint: disable=broad-except  (hypothesis re-raises the minimal case)
      failures.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
  shutil.rmtree(scratch, ignore_errors=True)
  return {"inputs_tried": totals["inputs"],
          "per_property": {k.split(":", 1)[1]: v for k, v in totals.items()
                           if k.startswith("inputs:")},
          "documents_in": totals["docs_in"], "documents_out": totals["docs_out"],
          "documents_dropped": totals["docs_dropped"], "documents_lost": totals["docs_lost"],
          "problems": failures}

