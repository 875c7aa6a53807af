"""Builds BENCHMARKS.md from the per-topic pages in docs/benchmarks/ (each written by its benchmark).

  python experiments/assemble_benchmarks.py
"""

from __future__ import annotations

import pathlib
import re

from absl import app

ROOT = pathlib.Path(__file__).resolve().parents[1]
# real_stacks: jaxalign and SOFIMA side by side on the shared real stacks (experiments/real_stacks.py).
PAGES = ["kernels", "io", "groundtruth", "pair", "generalise", "models", "encoder", "detector", "stack", "real_stacks_summary",
         "real_stacks", "scale", "demo"]
HEADER = """# jaxalign benchmarks

Every figure below comes from a script in `experiments/` whose command is given with it; speed is
reported as a ratio against a peer measured in the same run (scipy, torch, metroem, SOFIMA, block
matching), accuracy as endpoint error (px) against exact ground-truth fields and as the fraction of
chunks with CPC < 0.25. Unless a section says otherwise the machine is the team's 2-core x86_64 CPU VM
with no GPU (no GPU was lent to this task), often shared with other jobs: absolute times are rough,
ratios within one run are what to compare. This file is assembled from `docs/benchmarks/*.md` by
`python experiments/assemble_benchmarks.py`.

Sections: """


def main(argv):
  del argv
  parts = []
  for name in PAGES:
    path = ROOT / "docs" / "benchmarks" / f"{name}.md"
    if not path.exists():
      continue
    text = path.read_text()
    # Pictures and sibling pages are referenced relative to docs/benchmarks/.
    text = re.sub(r"\]\((?!https?:|/|docs/)([^)]+)\)", r"](docs/benchmarks/\1)", text)
    text = re.sub(r"^#", "##", text, flags=re.M)
    parts.append((name, text))
  body = HEADER + ", ".join(f"[{n}](#{n})" for n, _ in parts) + "\n"
  for name, text in parts:
    body += f"\n<a id=\"{name}\"></a>\n\n{text.rstrip()}\n"
  (ROOT / "BENCHMARKS.md").write_text(body)


if __name__ == "__main__":
  app.run(main)
