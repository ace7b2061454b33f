"""The stage configs, shipped with the package: `<stage>.py` files with `get_config(arg)`.

They are loaded by path, never imported: `--config=` and `configlib.load_config` take a file that
exists (e.g. `configs/pretrain.py` in a clone, whose `configs` links to this folder) or, failing
that, the name of a file here (`pretrain`, `pretrain.py`, `configs/pretrain.py`), so an installed
wheel runs `r1jax --config=pretrain:variant=tiny` from any directory (`configlib.resolve_config`).
A package (this file) so that setuptools ships the folder like the rest of r1jax.
"""
