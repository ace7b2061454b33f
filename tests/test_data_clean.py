"""Tests for r1jax.data.clean and clean_steps: each step on English and Chinese text, and exact
report counts."""
import json

import numpy as np
import pytest

from r1jax.data import clean
from r1jax.data import clean_grain
from r1jax.data import clean_steps
from r1jax.data import dedup
from r1jax.data import sources

EN_GOOD = ("Transformer-XL keeps a memory of hidden states from earlier segments, so attention can "
           "reach text the current segment no longer holds.")
ZH_GOOD = "计算机网络协议规定了主机之间交换数据的格式和顺序，是互联网能够正常运行的基础。"


def _fix(step, text, **record):
  return step.map(dict(record, text=text))["text"]


def _drop(step, text, **record):
  return step.map(dict(record, text=text)).get("_drop")


def test_repairs_english_and_chinese():
  assert _fix(clean_steps.NormalizeUnicode(), "ＡＢＣ１２３ ﬁle") == "ABC123 file"
  # NFKC turns "，！" into ",!" but has no ASCII "。": sentence punctuation after a CJK character is
  # written full width, whichever form it came in, and stays ASCII in Latin context.
  nfkc = clean_steps.NormalizeUnicode()
  assert _fix(nfkc, "中文，全角！") == "中文，全角！"
  assert _fix(nfkc, "我们,今天去公园。对吗?好:走;") == "我们，今天去公园。对吗？好：走；"
  assert _fix(nfkc, "ＡＢＣ，ｄｅｆ！ 1，000 中文。") == "ABC,def! 1,000 中文。"
  assert _fix(clean_steps.RemoveControlChars(), "a\x00b\x07c\u200bd\ufeff\te\nf") == "abcd\te\nf"
  assert _fix(clean_steps.RemoveControlChars(), "中\u200b文\x1b测试") == "中文测试"
  ws = clean_steps.NormalizeWhitespace()
  assert _fix(ws, "  two   spaces\t\there \r\n\n\n\nnext  ") == "two spaces here\n\nnext"
  assert _fix(ws, "中 文 的  空 格 and English words") == "中文的空格 and English words"
  assert _fix(clean_steps.RepairUndecodable(), "bro\ufffdken", _undecodable=True) == "broken"
  record = clean_steps.NormalizeUnicode().map({"text": "ＡＢＣ"})
  assert record["_repaired"] == ["nfkc"]


def test_too_short_is_cjk_aware():
  step = clean_steps.TooShort(10)
  assert _drop(step, "short one") == "too_short"       # 8 letters
  assert _drop(step, "!!!!!!!!!!!!!!!!!!!") == "too_short"  # punctuation does not count
  assert _drop(step, "今天天气很好我们去") == "too_short"  # 9 characters
  assert _drop(step, "今天天气很好，我们去公园。") is None  # 11 characters
  assert _drop(step, "ten chars!") is None or _drop(step, "tenletters") is None


