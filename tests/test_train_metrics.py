"""metrics.jsonl / TensorBoard writing and resume truncation, FLOP counting, peak FLOP/s."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import pytest

from r1jax import run_dir
from r1jax.model import heads
from r1jax.model import transformer_xl as txl
from r1jax.train import metrics


def _xla_flops(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["flops"]


@pytest.mark.parametrize("mem_len,attention", [(32, "bidirectional"), (0, "bidirectional"),
                                               (32, "causal")])
def test_encoder_flops_match_xla_count(mem_len, attention):
  """Our formula counts matmuls only; XLA also counts elementwise ops, so it is a little higher,
  never lower. Attention is counted over all memory + segment keys (nothing halved)."""
  cfg = txl.get_variant("tiny", vocab_size=100, d_model=512, n_layer=1, n_head=4, d_head=64,
                        d_inner=2048, mem_len=mem_len, attention=attention, dropout=0.0)
  model = txl.TransformerXL(cfg)
  b, q = 4, 32
  tokens = jnp.zeros((b, q), jnp.int32)
  memory = txl.init_memory(cfg, b)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, memory)["params"]
  xla = _xla_flops(lambda p, t, m: model.apply({"params": p}, t, m)[0], params, tokens, memory)
  ours = metrics.encoder_flops(cfg, batch_size=b, seq_len=q)
  assert 1.0 <= xla / ours < 1.04, (xla, ours)


def test_pretrain_step_flops_are_three_forwards_with_heads():
  cfg = txl.get_variant("tiny", vocab_size=2000, d_model=256, n_layer=1, n_head=4, d_head=64,
                        d_inner=1024, mem_len=0, n_token_types=2, dropout=0.0)
  model = heads.PretrainModel(cfg)
  b, q, p = 4, 32, 5
  tokens = jnp.zeros((b, q), jnp.int32)
  positions = jnp.zeros((b, p), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  forward = _xla_flops(lambda prm, t, pos: model.apply({"params": prm}, t, token_types=t,
                                                       mlm_positions=pos)[0]["mlm_logits"],
                       params, tokens, positions)
  ours = metrics.pretrain_flops_per_step(cfg, batch_size=b, seq_len=q, num_predictions=p)
  assert 1.0 <= forward * 3 / ours < 1.06, (forward * 3, ours)


def test_writer_truncates_on_resume_and_writes_tensorboard(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), enabled=True)
  for step in (1, 2, 3, 4):
    w.write(step, "train", {"loss": 1.0 / step, "nan": float("nan")})
  w.write(4, "eval", {"loss": 0.5})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "split": "tra')  # a line cut by a kill mid-write
  # Resume from a checkpoint at step 2: later records go, the cut line too.
  w = metrics.MetricsWriter(str(tmp_path), resume_step=2, enabled=True)
  w.write(3, "train", {"loss": 0.25})
  w.close()
  records = metrics.read_metrics(str(tmp_path))
  assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (3, "train")]
  assert records[0]["nan"] == "nan" and records[-1]["loss"] == 0.25
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_write_json_is_valid_json_with_nan(tmp_path):
  path = str(tmp_path / "summary.json")
  run_dir.write_json(path, {"a": float("inf"), "b": {"c": float("nan"), "d": [1.0]}})
  with open(path) as f:
    data = json.load(f)
  assert data == {"a": "inf", "b": {"c": "nan", "d": [1.0]}}
  assert not os.path.exists(path + f".tmp{os.getpid()}")


def test_peak_flops():
  assert metrics.peak_flops(123.0) == (123.0, "config")
  peak, source = metrics.peak_flops()
  assert source == "measured f32 matmul" and peak > 1e8


def test_progress_bar_moves_to_step(capsys):
  bar = metrics.ProgressBar(total=10, initial=2)
  bar.update_to(7, loss=1.5, tok_s=100.0)
  bar.close()
  assert "7/10" in capsys.readouterr().err
