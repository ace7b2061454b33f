"""Small command-line tools: `python -m r1jax.tools.<name>`."""
