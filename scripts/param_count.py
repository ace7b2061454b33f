"""Prints the parameter count of every Transformer-XL variant (computed with jax.eval_shape).

    python scripts/param_count.py
"""
from r1jax.model import heads
from r1jax.model import transformer_xl as txl


def main() -> None:
  for name in txl.VARIANTS:
    backbone = heads.count_params(txl.get_variant(name))
    pretrain = heads.count_params(txl.get_variant(name, n_token_types=2), pretrain_heads=True)
    print(f"{name:6s} backbone {backbone:>13,d}   backbone + MLM/NSP heads (2 token types) "
          f"{pretrain:>13,d}")


if __name__ == "__main__":
  main()
