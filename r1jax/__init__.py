"""r1jax: a multi-stage domain language model recipe in JAX/Flax."""

from r1jax import host_memory as _host_memory

__version__ = "0.1.0"

# Before JAX starts its threads: keep XLA:CPU's per-step scratch memory mapped between steps.
_host_memory.configure()
