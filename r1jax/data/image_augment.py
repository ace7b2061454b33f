"""Image augmentation on the host: random rotation, random resized crop, flips and colour jitter.

    augment = image_augment.AugmentImages(image_augment.ImageAugmentConfig(prob=1.0))
    ds = ds.batch(16).random_map(augment, seed=seed)     # a Grain MapDataset of batches
    # batch["images"] uint8 [B, S, S, 3] -> the same shape, each row drawn afresh

One Grain `RandomMap` over a whole batch of uint8 images, in numpy, each image with its own draws:

  geometry   a random resized crop (area `crop_scale` of the image, aspect `crop_ratio`, anywhere
             it fits), a rotation by up to +-`rotate_degrees` about the crop's centre and a
             horizontal flip with probability `flip_prob`, composed into one affine map per image
             and applied in one bilinear resampling (Pillow's `transform` convention, computed
             for the whole batch at once in numpy); what falls outside the image shows the mean
             colour of its border;
  colour     brightness, contrast and saturation factors drawn from [1 - x, 1 + x] and a hue
             rotation by up to +-`hue` of a turn (about the grey axis, in YIQ space), in that
             order, clipped to [0, 255].

An image is left as it is with probability 1 - `prob`. Why per batch: at 32 x 32 pixels the
per-call overhead of a Python transform per image dominates, and the pipeline has to outrun the
training step many times over (bench/multimodal.py measures both); the draws, the resampling and
the colour operations are whole-batch numpy operations on the images drawn for augmentation, in
buffers kept from batch to batch (bench/NOTES_multimodal.md has the measurements). Grain
seeds the generator from the dataset seed and the batch index, so the draws are
the same on every run and after a resume from a checkpointed iterator state (a MapDataset's
state is one index), whatever the worker count.
"""
import dataclasses
import functools
import math
import threading

import grain
import numpy as np

