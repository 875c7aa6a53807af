"""Generates docs/api.md (the API reference) from the docstrings of jaxalign's modules.

    python experiments/make_api_docs.py                 # writes docs/api.md
    python experiments/make_api_docs.py --check         # exits 1 if docs/api.md is out of date

For every module in --modules: its docstring, then every public function and class defined in it
(name not starting with "_", listed in `__all__` when the module has one), with its signature and
docstring; dataclass fields are in the class docstring's Attributes. The top-level `jaxalign.X`
names (the lazy `_EXPORTS` table) are listed first with the module that defines them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pathlib
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
flags.DEFINE_string("output", str(REPO / "docs" / "api.md"), "markdown file to write")
flags.DEFINE_list("modules", [
    "jaxalign.ops.fields", "jaxalign.ops.losses", "jaxalign.ops.voting", "jaxalign.ops.decay", "jaxalign.ops.metrics",
    "jaxalign.ops.preprocess", "jaxalign.ops.tears", "jaxalign.errors",
    "jaxalign.align.pair", "jaxalign.align.finetuner", "jaxalign.align.blockmatch", "jaxalign.align.protocols",
    "jaxalign.stack.block", "jaxalign.stack.chain", "jaxalign.stack.drift", "jaxalign.stack.refine", "jaxalign.stack.render",
    "jaxalign.volume.store", "jaxalign.volume.pyramid", "jaxalign.volume.images", "jaxalign.volume.chunking",
    "jaxalign.volume.pipeline", "jaxalign.volume.distributed",
    "jaxalign.models.seamless", "jaxalign.models.train_data", "jaxalign.models.train_pyramid",
    "jaxalign.models.train_encoder", "jaxalign.models.train_flags",
    "jaxalign.bench.groundtruth", "jaxalign.bench.evaluation", "jaxalign.bench.synthetic", "jaxalign.bench.report",
], "modules to document, in page order")
flags.DEFINE_boolean("check", False, "do not write; exit 1 if the file differs from what would be written")


def _signature(obj) -> str:
  try:
    sig = str(inspect.signature(obj))
  except (TypeError, ValueError):
    return "(...)"
  return sig


def _doc(obj) -> str:
  return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "*(no docstring)*"


def _fenced(text: str) -> str:
  """Google-style docstrings keep their Args:/Returns: layout inside a text block."""
  return f"```text\n{text}\n```"


def _public_members(mod):
  names = getattr(mod, "__all__", None)
  for name, obj in inspect.getmembers(mod):
    if name.startswith("_") or (names is not None and name not in names):
      continue
    # jitted functions wrap the original: document the original's module/docstring
    target = getattr(obj, "__wrapped__", obj)
    if not (inspect.isfunction(target) or inspect.isclass(target)):
      continue
    if getattr(target, "__module__", None) != mod.__name__:
      continue
    yield name, obj, target


def _class_section(name, cls) -> list[str]:
  kind = "dataclass" if dataclasses.is_dataclass(cls) else "class"
  out = [f"### `{name}{_signature(cls)}` ({kind})", "", _fenced(_doc(cls)), ""]
  for mname, m in inspect.getmembers(cls):
    if mname.startswith("_") or mname not in cls.__dict__:
      continue
    if inspect.isfunction(m) and m.__doc__:
      out += [f"- `{name}.{mname}{_signature(m)}`: {inspect.cleandoc(m.__doc__).splitlines()[0]}"]
    elif isinstance(cls.__dict__[mname], property) and cls.__dict__[mname].__doc__:
      out += [f"- `{name}.{mname}` (property): {inspect.cleandoc(cls.__dict__[mname].__doc__).splitlines()[0]}"]
  return out + [""]


def render(modules) -> str:
  import jaxalign
  lines = ["# jaxalign API reference", "",
           "Generated from the docstrings by `python experiments/make_api_docs.py`; do not edit by hand.",
           "Conventions (field layout, units, pull semantics) are in `../shared/DESIGN.md` §1.", "",
           "## Top-level names (`import jaxalign as ja`)", "", "| name | defined in |", "|---|---|"]
  for name, mod in sorted(jaxalign._EXPORTS.items()):
    lines.append(f"| `ja.{name}` | [`{mod}`](#{mod.replace('.', '')}) |")
  lines.append("")
  for modname in modules:
    lines += [f"## {modname}", ""]
    try:
      mod = importlib.import_module(modname)
    except Exception as e:  # noqa: BLE001 - a module in progress must not stop the page
      lines += [f"*(not importable: {type(e).__name__}: {e})*", ""]
      continue
    lines += [_doc(mod), ""]
    for name, obj, target in _public_members(mod):
      if inspect.isclass(target):
        lines += _class_section(name, target)
      else:
        lines += [f"### `{name}{_signature(target)}`", "", _fenced(_doc(target)), ""]
  return "\n".join(lines).rstrip() + "\n"


def main(argv):
  del argv
  text = render(FLAGS.modules)
  out = pathlib.Path(FLAGS.output)
  if FLAGS.check:
    same = out.is_file() and out.read_text() == text
    print(f"{out}: {'up to date' if same else 'out of date'}")
    return 0 if same else 1
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"wrote {out} ({len(text.splitlines())} lines)")
  return 0


if __name__ == "__main__":
  app.run(main)
