"""`jaxalign render SRC FIELDS DST`: warp every section of SRC by its field in FIELDS into a new image
volume DST (with its MIP pyramid); per-section tasks, resumable, on any executor."""

from __future__ import annotations

import time

from absl import flags

from jaxalign.commands import exec_flags
from jaxalign.errors import InputError

FLAGS = flags.FLAGS
exec_flags.define()
flags.DEFINE_integer("level", 0, "MIP level of SRC that FIELDS belong to")
flags.DEFINE_integer("pyramid_levels", None, "MIP levels of DST (default: down to ~64 px)")
flags.DEFINE_integer("chunk", None, "render sections larger than this many px in re-centred chunks")
flags.DEFINE_boolean("restart", False, "discard DST's completion records and recompute everything")


def main(argv):
  if len(argv) != 4:
    raise InputError(f"usage: jaxalign render SRC FIELDS DST [--flags] (got {len(argv) - 1} positional args)")
  from jaxalign.volume import distributed as jd, pipeline
  from jaxalign.volume.chunked import ChunkConfig
  chunk = None if FLAGS.chunk is None else ChunkConfig(chunk=FLAGS.chunk, overlap=0)
  config = pipeline.VolumeConfig(level=FLAGS.level, pyramid_levels=FLAGS.pyramid_levels, chunk=chunk)
  stats = jd.RunStats()
  t0 = time.time()
  with exec_flags.executor() as ex:
    out = pipeline.render_volume(argv[1], argv[2], argv[3], config, executor=ex, progress=FLAGS.progress,
                                 stats=stats, restart=FLAGS.restart)
  print(exec_flags.summary("render", stats, ex, time.time() - t0))
  print(f"aligned: {out.url} ({out.levels} level(s))")
  return 0