# RGB -> YIQ and back: hue is the angle of (I, Q), so a hue shift is a rotation in that plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)
_LUMA = _RGB_TO_YIQ[0]
# Colour jitter's 3x3 on RGB, hue(t) . ((1 - s) grey + s I), is a weighted sum of 6 constant
# matrices (`_colour_maps`): a hue rotation by t is H0 + cos t H1 + sin t H2 (the rotation of
# (I, Q) in YIQ), and `grey` gives every channel the pixel's luma.
_HUE_BASIS = (_YIQ_TO_RGB.astype(np.float64)
              @ np.array([np.diag([1.0, 0.0, 0.0]), np.diag([0.0, 1.0, 1.0]),
                          [[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])
              @ _RGB_TO_YIQ.astype(np.float64))                               # [3, 3, 3]
_MIX_BASIS = np.concatenate([_HUE_BASIS @ np.outer(np.ones(3), _LUMA), _HUE_BASIS]).reshape(6, 9)


@dataclasses.dataclass(frozen=True)
class ImageAugmentConfig:
  """How strongly each operation varies an image (0 turns one off)."""
  prob: float = 1.0                          # chance an image is augmented each time it is read
  rotate_degrees: float = 15.0               # rotation drawn from [-x, x] degrees
  crop_scale: tuple[float, float] = (0.6, 1.0)   # crop area as a share of the image's
  crop_ratio: tuple[float, float] = (0.75, 4 / 3)  # crop width / height (log-uniform)
  flip_prob: float = 0.5                     # horizontal flip
  brightness: float = 0.3                    # factor from [1 - x, 1 + x]
  contrast: float = 0.3                      # factor from [1 - x, 1 + x] around the mean grey
  saturation: float = 0.3                    # factor from [1 - x, 1 + x] around each pixel's grey
  hue: float = 0.05                          # rotation of the hue by up to +-x of a full turn

  def problems(self) -> list[tuple[str, str]]:
    """(field, what is wrong) for each bad field; [] when the config is usable."""
    out = []
    for name in ("prob", "flip_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        out.append((name, f"{getattr(self, name)} must be in [0, 1]"))
    for name in ("brightness", "contrast", "saturation"):
      if not 0.0 <= getattr(self, name) < 1.0:
        out.append((name, f"{getattr(self, name)} must be in [0, 1)"))
    if not 0.0 <= self.hue <= 0.5:
      out.append(("hue", f"{self.hue} must be in [0, 0.5] (a share of a full turn)"))
    if not 0.0 <= self.rotate_degrees <= 180.0:
      out.append(("rotate_degrees", f"{self.rotate_degrees} must be in [0, 180]"))
    lo, hi = self.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
      out.append(("crop_scale", f"{self.crop_scale} must be (low, high) with 0 < low <= high <= 1"))
    lo, hi = self.crop_ratio
    if not 0.0 < lo <= hi:
      out.append(("crop_ratio", f"{self.crop_ratio} must be (low, high) with 0 < low <= high"))
    return out


# The uniform draws per image, one row each, in this order (one `rng.random((len, n))` call
# gives the same numbers as one `rng.random(n)` or `rng.uniform(lo, hi, n)` call per row).
_DRAWS = ("active", "scale", "log_ratio", "cx", "cy", "angle", "flip", "brightness", "contrast",
          "saturation", "hue")


def _uniform(lo: float, hi: float, draw: np.ndarray) -> np.ndarray:
  """A [0, 1) draw mapped to [lo, hi), as `rng.uniform(lo, hi)` maps it (the same float64s)."""
  return lo + (hi - lo) * draw


def _affine_maps(u: dict[str, np.ndarray], size: int, cfg: ImageAugmentConfig) -> np.ndarray:
  """Per image, from its uniform [0, 1) draws `u` (rows of `_DRAWS`, [n] each), the 6
  coefficients (a, b, c, d, e, f) float64 [n, 6] that map an output pixel position (x, y) to the
  input position (a x + b y + c, d x + e y + f), in pixels (Pillow's `Image.transform(...,
  AFFINE)` convention)."""
  lerp = _uniform
  scale = lerp(*cfg.crop_scale, u["scale"])
  ratio = np.exp(lerp(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), u["log_ratio"]))
  half_w = np.minimum(np.sqrt(scale * ratio), 1.0)      # crop half-sizes, image half-side = 1
  half_h = np.minimum(np.sqrt(scale / ratio), 1.0)
  cx = lerp(-1.0, 1.0, u["cx"]) * (1.0 - half_w)        # crop centre, image centre = 0
  cy = lerp(-1.0, 1.0, u["cy"]) * (1.0 - half_h)
  angle = np.deg2rad(lerp(-cfg.rotate_degrees, cfg.rotate_degrees, u["angle"]))
  flip = np.where(u["flip"] < cfg.flip_prob, -1.0, 1.0)
  # Input = centre + R(angle) . diag(flip * half_w, half_h) . (output - S/2), all in pixels.
  cos, sin, fw = np.cos(angle), np.sin(angle), flip * half_w
  a, b, d, e = cos * fw, -sin * half_h, sin * fw, cos * half_h
  h = size / 2.0
  maps = np.empty((len(a), 6))
  maps[:, 0], maps[:, 1], maps[:, 3], maps[:, 4] = a, b, d, e
  maps[:, 2] = (cx + 1.0) * h - (a + b) * h
  maps[:, 5] = (cy + 1.0) * h - (d + e) * h
  return maps


def _colour_maps(u: dict[str, np.ndarray], cfg: ImageAugmentConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(brightness [n], contrast [n], saturation-and-hue 3x3 [n, 3, 3]) float32 per image, from
  its uniform draws `u` (rows of `_DRAWS`)."""
  lerp = _uniform
  brightness, contrast, saturation = (
      lerp(1.0 - x, 1.0 + x, u[name]).astype(np.float32)
      for name, x in (("brightness", cfg.brightness), ("contrast", cfg.contrast),
                      ("saturation", cfg.saturation)))
  turn = lerp(-cfg.hue, cfg.hue, u["hue"]) * 2.0 * np.pi
  # hue(t) . ((1 - s) grey + s I), with hue(t) = H0 + cos t H1 + sin t H2: one weighted sum of
  # the 6 constant matrices in _MIX_BASIS per image.
  cos, sin = np.cos(turn), np.sin(turn)
  weights = np.empty((6, len(turn)))                                        # [6, n]
  weights[0], weights[3] = 1.0 - saturation, saturation
  weights[1], weights[2], weights[4], weights[5] = (weights[0] * cos, weights[0] * sin,
                                                    weights[3] * cos, weights[3] * sin)
  mix = (weights.T @ _MIX_BASIS).reshape(-1, 3, 3).astype(np.float32)
  return brightness, contrast, mix


def _border_colours(images: np.ndarray) -> np.ndarray:
  """The mean colour of each image's outermost pixels, uint8 [n, 3]: what a rotation or a crop
  reaching past the edge shows (white around an icon, the sky's colour at a photo's top...)."""
  step = max(images.shape[1] - 1, 1)
  rows, columns = images[:, ::step], images[:, 1:-1, ::step]       # rows 0, -1; columns 0, -1
  total = (np.add.reduce(rows, axis=(1, 2), dtype=np.uint32)
           + np.add.reduce(columns, axis=(1, 2), dtype=np.uint32))                 # [n, 3]
  return np.rint(total / (rows[0, :, :, 0].size + columns[0, :, :, 0].size)).astype(np.uint8)


class _Buffers:
  """The arrays one batch's warp and recolouring work in, for up to n images of S x S pixels.

  Reused from batch to batch (one set per thread, `_buffers`): numpy would otherwise allocate
  ~20 arrays of 50-800 KB per batch, and glibc hands each such block back to the kernel when it
  is freed, so every batch paid page faults on fresh memory, which cost several times the
  arithmetic (measured: 3.5 ms -> 0.8 ms for the warp of 16 images under load).
  """

  def __init__(self, n: int, s: int):
    self.pad = s // 4 + 2                # a rotated crop leaves the image by at most ~0.21 S
    self.side = side = s + 2 * self.pad
    p = s * s
    # The padded tiles, RGB bytes, and 8 more bytes so that the uint64 read at each pixel (its
    # RGB, its right neighbour's and 2 bytes more) stays inside.
    self.tile_bytes = np.zeros(n * side * side * 3 + 8, np.uint8)
    self.pair_view = np.ndarray((n * side * side,), np.uint64, self.tile_bytes, 0, (3,))
    self.pairs = np.empty(n * side * side, np.uint64)     # the same, aligned (for np.take)
    self.pos = np.empty((n, 2, p), np.float32)            # sample positions, then fractions
    self.corner = np.empty((n, 2, p), np.float32)         # their floors
    self.index = np.empty((2, n, p), np.intp)             # into `pairs`: top row, bottom row
    #                                                       (intp: np.take converts int32 first)
    self.rows = np.empty((2, n, p), np.uint64)            # the gathered pixel pairs
    self.lanes = np.empty((2, 6, n, p), np.uint8)         # [row, RGB RGB, image, pixel]
    self.blend = np.empty((2, 3, n, p), np.float32)       # [row, RGB, image, pixel]
    self.colour = np.empty((n, 3, p), np.float32)
    self.out = np.empty((n, p, 3), np.uint8)


_THREAD = threading.local()


_KEEP_BYTES = 64 << 20   # larger buffers (big images, big batches) are made for each batch


def _buffers(n: int, s: int) -> _Buffers:
  """This thread's buffers for batches of up to n images of S x S pixels (~130 KB per 32-pixel
  image; above _KEEP_BYTES in all, fresh ones that are not kept)."""
  held = getattr(_THREAD, "buffers", None)
  if held is None or held.out.shape[0] < n or held.out.shape[1] != s * s:
    held = _Buffers(n, s)
    if sum(v.nbytes for v in vars(held).values() if getattr(v, "base", 0) is None) <= _KEEP_BYTES:
      _THREAD.buffers = held
  return held


@functools.lru_cache(maxsize=8)
def _output_grid(size: int) -> np.ndarray:
  """float32 [3, S * S]: each output pixel's centre (x + 0.5, y + 0.5, 1), row-major."""
  centres = np.arange(size, dtype=np.float32) + 0.5
  return np.stack([np.tile(centres, size), np.repeat(centres, size),
                   np.ones(size * size, np.float32)])


def _warp(images: np.ndarray, maps: np.ndarray, fills: np.ndarray, buf: _Buffers) -> np.ndarray:
  """Every image resampled (bilinear) through its affine map: uint8 [m, S, S, 3] -> float32
  channel planes [3, m, S * S] in whole levels (a view of `buf`).

  Vectorized over the batch, in whole-batch numpy operations writing into `buf` (at 32 pixels
  a per-image call, like Pillow's transform, costs more than its arithmetic; copies keep long
  inner loops, never one of 3 channels): each image sits in a tile padded with its border colour
  (wide enough for any rotation of a crop that fits the image; a sample past the padding reads
  the tile's edge), and the uint64 read at each tile pixel holds its RGB and its right
  neighbour's, so the 2 x 2 neighbourhoods of the whole batch are two gathers. The sampling is
  Pillow's bilinear `transform` (pixel centres at +0.5, float weights, truncated to whole
  levels): the old Pillow MESH path's pixels, bar float rounding.
  """
  m, s = images.shape[:2]
  pad, side, p = buf.pad, buf.side, s * s
  tiles = buf.tile_bytes[:m * side * side * 3].reshape(m, side, side * 3)
  row = np.tile(fills, side)[:, None, :]                           # [m, 1, side * 3]: padding
  tiles[:, :pad], tiles[:, pad + s:] = row, row
  tiles[:, pad:pad + s, :3 * pad], tiles[:, pad:pad + s, 3 * (pad + s):] = (
      row[:, :, :3 * pad], row[:, :, :3 * pad])
  tiles[:, pad:pad + s, 3 * pad:3 * (pad + s)] = images.reshape(m, s, s * 3)
  pairs = buf.pairs[:m * side * side]
  np.copyto(pairs, buf.pair_view[:m * side * side])
  # Sample positions (x, y) of every output pixel in its tile, less the half pixel of the
  # bilinear filter, clipped to where a 2 x 2 neighbourhood exists.
  coef = maps.reshape(m, 2, 3).astype(np.float32)
  coef[:, :, 2] += pad - 0.5
  pos, corner = buf.pos[:m], buf.corner[:m]
  np.matmul(coef, _output_grid(s), out=pos)
  np.clip(pos, 0.0, side - 2, out=pos)
  np.floor(pos, out=corner)
  np.subtract(pos, corner, out=pos)                                 # the fractions
  top, bottom = buf.index[0, :m], buf.index[1, :m]
  np.copyto(top, corner[:, 1] * side + corner[:, 0], casting="unsafe")   # exact: < side^2
  top += np.arange(0, m * side * side, side * side)[:, None]             # the image's tile
  np.add(top, side, out=bottom)
  rows = buf.rows[:, :m]
  np.take(pairs, buf.index[:, :m], out=rows, mode="clip")
  # Bytes 0-2 (the pixel) and 3-5 (its right neighbour) to channel planes, images innermost
  # but for the pixels, so that the fractions [m, p] broadcast over the leading axes.
  lanes, blend = buf.lanes[:, :, :m], buf.blend[:, :, :m]
  np.copyto(lanes, rows.view(np.uint8).reshape(2, m, p, 8).transpose(0, 3, 1, 2)[:, :6])
  left, right = lanes[:, 0:3], lanes[:, 3:6]                       # uint8 [row, 3, m, p]
  np.subtract(right, left, out=blend, dtype=np.float32)            # horizontal, both rows
  np.multiply(blend, pos[:, 0], out=blend)
  np.add(blend, left, out=blend, dtype=np.float32)
  top, bottom = blend
  np.subtract(bottom, top, out=bottom)                             # vertical
  np.multiply(bottom, pos[:, 1], out=bottom)
  np.add(top, bottom, out=top)
  return np.floor(top, out=top)


def augment_images(images: np.ndarray, rng: np.random.Generator,
                   cfg: ImageAugmentConfig) -> np.ndarray:
  """uint8 [n, S, S, 3] -> uint8 [n, S, S, 3], each image augmented with its own draws; the images
  left alone (probability 1 - prob) come back bit for bit."""
  images = np.asarray(images, np.uint8)
  n, s = images.shape[0], images.shape[1]
  draws = rng.random((len(_DRAWS), n))
  active = draws[0] < cfg.prob
  out = images.copy()
  if not active.any():
    return out
  # Only the drawn images are warped and recoloured (the draws above are made for every image,
  # so the random stream and each drawn image's result do not depend on the others): at prob 0.5
  # this halves the pipeline's cost.
  u = dict(zip(_DRAWS, draws[:, active]))
  maps = _affine_maps(u, s, cfg)
  brightness, contrast, mix = _colour_maps(u, cfg)
  chosen = images[active]
  m = chosen.shape[0]
  buf = _buffers(n, s)
  x = _warp(chosen, maps, _border_colours(chosen), buf)                      # [3, m, S * S]
  # brightness b, contrast c around the mean grey g of b * x, then the 3x3 `mix`, folded into one
  # affine map per image: mix (c b x + (1 - c) g) = (c b mix) x + (1 - c) g mix 1.
  grey = brightness * (_LUMA @ np.add.reduce(x, axis=2)) / (s * s)             # [m]
  scale = (contrast * brightness)[:, None, None] * mix                        # [m, 3, 3]
  offset = ((1.0 - contrast) * grey)[:, None] * mix.sum(axis=2) + 0.5         # + 0.5: rounds
  y = buf.colour[:m]                                                          # [m, 3, S * S]
  np.matmul(scale, x.transpose(1, 0, 2), out=y)
  y += offset[:, :, None]
  np.clip(y, 0.0, 255.0, out=y)
  recoloured = buf.out[:m]
  for c in range(3):                   # one channel at a time: long inner loops
    np.copyto(recoloured[:, :, c], y[:, c], casting="unsafe")
  out[active] = recoloured.reshape(m, s, s, 3)
  return out


class AugmentImages(grain.transforms.RandomMap):
  """Batch {"images": uint8 [B, S, S, 3], ...} -> the same batch with augmented images."""

  def __init__(self, config: ImageAugmentConfig, key: str = "images"):
    bad = config.problems()
    if bad:
      raise ValueError("; ".join(f"image augment {k}={v}" for k, v in bad))
    self._config = config
    self._key = key

  def random_map(self, element, rng: np.random.Generator):
    element = dict(element)
    element[self._key] = augment_images(element[self._key], rng, self._config)
    return element
