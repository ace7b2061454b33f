"""setup.cfg says what r1jax/ imports, no more and no less.

Reads setup.cfg (configparser) and the import statements of r1jax/ (ast; nothing is imported), and
maps import names to distributions with `importlib.metadata.packages_distributions()` of this
environment, where every declared package is installed (the test and reference extras included).
- a runtime dependency (install_requires) that r1jax/ never imports is dead weight for every user;
- a package r1jax/ imports at module level must be a runtime dependency;
- a package imported inside a function (an optional format or feature) must be declared in
  install_requires or an extra, whose name the error for a missing package gives.
"""
import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Declared, not imported by r1jax/, and needed all the same: name -> why.
NEEDED_UNIMPORTED = {
    "flatbuffers": "jax.export's serialization (r1jax/compress/export.py) imports it; jax does not "
                   "declare it",
}


def normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def declared(setup_cfg: str) -> tuple[set[str], dict[str, set[str]]]:
  """(install_requires distributions, {extra: distributions}), names normalized."""
  parser = configparser.ConfigParser()
  parser.read_string(setup_cfg)

  def names(value: str) -> set[str]:
    return {normalize(Requirement(line).name) for line in value.splitlines() if line.strip()}
  runtime = names(parser.get("options", "install_requires"))
  extras = {extra: names(value) for extra, value in parser.items("options.extras_require")}
  return runtime, extras


def imports(sources: dict[str, str]) -> dict[str, dict[str, bool]]:
  """{top-level import name: {"file:line": inside a function}} of the third-party imports."""
  out: dict[str, dict[str, bool]] = {}
  for path, source in sources.items():
    tree = ast.parse(source)
    in_function = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module]
      else:
        continue
      for name in names:
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("r1jax", "__future__"):
          continue
        out.setdefault(top, {})[f"{path}:{node.lineno}"] = id(node) in in_function
  return out


def problems(setup_cfg: str, sources: dict[str, str],
             distributions: dict[str, list[str]]) -> list[str]:
  """Every mismatch between setup.cfg and the imports; `distributions` maps import names to
  distributions (`importlib.metadata.packages_distributions()`)."""
  runtime, extras = declared(setup_cfg)
  optional = set().union(*extras.values())
  out, used = [], set()
  for name, places in sorted(imports(sources).items()):
    dists = {normalize(d) for d in distributions.get(name, [])}
    if not dists:
      out.append(f"{name} (imported at {sorted(places)[0]}) is not installed here, so its "
                 f"distribution is unknown; install it and declare it in setup.cfg")
      continue
    used |= dists
    eager = sorted(p for p, lazy in places.items() if not lazy)
    if not dists & (runtime | optional):
      out.append(f"{name} (imported at {sorted(places)[0]}) is not declared: add "
                 f"{sorted(dists)[0]} to install_requires or to the extra of its feature")
    elif eager and not dists & runtime:
      out.append(f"{name} is imported at module level ({eager[0]}) but declared in an extra "
                 f"only: add {sorted(dists)[0]} to install_requires, or import it where the "
                 f"feature needs it")
  for dist in sorted(runtime - used - set(NEEDED_UNIMPORTED)):
    out.append(f"{dist} is in install_requires but r1jax/ never imports it: drop it, or move it "
               f"to the extra (or test extra) that uses it")
  return out


def _package_sources() -> dict[str, str]:
  return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
          for p in sorted((ROOT / "r1jax").rglob("*.py"))}


def test_setup_cfg_declares_what_r1jax_imports():
  found = problems((ROOT / "setup.cfg").read_text(encoding="utf-8"), _package_sources(),
                   importlib.metadata.packages_distributions())
  assert not found, "\n".join(found)


def test_ci_installs_what_the_tests_import():
  """.ci/run installs ".[test,reference]": every package tests/ imports must come with it."""
  runtime, extras = declared((ROOT / "setup.cfg").read_text(encoding="utf-8"))
  installed = runtime | extras["test"] | extras["reference"]
  distributions = importlib.metadata.packages_distributions()
  sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
             for p in sorted((ROOT / "tests").rglob("*.py"))}
  local = {p.stem for p in (ROOT / "tests").iterdir()}  # the tests' own modules and packages
  missing = {name: sorted(places)[0] for name, places in imports(sources).items()
             if name not in local
             and not {normalize(d) for d in distributions.get(name, [])} & installed}
  assert not missing, f"imported by tests but not in install_requires, test or reference: {missing}"


def test_the_checker_sees_each_kind_of_mismatch():
  """The rules above can fail: a dead runtime dependency, an undeclared import, an extra-only
  package imported at module level, and an unknown import are all reported."""
  setup_cfg = ("[options]\ninstall_requires =\n    numpy>=2\n    nltk>=3\n"
               "[options.extras_require]\nparquet =\n    pyarrow>=15\n")
  sources = {"r1jax/a.py": "import numpy\nimport pyarrow\nfrom absl import logging\n",
             "r1jax/b.py": "def f():\n  import nonexistent_pkg\n"}
  dists = {"numpy": ["numpy"], "pyarrow": ["pyarrow"], "absl": ["absl-py"], "nltk": ["nltk"]}
  found = "\n".join(problems(setup_cfg, sources, dists))
  assert "nltk is in install_requires but r1jax/ never imports it" in found
  assert "absl (imported at r1jax/a.py:3) is not declared: add absl-py" in found
  assert "pyarrow is imported at module level (r1jax/a.py:2) but declared in an extra" in found
  assert "nonexistent_pkg (imported at r1jax/b.py:2) is not installed here" in found
  assert "numpy" not in found


def test_readme_states_the_python_that_setup_cfg_requires():
  parser = configparser.ConfigParser()
  parser.read_string((ROOT / "setup.cfg").read_text(encoding="utf-8"))
  required = parser.get("options", "python_requires").strip()
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  stated = set(re.findall(r"Python (>= ?\d+(?:\.\d+)*)", readme))
  assert stated and {s.replace(" ", "") for s in stated} == {required}, (stated, required)


def test_the_heavy_files_run_first_exist():
  """tests/conftest.py's HEAVY_FILES (the default suite's heaviest files, started first): a renamed
  or removed file would silently drop out of that order."""
  import conftest  # pylint: disable=g-import-not-at-top  # tests/ is on sys.path
  missing = [name for name in conftest.HEAVY_FILES if not (ROOT / "tests" / name).is_file()]
  assert not missing, f"tests/conftest.py HEAVY_FILES names files that do not exist: {missing}"