def test_low_quality_rules_english_and_chinese():
  urls = clean_steps.UrlDensity(0.5)
  assert _drop(urls, "see http://a.example.com/x/y/z http://b.example.com/q?=1 now") is not None
  assert _drop(urls, "访问 www.example.cn/abc/def/ghi 和 https://x.cn/12345678") is not None
  assert _drop(urls, EN_GOOD + " More at https://example.org.") is None
  contact = clean_steps.ContactSpam(5.0)
  assert _drop(contact, "Call 555-123-4567 or 555-987-6543, mail deals@spam.com") is not None
  assert _drop(contact, "加微信：abc12345 或者 电话13812345678 13912345678 优惠") is not None
  assert _drop(contact, EN_GOOD + " Written by Ann <ann@uni.edu>.") is None
  symbols = clean_steps.SymbolDensity(0.25)
  assert _drop(symbols, "$$$ ### @@@ *** ~~~ ^^^ win $$$") is not None
  assert _drop(symbols, "★★★★★ 好评 ★★★★★ ☆☆☆") is not None
  assert _drop(symbols, ZH_GOOD) is None and _drop(symbols, EN_GOOD) is None
  rep = clean_steps.Repetition(0.5)
  assert _drop(rep, "buy cheap watches now " * 10) is not None
  assert _drop(rep, "好便宜快来买" * 10) is not None
  assert _drop(rep, EN_GOOD) is None and _drop(rep, ZH_GOOD) is None
  phrases = clean_steps.SpamPhrases(clean.DEFAULT_SPAM_PHRASES, 2)
  assert _drop(phrases, "Click here to get it, buy now while stocks last!") is not None
  assert _drop(phrases, "限时优惠！点击链接立即购买") is not None
  assert _drop(phrases, EN_GOOD) is None and _drop(phrases, ZH_GOOD) is None
  filler = clean_steps.MeaninglessReply(clean.DEFAULT_MEANINGLESS_REPLIES)
  for text in ("Thanks!!", "+1", "顶！", "沙发", "哈哈哈哈哈哈哈哈", "lol"):
    assert _drop(filler, text) == "low_quality:meaningless", text
  assert _drop(filler, EN_GOOD) is None and _drop(filler, "谢谢你的详细解释，帮助很大") is None


def test_domain_filter_lexicon_and_scorer():
  lex = clean_steps.DomainFilter(["compiler", "network", "协议", "memory"], min_score=2.0)
  assert _drop(lex, EN_GOOD) is None  # "memory" once in 21 words: 4.8 per 100
  assert _drop(lex, ZH_GOOD) is None
  assert _drop(lex, "The cat sat on the mat and looked at the birds outside.") == "off_domain"
  assert _drop(lex, "今天天气很好，我们去公园散步。") == "off_domain"
  by_model = clean_steps.DomainFilter(scorer=lambda t: 0.9 if "memory" in t else 0.1, min_score=0.5)
  assert _drop(by_model, EN_GOOD) is None and _drop(by_model, ZH_GOOD) == "off_domain"
  with pytest.raises(ValueError, match="lexicon or a scorer"):
    clean_steps.DomainFilter()


def test_missing_values_median_and_mode():
  records = [{"text": f"row {i} with enough text", "n": n, "cat": c, "label": lab, "_file": "t"}
             for i, (n, c, lab) in enumerate([(1.0, "a", "x"), (None, "b", None), (3.0, None, "y"),
                                              (10.0, "a", "y")])]
  step = clean_steps.ImputeMissing.fit(records)
  out = [step.map(dict(r)) for r in records]
  assert out[1]["n"] == 3.0 and out[2]["cat"] == "a"
  assert out[1]["label"] is None  # labels are never invented
  assert [("missing_values" in r.get("_repaired", ())) for r in out] == [False, True, True, False]


def test_minhash_near_duplicates_english_and_chinese():
  sig = dedup.MinHashSignature(num_perm=128, shingle_size=3)
  a = sig.signature("the quick brown fox jumps over the lazy dog near the river bank today")
  b = sig.signature("the quick brown fox jumps over the lazy dog near the river bank tonight")
  c = sig.signature("completely different words about compilers and memory and networks")
  assert (a == b).mean() > 0.7 and (a == c).mean() < 0.1
  z1 = sig.signature("计算机网络协议规定了主机之间交换数据的格式和顺序")
  z2 = sig.signature("计算机网络协议规定了主机之间交换数据的格式与顺序")
  assert (z1 == z2).mean() > 0.6


def test_near_dedup_buckets_shared_by_several_kept_texts():
  near = dedup.NearDedup(threshold=0.8, num_perm=64)
  rows = 64 // near.bands
  base = np.arange(64, dtype=np.uint32)
  other = base + 1000
  other[:rows] = base[:rows]  # shares only band 0 with base: similarity 1/bands, kept
  records = [{"text": t, "_minhash": sig.tobytes(), "_line": i}
             for i, (t, sig) in enumerate([("a", base), ("b", other), ("c", other)])]
  out = [near.map(r) for r in records]
  assert [r.get("_drop") for r in out] == [None, None, "near_duplicate"]
  assert "similar to None:1" in out[2]["_detail"]
  assert all("_minhash" not in r for r in out)


