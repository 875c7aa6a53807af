"""The code's shape, checked (issue 21): lint clean, kernels at the bottom, no reaching into another
module's private names. Static checks on the source (AST and ruff); nothing is imported or run."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxalign"
# Array kernels: pure functions of arrays. They may use the standard library, jax, numpy, the error
# types and one another, nothing of the pipeline above them.
KERNELS = ("fields", "losses", "voting", "decay", "metrics", "preprocess", "tears")
KERNEL_IMPORTS = {"jax", "numpy", "jaxalign.errors"} | {f"jaxalign.{k}" for k in KERNELS}
# namedtuple API names start with "_" but are public.
NAMEDTUPLE_API = {"_fields", "_replace", "_asdict", "_make", "_field_defaults"}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    yield name.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__") and name not in NAMEDTUPLE_API


def private_uses(module: str, tree: ast.AST) -> list[str]:
  """`module`'s uses of another jaxalign module's private names: `from jaxalign.x import _y`, and
  `alias._y` where `alias` names a jaxalign module (or a name imported from one)."""
  aliases, found = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxalign":
      for a in node.names:
        if _is_private(a.name) and node.module != module:
          found.append(f"line {node.lineno}: from {node.module} import {a.name}")
        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jaxalign":
          aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "jaxalign"
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _is_private(node.attr):
      owner = _dotted(node.value)
      if owner and owner.split(".")[0] in aliases:
        target = ".".join([aliases[owner.split(".")[0]]] + owner.split(".")[1:])
        if target != module:
          found.append(f"line {node.lineno}: {owner}.{node.attr}")
  return found


def _dotted(node: ast.AST) -> str | None:
  """`a.b.c` for a chain of attributes on a name, else None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else None


def test_no_module_uses_another_modules_private_names():
  bad = {m: uses for m, tree in _modules() if (uses := private_uses(m, tree))}
  assert not bad, f"make these public in their home module: {bad}"


def test_the_checker_finds_private_uses():
  # The check itself, on known snippets: a private import and a private attribute are found; a
  # module's own names, dunders and namedtuple API are not.
  code = ("from jaxalign.block import _vote, align_block\nfrom jaxalign import fields as f\n"
          "import jaxalign.tears\nx = f._grid(1, 2) + f.warp\ny = jaxalign.tears._FAR\nz = S._fields + f.__doc__\n")
  found = private_uses("jaxalign.stack", ast.parse(code))
  assert sorted(u.split(": ")[1] for u in found) == ["f._grid", "from jaxalign.block import _vote",
                                                     "jaxalign.tears._FAR"], found
  assert private_uses("jaxalign.block", ast.parse("from jaxalign.block import _vote\n")) == []


def test_kernels_import_only_jax_numpy_errors_and_each_other():
  bad = {}
  for module, tree in _modules():
    if module.split(".")[-1] not in KERNELS or not module.startswith("jaxalign."):
      continue
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from jaxalign import fields` imports the module jaxalign.fields.
        names = [f"jaxalign.{a.name}" for a in node.names] if node.module == "jaxalign" else [node.module]
      else:
        names = []
      for n in names:
        top = n.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
          continue
        if not any(n == k or n.startswith(k + ".") for k in KERNEL_IMPORTS):
          bad.setdefault(module, []).append(f"line {node.lineno}: {n}")
  assert not bad, bad


def test_ruff_is_clean():
  ruff = shutil.which("ruff")
  if ruff is None:
    try:
      import ruff as _ruff  # noqa: F401  (the PyPI wheel ships the binary)
      cmd = [sys.executable, "-m", "ruff"]
    except ImportError:
      pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
  else:
    cmd = [ruff]
  r = subprocess.run(cmd + ["check", "--no-cache", "jaxalign", "tests", "experiments"], cwd=ROOT,
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
