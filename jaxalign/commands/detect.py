"""`jaxalign detect SRC DST`: crack / fold / tissue masks of an image volume, with MIP pyramids.

A thin wrapper of `jaxalign.models.detector.detect_volume`. Runs the detector (shipped weights by default) on MIP `--mip` of SRC, section by
section and in overlapping chunks within a section, and writes (zarr v3 unless --format says otherwise)::

  DST/crack, DST/fold   [Z, H, W] uint8 probability x 255, kind "defect" (pyramid by max)
  DST/tissue            [Z, H, W] uint8 probability x 255, kind "tissue" (pyramid by min)
  DST/defects           [Z, H, W] uint8 0/1: crack|fold thresholded and dilated
                        (`detector.masks_for_alignment`), kind "defect" (pyramid by max)

Level 0 of every output is SRC's MIP `--mip` (its nm resolution is recorded). Each section is
written only when its masks are complete; a section already written (all four volumes) is skipped on
a re-run unless --overwrite, so an interrupted run can simply be repeated.
"""

from __future__ import annotations

from absl import flags

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_integer("mip", None, "MIP level of SRC to detect on (default: the level closest to --nm)")
flags.DEFINE_float("nm", None, "target resolution nm/px for --mip=auto (default: the detector's nm_per_px)")
flags.DEFINE_string("weights", None, "detector weights path without suffix (default: shipped weights)")
flags.DEFINE_integer("levels", None, "MIP levels of the outputs (default: down to ~64 px)")
flags.DEFINE_list("z", None, "sections to process as START,STOP (default: all)")
flags.DEFINE_float("defect_threshold", 0.5, "crack/fold probability threshold of DST/defects")
flags.DEFINE_integer("dilation", 2, "DST/defects dilation, px of --mip")
flags.DEFINE_integer("chunk", 256, "inference chunk edge, px")
flags.DEFINE_integer("chunk_overlap", 32, "inference chunk overlap, px")
flags.DEFINE_string("format", "zarr3", "output format: zarr3, n5 or neuroglancer_precomputed")
flags.DEFINE_boolean("overwrite", False, "recompute sections that were already written")
flags.DEFINE_boolean("progress", True, "show progress bars")


def main(argv):
  if len(argv) != 3:
    raise InputError(f"usage: jaxalign detect SRC DST [--flags] (got {len(argv) - 1} positional args)")
  from jaxalign.volume import store
  store.open_volume(argv[1])  # before importing JAX: a bad path fails fast
  from jaxalign.models import detector
  if FLAGS.z:
    try:
      z = tuple(int(v) for v in FLAGS.z)
    except ValueError:
      raise InputError(f"--z must be START,STOP, got {FLAGS.z}") from None
    if len(z) != 2:
      raise InputError(f"--z must be START,STOP, got {FLAGS.z}")
  else:
    z = None
  model = detector.load_weights(FLAGS.weights) if FLAGS.weights else None
  rep = detector.detect_volume(
    argv[1], argv[2], model=model, mip=FLAGS.mip, nm=FLAGS.nm, levels=FLAGS.levels, z=z,
    config=detector.DetectConfig(chunk=FLAGS.chunk, overlap=FLAGS.chunk_overlap),
    mask_config=detector.MaskConfig(defect_threshold=FLAGS.defect_threshold, dilation=FLAGS.dilation),
    format=FLAGS.format, overwrite=FLAGS.overwrite, progress=FLAGS.progress)
  res = rep["resolution"]
  print(f"detected {rep['done']} section(s) at MIP {rep['mip']} ({res[2]:g}x{res[1]:g} nm, "
        f"{rep['shape'][2]}x{rep['shape'][1]} px) in {rep['seconds']:.1f} s; {rep['skipped']} already done; "
        f"{rep['levels']} level(s)")
  for name, url in rep["outputs"].items():
    print(f"  {name:8s} {url}")
  return 0
