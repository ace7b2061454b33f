"""Smoke test of bench/train_throughput.py: it runs end to end at toy sizes and its last line is
the JSON summary with the keys the issue names (the figures themselves are meaningless at toy size).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "train_throughput.py")
REQUIRED = ("ratio_vs_hf_bert", "ratio_vs_hf_transfo_xl", "mfu_small",
            "peak_memory_ratio_vs_hf_bert", "base_compile_seconds")


def _run(*flags, timeout=600):
  proc = subprocess.run([sys.executable, SCRIPT, "--toy", "--threads", "1", *flags],
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  return json.loads(lines[-1]), proc.stdout


def test_toy_run_prints_table_and_json():
  summary, stdout = _run("--skip-hf", "--skip-base")
  assert "| r1jax MLM+NSP, memory off |" in stdout
  # The table names the CPU it was measured on, with its vector extensions.
  assert summary["cpu_model"] and isinstance(summary["cpu_vector_flags"], list)
  assert f"CPU: {summary['cpu_model']}, " in stdout and "vector extensions: " in stdout
  for key in REQUIRED:
    assert key in summary
  assert summary["toy"] is True and summary["threads"] == 1
  assert 0 < summary["mfu_small"] < 1.5
  # The strict MFU divides by the run's highest ceiling sample, never below the in-process median.
  assert summary["ceiling_f32_flops_best_in_run"] >= summary["ceiling_f32_flops_in_r1jax_mlm"]
  assert 0 < summary["mfu_small_vs_best_ceiling"] <= summary["mfu_small"]
  assert summary["r1jax_mlm_tokens_per_s"] > 0 and summary["r1jax_lm_mem_tokens_per_s"] > 0
  assert summary["ceiling_f32_flops"] > 1e8
  assert summary["ratio_vs_hf_bert"] is None  # peers skipped: no ratio made up
  # r1jax rows run the loop's automatic steps per call (CPU: 10 for configs/pretrain.py), and one
  # more row runs one step per call.
  assert summary["steps_per_call"] == 10
  assert "| r1jax MLM+NSP, memory off, one step per call |" in stdout
  assert summary["r1jax_mlm_one_step_per_call_tokens_per_s"] > 0
  # The plain Flax BERT reference runs without the PyTorch extra and gets its own MFU.
  assert "| plain Flax BERT" in stdout
  assert summary["flax_bert_tokens_per_s"] > 0 and 0 < summary["mfu_flax_bert"] < 1.5
  assert summary["ratio_vs_flax_bert"] > 0


@pytest.mark.slow
def test_toy_run_all_peers():
  summary, stdout = _run()
  assert "HF PyTorch BertForPreTraining" in stdout and "TransfoXLLMHeadModel" in stdout
  for key in REQUIRED:
    assert isinstance(summary[key], float) and summary[key] > 0, (key, summary[key])


def test_gpu_section_code_path_on_cpu(tmp_path):
  # No GPU here: the hidden --gpu-platform=cpu runs the GPU section's measurement on the CPU,
  # with the portable "sdpa" path standing in for cuDNN, and traces each row.
  summary, stdout = _run("--gpu-only", "--gpu-platform", "cpu", "--gpu-profile", str(tmp_path))
  assert summary["gpu_available"] is True and summary["gpu_base_mfu"] > 0
  assert summary["gpu_bf16_matmul_flops"] > 0 and summary["ratio_vs_hf_bert"] is None
  assert [r["attention_impl"] for r in summary["gpu_rows"]] == ["einsum", "sdpa"]
  assert all(r["mfu"] > 0 for r in summary["gpu_rows"])
  assert stdout.count("| GPU ") == 2
  assert sorted(os.listdir(tmp_path)) == ["gpu_einsum_b4", "gpu_sdpa_b4"]


def test_bad_flag_names_the_fix():
  proc = subprocess.run([sys.executable, SCRIPT, "--threads", "999"], capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode != 0 and "--threads=999" in proc.stderr


def test_data_bench_runs_with_workers_and_agrees_with_pandas(tmp_path):
  """bench/data_throughput.py at a tiny size: every configuration keeps the same documents and
  builds the same example batches (the bench checks this itself), and writes its JSON."""
  out = tmp_path / "data.json"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "data_throughput.py"),
                         "--docs", "300", "--steps", "2", "--repeats", "1", "--workers", "1",
                         "--out", str(out)], capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert set(result["cleaning"]) == set(result["examples"]) == {"0", "1", "pandas"}
  kept = {r["workers"]: r["kept"] for r in result["cleaning_runs"]}
  assert len(set(kept.values())) == 1 and kept[0] > 0, kept
  sums = {r["workers"]: r["checksum"] for r in result["examples_runs"] if "checksum" in r}
  assert sums[0] == sums[1], sums
  assert "x the training step" in proc.stdout


AB_SCRIPT = os.path.join(REPO, "bench", "ab_step.py")


def _run_ab(*flags):
  return subprocess.run([sys.executable, AB_SCRIPT, "--toy", "--threads", "1", "--rounds", "2",
                         *flags], capture_output=True, text=True, timeout=600, check=False)


def test_ab_step_alternates_variants_in_one_process():
  proc = _run_ab("--model", "dropout=0.1,0.0")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["field"] == "dropout" and summary["threads"] == 1
  assert list(summary["variants"]) == ["0.1", "0.0"]
  first, second = summary["variants"]["0.1"], summary["variants"]["0.0"]
  assert first["ratio_to_first"] == 1.0 and second["median_s"] > 0
  assert first["loss"] != second["loss"]  # the variants really differ (dropout on / off)
  assert "| dropout | s/step (median) |" in proc.stdout


def test_ab_step_compares_two_source_trees_in_one_process():
  """--code loads each tree's r1jax under its own name: the same code twice trains identically."""
  proc = _run_ab("--code", f"{REPO},{REPO}")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["field"] == "code" and len(summary["variants"]) == 2
  first, second = summary["variants"].values()
  assert first["loss"] == second["loss"] and second["median_s"] > 0


