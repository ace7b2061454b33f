"""Tests for r1jax.data.augment: EDA operations (English and Chinese), back-translation, SMOTE, mixup."""
import json

import numpy as np
import pytest

from r1jax.data import augment

EN = "The quick brown fox jumps over the lazy dog near the big computer network."
ZH = "我的电脑连接网络的速度很快速。"
ZH_LEXICON = {"电脑": ["计算机", "微机"], "快速": ["迅速"], "网络": ["网路"], "连接": ["联接"]}


@pytest.fixture(scope="module")
def wordnet():
  return augment.SynonymLexicon.wordnet()


def _only(op, **probs):
  config = dict(synonym_prob=0.0, insert_prob=0.0, delete_prob=0.0, swap_prob=0.0)
  config[op] = probs.get("p", 0.5)
  return augment.AugmentConfig(**config)


def test_wordnet_table_ships_with_the_package(wordnet):
  assert "large" in wordnet.synonyms("big")
  assert wordnet.synonyms("Big") == wordnet.synonyms("big") != ()
  assert len(wordnet.table) > 30000


def test_synonym_replacement_english(wordnet):
  aug = augment.TextAugmenter(wordnet, _only("synonym_prob", p=1.0))
  new, ops = aug.augment(EN, np.random.default_rng(0))
  assert ops == ["synonym"] and new != EN
  old_words, new_words = EN.split(), new.split()
  assert len(old_words) == len(new_words)
  for old, w in zip(old_words, new_words):
    if old.lower() in augment.ENGLISH_STOPWORDS:
      assert old == w  # function words are never replaced
    elif old != w:
      assert w.strip(".").lower() in {s.lower() for s in wordnet.synonyms(old.strip("."))}


def test_user_lexicon_chinese(tmp_path):
  path = tmp_path / "syn.tsv"
  path.write_text("# comment\n电脑\t计算机\t微机\n快速,迅速\n网络\t网路\n连接\t联接\n", encoding="utf-8")
  lex = augment.SynonymLexicon.from_file(str(path))
  assert lex.synonyms("电脑") == ("计算机", "微机")
  assert [w for w, is_word in lex.split_cjk("我的电脑连接网络") if is_word] == ["电脑", "连接",
                                                                           "网络"]
  aug = augment.TextAugmenter(lex, _only("synonym_prob", p=1.0))
  new, ops = aug.augment(ZH, np.random.default_rng(1))
  assert ops == ["synonym"] and new.startswith("我的") and new.endswith("的速度很迅速。")
  assert "联接网路" in new and ("计算机" in new or "微机" in new)
  bad = tmp_path / "bad.tsv"
  bad.write_text("单独一个词\n", encoding="utf-8")
  with pytest.raises(ValueError, match="bad.tsv:1"):
    augment.SynonymLexicon.from_file(str(bad))


def test_insert_delete_swap_english_and_chinese(wordnet):
  rng = np.random.default_rng(2)
  words = EN.rstrip(".").split()
  new, ops = augment.TextAugmenter(wordnet, _only("insert_prob", p=0.3)).augment(EN, rng)
  assert ops == ["insert"] and len(new.rstrip(".").split()) == len(words) + round(0.3 * len(words))
  new, ops = augment.TextAugmenter(wordnet, _only("delete_prob", p=0.3)).augment(EN, rng)
  assert ops == ["delete"] and 0 < len(new.split()) < len(words)
  assert set(new.rstrip(".").split()) <= set(words)
  new, ops = augment.TextAugmenter(wordnet, _only("swap_prob", p=0.2)).augment(EN, rng)
  assert ops == ["swap"] and sorted(new.rstrip(".").split()) == sorted(words)
  lex = augment.SynonymLexicon(ZH_LEXICON)
  new, ops = augment.TextAugmenter(lex, _only("swap_prob", p=0.5)).augment(ZH, rng)
  assert ops == ["swap"] and sorted(new) == sorted(ZH)  # whole words moved, characters kept
  new, ops = augment.TextAugmenter(lex, _only("delete_prob", p=0.5)).augment(ZH, rng)
  assert ops == ["delete"] and new.startswith("我的") and len(new) < len(ZH)
  new, ops = augment.TextAugmenter(lex, _only("insert_prob", p=0.5)).augment(ZH, rng)
  assert ops == ["insert"] and len(new) > len(ZH)


