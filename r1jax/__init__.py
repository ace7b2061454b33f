"""r1jax: a multi-stage domain language model recipe in JAX/Flax."""

__version__ = "0.1.0"
