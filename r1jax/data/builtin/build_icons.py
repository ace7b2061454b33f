r"""Rebuilds the embedded image+text task from Debian's Adwaita icon theme.

    apt-get install -y adwaita-icon-theme
    python -m r1jax.data.builtin.build_icons [--theme /usr/share/icons/Adwaita] [--out DIR]

Writes, next to this script (or to --out):
  icons_{train,dev,test}.jsonl.gz  one record per icon of the theme's 32x32 set, in the contexts
                            of CONTEXTS: `{"id", "text", "label", "image"}` where `text` is the
                            icon's name with its dashes as spaces ("folder music symbolic"),
                            `label` its context (the directory: actions, devices, places, ...)
                            and `image` the picture as "base64:<PNG>" (32x32 RGB, transparent
                            pixels laid on white). Split 70/15/15 by a hash of the name without
                            "-symbolic", so an icon's full-colour and symbolic versions are in
                            the same split.
  icons_labels.txt          the contexts, one per line, in class-id order.
  LICENSE.adwaita           what the files are derived from, then the theme's copyright file
                            (CC-BY-SA 3.0 or LGPL 3; "GNOME Project").
and prints the counts and the sha256 of each file's uncompressed contents (for README.txt).

The `apps` context (one icon) and `legacy` (names kept for old programs, from every context) are
left out. Deterministic: the same theme version gives the same records (gzip timestamps are 0;
PNG bytes depend on the Pillow version, the decoded pixels do not).
"""
import argparse
import base64
import gzip
import hashlib
import io
import json
import os
import sys

from PIL import Image

THEME = "/usr/share/icons/Adwaita"
COPYRIGHT = "/usr/share/doc/adwaita-icon-theme/copyright"
SIZE_DIR = "32x32"
CONTEXTS = ("actions", "categories", "devices", "emblems", "emotes", "mimetypes", "places",
            "status", "ui")
SPLIT_BUCKETS = (("test", 15), ("dev", 15))  # of 100; the rest is train
SPLITS = ("train", "dev", "test")
OUT = os.path.dirname(os.path.abspath(__file__))
# The first paragraph names the files it covers (r1jax.compress.model_card reads it).
LICENSE_HEAD = """\
icons_*.jsonl.gz and icons_labels.txt are derived from the Adwaita icon theme of the GNOME
Project, https://www.gnome.org (Debian package adwaita-icon-theme). They were modified: the
32x32 icons laid on white and stored as RGB PNG, the file names turned into text, the icon
contexts used as labels; see build_icons.py. They are distributed under the terms of either the
GNU LGPL v3 or the Creative Commons Attribution-Share Alike 3.0 United States License, as the
theme is. The Debian copyright notice follows."""


def icon_name(filename: str) -> str:
  """"folder-music-symbolic.symbolic.png" -> "folder-music-symbolic"."""
  name = filename[:-len(".png")]
  return name[:-len(".symbolic")] if name.endswith(".symbolic") else name


def text_of(name: str) -> str:
  """The icon's name as words: "folder-music-symbolic" -> "folder music symbolic"."""
  return " ".join(name.replace("_", "-").split("-"))


def split_of(name: str) -> str:
  """train / dev / test by a hash of the name without "-symbolic"."""
  base = name[:-len("-symbolic")] if name.endswith("-symbolic") else name
  bucket = int(hashlib.sha256(base.encode()).hexdigest(), 16) % 100
  for split, share in SPLIT_BUCKETS:
    if bucket < share:
      return split
    bucket -= share
  return "train"


def png_rgb(path: str) -> bytes:
  """The icon as a 32x32 RGB PNG on white."""
  with Image.open(path) as im:
    rgba = im.convert("RGBA")
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  rgb = Image.alpha_composite(white, rgba).convert("RGB")
  buf = io.BytesIO()
  rgb.save(buf, format="PNG", optimize=True)
  return buf.getvalue()


def build_records(theme: str) -> dict[str, list[dict]]:
  """{split: records}, each split sorted by (label, name)."""
  out = {s: [] for s in SPLITS}
  for context in CONTEXTS:
    folder = os.path.join(theme, SIZE_DIR, context)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{folder} is missing; install the icon theme "
                              "(apt-get install -y adwaita-icon-theme) or pass --theme.")
    for filename in sorted(os.listdir(folder)):
      if not filename.endswith(".png"):
        continue
      name = icon_name(filename)
      image = base64.b64encode(png_rgb(os.path.join(folder, filename))).decode("ascii")
      out[split_of(name)].append({"id": f"{context}/{name}", "text": text_of(name),
                                  "label": context, "image": "base64:" + image})
  return out


def _write_jsonl_gz(path: str, records: list[dict]) -> str:
  data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
  with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
    g.write(data)
  return hashlib.sha256(data).hexdigest()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--theme", default=THEME, help="icon theme directory")
  parser.add_argument("--copyright", default=COPYRIGHT, help="the theme's copyright file")
  parser.add_argument("--out", default=OUT, help="output directory")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  records = build_records(args.theme)
  for split in SPLITS:
    digest = _write_jsonl_gz(os.path.join(args.out, f"icons_{split}.jsonl.gz"), records[split])
    counts = {c: sum(r["label"] == c for r in records[split]) for c in CONTEXTS}
    print(f"icons {split}: {len(records[split])} icons, labels {counts}, sha256 {digest}")
  with open(os.path.join(args.out, "icons_labels.txt"), "w", encoding="utf-8") as f:
    f.write("".join(c + "\n" for c in CONTEXTS))
  if os.path.isfile(args.copyright):
    with open(args.copyright, encoding="utf-8") as f:
      notice = f.read()
    with open(os.path.join(args.out, "LICENSE.adwaita"), "w", encoding="utf-8") as f:
      f.write(LICENSE_HEAD + "\n\n" + notice)
  else:
    print(f"warning: {args.copyright} not found; LICENSE.adwaita not written", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