def test_augment_dataset_is_a_deterministic_grain_pipeline(wordnet):
  records = [{"text": EN, "label": "a", "_file": "x"}, {"text": "A second sentence about memory.",
                                                        "label": "b"}]
  aug = augment.TextAugmenter(wordnet)
  first = list(augment.augment_dataset(records, aug, seed=3, copies=3))
  again = list(augment.augment_dataset(records, aug, seed=3, copies=3))
  assert first == again and len(first) == 6
  assert [r["augment_source"] for r in first] == [0, 0, 0, 1, 1, 1]
  assert all(r["label"] == records[r["augment_source"]]["label"] for r in first)
  assert "_file" not in first[0]
  assert any(r["text"] != EN for r in first[:3])
  with pytest.raises(ValueError, match="synonym_prob"):
    augment.TextAugmenter(wordnet, augment.AugmentConfig(synonym_prob=1.5))


def test_back_translation_with_the_test_stand_in():
  stand_in = augment.ReversibleTestTranslator(paraphrases={"quick": "fast"})
  bt = augment.BackTranslator(stand_in, "en", "zh")
  out = bt([EN, "nothing to paraphrase here"])
  assert out == [EN.replace("quick", "fast"), None]  # unchanged round trips are None
  assert stand_in.calls == [("en", "zh", 2), ("zh", "en", 2)]
  with pytest.raises(ValueError, match="pivot_lang"):
    augment.BackTranslator(stand_in, "en", "en")


def test_marian_translator_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    augment.MarianTranslator({"en-zh": str(tmp_path / "missing")})
  translator = augment.MarianTranslator({"en-zh": str(tmp_path)})
  with pytest.raises(ValueError, match="No MarianMT model for zh-en"):
    translator.translate(["x"], "zh", "en")


def test_marian_translator_runs_a_real_local_model(tmp_path):
  """The real adapter on a tiny randomly initialised MarianMT model saved locally (no download)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  text = [EN, "A second sentence about memory and networks.", "Ein Satz auf Deutsch."] * 30
  model_path = tmp_path / "spm"
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(model_path),
                                 vocab_size=40, minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=str(model_path) + ".model")
  vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
  for i in range(sp.get_piece_size()):
    vocab.setdefault(sp.id_to_piece(i), len(vocab))
  out = tmp_path / "marian"
  out.mkdir()
  (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  for name in ("source.spm", "target.spm"):
    (out / name).write_bytes((tmp_path / "spm.model").read_bytes())
  tokenizer = transformers.MarianTokenizer(str(out / "source.spm"), str(out / "target.spm"),
                                           str(out / "vocab.json"))
  tokenizer.save_pretrained(str(out))
  config = transformers.MarianConfig(
      vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
      decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=2, eos_token_id=0,
      decoder_start_token_id=2)
  transformers.MarianMTModel(config).save_pretrained(str(out))
  translator = augment.MarianTranslator({"en-de": str(out), "de-en": str(out)}, max_length=12,
                                        num_beams=1)
  result = augment.BackTranslator(translator, "en", "de")([EN, "Another short line."])
  assert len(result) == 2 and all(r is None or isinstance(r, str) for r in result)
  assert len(translator.translate([EN], "en", "de")) == 1


def test_smote_fills_minority_classes():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0, 1, (20, 4)), rng.normal(5, 1, (5, 4)), [[9, 9, 9, 9]]])
  y = np.array([0] * 20 + [1] * 5 + [2])
  new_x, new_y = augment.smote(x, y, k=3, rng=1)
  assert np.bincount(np.concatenate([y, new_y])).tolist() == [20, 20, 20]
  ones = new_x[new_y == 1]
  lo, hi = x[y == 1].min(0), x[y == 1].max(0)
  assert ((ones >= lo - 1e-5) & (ones <= hi + 1e-5)).all()  # interpolations stay in the hull box
  assert (new_x[new_y == 2] == 9).all()  # a single sample can only be copied
  few_x, few_y = augment.smote(x, y, target_count=8, classes=[1], rng=1)
  assert few_y.tolist() == [1, 1, 1] and few_x.shape == (3, 4)


def test_mixup_soft_labels_and_minority_only():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 3)).astype(np.float32)
  y = np.array([0] * 20 + [1] * 6 + [2] * 4)
  mx, my = augment.mixup(x, y, 3, alpha=0.4, rng=2)
  assert mx.shape == (30, 3) and my.shape == (30, 3)
  np.testing.assert_allclose(my.sum(1), 1.0, rtol=1e-6)
  mx, my = augment.mixup(x, y, 3, classes=[1, 2], num_samples=10, rng=3)
  assert my[:, 0].max() == 0.0 and my.shape == (10, 3)
  with pytest.raises(ValueError, match="at least 2"):
    augment.mixup(x, y, 3, classes=[5])
