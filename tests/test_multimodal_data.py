"""Image inputs (issue 28): decoding and every bad-image case counted, image+text sources,
augmentation deterministic under the seed and resumable mid-epoch, the embedded icon task."""
import base64
import csv
import gzip
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from r1jax import errors
from r1jax.data import builtin
from r1jax.data import image_augment
from r1jax.data import images
from r1jax.data import multimodal
from r1jax.data import task as task_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.data.builtin import build_icons

SIZE = 16


def _png(mode="RGB", size=(20, 12), colour=None) -> bytes:
  rng = np.random.default_rng(len(mode) + size[0])
  if colour is None:
    shape = (size[1], size[0], 3) if mode in ("RGB",) else (size[1], size[0])
    pixels = rng.integers(0, 256, shape).astype(np.uint8)
    im = Image.fromarray(pixels, "RGB" if len(shape) == 3 else "L")
    im = im.convert(mode) if mode not in ("RGB", "L") else im
  else:
    im = Image.new(mode, size, colour)
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def icons():
  """The embedded icon task's train and test splits, decoded at 16 pixels."""
  return {s: multimodal.read_image_split(f"builtin:icons:{s}", s, image_size=SIZE)
          for s in ("train", "test")}


@pytest.fixture(scope="module")
def tok(icons):
  return tokenizer_lib.Tokenizer.train([r["text"] for r in icons["train"].records], 400)