def test_exact_dedup_with_and_without_the_precomputed_key():
  key_step, exact = dedup.DedupKey(), dedup.ExactDedup()
  first = exact.map(key_step.map({"text": "Same  Text"}))
  second = exact.map({"text": "same text"})  # no _dedup_key: hashed in place
  assert first.get("_drop") is None and second["_drop"] == "duplicate"
  assert "_dedup_key" not in first


def test_pipeline_counts_are_exact():
  base = [EN_GOOD, ZH_GOOD, "A different sentence about memory in segment recurrence models.",
          "另一段关于编译器如何把源代码翻译成机器码的中文说明文字。"]
  records = base + [
      EN_GOOD.upper(),                                # duplicate (case-insensitive)
      ZH_GOOD.replace("正常", "正常地"),               # near duplicate
      "ok",                                           # meaningless
      "too short",                                    # too_short
      "Click here for the best deal, buy now before it ends tomorrow.",  # spam phrases
      "ＦＵＬＬ　ｗｉｄｔｈ  text that is long enough to keep",  # kept: nfkc + whitespace repairs
  ]
  config = clean.CleanConfig(near_dup_threshold=0.5, num_perm=64)
  kept, report = clean_grain.clean_records(records, config)
  assert report["documents_in"] == 10 and report["documents_out"] == 5
  dropped = {k: v for k, v in report["dropped"].items() if v}
  assert dropped == {"duplicate": 1, "near_duplicate": 1, "low_quality:meaningless": 1,
                     "too_short": 1, "low_quality:phrases": 1}
  # NFKC: the full-width line (ZH_GOOD's full-width commas stay: CJK context).
  assert report["repaired"] == {"nfkc": 1, "whitespace": 1}
  assert [s["line"] for s in report["samples"]["duplicate"]] == [5]
  assert "same as <memory>:1" in report["samples"]["duplicate"][0]["detail"]
  assert kept[-1]["text"] == "FULL width text that is long enough to keep"
  json.dumps(report)  # serializable as report.json


def test_pipeline_with_workers_matches_in_process(tmp_path):
  lines = [f"Document {i} explains topic {i % 7} of networking in some words." for i in range(60)]
  lines += lines[:5] + ["ok", "short"]
  path = tmp_path / "docs.txt"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  src = sources.open_source(str(path))
  config = clean.CleanConfig()
  results = []
  for workers in (0, 2):
    report = clean.CleaningReport(clean.rule_names(config))
    kept = [r["text"] for r in map(report.add, clean_grain.cleaning_dataset(
        src, config, worker_count=workers)) if not r.get("_drop")]
    results.append((kept, report.to_dict()))
  assert results[0] == results[1]
  assert results[0][1]["dropped"]["duplicate"] + results[0][1]["dropped"]["near_duplicate"] == 5


def test_bad_config():
  with pytest.raises(ValueError, match="max_url_fraction"):
    clean.CleanConfig(max_url_fraction=2.0).validate()
  with pytest.raises(ValueError, match="num_perm"):
    clean.CleanConfig(num_perm=10).validate()


def test_ftfy_repairs_terminal_escapes_mojibake_and_entities():
  fix = clean_steps.FixText()
  assert _fix(fix, "\x1b[37;1m3.关于本文档\x1b[;m\x1b[33m 正文") == "3.关于本文档 正文"
  # The residue a tool leaves after removing ESC alone (the console capture).
  assert _fix(fix, "[37;1m3.关于本文档[;m[33m 正文") == "3.关于本文档 正文"
  assert _fix(fix, "The cafÃ© serves crÃ¨me brÃ»lÃ©e") == "The café serves crème brûlée"
  assert _fix(fix, "Tom &amp; Jerry &lt;3") == "Tom & Jerry <3"
  assert _fix(fix, "code: a[m] = b[m] + “quoted”") == "code: a[m] = b[m] + “quoted”"
  assert _fix(fix, EN_GOOD) == EN_GOOD and _fix(fix, ZH_GOOD) == ZH_GOOD
  _, report = clean_grain.clean_records(
      ["\x1b[1;31mError:\x1b[0m the build failed on every platform", EN_GOOD])
  assert report["repaired"]["ftfy"] == 1 and report["documents_out"] == 2


