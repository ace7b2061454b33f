"""Task heads on the Transformer-XL backbone, and the two models the stages train.

* `MLMHead`: dense -> gelu -> LayerNorm -> tied word embedding^T + bias (BERT). Given
  `mlm_positions` [B, P], the hidden states are gathered at those positions *before* the head, so
  the [*, V] logits cost B * P rows instead of B * Q.
* `PooledHead`: pooled = tanh(dense(h[:, 0])) -> dropout -> dense to `num_outputs`. Used for NSP
  (2 logits, label 1 = random next segment), the knowledge head (triple validity) and sequence
  classification (multi-class or multi-label: the logits are the same, only the loss differs).
  With pooling="mean" (the classifier's `config.pooling`) the pooler reads the mean of the real
  tokens' states instead of h[:, 0]; the parameters are the same.
* `PretrainModel`: params `backbone/`, `mlm_head/`, `nsp_head/`, and `kg_head/` when
  num_kg_labels > 0.
* `Classifier`: params `backbone/`, `cls_head/`.

`count_params(config)` counts the backbone's parameters (with pretrain_heads=True, the
PretrainModel's) from shapes alone.

`nsp_head/pooler` and `cls_head/pooler` have the same shapes, so a finetuning stage can carry the
pretrained pooler over, as BERT does.

Logits are float32 whatever the compute dtype, so losses are computed at full precision.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r1jax.model import axes
from r1jax.model import config as config_lib
from r1jax.model import kernels
from r1jax.model import losses
from r1jax.model import transformer_xl as txl

Memory = txl.Memory


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden [B, Q, d], positions int [B, P] -> [B, P, d]."""
  return jnp.take_along_axis(hidden, jnp.asarray(positions)[..., None].astype(jnp.int32), axis=1)


def _check_positions(positions: Any, batch: int, qlen: int) -> None:
  shape = tuple(jnp.shape(positions))
  if len(shape) != 2 or shape[0] != batch:
    raise ValueError(f"mlm_positions must have shape [batch={batch}, num_predictions], got "
                     f"{shape}.")
  config_lib.check_int_range("mlm_positions", positions, qlen, "the segment positions")


class MLMHead(nn.Module):
  """Masked-LM head with the output projection tied to the word embedding."""
  config: txl.TransformerXLConfig

  def setup(self):
    cfg = self.config
    self.dense = txl.make_dense(cfg, cfg.d_model, (axes.EMBED, axes.MLP), "dense")
    self.norm = txl.make_layer_norm(cfg, "norm")
    self.bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                (axes.VOCAB,)),
                           (cfg.vocab_size,), jnp.float32)

  def features(self, h: jax.Array) -> jax.Array:
    """h [B, P, d] -> the transformed states [B, P, d] that the tied decoder reads."""
    return self.norm(kernels.gelu(self.dense(h)))

  def __call__(self, h: jax.Array, embedding: jax.Array) -> jax.Array:
    """h [B, P, d], embedding [V, d] -> logits float32 [B, P, V]."""
    return _decode(self.features(h), embedding.astype(self.config.dtype), self.bias)

  def nll(self, h: jax.Array, embedding: jax.Array, labels: jax.Array, chunk_size: int = 0
          ) -> jax.Array:
    """Cross-entropy of `labels` int [B, P] under the head's logits: float32 [B, P].

    With chunk_size > 0, the [B, chunk, V] logits are made, used and (in the backward pass)
    remade one chunk of positions at a time, so at most one chunk's logits, softmax and logit
    gradient are alive instead of the whole [B, P, V] (what dominates a full-vocabulary LM step's
    memory). P must be a multiple of chunk_size. Same values as the unchunked path.
    """
    x = self.features(h)
    embedding = embedding.astype(self.config.dtype)
    bias = self.bias

    def chunk_nll(xc, lc):
      return losses.cross_entropy(_decode(xc, embedding, bias), lc)[1]
    batch, length = labels.shape
    if not chunk_size or chunk_size >= length:
      return chunk_nll(x, labels)
    if length % chunk_size:
      raise ValueError(f"chunk_size={chunk_size} must divide the number of positions {length}.")
    n = length // chunk_size
    xs = jnp.swapaxes(x.reshape(batch, n, chunk_size, -1), 0, 1)              # [n, B, C, d]
    ls = jnp.swapaxes(labels.reshape(batch, n, chunk_size), 0, 1)              # [n, B, C]
    nll = jax.lax.map(lambda a: jax.checkpoint(chunk_nll)(*a), (xs, ls))       # [n, B, C]
    return jnp.swapaxes(nll, 0, 1).reshape(batch, length)


