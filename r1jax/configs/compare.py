r"""Side-by-side comparison of finetuned workdirs (e.g. general model vs domain-adapted).

    python -m r1jax.main --config=configs/compare.py --workdir=/tmp/cmp \
        --config.workdirs=/tmp/ft_general,/tmp/ft_dapt --config.names=general,domain-adapted

Reads each workdir's summary.json (written by the finetune stage) and prints / writes a table of
accuracy, macro-F1, latency and parameters with the differences to the first workdir (the
reference), plus per-class F1: DIR/comparison.md and DIR/summary.json.
"""
import ml_collections

from r1jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  configlib.check_variant(configlib.parse_arg(arg, variant="base").variant)  # accepted, unused
  config = ml_collections.ConfigDict()
  config.stage = "compare"
  config.seed = 0
  config.init_from = ""   # unused: the runs to compare are named by `workdirs`
  config.workdirs = ""    # comma-separated finetune workdirs; the first is the reference
  config.names = ""       # comma-separated display names (default: the workdirs' basenames)
  config.split = "test"   # which split's metrics to compare: test | dev
  return config
