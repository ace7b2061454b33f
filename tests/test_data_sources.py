"""Tests for r1jax.data.sources: formats, globs, sharding and every bad-input case of the issue."""
import gzip
import json

import grain
import pandas as pd
import pytest

from r1jax.data import clean_grain
from r1jax.data import readers
from r1jax.data import sources


def _write(path, content, mode="w"):
  if mode == "wb":
    path.write_bytes(content)
  else:
    path.write_text(content, encoding="utf-8")
  return str(path)


def _good(records):
  return [r for r in records if not r.get("_error")]


def test_text_lines_and_paragraphs(tmp_path):
  path = _write(tmp_path / "a.txt", "first line here\n\nsecond line 中文\r\nthird\n")
  records = list(sources.read_records(path))
  assert [r["text"] for r in records] == ["first line here", "second line 中文", "third"]
  assert [r["_line"] for r in records] == [1, 3, 4]
  path = _write(tmp_path / "b.txt", "para one\ncontinues\n\n\n  \npara two\n\npara three")
  records = list(sources.read_records(path, text_mode="paragraphs"))
  assert [r["text"] for r in records] == ["para one\ncontinues", "para two", "para three"]
  assert [r["_line"] for r in records] == [1, 6, 8]


def test_line_index_is_the_same_scanned_in_chunks_of_any_size(tmp_path, monkeypatch):
  """Plain files are indexed a chunk at a time (memory: the index, not the file); "\r"-only lines
  and "\r\n" pairs split across chunks are read as from one buffer, and gzip the same."""
  content = "a\r\n\r\n\nbb\n\r\nccc\r\n\n\r\r\nd 中文\n\ne"
  plain = _write(tmp_path / "a.txt", content)
  packed = tmp_path / "a.txt.gz"
  packed.write_bytes(gzip.compress(content.encode("utf-8")))
  whole = [(r.get("text"), r["_line"]) for r in sources.read_records(str(packed))]
  assert whole == [("a", 1), ("bb", 4), ("ccc", 6), (None, 8), ("d 中文", 9), ("e", 11)]
  for chunk in (1, 2, 3, 5, 1 << 24):
    monkeypatch.setattr(readers, "_SCAN_CHUNK", chunk)
    assert [(r.get("text"), r["_line"]) for r in sources.read_records(plain)] == whole, chunk


def test_jsonl_with_metadata_and_custom_field(tmp_path):
  path = _write(tmp_path / "a.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
      {"body": "hello world", "label": "x", "score": 1.5},
      {"body": "你好世界", "label": "y", "_private": 1}]) + "\n")
  records = list(sources.read_records(path, text_field="body"))
  assert records[0]["text"] == "hello world" and records[0]["label"] == "x"
  assert records[0]["score"] == 1.5 and "_private" not in records[1]
  assert readers.public_fields(records[1]) == {"text": "你好世界", "label": "y"}


def test_csv_tsv_parquet(tmp_path):
  path = _write(tmp_path / "a.csv", 'text,n,cat\n"a, quoted\nmultiline text",1,u\nplain,,v\n'
                                    'more text,3,\n')
  records = list(sources.read_records(path))
  assert [r["text"] for r in records] == ["a, quoted\nmultiline text", "plain", "more text"]
  assert [r["n"] for r in records] == [1, None, 3] and records[2]["cat"] is None
  assert [r["_line"] for r in records] == [2, 4, 5]
  tsv = _write(tmp_path / "a.tsv", "text\tlabel\nsome text\tz\n")
  assert list(sources.read_records(tsv))[0]["label"] == "z"
  pq = str(tmp_path / "a.parquet")
  pd.DataFrame({"text": ["alpha beta", None, "gamma"], "v": [1.0, 2.0, float("nan")]}).to_parquet(pq)
  records = list(sources.read_records(pq))
  assert records[1]["_error"] == "missing_text"
  assert records[0]["v"] == 1.0 and records[2]["v"] is None


def test_globs_directories_many_files_and_sharding(tmp_path):
  for i in range(5):
    _write(tmp_path / f"part-{i}.txt", "".join(f"doc {i}-{j}\n" for j in range(3)))
  src = sources.open_source(str(tmp_path / "part-*.txt"))
  assert len(src) == 15 and len(src.files) == 5
  assert len(sources.open_source(str(tmp_path))) == 15
  both = sources.open_source(f"{tmp_path}/part-0.txt,{tmp_path}/part-1.txt")
  assert [r["text"] for r in both][:4] == ["doc 0-0", "doc 0-1", "doc 0-2", "doc 1-0"]
  shards = [[r["text"] for r in sources.read_records(str(tmp_path), process_index=p,
                                                     process_count=2)] for p in range(2)]
  assert len(shards[0]) == 8 and len(shards[1]) == 7
  assert sorted(shards[0] + shards[1]) == sorted(r["text"] for r in src)
  # The source is a Grain random-access source: slicing and workers work on it.
  assert len(grain.MapDataset.source(src)[1::3]) == 5


