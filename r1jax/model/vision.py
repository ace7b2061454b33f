"""Images beside text in the same Transformer-XL: a ViT-style patch embedding and a classifier.

Notation as in `transformer_xl`, plus S image side (pixels), C channels, P patch side,
N = (S / P)^2 patches per image, Q text tokens.

An image is cut into N non-overlapping P x P patches in raster order; each flattened patch
[P * P * C] goes through one linear projection to the model width d (ViT's patch embedding), gets a
learned position row of its own (`pos_emb` [N, d]: the backbone's relative positions see the
patches as one raster line, the table says where a patch sits in 2-D) and the image modality row
(`image_type` [d]). These N rows join the text's embedded rows (`TransformerXL.embed`) in one
sequence [text ; patches] that the backbone's layers (`TransformerXL.encode`) attend over
together, so one backbone reads both modalities. Text rows carry no modality row: text is the
modality a text-only model already reads, so a `MultimodalClassifier` given text alone computes
what a `heads.Classifier` with the same parameters computes (tests/test_multimodal_model.py).

Parameters: `backbone/...` (a `TransformerXL`, the same tree a text checkpoint holds),
`patch_embed/proj/{kernel [P*P*C, d], bias [d]}`, `patch_embed/pos_emb` [N, d],
`patch_embed/image_type` [d], then the head(s), by `ImageConfig.fusion`:

  joint  `cls_head/...` (a `heads.PooledHead` reading the mean of the real positions; with both
         modalities, the average of the text's mean and the image's mean, so the N patches do not
         outweigh a short text). Text and patches attend to each other in one sequence.
  late   `text_head/...` and `image_head/...`: the backbone (the same parameters) encodes the
         text and the patches as two sequences, each modality's mean goes through its own head,
         and the fused logits are the sum of the two (a product of the two softmaxes, up to
         normalisation). Each branch's logits come back beside them (`text_logits`,
         `image_logits`), for per-modality auxiliary losses (`losses.multimodal_loss_fn`'s
         `aux_weight`); one modality alone reads its own branch.

Pixels come in as values 0..255 ([B, S, S, C], uint8 from `r1jax.data.images`, any dtype) and are
scaled to about [-2, 2] inside the model, so batches stay uint8 (a quarter of float32's bytes) on
their way to the device.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.model import axes
from r1jax.model import heads
from r1jax.model import transformer_xl as txl

MODALITIES = ("text", "image")
# How a model reading both modalities combines them (ImageConfig.fusion; module docstring).
FUSIONS = ("joint", "late")
# The multimodal models a task trains and compares, by name -> the modalities each reads.
MODELS = {"fused": ("text", "image"), "text": ("text",), "image": ("image",)}
# Pixel scaling: 0..255 -> (x / 255 - 0.5) / 0.25, so a mid-grey pixel is 0.
_PIXEL_CENTER = 0.5
_PIXEL_SCALE = 0.25


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """What the image path takes: square images of `image_size` pixels cut into patches."""
  image_size: int = 32   # S, side of the (square) images in pixels.
  patch_size: int = 8    # P, side of a patch; S must be a multiple of it.
  channels: int = 3      # C, colour channels (RGB).
  fusion: str = "joint"  # one of FUSIONS: one sequence and one head, or a head per modality.

  def __post_init__(self):
    for name in ("image_size", "patch_size", "channels"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ImageConfig.{name}={value!r}: must be a positive integer.")
    if self.image_size % self.patch_size:
      raise ValueError(f"ImageConfig.patch_size={self.patch_size} must divide image_size="
                       f"{self.image_size} (e.g. patch_size={_divisor_near(self.image_size, 8)}).")
    if self.fusion not in FUSIONS:
      raise ValueError(f"ImageConfig.fusion={self.fusion!r}: choose one of {', '.join(FUSIONS)}.")

  @property
  def num_patches(self) -> int:
    """N, patches per image."""
    return (self.image_size // self.patch_size) ** 2

  @property
  def patch_dim(self) -> int:
    """P * P * C, values in one flattened patch."""
    return self.patch_size * self.patch_size * self.channels


def _divisor_near(n: int, target: int) -> int:
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """images [B, S, S, C] -> patches [B, N, P * P * C], raster order, each patch row-major."""
  b, s, _, c = images.shape
  n = s // patch_size
  x = images.reshape(b, n, patch_size, n, patch_size, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))                                  # [B, n, n, P, P, C]
  return x.reshape(b, n * n, patch_size * patch_size * c)


def check_images(image: ImageConfig, images, batch: int | None = None) -> None:
  """ValueError unless images is [B, S, S, C] as `image` says (and B == batch when given)."""
  shape = tuple(jnp.shape(images))
  want = (image.image_size, image.image_size, image.channels)
  if len(shape) != 4 or shape[1:] != want or (batch is not None and shape[0] != batch):
    b = "B" if batch is None else batch
    raise ValueError(f"images must have shape [{b}, {want[0]}, {want[1]}, {want[2]}] "
                     f"(ImageConfig image_size={image.image_size}, channels={image.channels}), "
                     f"got {shape}.")


class PatchEmbed(nn.Module):
  """images [B, S, S, C] (0..255) -> patch rows [B, N, d] ready to join the text's rows."""
  config: txl.TransformerXLConfig
  image: ImageConfig

  @nn.compact
  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg, img = self.config, self.image
    check_images(img, images)
    x = (jnp.asarray(images, jnp.float32) / 255.0 - _PIXEL_CENTER) / _PIXEL_SCALE
    x = patchify(x, img.patch_size)                                           # [B, N, P*P*C]
    h = txl.make_dense(cfg, cfg.d_model, (axes.PATCH, axes.EMBED), "proj")(x)  # [B, N, d]
    init = nn.with_logical_partitioning(nn.initializers.normal(txl.INIT_STD),
                                        (axes.PATCHES, axes.EMBED))
    pos = self.param("pos_emb", init, (img.num_patches, cfg.d_model), cfg.param_dtype)
    kind = self.param("image_type", nn.with_logical_partitioning(
        nn.initializers.normal(txl.INIT_STD), (axes.EMBED,)), (cfg.d_model,), cfg.param_dtype)
    h = h + (pos + kind).astype(cfg.dtype)
    h = txl.Dropout(cfg.dropout)(h, deterministic=deterministic)
    return axes.constrain(h, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))


