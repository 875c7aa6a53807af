"""Pretrained SEAMLeSS pyramid vs finetuner-on-raw-images vs block matching on held-out GT pairs.

Cases are built with the team's ground-truth generator (`jaxalign.bench.groundtruth` via
`jaxalign.bench.evaluation.make_case`) from sections that the shipped weights never saw in training (the
last sections of each stack, see jaxalign/models/weights/README.md), with knife-chatter stripes on
consecutive sections, missing blobs, folds and cracks switched on. Also writes a PNG of a striped
section next to its encoding, and measures training steps/s of the default level on this machine.

  python experiments/bench_models.py --out=docs/benchmarks/models.md --png=docs/benchmarks/models_stripes.png
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "weights path prefix (default: the shipped jaxalign/models/weights/default)")
flags.DEFINE_integer("crop", 384, "centre crop of the sections, px")
flags.DEFINE_list("methods", ["pyramid+finetuner", "pyramid", "finetuner", "blockmatch"], "methods to compare")
flags.DEFINE_string("out", None, "write the markdown table here (also printed)")
flags.DEFINE_string("json_out", None, "append the rows as JSON lines here")
flags.DEFINE_string("png", None, "write the image-vs-encoding figure here")
flags.DEFINE_integer("speed_steps", 10, "train steps timed for steps/s (0 = skip)")
flags.DEFINE_integer("seed", 1, "distortion seed")

# Held-out sections (the last 3 of each training stack; flyem is taken every 4th slice).
CASES = (
    ("same", "isbi2012_train", dict(start=27, num=3, step=1)),
    ("neighbour", "flyem_medulla_fibsem", dict(start=116, num=3, step=4)),
    ("same", "gerhard_vnc_stack1", dict(start=17, num=3, step=1)),
)


def artifact_config(seed: int):
  from jaxalign.bench.groundtruth import DistortionConfig
  # Artifacts on every section so each pair exercises them; the default smooth/affine distortions.
  return DistortionConfig(seed=seed, undistorted=(), chatter_probability=1.0, blob_probability=1.0,
                          fold_probability=0.6, crack_probability=0.3, blank_probability=0.0)


def methods(pyr):
  import jaxalign as ja
  from jaxalign.align import blockmatch
  out = {
      "pyramid+finetuner": lambda s, t, **kw: ja.align_pair(s, t, model=pyr, **kw),
      "pyramid": lambda s, t, **kw: ja.align_pair(s, t, model=lambda *a, **k: pyr(*a, use_finetuner=False, **k), **kw),
      "finetuner": lambda s, t, **kw: ja.align_pair(s, t, **kw),
      "blockmatch": lambda s, t, **kw: blockmatch.block_match(s, t, **kw),
  }
  return {k: out[k] for k in FLAGS.methods}


def stripes_figure(pyr, path: pathlib.Path) -> None:
  """Image vs encoding (first 3 channels as RGB) for a held-out section with knife-chatter stripes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from jaxalign.bench import evaluation as ev
  from jaxalign.bench.groundtruth import distort_stack
  stack = ev.load_stack("isbi2012_train", start=28, num=2, crop=FLAGS.crop)
  cfg = dataclasses.replace(artifact_config(FLAGS.seed), blob_probability=0.0, fold_probability=0.0,
                            crack_probability=0.0, chatter_amplitude=0.3)
  d = distort_stack(stack, cfg, progress=False)
  img = d.images[1]
  fig, axes = plt.subplots(1, 1 + len(pyr.levels), figsize=(4 * (1 + len(pyr.levels)), 4))
  axes[0].imshow(img, cmap="gray")
  axes[0].set_title("section with knife-chatter stripes")
  for i, lv in enumerate(pyr.levels):
    enc = np.asarray(pyr.encode(img, level=i))
    rgb = enc[..., :3]
    lo, hi = np.percentile(rgb, 1), np.percentile(rgb, 99)
    axes[1 + i].imshow(np.clip((rgb - lo) / (hi - lo + 1e-9), 0, 1))
    axes[1 + i].set_title(f"encoding, level mip {lv.cfg.mip} (ch 0-2)")
  for a in axes:
    a.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  logging.info("wrote %s", path)


def train_speed(steps: int) -> dict:
  """Steady-state steps/s of one default level (crop 128, batch 4) on this machine, per stage."""
  from flax import nnx
  from jaxalign.models import seamless, train_data, train_pyramid
  from jaxalign.bench import evaluation as ev
  cfg = train_data.TrainConfig(batch_size=4)
  secs = ev.load_stack("isbi2012_train", num=3, crop=256)
  ps = train_data.make_pairs(secs, jax.random.PRNGKey(0), cfg.augment, multiple=32)
  data = train_pyramid.level_data(ps, 0, None)
  level = seamless.Level(seamless.LevelConfig(mip=0), rngs=nnx.Rngs(0))
  out = {}
  for stage in (1, 2):
    ts = train_pyramid.TrainStep(level, train_pyramid.make_optimizer(level, cfg, 100), cfg, 0, stage)
    rng = np.random.default_rng(0)
    jax.block_until_ready(ts(train_pyramid.sample_batch(rng, [data], cfg.batch_size, cfg.crop), jax.random.PRNGKey(0)))
    t0 = time.perf_counter()
    for i in range(steps):
      m = ts(train_pyramid.sample_batch(rng, [data], cfg.batch_size, cfg.crop), jax.random.PRNGKey(i))
    jax.block_until_ready(m)
    out[f"stage{stage}_steps_per_s"] = steps / (time.perf_counter() - t0)
  return out


def main(argv):
  del argv
  from jaxalign.bench import evaluation as ev
  from jaxalign.models import seamless
  pyr = seamless.load_weights(FLAGS.weights) if FLAGS.weights else seamless.pretrained()
  rows = []
  for kind, stack_name, sel in CASES:
    stack = ev.load_stack(stack_name, crop=FLAGS.crop, **sel)
    case = ev.make_case(kind, stack, config=artifact_config(FLAGS.seed), meta=dict(stack=stack_name, **sel))
    for name, fn in methods(pyr).items():
      row = ev.evaluate(fn, case, name=name, progress=False)
      row["stack"] = stack_name
      rows.append(row)
      logging.info("%s", json.dumps(row))
      if FLAGS.json_out:
        with open(FLAGS.json_out, "a") as fh:
          fh.write(json.dumps(row) + "\n")
  table = ev.format_table(rows)
  print(table)
  speed = train_speed(FLAGS.speed_steps) if FLAGS.speed_steps else {}
  print(json.dumps(speed))
  if FLAGS.png:
    stripes_figure(pyr, pathlib.Path(FLAGS.png))
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(table + "\n\n" + json.dumps(speed) + "\n")


if __name__ == "__main__":
  app.run(main)
