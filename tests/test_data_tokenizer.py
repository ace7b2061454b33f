"""Tests for r1jax.data.tokenizer and the embedded corpus loader."""
import pickle
import unicodedata

import numpy as np
import pytest

from r1jax.data import builtin
from r1jax.data import tokenizer as tokenizer_lib

EN = ["The quick brown fox jumps over the lazy dog.", "A compiler translates source code.",
      "Networking protocols move packets between hosts."]
ZH = ["今天天气很好，我们去公园散步。", "计算机网络协议在主机之间传输数据包。", "编译器把源代码翻译成机器码。"]


@pytest.fixture(scope="module")
def tok():
  texts = builtin.texts("domain")[:1500] + ZH * 20
  return tokenizer_lib.Tokenizer.train(texts, vocab_size=1200)


def test_builtin_corpus_loads_and_test_split_is_not_in_domain():
  domain = builtin.load("domain")
  test = builtin.load("task", split="test")
  assert len(builtin.load("general")) > 5000 and len(domain) > 5000
  assert {r["label"] for r in test} <= set(builtin.labels())
  assert len(builtin.labels()) == 10
  domain_ids = {r["id"] for r in domain}
  assert not domain_ids & {r["id"] for r in test}
  assert not domain_ids & {r["id"] for r in builtin.load("task", split="dev")}
  with pytest.raises(ValueError, match="split"):
    builtin.path("task")
  with pytest.raises(ValueError, match="Unknown built-in"):
    builtin.path("nope")


def test_special_ids_and_roundtrip(tok):
  assert [tok.id_to_piece(i) for i in range(5)] == list(tokenizer_lib.SPECIAL_PIECES)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size == 1200
  for text in EN + ZH:
    ids = tok.encode(text)
    assert min(ids) >= tokenizer_lib.NUM_SPECIAL  # byte fallback: no [UNK], never a special
    assert tok.decode(ids) == unicodedata.normalize("NFKC", text)  # SentencePiece applies NFKC
  # Text that spells a special token does not produce it.
  assert tokenizer_lib.MASK_ID not in tok.encode("[MASK] [CLS] [SEP]")


def test_offsets_map_back_to_characters(tok):
  text = "Ada 中文 über"
  ids, starts, ends = tok.encode_with_offsets(text)
  assert list(ids) == tok.encode(text)
  assert np.all(starts <= ends) and ends.max() == len(text)
  ada = [i for i, s in enumerate(starts) if s < 4 and ends[i] > 0]
  assert "Ada" in "".join(text[starts[i]:ends[i]] for i in ada)


def test_save_load_pickle(tok, tmp_path):
  path = tok.save(str(tmp_path / "tokenizer.model"))
  again = tokenizer_lib.Tokenizer.load(str(tmp_path))
  assert again.encode(EN[0]) == tok.encode(EN[0])
  assert pickle.loads(pickle.dumps(tok)).encode(ZH[0]) == tok.encode(ZH[0])
  with pytest.raises(FileNotFoundError, match="data stage"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "missing.model"))
  del path


def test_word_start_table(tok):
  table = tok.word_start_table()
  assert table.shape == (tok.vocab_size,)
  ids = tok.encode("internationalization")
  assert table[ids[0]] and not table[ids[1:]].any()


def test_bad_arguments():
  with pytest.raises(ValueError, match="model_type"):
    tokenizer_lib.Tokenizer.train(EN, 1000, model_type="wordpiece")
  with pytest.raises(ValueError, match="too small"):
    tokenizer_lib.Tokenizer.train(EN, 100)
  with pytest.raises(ValueError, match="empty"):
    tokenizer_lib.Tokenizer.train(["", "  "], 1000)
