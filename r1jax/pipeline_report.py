"""Moved to `r1jax.stages.pipeline_report` (run `python -m r1jax.stages.pipeline_report DIR`).

Kept so that the old command says where the new one is instead of failing with a traceback.
"""
import sys


def __getattr__(name: str):
  raise AttributeError(f"r1jax.pipeline_report.{name}: the module moved to "
                       "r1jax.stages.pipeline_report.")


if __name__ == "__main__":
  sys.exit("r1jax.pipeline_report moved: run python -m r1jax.stages.pipeline_report DIR")
