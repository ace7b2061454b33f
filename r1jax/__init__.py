"""r1jax: a multi-stage domain language model recipe in JAX/Flax."""

from r1jax import host_memory as _host_memory

__version__ = "0.1.0"

# Opt-in (R1JAX_HOST_MALLOC=keep): must run before JAX starts its threads.
_host_memory.configure()