@pytest.mark.parametrize("flags, message", [
    (("--code", "/nonexistent,/also/not"), "name two or more repository roots"),
    (("--model", "dropout=0.1"), "exactly one option must take several"),
    (("--model", "dropout=0.1,0.0", "--steps-per-call", "5,10"), "got dropout, steps_per_call"),
    (("--model", "not_a_field=1,2"), "unknown model field(s) ['not_a_field']"),
    (("--steps-per-call", "0,5"), "each value must be >= 1"),
])
def test_ab_step_bad_flags_name_the_fix(flags, message):
  proc = _run_ab(*flags)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]


def test_ci_schedule_replays_xdist_orders(tmp_path):
  """bench/ci_schedule.py on a made-up --durations=0 log: six 2 s files of four tests, a 10 s and a
  6 s single-test file. xdist's reordering (most tests first) leaves the two heavy files for the
  end, one per worker after three light ones each: 6 + 10 = 16 s. Heaviest first, the light files
  fill in behind the 6 s one: the even split, 14 s."""
  spec = importlib.util.spec_from_file_location("ci_schedule", os.path.join(REPO, "bench",
                                                                          "ci_schedule.py"))
  ci_schedule = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ci_schedule)
  lines = [f"0.50s call     tests/test_{f}.py::test_{i}" for f in "abcdef" for i in range(4)]
  lines += ["10.00s call     tests/test_y.py::test_0", "5.00s setup    tests/test_z.py::test_0",
            "1.00s call     tests/test_z.py::test_0"]
  log = tmp_path / "run.log"
  log.write_text("\n".join(lines) + "\n")
  tests = ci_schedule.read_durations(str(log))
  assert len(tests) == 26 and tests[-1] == ("test_z.py", 6.0)
  assert max(ci_schedule.loadfile(tests, 2, reorder=True)) == pytest.approx(16.0)
  heavy = ci_schedule.heavy_first(tests, ["test_y.py", "test_z.py"])
  assert ci_schedule.loadfile(heavy, 2, reorder=False) == pytest.approx([14.0, 14.0])
  assert set(ci_schedule.heavy_files()) >= {"test_finetune.py", "test_bench.py"}
