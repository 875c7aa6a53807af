"""`jaxalign export SRC DST_DIR`: a volume (one level) to one PNG/TIFF file per section."""

from __future__ import annotations

from absl import flags

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_enum("fmt", "png", ["png", "tif", "tiff"], "file format (float32 images and fields need tif)")
flags.DEFINE_integer("level", 0, "MIP level to export")
flags.DEFINE_boolean("progress", True, "show progress bars")


def main(argv):
  if len(argv) != 3:
    raise InputError(f"usage: jaxalign export SRC DST_DIR (got {len(argv) - 1} positional args)")
  from jaxalign.volume import store
  from jaxalign.volume.images import export_stack
  paths = export_stack(store.open_volume(argv[1]), argv[2], FLAGS.fmt, level=FLAGS.level, progress=FLAGS.progress)
  print(f"exported {len(paths)} sections to {argv[2]}")
  return 0