def test_builtin_spec():
  src = sources.open_source("builtin:task:dev")
  assert len(src) > 100 and "label" in src[0]


# --- Bad input: each case of the issue ----------------------------------------------------------


def test_missing_path_and_empty_glob(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    sources.open_source(str(tmp_path / "nope.txt"))
  with pytest.raises(FileNotFoundError, match="matches no file"):
    sources.open_source(str(tmp_path / "*.jsonl"))


def test_empty_file(tmp_path):
  path = _write(tmp_path / "empty.txt", "")
  with pytest.raises(ValueError, match="empty.txt is empty"):
    sources.open_source(path)


def test_file_that_is_not_text(tmp_path):
  path = _write(tmp_path / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
                "wb")
  with pytest.raises(ValueError, match=r"image.txt does not look like text: NUL byte at offset 8"):
    sources.open_source(path)
  with pytest.raises(ValueError, match="not a readable Parquet"):
    sources.open_source(_write(tmp_path / "fake.parquet", b"not parquet at all", "wb"))


def test_invalid_utf8_in_the_middle(tmp_path):
  path = _write(tmp_path / "bad.txt", b"good line one\nbroken \xff\xfe line\ngood line three\n",
                "wb")
  records = list(sources.read_records(path))
  assert [r["text"] for r in records] == ["good line one", "broken \ufffd\ufffd line",
                                          "good line three"]
  assert records[1]["_undecodable"] and records[1]["_line"] == 2
  kept, report = clean_grain.clean_records(records)
  assert [r["text"] for r in kept] == ["good line one", "broken line", "good line three"]
  assert report["repaired"]["undecodable"] == 1
  dropped = list(sources.read_records(path, on_undecodable="drop"))
  assert dropped[1]["_error"] == "undecodable" and len(_good(dropped)) == 2


def test_ten_megabyte_line(tmp_path):
  path = tmp_path / "long.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps({"text": "short good one"}) + "\n")
    f.write(json.dumps({"text": "x" * 10_000_000}) + "\n")
    f.write(json.dumps({"text": "another good one"}) + "\n")
  records = list(sources.read_records(str(path)))
  assert records[1]["_error"] == "too_long" and records[1]["_line"] == 2
  assert len(records[1]["text"]) <= 200
  assert [r["text"] for r in _good(records)] == ["short good one", "another good one"]


def test_malformed_jsonl_and_missing_text_field(tmp_path):
  path = _write(tmp_path / "mixed.jsonl", "\n".join([
      '{"text": "fine document number one"}', '{"text": "unterminated', "[1, 2, 3]",
      '{"content": "no text field"}', '{"text": null}', '{"text": 42}',
      '{"text": "fine document number two"}']) + "\n")
  records = list(sources.read_records(path))
  assert [(r["_line"], r.get("_error")) for r in records] == [
      (1, None), (2, "malformed_json"), (3, "malformed_json"), (4, "missing_text"),
      (5, "missing_text"), (6, "bad_text_type"), (7, None)]
  kept, report = clean_grain.clean_records(records)
  assert len(kept) == 2
  assert report["dropped"]["malformed_json"] == 2 and report["dropped"]["missing_text"] == 2
  assert report["dropped"]["bad_text_type"] == 1
  assert report["documents_in"] == 7 == report["documents_out"] + sum(report["dropped"].values())
  assert {(s["file"], s["line"]) for s in report["samples"]["malformed_json"]} == {
      (path, 2), (path, 3)}


def test_csv_ragged_rows_and_missing_column(tmp_path):
  path = _write(tmp_path / "ragged.csv",
                "text,label\nfirst good row,a\nbad row,b,extra\nonly-one-field\nsecond good,b\n")
  records = list(sources.read_records(path))
  assert [(r["_line"], r.get("_error")) for r in records] == [
      (2, None), (3, "ragged_row"), (4, "ragged_row"), (5, None)]
  assert [r["text"] for r in _good(records)] == ["first good row", "second good"]
  with pytest.raises(ValueError, match=r"no column 'body' \(columns: \['text', 'label'\]\)"):
    sources.open_source(path, text_field="body")


def test_bad_options():
  with pytest.raises(ValueError, match="format="):
    sources.open_source("builtin:domain", format="xml")
  with pytest.raises(ValueError, match="on_undecodable="):
    sources.open_source("builtin:domain", on_undecodable="ignore")
  with pytest.raises(ValueError, match="Bad TFDS spec"):
    sources.open_source("tfds:")
