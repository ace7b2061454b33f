"""Notebooks: the committed .ipynb files are what notebooks/build_notebooks.py builds, have a
parameters cell defaulting to the real settings, and (slow) run top to bottom with tiny settings
on CPU through nbclient and a python3 kernel, selected once by injecting a cell after the
parameters cell (the papermill convention) and once by the R1JAX_NOTEBOOK_TINY variable."""
import importlib.metadata
import importlib.util
import json
import os
import sys

import nbformat
import pytest

import test_packaging  # pylint: disable=g-bad-import-order  (tests/: setup.cfg's declarations)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("pretrain_tpu.ipynb", "adapt_compress.ipynb")


def _builder():
  spec = importlib.util.spec_from_file_location("build_notebooks",
                                                os.path.join(NOTEBOOKS, "build_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_notebooks_are_up_to_date_and_valid():
  built = _builder().build()
  assert sorted(os.path.basename(p) for p in built) == sorted(NAMES)
  def cells(nb):
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]
  for path, nb in built.items():
    committed = nbformat.read(path, as_version=4)
    nbformat.validate(committed)
    assert cells(committed) == cells(nb), (
        f"{path} is out of date: run python notebooks/build_notebooks.py")
    assert not any(c.get("outputs") for c in committed.cells), f"{path} is committed with outputs"


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_defaults_to_real_settings(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  assert "TINY = False" in params[0].source
  # The next cell honours the environment variable CI can set instead of injecting a cell.
  following = nb.cells[nb.cells.index(params[0]) + 1]
  assert 'os.environ.get("R1JAX_NOTEBOOK_TINY", "") == "1"' in following.source


def test_notebooks_import_only_what_installing_r1jax_brings():
  """A fresh Colab has the standard library, IPython (the kernel) and what `pip install r1jax`
  installs: an import of anything else (pandas, say) would fail there."""
  runtime, _ = test_packaging.declared(open(os.path.join(ROOT, "setup.cfg")).read())
  distributions = importlib.metadata.packages_distributions()
  for name in NAMES:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for module, places in test_packaging.imports({name: code}).items():
      dists = {test_packaging.normalize(d) for d in distributions.get(module, [])}
      assert module == "IPython" or dists & runtime, (
          f"{name} imports {module} ({sorted(places)[0]}), which installing r1jax does not bring")


def _python3_kernel():
  from jupyter_client import kernelspec  # pylint: disable=g-import-not-at-top
  if "python3" not in kernelspec.KernelSpecManager().find_kernel_specs():
    from ipykernel import kernelspec as ipk  # pylint: disable=g-import-not-at-top
    in_venv = sys.prefix != sys.base_prefix
    ipk.install(prefix=sys.prefix if in_venv else None, user=not in_venv)
  return "python3"


def _execute(name, tmp_path, *, inject, env):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  workdir = str(tmp_path / "work")
  if inject is not None:
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(inject.replace("{workdir}", workdir))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
  # The kernel imports this checkout (as after `pip install -e .`), never installing anything.
  env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
  old = {k: os.environ.get(k) for k in env}
  os.environ.update({k: v.replace("{workdir}", workdir) for k, v in env.items()})
  try:
    client = NotebookClient(nb, timeout=1200, kernel_name=_python3_kernel(),
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  with open(tmp_path / name, "w") as f:
    nbformat.write(nb, f)
  return nb, workdir


def _outputs(nb):
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(out.get("text", ""))
      text.append(json.dumps(out.get("data", {}).get("text/plain", "")))
  return "\n".join(text)


@pytest.mark.slow
def test_pretrain_tpu_notebook_runs_on_cpu(tmp_path):
  nb, workdir = _execute("pretrain_tpu.ipynb", tmp_path,
                         inject='TINY = True\nWORKDIR = "{workdir}"', env={})
  out = _outputs(nb)
  assert "TINY=True" in out and "No TPU found: running on cpu" in out
  assert "mesh shape:" in out
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["status"] == "complete" and summary["step"] == 60
  # The live plot was drawn at least once, and the final one too.
  images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
  assert images >= 2


@pytest.mark.slow
def test_adapt_compress_notebook_runs_on_cpu(tmp_path):
  nb, workdir = _execute("adapt_compress.ipynb", tmp_path, inject=None,
                         env={"R1JAX_NOTEBOOK_TINY": "1", "R1JAX_NOTEBOOK_WORKDIR": "{workdir}"})
  out = _outputs(nb)
  assert "TINY=True" in out
  report = open(os.path.join(workdir, "report.md")).read()
  for section in ("## Stages", "## Data", "## General vs domain-adapted model",
                  "## Compression trade-off"):
    assert section in report
  for stage in ("pretrain_domain", "finetune_domain", "distill", "quantize", "prune"):
    with open(os.path.join(workdir, stage, "summary.json")) as f:
      assert json.load(f)["status"] == "complete"
