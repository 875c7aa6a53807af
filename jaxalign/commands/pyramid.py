"""`jaxalign pyramid DST --levels=N`: build MIP levels 1..N-1 of a volume.

Images are 2x2-averaged, defect masks max-reduced, tissue masks min-reduced, fields averaged and
halved (DESIGN.md §1); --kind overrides the volume's kind (needed for a generic "mask" volume).
"""

from __future__ import annotations

from absl import flags

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_integer("levels", None, "total number of MIP levels (level 0 included)", required=True)
flags.DEFINE_enum("kind", None, ["image", "defect", "tissue", "field"], "how to reduce (default: the volume's kind)")
flags.DEFINE_boolean("progress", True, "show progress bars")


def main(argv):
  if len(argv) != 2:
    raise InputError(f"usage: jaxalign pyramid DST --levels=N (got {len(argv) - 1} positional args)")
  from jaxalign.volume import store
  from jaxalign.volume.pyramid import build_pyramid
  vol = build_pyramid(store.open_volume(argv[1]), FLAGS.levels, FLAGS.kind, progress=FLAGS.progress)
  print(f"{vol.url}: {vol.levels} level(s)")
  for k in range(vol.levels):
    shape, res = vol.shape(k), vol.resolution_at(k)
    print(f"  level {k}: {shape[1]}x{shape[2]} px x {shape[0]} sections, {res[2]:g}x{res[1]:g}x{res[0]:g} nm (x,y,z)")
  return 0
