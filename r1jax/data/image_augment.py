"""Image augmentation on the host: random rotation, random resized crop, flips and colour jitter.

    augment = image_augment.AugmentImages(image_augment.ImageAugmentConfig(prob=1.0))
    ds = ds.batch(16).random_map(augment, seed=seed)     # a Grain MapDataset of batches
    # batch["images"] uint8 [B, S, S, 3] -> the same shape, each row drawn afresh

One Grain `RandomMap` over a whole batch of uint8 images, in numpy, each image with its own draws:

  geometry   a random resized crop (area `crop_scale` of the image, aspect `crop_ratio`, anywhere
             it fits), a rotation by up to +-`rotate_degrees` about the crop's centre and a
             horizontal flip with probability `flip_prob`, composed into one affine map per image
             and applied in one bilinear resampling (Pillow's MESH transform over the batch);
             what falls outside the image shows the mean colour of its border;
  colour     brightness, contrast and saturation factors drawn from [1 - x, 1 + x] and a hue
             rotation by up to +-`hue` of a turn (about the grey axis, in YIQ space), in that
             order, clipped to [0, 255].

An image is left as it is with probability 1 - `prob`. Why per batch: at 32 x 32 pixels the
per-call overhead of a Python transform per image dominates, and the pipeline has to outrun the
training step many times over (bench/multimodal.py measures both); the draws and the colour
operations are vectorized over the batch, and the resampling is one Pillow call per batch. Grain
seeds the generator from the dataset seed and the batch index, so the draws are
the same on every run and after a resume from a checkpointed iterator state (a MapDataset's
state is one index), whatever the worker count.
"""
import dataclasses
import math

import grain
import numpy as np
from PIL import Image

# RGB -> YIQ and back: hue is the angle of (I, Q), so a hue shift is a rotation in that plane.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)
_LUMA = _RGB_TO_YIQ[0]


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


def _affine_maps(rng: np.random.Generator, n: int, size: int, cfg: ImageAugmentConfig,
                 active: np.ndarray) -> np.ndarray:
  """Per image, the 6 coefficients (a, b, c, d, e, f) float64 [n, 6] that map an output pixel
  position (x, y) to the input position (a x + b y + c, d x + e y + f), in pixels (Pillow's
  `Image.transform(..., AFFINE)` convention)."""
  scale = rng.uniform(*cfg.crop_scale, n)
  log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
  ratio = np.exp(rng.uniform(log_lo, log_hi, n))
  half_w = np.minimum(np.sqrt(scale * ratio), 1.0)      # crop half-sizes, image half-side = 1
  half_h = np.minimum(np.sqrt(scale / ratio), 1.0)
  cx = rng.uniform(-1.0, 1.0, n) * (1.0 - half_w)       # crop centre, image centre = 0
  cy = rng.uniform(-1.0, 1.0, n) * (1.0 - half_h)
  angle = np.deg2rad(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees, n))
  flip = np.where(rng.random(n) < cfg.flip_prob, -1.0, 1.0)
  # Identity for the images left alone.
  half_w, half_h = np.where(active, half_w, 1.0), np.where(active, half_h, 1.0)
  cx, cy = np.where(active, cx, 0.0), np.where(active, cy, 0.0)
  angle, flip = np.where(active, angle, 0.0), np.where(active, flip, 1.0)
  # Input = centre + R(angle) . diag(flip * half_w, half_h) . (output - S/2), all in pixels.
  cos, sin, fw = np.cos(angle), np.sin(angle), flip * half_w
  a, b, d, e = cos * fw, -sin * half_h, sin * fw, cos * half_h
  h = size / 2.0
  c = (cx + 1.0) * h - (a + b) * h
  f = (cy + 1.0) * h - (d + e) * h
  return np.stack([a, b, c, d, e, f], axis=1)


def _border_colours(images: np.ndarray) -> np.ndarray:
  """The mean colour of each image's outermost pixels, uint8 [n, 3]: what a rotation or a crop
  reaching past the edge shows (white around an icon, the sky's colour at a photo's top...)."""
  border = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]],
                          axis=1)                                            # [n, 4S - 4, 3]
  return np.rint(border.mean(axis=1)).astype(np.uint8)


