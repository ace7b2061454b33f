"""Image augmentation's numpy warp (data/image_augment.py): Pillow's bilinear resampling to within
float rounding, the images left alone returned bit for bit, the same draws whatever the batch
around an image, and the reused buffers giving the same results across sizes and threads."""
import threading

import numpy as np
from PIL import Image
import pytest

from r1jax.data import image_augment

MILD = image_augment.ImageAugmentConfig(prob=0.5, rotate_degrees=10.0, crop_scale=(0.85, 1.0),
                                        brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)


def _icons(n, s, seed=0):
  """Line-art-like images: a light background with dark random strokes (sharp edges, where a
  resampling difference would show)."""
  rng = np.random.default_rng(seed)
  images = np.full((n, s, s, 3), 235, np.uint8) + rng.integers(0, 20, (n, 1, 1, 3), np.uint8)
  for i in range(n):
    for _ in range(4):
      y, x = rng.integers(0, s - 4, 2)
      h, w = rng.integers(1, s // 2, 2)
      images[i, y:y + h, x:x + w] = rng.integers(0, 256, 3)
  return images


def _pillow_warp(images, maps, fills):
  """The reference: per image, Pillow's bilinear AFFINE transform of the image on a tile padded
  with its border colour (what the Pillow MESH path before this warp computed)."""
  s = images.shape[1]
  pad = s // 4 + 2
  out = []
  for image, (a, b, c, d, e, f), fill in zip(images, maps.tolist(), fills):
    tile = np.empty((s + 2 * pad, s + 2 * pad, 3), np.uint8)
    tile[:] = fill
    tile[pad:pad + s, pad:pad + s] = image
    out.append(np.asarray(Image.fromarray(tile).transform(
        (s, s), Image.Transform.AFFINE, (a, b, c + pad, d, e, f + pad),
        resample=Image.Resampling.BILINEAR)))
  return np.stack(out)


@pytest.mark.parametrize("size", [32, 17])
def test_warp_matches_pillows_bilinear_transform(size):
  images = _icons(24, size)
  cfg = image_augment.ImageAugmentConfig(rotate_degrees=30.0, crop_scale=(0.5, 1.0))
  draws = np.random.default_rng(1).random((len(image_augment._DRAWS), len(images)))
  maps = image_augment._affine_maps(dict(zip(image_augment._DRAWS, draws)), size, cfg)
  fills = image_augment._border_colours(images)
  want = _pillow_warp(images, maps, fills).astype(int)
  buf = image_augment._buffers(len(images), size)
  got = image_augment._warp(images, maps, fills, buf)                       # [3, n, S * S]
  got = got.transpose(1, 2, 0).reshape(images.shape).astype(int)
  diff = np.abs(got - want)
  # Float32 positions against Pillow's float64 ones: a rare level of difference, never more.
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  assert (np.abs(got - images) > 8).mean() > 0.05              # and the images did move


def test_images_left_alone_come_back_bit_for_bit_and_the_others_change():
  images = _icons(40, 32, seed=3)
  for seed in range(5):
    rng = np.random.default_rng(seed)
    active = np.random.default_rng(seed).random((len(image_augment._DRAWS), 40))[0] < MILD.prob
    out = image_augment.augment_images(images, rng, MILD)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert 0 < active.sum() < 40
    np.testing.assert_array_equal(out[~active], images[~active])
    assert all(not np.array_equal(o, i) for o, i in zip(out[active], images[active]))


def test_an_image_gets_the_same_augmentation_whatever_the_others_are():
  # The same seed draws the same images and parameters; an image present in both batches comes
  # out the same although its neighbours (and what the warp's tiles hold around it) differ.
  images, other = _icons(16, 32, seed=4), _icons(16, 32, seed=5)
  cfg = image_augment.ImageAugmentConfig(prob=0.6)
  active = np.random.default_rng(7).random((len(image_augment._DRAWS), 16))[0] < cfg.prob
  i = int(np.flatnonzero(active)[1])
  other[i] = images[i]
  a = image_augment.augment_images(images, np.random.default_rng(7), cfg)
  b = image_augment.augment_images(other, np.random.default_rng(7), cfg)
  np.testing.assert_array_equal(a[i], b[i])
  assert not np.array_equal(a[i], images[i])
  assert not np.array_equal(a[np.flatnonzero(active)[0]], b[np.flatnonzero(active)[0]])


def test_reused_buffers_across_batch_and_image_sizes_and_threads():
  big, small, odd = _icons(32, 32, seed=6), _icons(5, 32, seed=7), _icons(9, 12, seed=8)
  run = lambda images, seed: image_augment.augment_images(images, np.random.default_rng(seed),
                                                          image_augment.ImageAugmentConfig())
  first = [run(small, 0), run(big, 1), run(odd, 2)]
  # Again, in another order (the buffers were made for other shapes in between) ...
  np.testing.assert_array_equal(run(odd, 2), first[2])
  np.testing.assert_array_equal(run(big, 1), first[1])
  np.testing.assert_array_equal(run(small, 0), first[0])
  # ... and from 4 threads at once, each with its own buffers.
  results = {}

  def work(k):
    results[k] = [run(big if k % 2 else odd, k) for _ in range(20)]

  threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for k in range(4):
    want = run(big if k % 2 else odd, k)
    for got in results[k]:
      np.testing.assert_array_equal(got, want)


def test_samples_past_the_padding_read_the_border_colour():
  # Thin crops turned by up to 180 degrees reach past the tiles' padding; what lies beyond shows
  # the image's border colour, never black or a neighbouring image (the Pillow MESH path showed
  # one of those in 1 of these 400 images).
  images = np.zeros((8, 16, 16, 3), np.uint8)
  images[:] = np.random.default_rng(0).integers(0, 256, (8, 1, 1, 3))
  cfg = image_augment.ImageAugmentConfig(prob=1.0, rotate_degrees=180.0, crop_scale=(0.3, 1.0),
                                         crop_ratio=(0.05, 20.0), brightness=0.0, contrast=0.0,
                                         saturation=0.0, hue=0.0)
  for seed in range(50):   # uniform images: the border colour everywhere
    out = image_augment.augment_images(images, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(out, images)
