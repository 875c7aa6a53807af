"""`jaxalign import SRC DST --resolution=z,y,x`: a PNG/TIFF stack into a volume.

SRC is a folder of PNG/TIFF sections (natural name order) or a multi-page TIFF; DST a volume URL
(local path, gs://, s3://). With --levels > 1 the MIP pyramid is built as well.
"""

from __future__ import annotations

from absl import flags

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("resolution", None, "nm per pixel as z,y,x (e.g. 50,4,4)", required=True)
flags.DEFINE_enum("format", "zarr3", ["zarr3", "zarr", "n5", "precomputed", "neuroglancer_precomputed"],
                  "volume format")
flags.DEFINE_list("chunks", None, "chunk shape z,y,x (default 1,512,512)")
flags.DEFINE_enum("kind", "image", ["image", "defect", "tissue", "mask"], "what the sections are")
flags.DEFINE_integer("levels", 1, "MIP levels to build after import (1 = level 0 only)")
flags.DEFINE_boolean("progress", True, "show progress bars")


def main(argv):
  if len(argv) != 3:
    raise InputError(f"usage: jaxalign import SRC DST --resolution=z,y,x (got {len(argv) - 1} positional args)")
  from jaxalign.volume import store
  from jaxalign.volume.images import import_stack
  src, dst = argv[1], argv[2]
  res = store.parse_resolution(FLAGS.resolution)
  vol = import_stack(src, dst, res, format=FLAGS.format, chunks=FLAGS.chunks, levels=FLAGS.levels,
                        kind=FLAGS.kind, progress=FLAGS.progress)
  print(f"imported {vol.shape(0)[0]} sections {vol.shape(0)[1]}x{vol.shape(0)[2]} {vol.dtype} into {vol.url} "
        f"({vol.format}, {vol.resolution[0]:g},{vol.resolution[1]:g},{vol.resolution[2]:g} nm, {vol.levels} level(s))")
  return 0