def _warp(images: np.ndarray, maps: np.ndarray, fills: np.ndarray) -> np.ndarray:
  """Every image resampled (bilinear) through its affine map, in one Pillow call.

  The images are laid side by side on one strip, each in a tile padded with its border colour
  (wide enough for any rotation of a crop that fits the image), and Pillow's MESH transform
  maps each output tile from its own quadrilateral of the strip (a parallelogram: the affine
  map). One call instead of one `Image.transform` per image: at 32 pixels Pillow's per-call
  Python overhead is several times its C resampling.
  """
  n, s = images.shape[:2]
  pad = s // 4 + 2                       # a rotated crop leaves the image by at most ~0.21 S
  side = s + 2 * pad
  strip = np.empty((side, n, side, 3), np.uint8)
  strip[:] = fills[None, :, None, :]
  strip[pad:pad + s, :, pad:pad + s] = images.transpose(1, 0, 2, 3)
  mesh = []
  for i, (a, b, c, d, e, f) in enumerate(maps.tolist()):
    ox, oy = i * side + pad, pad
    corner = lambda x, y: (a * x + b * y + c + ox, d * x + e * y + f + oy)  # pylint: disable=cell-var-from-loop
    mesh.append(((i * s, 0, (i + 1) * s, s),
                 corner(0, 0) + corner(0, s) + corner(s, s) + corner(s, 0)))
  out = Image.fromarray(strip.reshape(side, n * side, 3)).transform(
      (n * s, s), Image.Transform.MESH, mesh, resample=Image.Resampling.BILINEAR)
  return np.asarray(out).reshape(s, n, s, 3).transpose(1, 0, 2, 3)


def _colour_matrices(rng: np.random.Generator, n: int, cfg: ImageAugmentConfig,
                     active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(brightness [n], contrast [n], saturation-and-hue 3x3 [n, 3, 3]) per image."""
  def factor(x):
    return np.where(active, rng.uniform(1.0 - x, 1.0 + x, n), 1.0).astype(np.float32)
  brightness, contrast, saturation = (factor(cfg.brightness), factor(cfg.contrast),
                                      factor(cfg.saturation))
  turn = np.where(active, rng.uniform(-cfg.hue, cfg.hue, n), 0.0) * 2.0 * np.pi
  # Saturation: mix with the pixel's grey (1 - s) * luma + s * rgb, as a 3x3 on RGB.
  grey = np.broadcast_to(_LUMA[None, :], (3, 3))
  sat = ((1.0 - saturation)[:, None, None] * grey[None]
         + saturation[:, None, None] * np.eye(3, dtype=np.float32)[None])
  rot = np.zeros((n, 3, 3), np.float32)
  rot[:, 0, 0] = 1.0
  rot[:, 1, 1] = rot[:, 2, 2] = np.cos(turn)
  rot[:, 1, 2], rot[:, 2, 1] = -np.sin(turn), np.sin(turn)
  hue = _YIQ_TO_RGB[None] @ rot @ _RGB_TO_YIQ[None]
  return brightness, contrast, (hue @ sat).astype(np.float32)


def augment_images(images: np.ndarray, rng: np.random.Generator,
                   cfg: ImageAugmentConfig) -> np.ndarray:
  """uint8 [n, S, S, 3] -> uint8 [n, S, S, 3], each image augmented with its own draws; the images
  left alone (probability 1 - prob) come back bit for bit."""
  images = np.asarray(images, np.uint8)
  n, s = images.shape[0], images.shape[1]
  active = rng.random(n) < cfg.prob
  maps = _affine_maps(rng, n, s, cfg, active)
  brightness, contrast, mix = _colour_matrices(rng, n, cfg, active)
  out = images.copy()
  if not active.any():
    return out
  # Only the drawn images are warped and recoloured (the draws above are made for every image,
  # so the random stream and each drawn image's result do not depend on the others): at prob 0.5
  # this halves the pipeline's cost.
  maps, brightness, contrast, mix = maps[active], brightness[active], contrast[active], mix[active]
  chosen = images[active]
  m = chosen.shape[0]
  x = _warp(chosen, maps, _border_colours(chosen)).reshape(m, s * s, 3).astype(np.float32)
  # brightness b, contrast c around the mean grey m of b * x, then the 3x3 `mix`, folded into one
  # affine map per image: mix (c b x + (1 - c) m) = (c b mix) x + (1 - c) m mix 1.
  grey = brightness * (x @ _LUMA).mean(axis=1)                                # [n]
  scale = (contrast * brightness)[:, None, None] * mix                        # [n, 3, 3]
  offset = ((1.0 - contrast) * grey)[:, None] * mix.sum(axis=2)              # [n, 3]
  x = np.matmul(x, np.swapaxes(scale, 1, 2))
  x += offset[:, None, :] + 0.5                                               # + 0.5: rounds
  np.clip(x, 0.0, 255.0, out=x)
  out[active] = x.astype(np.uint8).reshape(chosen.shape)
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
