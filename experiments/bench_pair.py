"""Pair alignment benchmark: accuracy on ground-truth cases, speed vs block matching and metroem, real fold.

  python experiments/bench_pair.py --mode=accuracy --num=4      # EPE tables (jaxalign.bench.evaluation cases)
  python experiments/bench_pair.py --mode=speed                  # 512² / 1024² timings (+ metroem peer)
  python experiments/bench_pair.py --mode=fold                   # damaged_pair_dolw7 before/after + CPC
  python experiments/bench_pair.py --mode=heldout                # neighbour target on distortion seeds 3, 7

Writes markdown fragments to --out_dir (default docs/benchmarks/pair_*.md) and PNGs for the fold.
Machine for the committed figures: 2-core CPU VM shared with other jobs, no GPU.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import numpy as np
from absl import app, flags, logging

import jax
import jax.numpy as jnp

from jaxalign.bench import evaluation
from jaxalign.ops import fields, metrics
from jaxalign.align.blockmatch import block_match
from jaxalign.align.pair import PairConfig, align_pair

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "accuracy", ["accuracy", "speed", "fold", "heldout", "all"], "what to run")
flags.DEFINE_list("heldout_seeds", ["3", "7"], "distortion seeds of the held-out neighbour cases (the pair "
                  "aligner's defaults were chosen on seed 0)")
flags.DEFINE_integer("num", 4, "sections per same-section accuracy case (pairs = num - 1, anchor excluded)")
flags.DEFINE_integer("neighbour_num", 32, "FIB-SEM sections (every 4th slice) in the neighbour case: 32 = all "
                     "31 neighbour pairs of the stack")
flags.DEFINE_integer("repeats", 2, "timed calls per method after the first (compile) call")
flags.DEFINE_bool("metroem", True, "also run the metroem finetuner peer (../shared/peers) in speed mode")
flags.DEFINE_enum("speed_data", "shared", ["shared", "synthetic"],
                  "speed: ISBI 512² and Gerhard 1024² from ../shared/data (shared) or synthetic EM "
                  "(jaxalign.bench.synthetic; for machines without the data, e.g. experiments/device_check.sh)")
flags.DEFINE_list("speed_sizes", ["512", "1024", "2048"], "speed: section sizes with --speed_data=synthetic")
flags.DEFINE_string("out_dir", "docs/benchmarks", "where markdown / PNG outputs go")

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"


def finetuner(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  return align_pair(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects, init_field=init_field)


_UNMASKED = PairConfig(mask_elastic_at_defects=False)


def finetuner_unmasked(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  return align_pair(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects, init_field=init_field,
                    config=_UNMASKED)


_NO_REFINE = PairConfig(tear_refine_iterations=0)


def finetuner_no_refine(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  return align_pair(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects, init_field=init_field,
                    config=_NO_REFINE)


_NO_MEDIAN = PairConfig(median_sizes=(1,))


def finetuner_no_median(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  return align_pair(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects, init_field=init_field,
                    config=_NO_MEDIAN)


_BM_INIT = PairConfig(init="blockmatch")


def finetuner_bm_init(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  return align_pair(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects, init_field=init_field,
                    config=_BM_INIT)


def blockmatch(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  return block_match(src, tgt, init_field=init_field, src_defects=src_defects, tgt_defects=tgt_defects)


METHODS = (("finetuner", finetuner), ("finetuner, no median filter", finetuner_no_median),
           ("finetuner, no tear refinement", finetuner_no_refine),
           ("finetuner, elastic not masked", finetuner_unmasked),
           ("finetuner, init=blockmatch", finetuner_bm_init),
           ("block matching", blockmatch), ("identity", evaluation.identity_aligner))


def run_accuracy(out: pathlib.Path):
  cases = [evaluation.shared_case("same", "isbi2012_train", num=FLAGS.num),
           evaluation.shared_case("same", "isbi2012_train", num=FLAGS.num, seed=10,
                                  config=dataclasses.replace(evaluation.DistortionConfig(), crack_probability=0.5,
                                                             fold_probability=0.5)),
           evaluation.shared_case("neighbour", "flyem_medulla_fibsem", num=FLAGS.neighbour_num)]
  rows = []
  for case in cases:
    for name, fn in METHODS:
      logging.info("accuracy: %s on %s/%s", name, case.kind, case.meta.get("stack"))
      rows.append(evaluation.evaluate(fn, case, name=name, progress=False))
      logging.info("%s", rows[-1])
  table = evaluation.format_table(rows)
  cmd = f"python experiments/bench_pair.py --mode=accuracy --num={FLAGS.num} --neighbour_num={FLAGS.neighbour_num}"
  (out / "pair_accuracy.md").write_text(f"Command: `{cmd}`\n\n{table}\n")
  print(table)


def run_heldout(out: pathlib.Path):
  """The neighbour case on distortion seeds the defaults were not chosen on (first 17 FIB-SEM sections)."""
  methods = (("finetuner", finetuner), ("finetuner, no median filter", finetuner_no_median),
             ("block matching", blockmatch), ("identity", evaluation.identity_aligner))
  rows = []
  for seed in FLAGS.heldout_seeds:
    case = evaluation.shared_case("neighbour", "flyem_medulla_fibsem", num=17, seed=int(seed))
    for name, fn in methods:
      logging.info("held-out: %s, seed %s", name, seed)
      rows.append(evaluation.evaluate(fn, case, name=f"{name} (seed {seed})", progress=False))
  table = evaluation.format_table(rows)
  cmd = f"python experiments/bench_pair.py --mode=heldout --heldout_seeds={','.join(FLAGS.heldout_seeds)}"
  (out / "pair_heldout.md").write_text(f"Command: `{cmd}`\n\n{table}\n")
  print(table)


def _timed(fn, *args, repeats, **kw):
  t = time.perf_counter()
  f = np.asarray(fn(*args, **kw))
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f = np.asarray(fn(*args, **kw))
    times.append(time.perf_counter() - t)
  return f, first, float(np.median(times))


def run_speed(out: pathlib.Path):
  lines = ["| size | method | first call (s, incl. compile) | per pair (s) | EPE median | EPE p95 |", "|---|---|---|---|---|---|"]
  no_discontinuities = dataclasses.replace(evaluation.DistortionConfig(), crack_probability=0.0,
                                           fold_probability=0.0, blob_probability=0.0)
  if FLAGS.speed_data == "shared":
    sources = [(size, lambda stack=stack: evaluation.shared_case("same", stack, num=2, config=no_discontinuities))
               for stack, size in (("isbi2012_train", 512), ("gerhard_vnc_stack1", 1024))]
  else:
    from jaxalign.bench.synthetic import SyntheticConfig, make_stack  # noqa: PLC0415
    sources = [(size, lambda size=size: evaluation.make_case(
        "same", make_stack(SyntheticConfig(sections=2, size=size), progress=False).images,
        config=no_discontinuities, meta=dict(stack=f"synthetic {size}")))
               for size in (int(s) for s in FLAGS.speed_sizes)]
  for size, make in sources:
    case = make()
    src, tgt, gt, valid = case.src[0], case.tgt[0], case.gt[0], case.valid[0]

    def epe(f):
      e = evaluation.endpoint_errors(f, gt)[valid]
      return float(np.median(e)), float(np.percentile(e, 95))

    for name, fn in (("jaxalign finetuner (align_pair)", finetuner), ("jaxalign block matching", blockmatch)):
      f, first, per = _timed(fn, src, tgt, repeats=FLAGS.repeats)
      m, p = epe(f)
      lines.append(f"| {size}² | {name} | {first:.1f} | {per:.2f} | {m:.3f} | {p:.3f} |")
      logging.info(lines[-1])
    if FLAGS.metroem:
      sys.path.insert(0, str(PEERS))
      import peers  # noqa: PLC0415 - optional peer, only here
      res = peers.call_peer("finetune", src=src, tgt=tgt, num_iter=100)
      m, p = epe(np.asarray(res["field"]))
      lines.append(f"| {size}² | metroem finetuner (100 it, peer) | | {float(res['elapsed_s']):.2f} | {m:.3f} | {p:.3f} |")
      logging.info(lines[-1])
  cmd = f"python experiments/bench_pair.py --mode=speed --repeats={FLAGS.repeats}"
  if FLAGS.speed_data == "synthetic":
    cmd += f" --speed_data=synthetic --speed_sizes={','.join(FLAGS.speed_sizes)}"
  device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
  (out / f"pair_speed{'' if FLAGS.speed_data == 'shared' else '_synthetic'}.md").write_text(
      f"Command: `{cmd}`\n\nDevice: {device}\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))


def run_fold(out: pathlib.Path):
  from PIL import Image  # noqa: PLC0415
  d = evaluation.em_data_dir() / "damaged_pair_dolw7"
  tgt = np.asarray(Image.open(d / "000.png"), np.float32) / 255.0
  src = np.asarray(Image.open(d / "001.png"), np.float32) / 255.0
  fold = np.asarray(Image.open(d / "mask_001.png")) > 127
  rows = ["| field | median CPC (all chunks) | low-CPC fraction | median CPC within 64 px of the fold |",
          "|---|---|---|---|"]
  from scipy import ndimage  # noqa: PLC0415
  near_fold = ndimage.binary_dilation(fold, iterations=64)
  chunk = 50
  near_chunks = near_fold.reshape(1000 // chunk, chunk, 1000 // chunk, chunk).mean(axis=(1, 3)) > 0.2
  results = {}
  # 50 nm sections at ~50 nm/px: one pixel thick, so the default median stage is off (PairConfig).
  xy, z = evaluation.STACK_RESOLUTION["damaged_pair_dolw7"]
  res = (z, xy, xy)
  default = PairConfig(resolution_nm=res)
  for name, f in (("identity", np.zeros(src.shape + (2,), np.float32)),
                  ("finetuner", np.asarray(align_pair(src, tgt, src_defects=fold, config=default))),
                  ("finetuner, elastic not masked",
                   np.asarray(align_pair(src, tgt, src_defects=fold,
                                         config=dataclasses.replace(default, mask_elastic_at_defects=False)))),
                  ("finetuner, median stage forced on (resolution not given)",
                   np.asarray(align_pair(src, tgt, src_defects=fold))),
                  ("block matching", np.asarray(block_match(src, tgt, src_defects=fold)))):
    warped = np.asarray(fields.warp(jnp.asarray(np.where(fold, 0, src)), jnp.asarray(f)))
    c = np.asarray(metrics.cpc(jnp.asarray(warped), jnp.asarray(tgt), chunk=chunk))
    results[name] = warped
    rows.append(f"| {name} | {np.nanmedian(c):.3f} | {metrics.low_cpc_fraction(c):.4f} | "
                f"{np.nanmedian(c[near_chunks]):.3f} |")
    logging.info(rows[-1])
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  ys, xs = np.nonzero(fold)
  cy, cx = int(np.median(ys)), int(np.median(xs))
  win = (slice(max(cy - 150, 0), cy + 150), slice(max(cx - 150, 0), cx + 150))
  for name, key in (("before", "identity"), ("after", "finetuner")):
    rgb = np.stack([results[key][win], tgt[win], results[key][win]], -1)
    plt.figure(figsize=(6, 6))
    plt.imshow(np.clip(rgb, 0, 1))
    plt.title(f"damaged_pair_dolw7 {name}: magenta = section 001 warped, green = 000")
    plt.axis("off")
    plt.savefig(out / f"pair_fold_{name}.png", dpi=80, bbox_inches="tight")
    plt.close()
  text = ("Command: `python experiments/bench_pair.py --mode=fold`; CPC with "
          f"{chunk}² chunks at full resolution (~50 nm/px); `PairConfig(resolution_nm={res})`.\n\n"
          + "\n".join(rows) + "\n")
  (out / "pair_fold.md").write_text(text)
  print(text)


def main(argv):
  del argv
  # The command line's XLA settings, so timings are what a user of `jaxalign align` gets.
  from jaxalign import compile_cache
  compile_cache.quick_cpu_compile()
  out = ROOT / FLAGS.out_dir
  out.mkdir(parents=True, exist_ok=True)
  logging.info("jax devices: %s", jax.devices())
  if FLAGS.mode in ("fold", "all"):
    run_fold(out)
  if FLAGS.mode in ("speed", "all"):
    run_speed(out)
  if FLAGS.mode in ("accuracy", "all"):
    run_accuracy(out)
  if FLAGS.mode in ("heldout", "all"):
    run_heldout(out)


if __name__ == "__main__":
  app.run(main)
