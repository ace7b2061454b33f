"""What a user gets from a wheel: the package with its configs and the `r1jax` command.

The wheel is built from a copy of the clone's build inputs (`pip wheel --no-deps
--no-build-isolation`), installed with `--no-deps --no-index` into a fresh venv outside the clone,
and `r1jax --config=pretrain:variant=tiny` runs a few steps from an empty directory. To stay fast
and offline, the new venv finds the dependencies in this environment's site-packages through a .pth
line, which puts that folder on sys.path after the venv's own site-packages and, being no site
directory, leaves its .pth files unread: the editable install's finder (the clone) never loads, so
`import r1jax` can only find the wheel's copy (asserted).
"""
import json
import os
import shutil
import site
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What setup.cfg builds the wheel from (README.md: long_description, LICENSE: license_files).
BUILD_INPUTS = ("r1jax", "setup.cfg", "pyproject.toml", "README.md", "LICENSE")
# A few steps of a smaller-than-tiny model (tests/test_pretrain.py's sizes), quiet and synchronous.
QUICK = ("--config.train.num_steps=3", "--config.train.warmup_steps=1",
         "--config.train.log_every_steps=1", "--config.train.progress_bar=False",
         "--config.eval.every_steps=3", "--config.eval.num_batches=1",
         "--config.checkpoint.every_steps=3", "--config.checkpoint.async_save=False",
         "--config.data.corpus=builtin:domain", "--config.model.n_layer=1",
         "--config.model.d_model=32", "--config.model.n_head=2", "--config.model.d_head=16",
         "--config.model.d_inner=64", "--config.model.mem_len=16")


def _run(cmd, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kwargs)
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The wheel built from a copy of the clone (the clone gets no build/ folder)."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  src.mkdir()
  for name in BUILD_INPUTS:
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(path, src / name)
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
        "-w", str(tmp / "dist")])
  (built,) = (tmp / "dist").glob("r1jax-*.whl")
  return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
  """A fresh venv, outside the clone, with the wheel installed and this environment's packages
  (not its r1jax) visible; returns its folder."""
  root = tmp_path_factory.mktemp("venv") / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(root)])
  python = str(root / "bin" / "python")
  purelib = _run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
                 ).stdout.strip()
  with open(os.path.join(purelib, "dependencies_from_dev_venv.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  # This environment's pip installs into the new venv's interpreter (which has no pip of its own).
  _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
        str(wheel)])
  return root


def _env():
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return env


def test_the_wheel_ships_the_configs_and_the_command(venv, tmp_path):
  where = _run([str(venv / "bin" / "python"), "-c",
                "import json, os, sys, r1jax\n"
                "from r1jax import configlib\n"
                "print(json.dumps(dict(file=r1jax.__file__, configs=configlib.shipped_configs(),\n"
                "    editable=any('__editable__' in m for m in sys.modules))))"],
               cwd=tmp_path, env=_env())
  found = json.loads(where.stdout.strip().splitlines()[-1])
  assert found["file"].startswith(str(venv) + os.sep), found  # the wheel's copy, not the clone's
  assert not found["editable"], found
  assert {"pretrain", "pipeline", "finetune", "data"} <= set(found["configs"])
  assert os.path.exists(venv / "bin" / "r1jax")


def test_r1jax_command_from_a_wheel_runs_a_shipped_config_by_name(venv, tmp_path):
  elsewhere = tmp_path / "elsewhere"  # no configs/ here, and not the clone
  elsewhere.mkdir()
  python = str(venv / "bin" / "python")
  # The interpreter the command runs, from here, imports the wheel's r1jax (also in isolated mode).
  for flags in ([], ["-I"]):
    path = _run([python, *flags, "-c", "import r1jax; print(r1jax.__file__)"],
                cwd=elsewhere, env=_env()).stdout.strip()
    assert path == str(venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                       / "site-packages" / "r1jax" / "__init__.py"), path
  with open(venv / "bin" / "r1jax") as f:
    assert f.readline().strip() == f"#!{python}"
  proc = _run([str(venv / "bin" / "r1jax"), "--config=pretrain:variant=tiny", "--workdir=run",
               *QUICK], cwd=elsewhere, env=_env())
  with open(elsewhere / "run" / "summary.json") as f:
    summary = json.load(f)
  assert summary["status"] == "complete" and summary["step"] == 3, summary
  with open(elsewhere / "run" / "config.json") as f:
    assert json.load(f)["model"]["variant"] == "tiny"
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(elsewhere)) == ["run"]
