"""Artifact weights as safetensors (bit-exact, sparse when mostly zero), old params.npz artifacts,
and the generated MODEL_CARD.md."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.compress import artifact as artifact_lib
from r1jax.compress import model_card
from r1jax.compress import prune as prune_lib
from r1jax.compress import quantize as quant_lib
from r1jax.compress import spec as spec_lib
from r1jax.compress import weights as weights_lib
from r1jax.model import heads
from r1jax.model import transformer_xl as txl

Q = 16
LABELS = ("language", "networking", "programming", "jargon", "hardware")


@pytest.fixture(scope="module")
def tiny():
  cfg = txl.get_variant("tiny", vocab_size=300, n_layer=1, dropout=0.0)
  model = heads.Classifier(cfg, len(LABELS))
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(5, 300, (6, Q)), jnp.int32)
  mask = jnp.asarray(np.arange(Q)[None, :] < rng.randint(4, Q + 1, (6, 1)))
  params = jax.device_get(nn.unbox(model.init(jax.random.PRNGKey(0), tokens[:1])["params"]))
  spec = spec_lib.ClassifierSpec(model=cfg, num_classes=len(LABELS), label_names=LABELS,
                                 seq_len=Q)
  return model, params, spec, tokens, mask


def _bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.itemsize}"))


def _assert_bit_equal(a, b):
  fa, fb = artifact_lib.to_arrays(a)[0], artifact_lib.to_arrays(b)[0]
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
    np.testing.assert_array_equal(_bits(fa[k]), _bits(fb[k]), err_msg=k)


def test_weights_file_roundtrip_is_bit_exact(tmp_path):
  rng = np.random.RandomState(1)
  sparse = rng.randn(48, 40).astype(np.float32)
  sparse[np.abs(sparse) < 1.0] = 0.0
  sparse[0, :3] = [-0.0, np.nan, np.inf]          # kept: their bits are not all zero
  arrays = {"a/kernel": sparse, "b/dense": rng.randn(7, 5).astype(np.float64),
            "c::qvalue": rng.randint(-127, 128, (33, 9)).astype(np.int8),
            "c::scale": rng.rand(1, 9).astype(np.float32), "d/empty": np.zeros((0, 4), np.float32)}
  info = weights_lib.save(str(tmp_path / "w.safetensors"), arrays)
  assert info["sparse_arrays"] == 1
  back = weights_lib.load(str(tmp_path / "w.safetensors"))
  assert sorted(back) == sorted(arrays)
  for k, v in arrays.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(_bits(back[k]), _bits(v), err_msg=k)
  assert np.signbit(back["a/kernel"][0, 0])       # -0.0 stayed -0.0
  # The stored form is the bitmask one: kept values + one bit per entry.
  assert weights_lib.sparse_bytes(sparse) < 0.5 * sparse.nbytes


def test_float_int8_and_pruned_artifacts_roundtrip(tiny, tmp_path):
  model, params, spec, tokens, mask = tiny
  dense = artifact_lib.save(str(tmp_path / "float"), spec, params)
  assert dense.weights_file == "model.safetensors" and not os.path.exists(
      os.path.join(dense.path, "params.npz"))
  _assert_bit_equal(artifact_lib.load(dense.path).params, params)
  # Magnitude pruning at 50%: the file shrinks by about what the zeros weigh.
  selected = prune_lib.select(params)
  masks = prune_lib.compute_masks(params, selected, 0.5)
  pruned_params = jax.device_get(prune_lib.apply_masks(params, masks))
  pruned = artifact_lib.save(str(tmp_path / "pruned"), spec, pruned_params, kind="pruned")
  _assert_bit_equal(artifact_lib.load(pruned.path).params, pruned_params)
  n_selected = sum(int(np.prod(p.shape)) for p, f in zip(jax.tree.leaves(params),
                                                         jax.tree.leaves(selected)) if f)
  saved = dense.file_bytes() - pruned.file_bytes()
  assert saved > 0.45 * 4 * n_selected        # ~ half of the pruned kernels' bytes, minus the masks
  meta = artifact_lib.read_meta(pruned.path)
  # The pruned kernels are stored sparse besides what was already all zeros (fresh biases).
  assert meta["sparse_arrays"] == sum(jax.tree.leaves(selected)) + artifact_lib.read_meta(
      dense.path)["sparse_arrays"]
  np.testing.assert_array_equal(pruned.predict({"tokens": tokens, "token_mask": mask}),
                                artifact_lib.load(pruned.path).predict(
                                    {"tokens": tokens, "token_mask": mask}))
  # int8: values and scales come back exactly.
  qparams = quant_lib.quantize_params(params, quant_lib.plan(model, tokens[:1], mask[:1]))
  q = artifact_lib.save(str(tmp_path / "int8"), spec, qparams, kind="int8",
                        quantization={"mode": "weights"})
  _assert_bit_equal(artifact_lib.load(q.path).params, qparams)
  assert q.file_bytes() < 0.5 * dense.file_bytes()


def test_old_params_npz_artifact_still_loads(tiny, tmp_path):
  _, params, spec, tokens, mask = tiny
  art = artifact_lib.save(str(tmp_path / "a"), spec, params)
  # Turn it into what format version 1 wrote: params.npz, no weights_file key.
  arrays = weights_lib.load(os.path.join(art.path, "model.safetensors"))
  np.savez(os.path.join(art.path, "params.npz"), **arrays)
  os.remove(os.path.join(art.path, "model.safetensors"))
  meta_path = os.path.join(art.path, spec_lib.ARTIFACT_FILE)
  meta = json.load(open(meta_path))
  meta["version"] = 1
  del meta["weights_file"]
  json.dump(meta, open(meta_path, "w"))
  old = artifact_lib.load(art.path)
  assert old.weights_file == "params.npz"
  assert old.file_bytes() == os.path.getsize(os.path.join(art.path, "params.npz"))
  _assert_bit_equal(old.params, params)
  np.testing.assert_array_equal(old.predict({"tokens": tokens, "token_mask": mask}),
                                art.predict({"tokens": tokens, "token_mask": mask}))
  meta["version"] = 7
  json.dump(meta, open(meta_path, "w"))
  with pytest.raises(ValueError, match="versions"):
    artifact_lib.load(art.path)


def _workdir(path, config):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def test_model_card_names_the_data_and_its_licences(tiny, tmp_path):
  model, params, spec, tokens, mask = tiny
  # As the pipeline runs it: pretraining reads the data stage's cleaned output.
  data_dir = _workdir(tmp_path / "data_general", {"stage": "data", "data": {
      "inputs": "builtin:general"}})
  os.makedirs(os.path.join(data_dir, "data", "clean"))
  general = _workdir(tmp_path / "general", {"stage": "pretrain", "data": {
      "corpus": os.path.join(data_dir, "data", "clean"), "knowledge_file": ""}})
  dapt = _workdir(tmp_path / "dapt", {"stage": "pretrain", "init_from": general, "data": {
      "corpus": "builtin:domain,notes/*.txt"}})
  ft = _workdir(tmp_path / "ft", {"stage": "finetune", "init_from": dapt, "task": {
      "train": "builtin:task:train", "dev": "builtin:task:dev", "test": "builtin:task:test"}})
  art = artifact_lib.save(str(tmp_path / "art"), spec, params, metadata={"source": ft})
  card = open(os.path.join(art.path, "MODEL_CARD.md")).read()
  for text in ("LICENSE.wordnet", "WordNet 3.0", "LICENSE.foldoc",
               "GNU Free Documentation License", "`builtin:general`", "`builtin:domain`",
               "licence unknown to it", "`notes/*.txt`", "none (float32 weights)",
               "`networking`", "Not measured yet", "model.safetensors"):
    assert text in card, text
  assert f"(made by {data_dir})" in card and "data_general/data/clean`" not in card.split(
      "licence unknown")[1]
  for name in ("LICENSE.wordnet", "LICENSE.foldoc"):
    assert os.path.getsize(os.path.join(art.path, name)) > 1000
  # The stage's measurements land in artifact.json and the card.
  artifact_lib.record_measurements(art.path, {
      "name": "float", "accuracy": 0.8125, "macro_f1": 0.75, "num_examples": 533,
      "latency_ms_batch1": 1.5, "latency_ms_batched": 0.25, "latency_batch_size": 32,
      "device": "cpu", "size_pct": 100.0})
  card = open(os.path.join(art.path, "MODEL_CARD.md")).read()
  assert "| 0.8125 | 0.75 |" in card and "batch 1 1.5 ms" in card and "533 examples" in card
  assert artifact_lib.read_meta(art.path)["measurements"]["accuracy"] == 0.8125
  # Only the FOLDOC-derived task behind it: no WordNet licence.
  qparams = quant_lib.quantize_params(params, quant_lib.plan(model, tokens[:1], mask[:1]))
  q = artifact_lib.save(str(tmp_path / "q"), spec, qparams, kind="int8",
                        quantization={"mode": "dynamic"})
  card = open(os.path.join(q.path, "MODEL_CARD.md")).read()
  assert "LICENSE.foldoc" in card and "LICENSE.wordnet" not in card
  assert "int8 weights, mode `dynamic`" in card
  assert not os.path.exists(os.path.join(q.path, "LICENSE.wordnet"))


def test_shipped_licences_name_the_files_they_cover():
  licences = model_card.shipped_licences()
  assert set(licences) == {"LICENSE.adwaita", "LICENSE.foldoc", "LICENSE.wordnet"}
  assert "icons_*.jsonl.gz" in licences["LICENSE.adwaita"][1]
  assert "task_*.jsonl.gz" in licences["LICENSE.foldoc"][1]
  assert "general.jsonl.gz" in licences["LICENSE.wordnet"][1]
  found = model_card.licences_for([{"spec": "builtin:task:test"}, {"spec": "builtin"}])
  assert found == {"LICENSE.foldoc": ["builtin:task:test", "builtin"]}


def test_model_card_accepts_a_corpus_file_path(tmp_path):
  # A data stage fed a JSONL file: the file's directory is looked up, never FILE/config.json.
  corpus = tmp_path / "domain.jsonl"
  corpus.write_text('{"text": "x"}\n')
  from r1jax.compress import model_card
  assert model_card._made_by(str(corpus)) == ""
  (tmp_path / "config.json").write_text('{"stage": "data"}')
  assert model_card._made_by(str(corpus)) == str(tmp_path)
