r"""Do two attention implementations agree on this machine? Outputs and gradients, side by side.

    python bench/attention_check.py                       # einsum vs cudnn on a GPU, else sdpa
    python bench/attention_check.py --variant tiny --impl sdpa --dtype float32

Runs the Transformer-XL backbone (bidirectional and causal, with half-valid memory and padded
rows) once with attention_impl="einsum" and once with the other implementation on the same
parameters and inputs, and prints the largest difference of the hidden states and of the
parameter gradients, each relative to the largest einsum value. In bfloat16 both paths round
differently (einsum keeps the scores in float32, the fused kernel keeps its bias in bf16), so the
figures to expect are bf16-sized (about 1e-2), not zero; a wrong bias or mask gives O(1).
The last line is a JSON object; the exit status is 1 when a relative difference exceeds --tol.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from r1jax.model import transformer_xl as txl  # noqa: E402


def compare(variant: str, impl: str, dtype: str, attention: str, batch: int, seq: int
            ) -> dict[str, float]:
  """Relative max differences (hidden, gradients) of `impl` against einsum."""
  rng = np.random.default_rng(0)
  results = []
  for name in ("einsum", impl):
    cfg = txl.get_variant(variant, attention=attention, attention_impl=name, dtype=dtype,
                          dropatt=0.0, dropout=0.0)
    model = txl.TransformerXL(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, cfg.vocab_size, (batch, seq)))
    mask = jnp.ones((batch, seq), bool).at[-1, seq // 2:].set(False)
    params = model.init(jax.random.key(0), tokens[:, :8])["params"]
    states = tuple(jnp.asarray(rng.standard_normal((batch, cfg.mem_len, cfg.d_model)), jnp.float32)
                   for _ in range(cfg.n_layer)) if results == [] else results[0][2]
    mem_mask = jnp.asarray(np.arange(cfg.mem_len)[None] >= np.linspace(0, cfg.mem_len // 2, batch)
                           .astype(int)[:, None])
    memory = txl.Memory(states, mem_mask)

    @jax.jit
    def run(p, memory=memory, model=model, tokens=tokens, mask=mask):
      def loss(p):
        h, _ = model.apply({"params": p}, tokens, memory, mask)
        h = h.astype(jnp.float32)
        return (h * jnp.linspace(-1.0, 1.0, h.shape[-1])).sum() / h.shape[0], h
      (_, h), g = jax.value_and_grad(loss, has_aux=True)(p)
      return h, g
    hidden, grads = run(params)
    results.append((np.asarray(hidden), jax.tree.map(np.asarray, grads), states))
  (h0, g0, _), (h1, g1, _) = results
  rel = lambda a, b: float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))  # noqa: E731
  return {"hidden": rel(h0, h1),
          "grads": max(rel(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))}


def main() -> int:
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="base" if on_gpu else "tiny")
  p.add_argument("--impl", default="cudnn" if on_gpu else "sdpa")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=0, help="segment length (0: the variant's)")
  p.add_argument("--tol", type=float, default=0.05)
  args = p.parse_args()
  seq = args.seq or txl.SEGMENT_LEN[args.variant]
  out = {"device": jax.devices()[0].device_kind, "variant": args.variant, "impl": args.impl,
         "dtype": args.dtype, "batch": args.batch, "seq": seq}
  worst = 0.0
  for attention in ("bidirectional", "causal"):
    diffs = compare(args.variant, args.impl, args.dtype, attention, args.batch, seq)
    print(f"{attention:13s} {args.impl} vs einsum ({args.dtype}): max relative difference "
          f"hidden {diffs['hidden']:.2e}, gradients {diffs['grads']:.2e}")
    out[attention] = diffs
    worst = max(worst, *diffs.values())
  out["ok"] = worst <= args.tol
  print(json.dumps(out))
  return 0 if out["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
