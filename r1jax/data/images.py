"""Image inputs: decoding with Pillow, and every bad image counted by reason, never fatal.

    decoded = images.decode_image(raw, size=32)          # DecodedImage(pixels, problem, converted)
    kept, report = images.decode_records(records, size=32)
    report.counts   # {"rows": 120, "used": 117, "missing_file": 1, "truncated": 2, ...}

A record's image reference (`image_ref`) is one of:
  bytes                   the encoded file itself (PNG, JPEG, GIF, BMP, WebP: what Pillow reads);
  "base64:<data>"         the same bytes in base64, for JSONL and CSV fields;
  "<path>"                a file; a relative path is read from `base_dir` (for a JSONL/CSV record,
                          the directory of the file it came from).
Each image becomes uint8 [size, size, 3]: the short side scaled to `size` and the centre cropped
(ViT's evaluation transform), transparent pixels laid on white.

Problems, each counted with the first place it happened (`ImageReport`); the image is dropped:
  missing_image   the record has no image reference (absent, null or empty)
  missing_file    the path does not exist or is not a readable file
  not_an_image    Pillow does not recognise the bytes as an image (or bad base64)
  truncated       the header is readable but the pixel data is cut short or corrupt
  too_large       more than `max_pixels` pixels or `max_bytes` bytes (decompression bombs)
  bad_mode        a pixel mode without a clear RGB reading (32-bit integer or float pixels)
Kept but counted: `converted_mode` (grey, palette, CMYK, alpha, ... converted to RGB).
"""
import base64
import binascii
import dataclasses
import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

from r1jax import errors

PROBLEMS = ("missing_image", "missing_file", "not_an_image", "truncated", "too_large", "bad_mode")
# Modes whose values are not 8-bit colour: no single right way to show them as RGB.
_BAD_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
BASE64_PREFIX = "base64:"
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class DecodedImage:
  """`pixels` uint8 [S, S, 3], or None with `problem` one of PROBLEMS; `converted` is True when
  the file's mode was not RGB."""
  pixels: np.ndarray | None
  problem: str | None = None
  converted: bool = False


