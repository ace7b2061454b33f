"""The pure-functional Transformer-XL (Flax linen), its heads and the HuggingFace converter.

    from r1jax import model
    config = model.get_variant("tiny", attention="causal")
    net = model.TransformerXL(config)
    variables = net.init(jax.random.key(0), tokens)
    hidden, memory = net.apply(variables, tokens, memory)
"""
from r1jax.model import axes
from r1jax.model.config import check_inputs
from r1jax.model.heads import Classifier
from r1jax.model.heads import count_params
from r1jax.model.heads import MLMHead
from r1jax.model.heads import PooledHead
from r1jax.model.heads import PretrainModel
from r1jax.model.transformer_xl import get_variant
from r1jax.model.transformer_xl import init_memory
from r1jax.model.transformer_xl import Memory
from r1jax.model.transformer_xl import TransformerXL
from r1jax.model.transformer_xl import TransformerXLConfig
from r1jax.model.transformer_xl import VARIANTS

__all__ = [
    "axes", "Classifier", "MLMHead", "PooledHead", "PretrainModel", "check_inputs",
    "count_params", "get_variant", "init_memory", "Memory", "TransformerXL",
    "TransformerXLConfig", "VARIANTS",
]