def test_repairs_repeat_until_the_text_is_a_fixed_point():
  """One repair can make work for an earlier one; cleaning cleaned text must change nothing."""
  cases = {
      # From the fuzz property: ftfy reads U+0080 as cp1252's euro sign; removing U+0001 then
      # joins "\u00c0\u20ac", which ftfy decodes as an overlong NUL on a second pass.
      "00000000a\u00c0\x01\x80 and more words": "00000000a and more words",
      # NFKC turns a full-width ampersand into an HTML entity that ftfy unescapes.
      "Tom \uff06amp; Jerry are here": "Tom & Jerry are here",
  }
  config = clean.CleanConfig(min_chars=1)
  for raw, expected in cases.items():
    kept, report = clean_grain.clean_records([raw], config)
    assert [r["text"] for r in kept] == [expected]
    again, _ = clean_grain.clean_records([expected], config)
    assert [r["text"] for r in again] == [expected]
    assert all(n == 1 for n in report["repaired"].values()), report["repaired"]  # once per record


def test_language_filter_keeps_listed_languages_and_counts_all():
  records = [EN_GOOD, ZH_GOOD, "Die Speicherverwaltung des Betriebssystems teilt den Prozessen "
             "Seiten zu und lagert selten benutzte aus."]
  kept, report = clean_grain.clean_records(records, clean.CleanConfig(languages=("en", "zh")))
  assert [r["text"] for r in kept] == records[:2]
  assert report["dropped"]["language"] == 1 and report["languages"] == {"en": 1, "zh": 1, "de": 1}
  assert "language de" in report["samples"]["language"][0]["detail"]
  _, report = clean_grain.clean_records(records)  # default: no keep-list, no detection
  assert "language" not in report["dropped"] and "languages" not in report
  with pytest.raises(ValueError, match="ISO 639"):
    clean.CleanConfig(languages=("English",)).validate()


def test_quality_classifier_from_examples():
  good = [EN_GOOD, ZH_GOOD, "Segment recurrence lets the model attend beyond a fixed context.",
          "The compiler lowers the graph to kernels and fuses adjacent elementwise operations.",
          "操作系统负责管理内存、进程和文件，并为应用程序提供统一的接口。"]
  bad = ["BEST PRICE!!! cheap watches click http://x.biz now now now",
         "win win win $$$ free free free call 555 0000", "哈哈哈哈 加微信 领红包 快快快 免费免费",
         "lorem ipsum dolor sit amet lorem ipsum", "asdf qwer zxcv asdf qwer zxcv 1234"]
  scorer = clean_steps.QualityClassifier.train(good, bad)
  assert scorer(good[0]) > 0.5 > scorer(bad[0])
  for text in (good[0], bad[0]):  # the hand-written probability is the pipeline's
    assert scorer(text) == pytest.approx(scorer.model.predict_proba([text])[0, 1], abs=1e-9)
  config = clean.CleanConfig(min_quality=0.5)
  texts = ["Attention over cached segments extends the context the model can use.",
           "cheap cheap watches free free click now $$$ win"]
  kept, report = clean_grain.clean_records(texts, config, quality_scorer=scorer)
  assert [r["text"] for r in kept] == texts[:1]
  assert report["dropped"]["low_quality:model"] == 1
  with pytest.raises(ValueError, match="good and bad"):
    clean_steps.QualityClassifier.train(good, [])