def _decode(x: jax.Array, embedding: jax.Array, bias: jax.Array) -> jax.Array:
  """x [B, P, d] x embedding [V, d] + bias [V] -> logits float32 [B, P, V]."""
  logits = kernels.tied_logits(x.reshape(-1, x.shape[-1]), embedding)
  logits = logits.reshape(x.shape[:-1] + (-1,))
  return axes.constrain(logits + bias, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))


def mean_pool(hidden: jax.Array, token_mask: jax.Array | None) -> jax.Array:
  """hidden [B, Q, d], token_mask bool [B, Q] (None = all real) -> mean of real positions [B, d]."""
  if token_mask is None:
    return hidden.mean(axis=1)
  weights = jnp.asarray(token_mask, hidden.dtype)[..., None]                 # [B, Q, 1]
  return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)


# Multipliers of the n-gram hash (odd, so that each is a bijection of uint32).
_NGRAM_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)


def ngram_ids(tokens: jax.Array, token_mask: jax.Array | None, buckets: int
              ) -> tuple[jax.Array, jax.Array]:
  """tokens int [B, Q] -> (bucket ids int32 [B, 2Q - 1], valid bool [B, 2Q - 1]): each token's
  unigram, then each adjacent pair's bigram, hashed into [0, buckets)."""
  t = jnp.asarray(tokens).astype(jnp.uint32)
  m1, m2, m3 = (jnp.uint32(x) for x in _NGRAM_MULTIPLIERS)
  uni = t * m1
  bi = t[:, :-1] * m2 + t[:, 1:] * m3 + jnp.uint32(1)
  ids = (jnp.concatenate([uni, bi], axis=1) >> 7) % jnp.uint32(buckets)
  mask = (jnp.ones(t.shape, bool) if token_mask is None else jnp.asarray(token_mask, bool))
  valid = jnp.concatenate([mask, mask[:, :-1] & mask[:, 1:]], axis=1)
  return ids.astype(jnp.int32), valid


class PooledHead(nn.Module):
  """pooled = tanh(dense(h[:, 0] or mean(h))); logits = dense(dropout(pooled))."""
  config: txl.TransformerXLConfig
  num_outputs: int
  dropout_rate: float = 0.0
  pooling: str = "cls"

  @nn.compact
  def __call__(self, hidden: jax.Array, deterministic: bool = True,
               token_mask: jax.Array | None = None, tokens: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """hidden [B, Q, d] (token_mask bool [B, Q] for mean pooling) -> (logits float32
    [B, num_outputs], pooled [B, d])."""
    cfg = self.config
    summary = mean_pool(hidden, token_mask) if self.pooling == "mean" else hidden[:, 0]
    pooled = jnp.tanh(txl.make_dense(cfg, cfg.d_model, (axes.EMBED, axes.MLP), "pooler")(
        summary))
    x = txl.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
    logits = txl.make_dense(cfg, self.num_outputs, (axes.EMBED, axes.CLASSES), "out")(x)
    if tokens is not None and cfg.ngram_buckets:
      # The wide path (fastText's bag of n-grams, linear to the logits beside the deep one).
      # Sum / sqrt(count) keeps a long text's bag at the scale of a short one's without
      # diluting each n-gram as a mean does.
      ids, valid = ngram_ids(tokens, token_mask, cfg.ngram_buckets)
      table = self.param("ngram_emb", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)),
          (cfg.ngram_buckets, cfg.d_model), cfg.param_dtype)
      bag = jnp.take(jnp.asarray(table, hidden.dtype), ids, axis=0)          # [B, 2Q-1, d]
      weights = jnp.asarray(valid, hidden.dtype)[..., None]                  # [B, 2Q-1, 1]
      bag = (bag * weights).sum(axis=1) / jnp.sqrt(jnp.maximum(weights.sum(axis=1), 1))
      logits = logits + txl.make_dense(cfg, self.num_outputs, (axes.EMBED, axes.CLASSES),
                                       "ngram_out")(bag)
    return logits.astype(jnp.float32), pooled


