"""`jaxalign train-detector`: train the crack / fold / tissue UNet on generated labels.

Examples (the shipped weights are stage 1 + stage 2; exact commands in
jaxalign/models/weights/detector/README.md)::

  jaxalign train-detector --workdir=runs/detector --steps=800
  # fine-tune with hard negatives mined by the starting weights
  jaxalign train-detector --workdir=runs/detector_ft --steps=800 --learning_rate=1e-3 --warmup=20 \
      --init_weights=runs/detector/detector --mined_patches=128 --mined_weight=2

Re-running the same command with the same --workdir resumes from the latest orbax checkpoint.
`damaged_pair_dolw7` is refused as training data (its real fold mask is a test set).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

from absl import flags, logging

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics.jsonl, detector.{npz,json})", required=True)
flags.DEFINE_string("data", None, "shared EM data folder (default ../shared/data/em from the project root)")
flags.DEFINE_list("stacks", ["isbi2012_train:1:4", "gerhard_vnc_stack1:1:3", "flyem_medulla_fibsem:4:4"],
                  "source stacks as NAME:STRIDE:HOLDOUT (the last HOLDOUT used sections are held out)")
flags.DEFINE_integer("steps", 800, "optimiser steps")
flags.DEFINE_integer("batch", 8, "patches per step")
flags.DEFINE_float("learning_rate", 3e-3, "peak AdamW learning rate (cosine decay)")
flags.DEFINE_list("channels", ["8", "16", "32", "48"], "UNet widths, finest level first")
flags.DEFINE_list("mips", ["1", "2"], "MIP levels the source sections are downsampled to")
flags.DEFINE_integer("patch", 128, "training patch edge (px)")
flags.DEFINE_integer("checkpoint_every", 100, "steps between orbax checkpoints / held-out scores")
flags.DEFINE_integer("seed", 0, "data and init seed")
flags.DEFINE_string("export", None, "also copy the final weights to EXPORT.{npz,json}")
flags.DEFINE_boolean("progress", True, "show a progress bar")
flags.DEFINE_string("init_weights", None, "fine-tune from these detector weights (path without suffix)")
flags.DEFINE_integer("warmup", 30, "learning-rate warmup steps")
flags.DEFINE_list("crack_width", None, "MIN,MAX crack gap width, px (default: SynthConfig's)")
flags.DEFINE_float("crack_bright_probability", None, "chance a crack gap is bright film rather than empty "
                   "(default: SynthConfig's)")
flags.DEFINE_float("dark_weight", 1.0, "BCE weight of dark undamaged pixels as crack/fold negatives (1 = off)")
flags.DEFINE_integer("mined_patches", 0, "undamaged hard-negative patches mined with --mine_from / --init_weights")
flags.DEFINE_integer("mined_candidates", 512, "undamaged patches scored for mining")
flags.DEFINE_float("mined_weight", 4.0, "BCE weight of the mined false-positive pixels")
flags.DEFINE_string("mine_from", None, "detector weights used for mining (default: --init_weights)")


def _parse_stacks(items):
  from jaxalign.models.train_detector import StackSpec
  out = []
  for it in items:
    parts = it.split(":")
    try:
      name = parts[0]
      stride = int(parts[1]) if len(parts) > 1 else 1
      holdout = int(parts[2]) if len(parts) > 2 else 3
    except ValueError:
      raise InputError(f"--stacks entry {it!r}: expected NAME[:STRIDE[:HOLDOUT]]") from None
    if stride < 1 or holdout < 0:
      raise InputError(f"--stacks entry {it!r}: stride must be >= 1 and holdout >= 0")
    out.append(StackSpec(name, stride, holdout))
  return tuple(out)


def main(argv):
  if len(argv) > 1:
    raise InputError(f"unexpected arguments {argv[1:]} (train-detector takes flags only)")
  from jaxalign.models import detector, train_detector
  try:
    channels = tuple(int(c) for c in FLAGS.channels)
    mips = tuple(int(m) for m in FLAGS.mips)
  except ValueError:
    raise InputError("--channels and --mips must be comma-separated integers") from None
  if any(m < 0 for m in mips):
    raise InputError(f"--mips must be >= 0, got {mips}")
  cfg = train_detector.DetectorTrainConfig()
  synth = dataclasses.replace(cfg.synth, mips=mips, patch=FLAGS.patch)
  if FLAGS.crack_width is not None:
    try:
      lo, hi = (float(v) for v in FLAGS.crack_width)
    except ValueError:
      raise InputError(f"--crack_width must be MIN,MAX in px, got {FLAGS.crack_width}") from None
    if not 0 < lo <= hi:
      raise InputError(f"--crack_width must satisfy 0 < MIN <= MAX, got {lo}, {hi}")
    synth = dataclasses.replace(synth, crack_width=(lo, hi))
  if FLAGS.crack_bright_probability is not None:
    if not 0 <= FLAGS.crack_bright_probability <= 1:
      raise InputError(f"--crack_bright_probability must lie in [0, 1], got {FLAGS.crack_bright_probability}")
    synth = dataclasses.replace(synth, crack_bright_probability=FLAGS.crack_bright_probability)
  if FLAGS.dark_weight <= 0 or FLAGS.mined_weight <= 0 or FLAGS.mined_patches < 0 or FLAGS.warmup < 0:
    raise InputError("--dark_weight and --mined_weight must be positive, --mined_patches and --warmup >= 0")
  if FLAGS.mined_patches and not (FLAGS.mine_from or FLAGS.init_weights):
    raise InputError("--mined_patches needs a detector to mine with: --mine_from or --init_weights")
  for name in ("init_weights", "mine_from"):
    path = getattr(FLAGS, name)
    if path and not pathlib.Path(path + ".npz").is_file():
      raise InputError(f"--{name}: no weights file {path}.npz")
  hard = train_detector.HardNegativeConfig(dark_weight=FLAGS.dark_weight, mined_patches=FLAGS.mined_patches,
                                           mined_candidates=FLAGS.mined_candidates,
                                           mined_weight=FLAGS.mined_weight, mine_from=FLAGS.mine_from)
  cfg = dataclasses.replace(
    cfg, detector=detector.DetectorConfig(channels=channels), stacks=_parse_stacks(FLAGS.stacks),
    synth=synth, steps=FLAGS.steps, batch=FLAGS.batch, warmup=FLAGS.warmup,
    learning_rate=FLAGS.learning_rate, checkpoint_every=FLAGS.checkpoint_every, seed=FLAGS.seed,
    init_weights=FLAGS.init_weights, hard_negatives=hard)
  root = pathlib.Path(FLAGS.data) if FLAGS.data else train_detector.DEFAULT_DATA_ROOT
  if not root.is_dir():
    raise InputError(f"data folder {root} does not exist (set --data)")
  res = train_detector.train(cfg, FLAGS.workdir, root=root, progress=FLAGS.progress)
  if FLAGS.export:
    dst = pathlib.Path(FLAGS.export)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".npz", ".json"):
      tmp = dst.with_name(dst.name + ".tmp" + suffix)
      shutil.copyfile(res.weights_path.with_suffix(suffix), tmp)
      tmp.replace(dst.with_suffix(suffix))
  logging.info("detector trained to step %d: %s", res.step, res.weights_path)
  print(f"step {res.step}  weights {res.weights_path}" + (f"  exported {FLAGS.export}" if FLAGS.export else ""))
  return 0