def test_every_bad_image_case_is_counted(tmp_path):
  good = _png()
  (tmp_path / "good.png").write_bytes(good)
  (tmp_path / "notes.txt").write_text("not a picture")
  (tmp_path / "cut.png").write_bytes(good[:len(good) // 2])
  (tmp_path / "big.png").write_bytes(_png(size=(300, 300)))
  (tmp_path / "deep.png").write_bytes(_png("I;16", colour=3000))
  (tmp_path / "grey.png").write_bytes(_png("L"))
  (tmp_path / "alpha.png").write_bytes(_png("RGBA", colour=(0, 0, 0, 0)))
  (tmp_path / "palette.png").write_bytes(_png("P"))
  refs = ["good.png", None, "", "gone.png", str(tmp_path), "notes.txt", "base64:%%%not-base64",
          "cut.png", "big.png", "deep.png", "grey.png", "alpha.png", "palette.png",
          "base64:" + base64.b64encode(good).decode(), good]
  records = [{"image": r, "_base": str(tmp_path), "_where": f"row {i}"}
             for i, r in enumerate(refs)]
  kept, report = images.decode_records(records, SIZE, max_pixels=200 * 200)
  want = {"rows": 15, "used": 6, "missing_image": 2, "missing_file": 2, "not_an_image": 2,
          "truncated": 1, "too_large": 1, "bad_mode": 1, "converted_mode": 3}
  assert report.counts == want
  assert report.counts["rows"] == report.counts["used"] + report.dropped
  assert report.first["missing_file"] == "row 3" and report.first["truncated"] == "row 7"
  summary = report.summary()
  for problem in images.PROBLEMS:
    assert problem in summary
  assert summary.startswith("6 of 15 images used")
  for r in kept:
    assert r["images"].shape == (SIZE, SIZE, 3) and r["images"].dtype == np.uint8
  # Transparent pixels are laid on white; the same file by path, base64 and bytes decodes alike.
  alpha = [r for r in kept if r["_where"] == "row 11"][0]["images"]
  assert (alpha == 255).all()
  same = [r["images"] for r in kept if r["_where"] in ("row 0", "row 13", "row 14")]
  np.testing.assert_array_equal(same[0], same[1])
  np.testing.assert_array_equal(same[0], same[2])
  # The byte limit is checked before a file is read.
  assert images.load_image("good.png", SIZE, base_dir=str(tmp_path),
                           max_bytes=10).problem == "too_large"


def test_jsonl_csv_and_folder_sources(tmp_path):
  (tmp_path / "pics").mkdir()
  (tmp_path / "pics" / "a.png").write_bytes(_png())
  inline = "base64:" + base64.b64encode(_png("L")).decode()
  rows = [{"text": "red", "label": "x", "image": "pics/a.png"},
          {"text": "blue", "label": "y", "image": inline},
          {"label": "y", "image": inline},                        # no text: an image-only row
          {"text": "green", "image": "pics/a.png"},               # no label
          {"text": "grey", "label": "x", "image": "pics/missing.png"}]
  (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
  split = multimodal.read_image_split(str(tmp_path / "t.jsonl"), "train", image_size=SIZE)
  assert [r["text"] for r in split.records] == ["red", "blue", ""]
  assert [r["label"] for r in split.records] == ["x", "y", "y"]
  assert split.counts["rows"] == 6 and split.counts["used"] == 3
  assert split.counts["skipped_bad_row"] == 1 and split.counts["skipped_missing_label"] == 1
  assert split.counts["image_missing_file"] == 1 and split.counts["image_converted_mode"] == 2
  with open(tmp_path / "t.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["caption", "cls", "picture"])
    w.writerow(["red", "x", "pics/a.png"])
    w.writerow(["blue", "y", inline])
  split = multimodal.read_image_split(str(tmp_path / "t.csv"), "dev", image_size=SIZE,
                                      text_field="caption", label_field="cls",
                                      image_field="picture")
  assert [(r["text"], r["label"]) for r in split.records] == [("red", "x"), ("blue", "y")]
  folder = tmp_path / "folder"
  for label in ("cat", "dog"):
    (folder / label).mkdir(parents=True)
    (folder / label / "1.png").write_bytes(_png())
  (folder / "dog" / "readme.txt").write_text("no image")
  split = multimodal.read_image_split(f"images:{folder}", "train", image_size=SIZE)
  assert [r["label"] for r in split.records] == ["cat", "dog"]
  assert split.report.counts["not_an_image"] == 1
  with pytest.raises(errors.InputNotFound, match="does not exist"):
    multimodal.read_image_split(f"images:{tmp_path / 'nowhere'}", "train", image_size=SIZE)
  (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "a", "label": "x", "image": "no.png"}))
  with pytest.raises(errors.BadInput, match="usable image in field 'image'.*missing_file 1"):
    multimodal.read_image_split(str(tmp_path / "bad.jsonl"), "test", image_size=SIZE)


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_augmentation_is_deterministic_and_resumes_mid_epoch(icons, tok):
  labels = task_lib.LabelVocab.from_names(builtin.labels("icons"))
  records = icons["train"].records[:70]   # 70 rows, batches of 16: 4 per epoch
  make = lambda seed: iter(multimodal.image_text_dataset(
      records, tok, labels=labels, seq_len=10, batch_size=16, image_size=SIZE, seed=seed,
      augment=image_augment.ImageAugmentConfig()))
  first = _batches(make(3), 10)
  _assert_same(first, _batches(make(3), 10))
  other = _batches(make(4), 2)
  assert not np.array_equal(first[0]["images"], other[0]["images"])
  # Resume mid-epoch (after 6 batches: epoch 1, batch 2) from the saved iterator state.
  it = make(3)
  _batches(it, 6)
  state = it.get_state()
  resumed = make(3)
  resumed.set_state(json.loads(json.dumps(state)))
  _assert_same(first[6:], _batches(resumed, 4))
  # Batches hold real augmented images of the right kind; an epoch later the same rows differ.
  b = first[0]
  assert b["images"].shape == (16, SIZE, SIZE, 3) and b["images"].dtype == np.uint8
  assert b["tokens"].shape == (16, 10) and b["label"].shape == (16,)
  plain = iter(multimodal.image_text_dataset(records, tok, labels=labels, seq_len=10,
                                             batch_size=16, image_size=SIZE, seed=3))
  raw = _batches(plain, 5)
  np.testing.assert_array_equal(raw[0]["label"], first[0]["label"])       # same rows ...
  assert not np.array_equal(raw[0]["images"], first[0]["images"])          # ... augmented
  assert not np.array_equal(first[4]["images"], raw[4]["images"])


def test_augment_operations():
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.uint8)
  off = dict(rotate_degrees=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
             brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
  cfg = image_augment.ImageAugmentConfig(**off)
  np.testing.assert_array_equal(image_augment.augment_images(imgs, rng, cfg), imgs)
  flip = image_augment.ImageAugmentConfig(**dict(off, flip_prob=1.0))
  np.testing.assert_array_equal(image_augment.augment_images(imgs, rng, flip), imgs[:, :, ::-1])
  never = image_augment.ImageAugmentConfig(prob=0.0)
  np.testing.assert_array_equal(image_augment.augment_images(imgs, rng, never), imgs)
  # A grey image stays grey under saturation and hue changes; brightness scales it.
  grey = np.full((2, SIZE, SIZE, 3), 100, np.uint8)
  colour = image_augment.ImageAugmentConfig(**dict(off, saturation=0.9, hue=0.5))
  out = image_augment.augment_images(grey, rng, colour).astype(int)
  assert np.abs(out - 100).max() <= 1
  bright = image_augment.ImageAugmentConfig(**dict(off, brightness=0.5))
  out = image_augment.augment_images(grey, np.random.default_rng(1), bright).astype(int)
  assert all(len(np.unique(o)) == 1 for o in out)            # uniform images stay uniform
  assert np.abs(out[:, 0, 0, 0] - 100).max() > 1 and np.abs(out - 100).max() <= 50
  # Without crop the geometry is a pure rotation about the centre (Pillow's affine convention).
  turn = image_augment.ImageAugmentConfig(**dict(off, rotate_degrees=90.0))
  draws = np.random.default_rng(0).random((len(image_augment._DRAWS), 1))
  a, b, c, d, e, f = image_augment._affine_maps(dict(zip(image_augment._DRAWS, draws)), SIZE,
                                                turn)[0]
  assert a == pytest.approx(e) and b == pytest.approx(-d) and a * a + d * d == pytest.approx(1)
  centre = SIZE / 2
  assert a * centre + b * centre + c == pytest.approx(centre)
  assert d * centre + e * centre + f == pytest.approx(centre)
  with pytest.raises(ValueError, match="image augment hue=0.7 must be in"):
    image_augment.AugmentImages(image_augment.ImageAugmentConfig(hue=0.7))


def _tiny_theme(root):
  for context, names in (("actions", ["go-up-symbolic.symbolic.png", "go-down.png"]),
                         ("places", ["folder-music.png"])):
    for name in names:
      folder = root / "32x32" / context
      folder.mkdir(parents=True, exist_ok=True)
      Image.new("RGBA", (32, 32), (10, 20, 30, 128)).save(folder / name)


def test_icon_build_script_on_a_small_theme(tmp_path):
  theme = tmp_path / "theme"
  _tiny_theme(theme)
  copyright_file = tmp_path / "copyright"
  copyright_file.write_text("licence text")
  for context in build_icons.CONTEXTS[1:]:
    (theme / "32x32" / context).mkdir(parents=True, exist_ok=True)
  out = tmp_path / "out"
  assert build_icons.main(["--theme", str(theme), "--copyright", str(copyright_file),
                           "--out", str(out)]) == 0
  got = []
  for split in build_icons.SPLITS:
    with gzip.open(out / f"icons_{split}.jsonl.gz", "rt") as f:
      got += [json.loads(line) for line in f]
  assert sorted((r["id"], r["text"], r["label"]) for r in got) == [
      ("actions/go-down", "go down", "actions"),
      ("actions/go-up-symbolic", "go up symbolic", "actions"),
      ("places/folder-music", "folder music", "places")]
  licence = (out / "LICENSE.adwaita").read_text()
  assert licence.startswith("icons_*.jsonl.gz and icons_labels.txt are derived from the Adwaita")
  assert licence.endswith("\n\nlicence text")
  assert (out / "icons_labels.txt").read_text().split() == list(build_icons.CONTEXTS)
  # Pictures on white, RGB: half-transparent dark pixels come out as a mid tone.
  pixels = images.load_image(got[0]["image"], 32).pixels
  assert pixels.shape == (32, 32, 3) and 120 < pixels.mean() < 150
  # An icon and its symbolic version share a split.
  assert build_icons.split_of("go-up") == build_icons.split_of("go-up-symbolic")


@pytest.mark.skipif(not os.path.isdir(os.path.join(build_icons.THEME, build_icons.SIZE_DIR)),
                    reason="needs Debian's adwaita-icon-theme (the shipped files' source)")
def test_shipped_icon_task_matches_its_build_script(tmp_path):
  assert build_icons.main(["--out", str(tmp_path)]) == 0
  for split in build_icons.SPLITS:
    with gzip.open(tmp_path / f"icons_{split}.jsonl.gz", "rt") as f:
      rebuilt = [json.loads(line) for line in f]
    shipped = builtin.load("icons", split)
    assert [(r["id"], r["text"], r["label"]) for r in rebuilt] == [
        (r["id"], r["text"], r["label"]) for r in shipped]
    for a, b in zip(rebuilt, shipped):   # the pixels (PNG bytes may differ between Pillows)
      np.testing.assert_array_equal(images.load_image(a["image"], 32).pixels,
                                    images.load_image(b["image"], 32).pixels)
  assert (tmp_path / "icons_labels.txt").read_text() == open(
      os.path.join(builtin.DIR, "icons_labels.txt")).read()
  assert (tmp_path / "LICENSE.adwaita").read_bytes() == open(
      os.path.join(builtin.DIR, "LICENSE.adwaita"), "rb").read()


def test_embedded_icon_task(icons):
  assert builtin.labels("icons") == list(build_icons.CONTEXTS)
  train, test = icons["train"], icons["test"]
  assert train.report.counts == {"rows": 465, "used": 465}
  assert len(test.records) == 101
  assert not {r["text"] for r in train.records} & {r["text"] for r in test.records}
  assert {r["label"] for r in train.records} == set(build_icons.CONTEXTS)
  with pytest.raises(ValueError, match="needs split"):
    builtin.path("icons")
