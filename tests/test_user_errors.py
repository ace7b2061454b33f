"""Every error a user can fix (bad config, bad data, a missing file, a missing extra) ends the real
command with one message naming the problem and its fix, no traceback, and a non-zero exit.

An optional package is made missing the way Python itself supports: `sys.modules[name] = None`
makes `import name` raise ImportError, as on a machine without that extra installed.
"""
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1jax import errors
from r1jax.data import augment
from r1jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# `python -m r1jax.main ARGS`, optionally with some packages made unimportable first.
_MAIN = ("import runpy, sys\n"
         "for name in sys.argv.pop(1).split(','):\n"
         "  if name: sys.modules[name] = None\n"
         "runpy.run_module('r1jax.main', run_name='__main__', alter_sys=True)\n")


def _main(tmp_path, config, *overrides, missing=""):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
      [sys.executable, "-c", _MAIN, missing, f"--config={os.path.join(CONFIGS, config)}",
       f"--workdir={tmp_path / 'w'}", *overrides],
      env=env, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  pq.write_table(pa.table({"text": ["routers forward packets between networks"] * 3}),
                 root / "notes.parquet")
  (root / "binary.txt").write_bytes(b"a document\x00\x01\x02")
  (root / "one_class.jsonl").write_text(
      '{"text": "routers forward packets", "label": "net"}\n'
      '{"text": "a cache keeps data close", "label": "net"}\n', encoding="utf-8")
  (root / "not_a_run").mkdir()
  return root


CASES = [  # (config, overrides with {root} for the inputs, packages made missing, message)
    pytest.param("data.py:variant=tiny", ["--config.data.inputs={root}/nowhere.txt"], "",
                 "Input path '{root}/nowhere.txt' does not exist.", id="missing-file"),
    pytest.param("data.py:variant=tiny", ["--config.data.inputs={root}/notes.parquet"], "pyarrow",
                 'Parquet input {root}/notes.parquet needs pyarrow, which is not installed: pip '
                 'install "r1jax[parquet]"', id="missing-extra"),
    pytest.param("pretrain.py:variant=tiny", ["--config.data.corpus={root}/binary.txt"], "",
                 "Input file {root}/binary.txt does not look like text: NUL byte at offset 10.",
                 id="bad-data"),
    pytest.param("finetune.py:variant=tiny",
                 [f"--config.task.{s}={{root}}/one_class.jsonl" for s in ("train", "dev", "test")],
                 "", "task.train has a single class ['net']; a classifier needs at least 2",
                 id="bad-task"),
    pytest.param("finetune.py:variant=tiny", ["--config.init_from={root}/not_a_run"], "",
                 "init_from='{root}/not_a_run' has no checkpoints/ directory", id="not-a-run"),
    pytest.param("data.py:variant=tiny", ["--config.data.format=xml"], "",
                 "data.format: 'xml' is not one of", id="bad-config"),
    pytest.param("pretrain.py:variant=huge", [], "",
                 "variant='huge' is not one of ('tiny', 'small', 'base')", id="bad-variant"),
    pytest.param("pretrain.py:variant=tiny", ["--config.trian.batch_size=8"], "",
                 "--config.trian.batch_size: the config has no such key", id="unknown-key"),
    pytest.param("pretrain.py:variant=tiny", ["--config.train.batch_size=eight"], "",
                 "flag --config.train.batch_size=eight: invalid literal for int()", id="bad-type"),
    pytest.param("nowhere.py", [], "", "nowhere.py: no such config file", id="missing-config"),
    pytest.param("tune.py:variant=tiny", ["--config.storage=postgresql://me:secret@127.0.0.1:1/db"],
                 "", "Cannot open the study database postgresql://me:***@127.0.0.1:1/db: "
                 "connection failed:", id="unreachable-database"),
    pytest.param("pipeline.py", ["--config.stages=finetune_domain,quantize"], "",
                 "Cannot run the selected stages:\n  finetune_domain needs the output of "
                 "pretrain_domain", id="pipeline-refusal"),
]


@pytest.mark.parametrize("config,overrides,missing,message", CASES)
def test_user_error_is_one_message_and_a_nonzero_exit(files, tmp_path, config, overrides, missing,
                                                      message):
  proc = _main(tmp_path, config, *(o.format(root=files) for o in overrides), missing=missing)
  assert proc.returncode == errors.EXIT_CODE, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  # The message ends the output: one "r1jax: " line (a config error lists its problems below it).
  lines = proc.stderr.strip().splitlines()
  first = max(i for i, line in enumerate(lines) if line.startswith("r1jax: "))
  assert all(line.startswith("  ") for line in lines[first + 1:]), lines[first:]
  assert message.format(root=files) in "\n".join(lines[first:])


def test_missing_extras_name_their_extra(files, monkeypatch):
  """TFDS inputs and back-translation: the error names the extra that installs the package."""
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(errors.MissingExtra, match=r'pip install "r1jax\[tfds\]"'):
    sources.open_source("tfds:imdb_reviews/train@/nowhere")
  monkeypatch.setitem(sys.modules, "transformers", None)
  with pytest.raises(errors.MissingExtra, match=r'transformers, which is not installed: pip '
                                                 r'install "r1jax\[translate\]"'):
    augment.MarianTranslator({"en-zh": str(files / "not_a_run")})