def read_image_bytes(image_ref: Any, base_dir: str = "", max_bytes: int = DEFAULT_MAX_BYTES
                     ) -> tuple[bytes | None, str | None]:
  """(the encoded bytes, None) of an image reference (see the module docstring), or (None, the
  problem)."""
  if isinstance(image_ref, (bytes, bytearray, memoryview)):
    data = bytes(image_ref)
    return (data, None) if data else (None, "missing_image")
  if not isinstance(image_ref, str) or not image_ref.strip():
    return None, "missing_image"
  if image_ref.startswith(BASE64_PREFIX):
    try:
      data = base64.b64decode(image_ref[len(BASE64_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
      return None, "not_an_image"
    return (data, None) if data else (None, "missing_image")
  path = os.path.join(base_dir, os.path.expanduser(image_ref.strip()))
  try:
    if os.path.getsize(path) > max_bytes:
      return None, "too_large"
    with open(path, "rb") as f:
      return f.read(), None
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
    return None, "missing_file"


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
  """Encoded bytes -> `DecodedImage` (uint8 [size, size, 3] or the problem)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.size[0] * im.size[1] > max_pixels:
        return DecodedImage(None, "too_large")
      im.load()
      return _to_rgb(im, size)
  except Image.DecompressionBombError:
    return DecodedImage(None, "too_large")
  except Image.UnidentifiedImageError:
    return DecodedImage(None, "not_an_image")
  except (OSError, SyntaxError, ValueError, EOFError):
    # Identified from its header, then the pixel data failed: cut short or corrupt.
    return DecodedImage(None, "truncated")


def _to_rgb(im: Image.Image, size: int) -> DecodedImage:
  if im.mode in _BAD_MODES:
    return DecodedImage(None, "bad_mode")
  converted = im.mode != "RGB"
  if converted:
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P"
                                                           and "transparency" in im.info):
      rgba = im.convert("RGBA")
      im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    im = im.convert("RGB")
  fitted = ImageOps.fit(im, (size, size), method=Image.Resampling.LANCZOS)
  return DecodedImage(np.asarray(fitted, np.uint8), None, converted)


def load_image(image_ref: Any, size: int, *, base_dir: str = "",
               max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
               ) -> DecodedImage:
  """`read_image_bytes` then `decode_image`."""
  data, problem = read_image_bytes(image_ref, base_dir, max_bytes)
  if problem:
    return DecodedImage(None, problem)
  return decode_image(data, size, max_pixels)


@dataclasses.dataclass
class ImageReport:
  """What happened to each image: counts by problem (and `converted_mode`), with the first
  place each problem was seen. rows = used + sum of the PROBLEMS counts."""
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  first: dict[str, str] = dataclasses.field(default_factory=dict)

  def add(self, key: str, where: str = "") -> None:
    self.counts[key] = self.counts.get(key, 0) + 1
    if where:
      self.first.setdefault(key, where)

  @property
  def dropped(self) -> int:
    return sum(self.counts.get(p, 0) for p in PROBLEMS)

  def summary(self) -> str:
    """One line: "117 of 120 images used; dropped: truncated 2 (first at a.jsonl:3), ..."."""
    rows, used = self.counts.get("rows", 0), self.counts.get("used", 0)
    parts = [f"{p} {self.counts[p]} (first at {self.first.get(p, '?')})"
             for p in PROBLEMS if self.counts.get(p)]
    text = f"{used} of {rows} images used"
    if parts:
      text += "; dropped: " + ", ".join(parts)
    if self.counts.get("converted_mode"):
      text += f"; {self.counts['converted_mode']} converted to RGB"
    return text

  def to_json(self) -> dict[str, Any]:
    return {"counts": dict(self.counts), "first": dict(self.first)}


def decode_records(records: Sequence[dict[str, Any]], size: int, *, image_field: str = "image",
                   max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                   report: ImageReport | None = None
                   ) -> tuple[list[dict[str, Any]], ImageReport]:
  """Each record's `image_field` decoded to uint8 [size, size, 3] (key "images" in the output,
  the reference dropped); records whose image has a problem are left out and counted.

  A record may carry "_base" (the directory relative paths are read from) and "_where" (its
  place, for the report). Decoding happens once, here, on the host: the training pipeline then
  only augments arrays, so a bad image is found and counted before the first step, and the
  counts are exact whatever the number of Grain workers.
  """
  report = report if report is not None else ImageReport()
  kept = []
  for i, record in enumerate(records):
    report.add("rows")
    where = record.get("_where", f"record {i}")
    decoded = load_image(record.get(image_field), size, base_dir=record.get("_base", ""),
                         max_pixels=max_pixels, max_bytes=max_bytes)
    if decoded.problem:
      report.add(decoded.problem, where)
      continue
    if decoded.converted:
      report.add("converted_mode", where)
    report.add("used")
    out = {k: v for k, v in record.items() if k != image_field}
    out["images"] = decoded.pixels
    kept.append(out)
  report.counts.setdefault("used", 0)
  return kept, report


def folder_records(directory: str) -> list[dict[str, Any]]:
  """An image folder `DIR/<label>/<file>` -> records {"image": path, "label", "text": "",
  "_where"} in sorted order. Every file under a label directory is listed (a file that is no
  image is then counted as not_an_image by `decode_records`); hidden entries are skipped.

  Raises errors.InputNotFound when DIR is missing or has no label directory with a file.
  """
  if not os.path.isdir(directory):
    raise errors.InputNotFound(f"Image folder {directory!r} does not exist; name a directory "
                               "holding one sub-directory per label (DIR/<label>/<file>.png).")
  records = []
  for label in sorted(os.listdir(directory)):
    sub = os.path.join(directory, label)
    if label.startswith(".") or not os.path.isdir(sub):
      continue
    for name in sorted(os.listdir(sub)):
      path = os.path.join(sub, name)
      if not name.startswith(".") and os.path.isfile(path):
        records.append({"image": path, "label": label, "text": "", "_where": path})
  if not records:
    raise errors.InputNotFound(f"Image folder {directory!r} has no files in label directories; "
                               "lay it out as DIR/<label>/<file>.png.")
  return records