class PretrainModel(nn.Module):
  """Backbone + MLM + NSP (+ knowledge) heads for pretraining and domain adaptation."""
  config: txl.TransformerXLConfig
  num_kg_labels: int = 0

  def setup(self):
    if self.num_kg_labels < 0:
      raise ValueError(f"num_kg_labels={self.num_kg_labels}: must be >= 0 (0 = no knowledge head, "
                       "2 = binary triple validity).")
    self.backbone = txl.TransformerXL(self.config)
    self.mlm_head = MLMHead(self.config)
    self.nsp_head = PooledHead(self.config, 2)
    if self.num_kg_labels:
      self.kg_head = PooledHead(self.config, self.num_kg_labels, self.config.dropout)

  def __call__(self, tokens: jax.Array, memory: Memory | Sequence[jax.Array] | None = None,
               token_mask: jax.Array | None = None, token_types: jax.Array | None = None,
               mlm_positions: jax.Array | None = None, *, deterministic: bool = True
               ) -> tuple[dict[str, jax.Array], Memory]:
    """Pretraining forward pass.

    Args:
      tokens: int [B, Q]; memory / token_mask / token_types as in `TransformerXL.__call__`.
      mlm_positions: int [B, P] positions to predict, or None for every position.
      deterministic: True disables dropout.

    Returns:
      ({"mlm_logits": [B, P, V] (or [B, Q, V]), "nsp_logits": [B, 2], "hidden": [B, Q, d],
        "pooled": [B, d]}, new_memory).
    """
    hidden, new_memory = self.backbone(tokens, memory, token_mask, token_types,
                                       deterministic=deterministic)
    picked = hidden
    if mlm_positions is not None:
      _check_positions(mlm_positions, hidden.shape[0], hidden.shape[1])
      picked = gather_positions(hidden, mlm_positions)
    mlm_logits = self.mlm_head(picked, self.backbone.embedding_table())
    nsp_logits, pooled = self.nsp_head(hidden, deterministic)
    if self.num_kg_labels and self.is_initializing():
      self.kg_head(hidden, True)  # create kg_head params in the same init call
    outputs = {"mlm_logits": mlm_logits, "nsp_logits": nsp_logits, "hidden": hidden,
               "pooled": pooled}
    return outputs, new_memory

  def lm_nll(self, tokens: jax.Array, labels: jax.Array,
             memory: Memory | Sequence[jax.Array] | None = None,
             token_mask: jax.Array | None = None, *, chunk_size: int = 0,
             deterministic: bool = True) -> tuple[jax.Array, Memory]:
    """Language-model loss at every position: (nll float32 [B, Q] of `labels` [B, Q], memory).

    For causal pretraining: the MLM head, tied to the word embedding, predicts `labels` (the next
    tokens) from each position, over the full vocabulary, `chunk_size` positions at a time (see
    `MLMHead.nll`; 0 = all at once).
    """
    hidden, new_memory = self.backbone(tokens, memory, token_mask, deterministic=deterministic)
    if self.is_initializing():
      self.nsp_head(hidden, True)
    nll = self.mlm_head.nll(hidden, self.backbone.embedding_table(), labels, chunk_size)
    return nll, new_memory

  def kg_logits(self, kg_tokens: jax.Array, kg_token_mask: jax.Array | None = None,
                kg_token_types: jax.Array | None = None, *, deterministic: bool = True
                ) -> jax.Array:
    """Triple-validity logits float32 [B, num_kg_labels] for triple sequences int [B, T].

    Each triple sequence is independent: it runs through the backbone without memory. Call with
    `model.apply(variables, kg_tokens, kg_token_mask, method=PretrainModel.kg_logits)`.
    """
    if not self.num_kg_labels:
      raise ValueError("kg_logits needs a knowledge head: build PretrainModel(config, "
                       "num_kg_labels=2) (num_kg_labels=0 has none).")
    hidden, _ = self.backbone(kg_tokens, None, kg_token_mask, kg_token_types,
                              deterministic=deterministic)
    logits, _ = self.kg_head(hidden, deterministic)
    return logits


class Classifier(nn.Module):
  """Backbone + pooled classification head; multi-label only changes the loss (sigmoid)."""
  config: txl.TransformerXLConfig
  num_classes: int
  multi_label: bool = False

  def setup(self):
    minimum = 1 if self.multi_label else 2
    if self.num_classes < minimum:
      kind = "multi-label" if self.multi_label else "multi-class"
      raise ValueError(f"num_classes={self.num_classes}: a {kind} classifier needs >= {minimum}.")
    self.backbone = txl.TransformerXL(self.config)
    self.cls_head = PooledHead(self.config, self.num_classes, self.config.dropout,
                               self.config.pooling)

  def __call__(self, tokens: jax.Array, token_mask: jax.Array | None = None,
               token_types: jax.Array | None = None, *, deterministic: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """tokens int [B, Q] -> (logits float32 [B, C], {"hidden": [B, Q, d], "pooled": [B, d]})."""
    hidden, _ = self.backbone(tokens, None, token_mask, token_types, deterministic=deterministic)
    logits, pooled = self.cls_head(hidden, deterministic, token_mask, tokens)
    return logits, {"hidden": hidden, "pooled": pooled}


def count_params(config: txl.TransformerXLConfig, *, pretrain_heads: bool = False) -> int:
  """Number of parameters of the backbone (or of `PretrainModel`), via eval_shape only."""
  model = PretrainModel(config) if pretrain_heads else txl.TransformerXL(config)
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"]))))
