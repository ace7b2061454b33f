"""The image path of the model: patch embedding shapes and axes, the three input kinds, and the
text-only path left as it was (issue 28)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.model import axes
from r1jax.model import heads
from r1jax.model import losses
from r1jax.model import transformer_xl as txl
from r1jax.model import vision

CONFIG = txl.get_variant("tiny", vocab_size=50, d_model=32, n_layer=1, n_head=2, d_head=16,
                         d_inner=64, dropout=0.1, pooling="mean", n_token_types=2)
IMAGE = vision.ImageConfig(image_size=16, patch_size=4, channels=3)
LATE = dataclasses.replace(IMAGE, fusion="late")


def _inputs(batch=3, qlen=7, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CONFIG.vocab_size, (batch, qlen)).astype(np.int32)
  mask = np.arange(qlen)[None] < rng.integers(2, qlen + 1, (batch, 1))
  images = rng.integers(0, 256, (batch, 16, 16, 3)).astype(np.uint8)
  return tokens, mask, images


@pytest.fixture(scope="module")
def model_and_params():
  model = vision.MultimodalClassifier(CONFIG, IMAGE, num_classes=5)
  tokens, mask, images = _inputs()
  params = model.init(jax.random.key(0), tokens, mask, images=images)["params"]
  return model, params


def test_patchify_is_raster_order_of_row_major_patches():
  images = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
  patches = np.asarray(vision.patchify(jnp.asarray(images), 2))
  assert patches.shape == (2, 4, 4)
  np.testing.assert_array_equal(patches[0, 0], [0, 1, 4, 5])      # top-left patch
  np.testing.assert_array_equal(patches[0, 1], [2, 3, 6, 7])      # top-right
  np.testing.assert_array_equal(patches[1, 3], [26, 27, 30, 31])  # second image, bottom-right


def test_patch_embedding_shapes_and_logical_axes():
  embed = vision.PatchEmbed(CONFIG, IMAGE)
  images = np.zeros((2, 16, 16, 3), np.uint8)
  boxed = embed.init(jax.random.key(1), images)["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["proj"]["kernel"]) == (axes.PATCH, axes.EMBED)
  assert tuple(specs["proj"]["bias"]) == (axes.EMBED,)
  assert tuple(specs["pos_emb"]) == (axes.PATCHES, axes.EMBED)
  assert tuple(specs["image_type"]) == (axes.EMBED,)
  params = nn.unbox(boxed)
  assert params["proj"]["kernel"].shape == (IMAGE.patch_dim, 32) == (48, 32)
  assert params["pos_emb"].shape == (IMAGE.num_patches, 32) == (16, 32)
  out = embed.apply({"params": params}, images)
  assert out.shape == (2, 16, 32)
  # Every logical name has a mesh rule (so the engine can shard the image path like the rest).
  ruled = {name for name, _ in axes.DEFAULT_RULES}
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert set(spec) <= ruled


def test_text_image_and_fused_inputs(model_and_params):
  model, params = model_and_params
  params = nn.unbox(params)
  tokens, mask, images = _inputs()
  text, aux_t = model.apply({"params": params}, tokens, mask)
  image, aux_i = model.apply({"params": params}, images=images)
  fused, aux_f = model.apply({"params": params}, tokens, mask, images=images)
  for logits in (text, image, fused):
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
  assert aux_t["hidden"].shape == (3, 7, 32)
  assert aux_i["hidden"].shape == (3, IMAGE.num_patches, 32)
  assert aux_f["hidden"].shape == (3, 7 + IMAGE.num_patches, 32)
  assert not np.allclose(fused, text) and not np.allclose(fused, image)
  # A row whose image is masked out reads as the text alone.
  masked, _ = model.apply({"params": params}, tokens, mask, images=images,
                          image_mask=np.array([True, False, True]))
  np.testing.assert_allclose(masked[1], text[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(masked[0], fused[0], rtol=1e-5, atol=1e-5)
  # Text padding is masked in the fused sequence too.
  other = np.where(mask, tokens, (tokens + 1) % CONFIG.vocab_size)
  again, _ = model.apply({"params": params}, other, mask, images=images)
  np.testing.assert_allclose(again, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image", [IMAGE, LATE], ids=["joint", "late"])
def test_one_parameter_tree_whatever_the_init_input(image):
  model = vision.MultimodalClassifier(CONFIG, image, num_classes=5)
  tokens, mask, images = _inputs()
  shapes = [jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                                            **kw)["params"]))
            for kw in (dict(tokens=tokens), dict(images=images),
                       dict(tokens=tokens, images=images))]
  assert shapes[0] == shapes[1] == shapes[2]


def test_text_only_outputs_equal_the_text_classifier(model_and_params):
  """The new code path leaves text alone: the text classifier with the multimodal model's
  backbone and head computes the same logits, and a TransformerXL split into embed + encode
  computes what its __call__ computes (dropout included)."""
  model, params = model_and_params
  params = nn.unbox(params)
  tokens, mask, _ = _inputs(seed=3)
  types = np.zeros_like(tokens)
  text_params = {k: v for k, v in params.items() if k != "patch_embed"}
  classifier = heads.Classifier(CONFIG, 5)
  want, aux_want = classifier.apply({"params": text_params}, tokens, mask, types)
  got, aux_got = model.apply({"params": params}, tokens, mask, types)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(aux_got["pooled"]), np.asarray(aux_want["pooled"]))
  rngs = {"dropout": jax.random.key(7)}
  want, _ = classifier.apply({"params": text_params}, tokens, mask, types, deterministic=False,
                             rngs=rngs)
  got, _ = model.apply({"params": params}, tokens, mask, types, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_inputs_name_the_problem(model_and_params):
  model, params = model_and_params
  tokens, mask, images = _inputs()
  with pytest.raises(ValueError, match="neither"):
    model.apply({"params": params})
  with pytest.raises(ValueError, match=r"images must have shape \[3, 16, 16, 3\]"):
    model.apply({"params": params}, tokens, mask, images=images[:, :8])
  with pytest.raises(ValueError, match="patch_size=4 must divide|patch_size=5 must divide"):
    vision.ImageConfig(image_size=16, patch_size=5)
  with pytest.raises(ValueError, match="ngram_buckets"):
    vision.MultimodalClassifier(txl.get_variant("tiny", ngram_buckets=8), IMAGE, 3).init(
        jax.random.key(0), tokens)


def test_loss_fn_reads_only_its_modalities(model_and_params):
  model, params = model_and_params
  params = nn.unbox(params)
  tokens, mask, images = _inputs()
  batch = {"tokens": tokens, "token_mask": mask, "images": images,
           "label": np.array([0, 3, 4], np.int32)}
  for modalities in (("text",), ("image",), ("text", "image")):
    fn = losses.multimodal_loss_fn(model, modalities=modalities)
    loss, (metrics, _) = fn(params, batch, {}, jax.random.key(0), True)
    assert np.isfinite(loss) and float(metrics["accuracy"][1]) == 3
  image_only = losses.multimodal_loss_fn(model, modalities=("image",))
  no_text = {k: v for k, v in batch.items() if k not in ("tokens", "token_mask")}
  assert np.isfinite(image_only(params, no_text, {}, jax.random.key(0), True)[0])
  with pytest.raises(ValueError, match="modalities"):
    losses.multimodal_loss_fn(model, modalities=("audio",))


def test_modality_dropout_hides_images_in_training_only(model_and_params):
  _, params = model_and_params
  params = nn.unbox(params)
  model = vision.MultimodalClassifier(dataclasses.replace(CONFIG, dropout=0.0), IMAGE, 5)
  tokens, mask, images = _inputs()
  batch = {"tokens": tokens, "token_mask": mask, "images": images,
           "label": np.array([0, 3, 4], np.int32)}
  key = jax.random.key(5)
  fused = losses.multimodal_loss_fn(model, modalities=("text", "image"))(
      params, batch, {}, key, True)[0]
  text = losses.multimodal_loss_fn(model, modalities=("text",))(params, batch, {}, key, True)[0]
  almost_all = losses.multimodal_loss_fn(model, modalities=("text", "image"),
                                         modality_dropout=0.999999)
  np.testing.assert_allclose(almost_all(params, batch, {}, key, False)[0], text, rtol=1e-6)
  np.testing.assert_allclose(almost_all(params, batch, {}, key, True)[0], fused, rtol=1e-6)
  with pytest.raises(ValueError, match="modality_dropout=1.0"):
    losses.multimodal_loss_fn(model, modalities=("text", "image"), modality_dropout=1.0)


@pytest.fixture(scope="module")
def late_model_and_params():
  model = vision.MultimodalClassifier(CONFIG, LATE, num_classes=5)
  tokens, mask, images = _inputs()
  params = nn.unbox(model.init(jax.random.key(0), tokens, mask, images=images)["params"])
  return model, params


def test_late_fusion_sums_one_head_per_modality(late_model_and_params):
  model, params = late_model_and_params
  assert sorted(params) == ["backbone", "image_head", "patch_embed", "text_head"]
  for head in ("text_head", "image_head"):
    assert params[head]["out"]["kernel"].shape == (32, 5)
  tokens, mask, images = _inputs()
  types = np.zeros_like(tokens)
  text, aux_t = model.apply({"params": params}, tokens, mask, types)
  image, aux_i = model.apply({"params": params}, images=images)
  fused, aux_f = model.apply({"params": params}, tokens, mask, types, images=images)
  for logits in (text, image, fused, aux_f["text_logits"], aux_f["image_logits"]):
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert aux_t["hidden"].shape == (3, 7, 32) and aux_i["hidden"].shape == (3, 16, 32)
  assert aux_f["hidden"].shape == (3, 7 + IMAGE.num_patches, 32)
  assert aux_f["pooled"].shape == (3, 32)
  # Each modality is encoded alone: the branches are what each input alone gives.
  np.testing.assert_allclose(aux_f["text_logits"], text, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux_f["image_logits"], image, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused, text + image, rtol=1e-5, atol=1e-6)
  masked, _ = model.apply({"params": params}, tokens, mask, types, images=images,
                          image_mask=np.array([True, False, True]))
  np.testing.assert_allclose(masked[1], text[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masked[0], fused[0], rtol=1e-5, atol=1e-6)
  # The text branch is the text classifier with the text head.
  text_params = {"backbone": params["backbone"], "cls_head": params["text_head"]}
  want, _ = heads.Classifier(CONFIG, 5).apply({"params": text_params}, tokens, mask, types)
  np.testing.assert_allclose(text, want, rtol=1e-6, atol=1e-6)
  # Joint fusion with the same backbone and patch embedding reads the two together: different.
  joint = vision.MultimodalClassifier(CONFIG, IMAGE, num_classes=5)
  joint_params = {k: v for k, v in params.items() if k in ("backbone", "patch_embed")}
  joint_params["cls_head"] = params["text_head"]
  got, aux = joint.apply({"params": joint_params}, tokens, mask, types, images=images)
  assert "text_logits" not in aux and not np.allclose(got, fused)
  with pytest.raises(ValueError, match="fusion='early'"):
    vision.ImageConfig(image_size=16, patch_size=4, fusion="early")


def test_aux_weight_adds_each_branch_loss_in_training_only(late_model_and_params):
  _, params = late_model_and_params
  model = vision.MultimodalClassifier(dataclasses.replace(CONFIG, dropout=0.0), LATE, 5)
  tokens, mask, images = _inputs()
  labels = np.array([0, 3, 4], np.int32)
  batch = {"tokens": tokens, "token_mask": mask, "images": images, "label": labels}
  key = jax.random.key(2)

  def loss(weight, deterministic):
    fn = losses.multimodal_loss_fn(model, modalities=("text", "image"), aux_weight=weight)
    return float(fn(params, batch, {}, key, deterministic)[0])
  _, aux = model.apply({"params": params}, tokens, mask, np.zeros_like(tokens), images=images)
  text_ce = float(losses.cross_entropy(aux["text_logits"], labels)[0].mean())
  image_ce = float(losses.cross_entropy(aux["image_logits"], labels)[0].mean())
  base = loss(0.0, False)
  assert loss(0.0, True) == pytest.approx(base, rel=1e-6)
  assert loss(0.5, False) == pytest.approx(base + 0.5 * (text_ce + image_ce), rel=1e-5)
  assert loss(0.5, True) == pytest.approx(base, rel=1e-6)     # evaluation: the fused loss only
  # A joint model has no branches: the weight leaves its loss alone.
  joint = vision.MultimodalClassifier(dataclasses.replace(CONFIG, dropout=0.0), IMAGE, 5)
  joint_params = nn.unbox(joint.init(jax.random.key(0), tokens, mask, images=images)["params"])
  joint_loss = [losses.multimodal_loss_fn(joint, modalities=("text", "image"), aux_weight=w)(
      joint_params, batch, {}, key, False)[0] for w in (0.0, 1.0)]
  assert float(joint_loss[0]) == float(joint_loss[1])
  with pytest.raises(ValueError, match="aux_weight=-1"):
    losses.multimodal_loss_fn(model, modalities=("text", "image"), aux_weight=-1.0)
