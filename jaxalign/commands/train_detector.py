"""`jaxalign train-detector`: train the crack / fold / tissue UNet on generated labels.

Example (the shipped weights; see jaxalign/weights/detector/README.md)::

  jaxalign train-detector --workdir=runs/detector --steps=800 \
      --export=jaxalign/weights/detector/detector

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


def _parse_stacks(items):
  from jaxalign.train_detector import StackSpec
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
  from jaxalign import detector, train_detector
  try:
    channels = tuple(int(c) for c in FLAGS.channels)
    mips = tuple(int(m) for m in FLAGS.mips)
  except ValueError:
    raise InputError("--channels and --mips must be comma-separated integers") from None
  if any(m < 0 for m in mips):
    raise InputError(f"--mips must be >= 0, got {mips}")
  cfg = train_detector.DetectorTrainConfig()
  cfg = dataclasses.replace(
    cfg, detector=detector.DetectorConfig(channels=channels), stacks=_parse_stacks(FLAGS.stacks),
    synth=dataclasses.replace(cfg.synth, mips=mips, patch=FLAGS.patch), steps=FLAGS.steps, batch=FLAGS.batch,
    learning_rate=FLAGS.learning_rate, checkpoint_every=FLAGS.checkpoint_every, seed=FLAGS.seed)
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