class MultimodalClassifier(nn.Module):
  """Backbone over [text ; image patches] + a pooled head on the mean of the real positions.

  Text-only, image-only and image+text inputs all go through the same parameters; a row without
  an image (`image_mask` False) has its patches masked out, a row's text padding is masked by
  `token_mask` as in the text classifier.
  """
  config: txl.TransformerXLConfig
  image: ImageConfig
  num_classes: int
  multi_label: bool = False

  def setup(self):
    minimum = 1 if self.multi_label else 2
    if self.num_classes < minimum:
      raise ValueError(f"num_classes={self.num_classes}: a classifier needs >= {minimum}.")
    if self.config.ngram_buckets:
      raise ValueError(f"model.ngram_buckets={self.config.ngram_buckets}: the multimodal "
                       "classifier has no n-gram path; set model.ngram_buckets=0.")
    self.backbone = txl.TransformerXL(self.config)
    self.patch_embed = PatchEmbed(self.config, self.image)
    if self.image.fusion == "late":
      self.text_head = heads.PooledHead(self.config, self.num_classes, self.config.dropout, "mean")
      self.image_head = heads.PooledHead(self.config, self.num_classes, self.config.dropout,
                                         "mean")
    else:
      self.cls_head = heads.PooledHead(self.config, self.num_classes, self.config.dropout, "mean")

  def __call__(self, tokens: jax.Array | None = None, token_mask: jax.Array | None = None,
               token_types: jax.Array | None = None, images: jax.Array | None = None,
               image_mask: jax.Array | None = None, *, deterministic: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Classifies text, images or both.

    Args:
      tokens: int [B, Q] or None (image-only); token_mask bool [B, Q]; token_types int [B, Q].
      images: [B, S, S, C] pixel values 0..255, or None (text-only).
      image_mask: bool [B], False for rows that have no image (their patches are ignored); None =
        every row has one.
      deterministic: True disables dropout.

    Returns:
      (logits float32 [B, C], {"hidden": [B, Q + N, d] (text rows first), "pooled": [B, d]});
      late fusion with both modalities adds "text_logits" and "image_logits" [B, C] (the
      image's for every row, `image_mask` or not), and "pooled" is then the average of the two
      branches' pooled rows.
    """
    if self.image.fusion == "late":
      return self._late(tokens, token_mask, token_types, images, image_mask, deterministic)
    if tokens is None and images is None:
      raise ValueError("MultimodalClassifier needs tokens, images or both; got neither.")
    rows, masks = [], []
    if tokens is not None:
      txl.check_inputs(self.config, tokens, None, token_mask, token_types)
      tokens = jnp.asarray(tokens)
      rows.append(self.backbone.embed(tokens, token_types, deterministic=deterministic))
      masks.append(jnp.ones(tokens.shape, bool) if token_mask is None
                   else jnp.asarray(token_mask, bool))
    elif self.is_initializing():
      # An image-only init still creates the text path's parameters: one tree for every input.
      self.backbone.embed(jnp.zeros((1, 1), jnp.int32))
    if images is not None:
      batch = None if tokens is None else tokens.shape[0]
      check_images(self.image, images, batch)
      patches = self.patch_embed(images, deterministic)                        # [B, N, d]
      rows.append(patches)
      present = (jnp.ones(patches.shape[:1], bool) if image_mask is None
                 else jnp.asarray(image_mask, bool))
      masks.append(jnp.broadcast_to(present[:, None], patches.shape[:2]))
    elif self.is_initializing():
      # The same for the image path in a text-only init.
      self.patch_embed(jnp.zeros((1, self.image.image_size, self.image.image_size,
                                  self.image.channels), jnp.uint8))
    if len(rows) == 1:
      hidden, _ = self.backbone.encode(rows[0], None, masks[0], deterministic=deterministic)
      logits, pooled = self.cls_head(hidden, deterministic, masks[0])
      return logits, {"hidden": hidden, "pooled": pooled}
    mask = jnp.concatenate(masks, axis=1)
    hidden, _ = self.backbone.encode(jnp.concatenate(rows, axis=1), None, mask,
                                     deterministic=deterministic)
    # Each modality's mean, then their average: the N patches would otherwise outweigh a short
    # text in one mean over all positions. A row without an image reads its text's mean.
    q = tokens.shape[1]
    text = heads.mean_pool(hidden[:, :q], masks[0])                            # [B, d]
    image = heads.mean_pool(hidden[:, q:], masks[1])                           # [B, d]
    summary = jnp.where(masks[1][:, :1], 0.5 * (text + image), text)
    logits, pooled = self.cls_head(summary[:, None], deterministic)
    return logits, {"hidden": hidden, "pooled": pooled}

  def _late(self, tokens, token_mask, token_types, images, image_mask, deterministic):
    """Late fusion: each modality encoded alone by the shared backbone, a head each, logits
    summed (the image's only where `image_mask`). Arguments and results as `__call__`."""
    branches = {}
    if tokens is not None:
      txl.check_inputs(self.config, tokens, None, token_mask, token_types)
      tokens = jnp.asarray(tokens)
      mask = (jnp.ones(tokens.shape, bool) if token_mask is None
              else jnp.asarray(token_mask, bool))
      rows = self.backbone.embed(tokens, token_types, deterministic=deterministic)
      hidden, _ = self.backbone.encode(rows, None, mask, deterministic=deterministic)
      branches["text"] = (hidden, *self.text_head(hidden, deterministic, mask))
    elif self.is_initializing():
      self.backbone.embed(jnp.zeros((1, 1), jnp.int32))
      self.text_head(jnp.zeros((1, 1, self.config.d_model), self.config.dtype))
    if images is not None:
      check_images(self.image, images, None if tokens is None else tokens.shape[0])
      rows = self.patch_embed(images, deterministic)                            # [B, N, d]
      hidden, _ = self.backbone.encode(rows, None, None, deterministic=deterministic)
      branches["image"] = (hidden, *self.image_head(hidden, deterministic))
    elif self.is_initializing():
      self.patch_embed(jnp.zeros((1, self.image.image_size, self.image.image_size,
                                  self.image.channels), jnp.uint8))
      self.image_head(jnp.zeros((1, 1, self.config.d_model), self.config.dtype))
    if len(branches) == 1:
      ((hidden, logits, pooled),) = branches.values()
      return logits, {"hidden": hidden, "pooled": pooled}
    (text_h, text_logits, text_pooled), (image_h, image_logits, image_pooled) = (
        branches["text"], branches["image"])
    present = (jnp.ones(text_logits.shape[:1], bool) if image_mask is None
               else jnp.asarray(image_mask, bool))
    logits = text_logits + jnp.where(present[:, None], image_logits, 0.0)
    return logits, {"hidden": jnp.concatenate([text_h, image_h], axis=1),
                    "pooled": 0.5 * (text_pooled + image_pooled),
                    "text_logits": text_logits, "image_logits": image_logits}
