"""`jaxalign align SRC DST`: align an image volume (blocks, vector voting, stitching, composition with
decay) into DST/fields and DST/aligned (with its MIP pyramid); resumable per section.

Tasks run inline, on local processes or on Dask (`--executor`); the output is identical whichever
runs it. Re-running the same command skips finished work (completion records in DST/_done).
See docs/distributed.md.

Progress (--progress): a bar per stage and, inside each block, per section with an ETA: a tqdm bar
named after the block with --executor=inline; with processes / Dask the workers log one line per
section (at most every few seconds) instead, to this terminal for local workers and to the worker
logs on a cluster.

Unreadable input (a corrupt or truncated chunk of SRC) is found before anything is written: by
default the run stops with one line naming the volume, section and chunk (exit status 2);
--on_read_error=missing treats such chunks as missing data (zeros, like a blank section) and lists
them in the summary.
"""

from __future__ import annotations

import time

from absl import flags

from jaxalign.commands import exec_flags
from jaxalign.errors import InputError

FLAGS = flags.FLAGS
exec_flags.define()
flags.DEFINE_integer("block_size", 25, "sections per block (paper: 25)")
flags.DEFINE_integer("overlap", 3, "sections shared by neighbouring blocks (paper: 3)")
flags.DEFINE_integer("voting_distance", 3, "previous sections each section votes over (paper: 3)")
flags.DEFINE_float("decay_distance", 100.0, "sections over which stitch fields decay (paper: 100)")
flags.DEFINE_list("starters", None, "starter section per block (default: chosen from section quality)")
flags.DEFINE_integer("level", 0, "MIP level of SRC to align and render")
flags.DEFINE_integer("pyramid_levels", None, "MIP levels of DST/aligned (default: down to ~64 px)")
flags.DEFINE_integer("chunk", None, "process sections larger than this many px in overlapping chunks")
flags.DEFINE_integer("chunk_overlap", 64, "chunk context margin, px")
flags.DEFINE_float("finest_nm", 32.0, "pixel size (nm) of the finest computed field, upsampled to the data's "
                   "pixels (paper: 32 nm; the data's resolution comes from SRC)")
flags.DEFINE_boolean("precise", False, "refine fields down to the data's own pixel (overrides --finest_nm; "
                     "slower, follows more of the tissue's own section-to-section change)")
flags.DEFINE_float("max_displacement_nm", 2048.0, "largest displacement expected between neighbouring "
                   "sections, nm (sizes the coarsest level)")
flags.DEFINE_enum("pair_init", "identity", ["identity", "blockmatch"], "initial field of each pair alignment")
flags.DEFINE_float("drift_sigma", 2.0, "remove the fields' drift along z (jaxalign.stack.drift): Gaussian width, "
                   "sections; 0 = off (the paper's ABCD)")
flags.DEFINE_integer("drift_degree", 1, "degree of the local fit along z for --drift_sigma (0, 1 or 2)")
flags.DEFINE_boolean("drift_keep_translation", True, "leave each section's mean translation out of the drift "
                     "fit, so steps (a section moved during acquisition) are not smeared over neighbours")
flags.DEFINE_integer("neighbour_refine", 1, "sweeps re-aligning each section to the mean of its aligned "
                     "neighbours on both sides (jaxalign.stack.refine); 0 = off")
flags.DEFINE_float("refine_stiffness", 4.0, "elastic weights of the neighbour refinement relative to pair "
                   "alignment's (jaxalign.stack.refine.RefineConfig.stiffness; thicker sections in pixels need more)")
flags.DEFINE_boolean("restart", False, "discard DST's completion records and recompute everything")
flags.DEFINE_enum("on_read_error", "stop", ["stop", "missing"], "a chunk of SRC that cannot be read (corrupt, "
                  "truncated): stop before writing anything, or treat it as missing data (no data, like a "
                  "blank section) and list it in the summary")

# Unreadable chunks printed one per line in the summary at most (all are logged as warnings).
PRINT_UNREADABLE = 20


def main(argv):
  if len(argv) != 3:
    raise InputError(f"usage: jaxalign align SRC DST [--flags] (got {len(argv) - 1} positional args)")
  from jaxalign.volume import distributed as jd, pipeline
  from jaxalign.stack.block import BlockConfig
  from jaxalign.volume.chunked import ChunkConfig
  from jaxalign.align.pair import PairConfig
  from jaxalign.stack.chain import StackConfig
  try:
    starters = None if FLAGS.starters is None else tuple(int(s) for s in FLAGS.starters)
  except ValueError:
    raise InputError(f"--starters must be integers, got {FLAGS.starters}") from None
  chunk = None if FLAGS.chunk is None else ChunkConfig(chunk=FLAGS.chunk, overlap=FLAGS.chunk_overlap)
  from jaxalign.stack.drift import DriftConfig
  if FLAGS.drift_sigma < 0:
    raise InputError(f"--drift_sigma must be >= 0 sections (0 = off), got {FLAGS.drift_sigma}")
  drift = (DriftConfig(sigma=FLAGS.drift_sigma, degree=FLAGS.drift_degree,
                      keep_translation=FLAGS.drift_keep_translation) if FLAGS.drift_sigma > 0 else None)
  from jaxalign.stack.refine import RefineConfig
  if FLAGS.neighbour_refine < 0:
    raise InputError(f"--neighbour_refine must be >= 0 sweeps, got {FLAGS.neighbour_refine}")
  refine = (RefineConfig(iterations=FLAGS.neighbour_refine, stiffness=FLAGS.refine_stiffness)
            if FLAGS.neighbour_refine else None)
  finest_nm = 0.0 if FLAGS.precise else FLAGS.finest_nm
  pair = PairConfig(init=FLAGS.pair_init, finest_nm=finest_nm, max_displacement_nm=FLAGS.max_displacement_nm)
  stack = StackConfig(block=BlockConfig(pair=pair), drift=drift,
                      neighbour_refine=refine)
  config = pipeline.VolumeConfig(block_size=FLAGS.block_size, overlap=FLAGS.overlap,
                                 voting_distance=FLAGS.voting_distance, decay_distance=FLAGS.decay_distance,
                                 starters=starters, level=FLAGS.level, pyramid_levels=FLAGS.pyramid_levels,
                                 chunk=chunk, stack=stack)
  stats = jd.RunStats()
  t0 = time.time()
  with exec_flags.executor() as ex:
    plan = pipeline.align_volume(argv[1], argv[2], config, executor=ex, progress=FLAGS.progress, stats=stats,
                                 restart=FLAGS.restart, on_read_error=FLAGS.on_read_error)
  print(plan.describe())
  print(exec_flags.summary("align", stats, ex, time.time() - t0))
  unreadable = pipeline.read_errors(argv[2])
  if unreadable:
    sections = sorted({u.z for u in unreadable})
    print(f"unreadable input treated as missing data (--on_read_error=missing): {len(unreadable)} chunk(s) in "
          f"section(s) {', '.join(map(str, sections))}")
    for u in unreadable[:PRINT_UNREADABLE]:
      print(f"  {u.describe()}")
    if len(unreadable) > PRINT_UNREADABLE:
      print(f"  ... and {len(unreadable) - PRINT_UNREADABLE} more (all in the log)")
  print(f"fields:  {pipeline.output_url(argv[2], pipeline.FIELDS)}\naligned: {pipeline.output_url(argv[2], pipeline.ALIGNED)}")
  return 0
