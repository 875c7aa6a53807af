"""Evidence for block/stack alignment (issue 6 §4) on ground-truth stacks from ../shared/data/em.

Two experiments, both on sections distorted with known fields by `jaxalign.groundtruth`:

* ``defects``: a short stack (FIB-SEM every 4th slice = 40 nm sections, or ssTEM) with one blank
  section and strong stripes (knife chatter, *not* given to the aligner as a mask) in two consecutive
  sections. Per-section endpoint error (EPE) against the ground truth with voting distance 3 vs 1
  (plain sequential alignment), plotted.
* ``abcd``: >= 100 sections (the FIB-SEM every-4th sequence played forward and backward), aligned
  as one block and with `align_stack` in blocks (blocks' starter sections are left undistorted, as
  in a coarsely pre-aligned stack whose starters define the frame). Per-section EPE of both (drift),
  the difference of the two runs away from block interfaces, a seam measure at interfaces, and the
  low-CPC fraction of the aligned stack next to the undistorted original's.

The pair aligner is `jaxalign.blockmatch.block_match` (fast on CPU) or `jaxalign.pair.align_pair`.

  python experiments/eval_stack.py --experiment=defects --stack=flyem_medulla_fibsem --crop=192
  python experiments/eval_stack.py --experiment=defects --stack=isbi2012_train --crop=192 --num=24
  python experiments/eval_stack.py --experiment=abcd --crop=128 --num=100 --block_size=20
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import app, flags, logging

from jaxalign.block import BlockConfig, align_block
from jaxalign.evaluation import em_data_dir, load_stack
from jaxalign.groundtruth import DistortionConfig, distort_stack
from jaxalign.metrics import cpc
from jaxalign.render import render
from jaxalign.stack import StackConfig, align_stack, choose_starters, plan_blocks

FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", "defects", ["defects", "abcd"], "which experiment")
flags.DEFINE_string("stack", "flyem_medulla_fibsem", "shared stack name (../shared/data/em/<name>)")
flags.DEFINE_integer("step", None, "slice step (default 4 for FIB-SEM: 40 nm sections, else 1)")
flags.DEFINE_integer("crop", 192, "centre crop (px)")
flags.DEFINE_integer("num", 24, "number of sections")
flags.DEFINE_integer("seed", 0, "distortion seed")
flags.DEFINE_float("elastic", 6.0, "elastic distortion amplitude (px)")
flags.DEFINE_float("translation", 3.0, "max translation of the distortion (px)")
flags.DEFINE_bool("discontinuities", False, "also draw random cracks, folds and missing blobs")
flags.DEFINE_integer("blank", 8, "defects: index of the blank section")
flags.DEFINE_integer("stripes", 14, "defects: first of the two striped sections")
flags.DEFINE_float("stripe_amplitude", 1.0, "defects: relative stripe modulation")
flags.DEFINE_float("stripe_period", 6.0, "defects: stripe period (px)")
flags.DEFINE_integer("block_size", 20, "abcd: block size")
flags.DEFINE_integer("overlap", 3, "abcd: overlap")
flags.DEFINE_float("decay_distance", 100.0, "abcd: decay distance (sections)")
flags.DEFINE_integer("voting_distance", 3, "abcd: voting distance")
flags.DEFINE_enum("aligner", "blockmatch", ["blockmatch", "pair"], "pair aligner")
flags.DEFINE_integer("cpc_chunk", 32, "CPC chunk (px)")
flags.DEFINE_string("out_dir", "docs/benchmarks", "where PNG/JSON results go")

# Sections within this distance of a block interface count as "near" it.
INTERFACE_MARGIN = 3


def _aligner():
  """Batched protocol around a one-pair aligner (the benchmark runs pairs one by one on CPU)."""
  if FLAGS.aligner == "blockmatch":
    from jaxalign.blockmatch import BlockMatchConfig, block_match
    # Large, smooth patches: the distortions are smooth, and small patches follow the tissue's own
    # section-to-section change (which the ground truth counts as error) more.
    cfg = BlockMatchConfig(levels=(2, 1, 0), patch=64, stride=32, smooth=1.0)

    def one(s, t, sd, td, init):
      return block_match(s, t, init_field=init, src_defects=sd, tgt_defects=td, config=cfg)
  else:
    from jaxalign.pair import align_pair

    def one(s, t, sd, td, init):
      return align_pair(s, t, src_defects=sd, tgt_defects=td, init_field=init)

  def aligner(srcs, tgts, *, src_defects=None, tgt_defects=None, init_fields=None):
    b = len(srcs)
    out = []
    for i in range(b):
      out.append(np.asarray(one(np.asarray(srcs[i]), np.asarray(tgts[i]),
                                None if src_defects is None else np.asarray(src_defects[i]),
                                None if tgt_defects is None else np.asarray(tgt_defects[i]),
                                None if init_fields is None else np.asarray(init_fields[i]))))
    return np.stack(out)
  return aligner


def _load(num: int) -> np.ndarray:
  step = FLAGS.step or (4 if FLAGS.stack == "flyem_medulla_fibsem" else 1)
  available = len(list((em_data_dir() / FLAGS.stack).glob("[0-9]*.png")))
  unique = min(num, (available - 1) // step + 1)
  base = load_stack(FLAGS.stack, num=unique, step=step, crop=FLAGS.crop)
  if unique >= num:
    return base
  # Ping-pong through the sequence so neighbouring sections stay neighbours in the tissue.
  order = []
  fwd = list(range(unique)) + list(range(unique - 2, 0, -1))
  while len(order) < num:
    order.extend(fwd)
  logging.info("%s: %d unique sections, played forward/backward to %d", FLAGS.stack, unique, num)
  return base[np.array(order[:num])]


def _distortion(undistorted=(0,)) -> DistortionConfig:
  # Random blanks/chatter off: the defects experiment places them deterministically.
  return DistortionConfig(seed=FLAGS.seed, undistorted=tuple(int(u) for u in undistorted),
                          elastic_amplitude=FLAGS.elastic, max_translation=FLAGS.translation,
                          blank_probability=0.0, chatter_probability=0.0,
                          **({} if FLAGS.discontinuities else
                             dict(crack_probability=0.0, fold_probability=0.0, blob_probability=0.0)))


def _section_epe(pred, d) -> np.ndarray:
  """`[Z]` median EPE (px) over each section's valid pixels (NaN where none)."""
  err = np.linalg.norm(np.asarray(pred) - d.fields, axis=-1)
  out = np.full(err.shape[0], np.nan)
  for z in range(err.shape[0]):
    v = d.valid[z] & d.tissue[z] if d.tissue[z].shape == d.valid[z].shape else d.valid[z]
    if v.any():
      out[z] = float(np.median(err[z][v]))
  return out


def _low_cpc(stack, threshold=0.25) -> tuple[float, int]:
  """Fraction of scored chunks with CPC < threshold over consecutive section pairs, and the count."""
  vals = []
  for z in range(1, stack.shape[0]):
    c = np.asarray(cpc(stack[z - 1], stack[z], chunk=FLAGS.cpc_chunk))
    vals.append(c[~np.isnan(c)])
  vals = np.concatenate(vals)
  return float(np.mean(vals < threshold)), int(vals.size)


def _plot(path, curves: dict, title: str, marks: dict | None = None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 3.5))
  for label, y in curves.items():
    ax.plot(np.arange(len(y)), y, marker=".", label=label)
  for label, xs in (marks or {}).items():
    for i, x in enumerate(xs):
      ax.axvline(x, color="grey", ls=":", lw=1, label=label if i == 0 else None)
  ax.set_xlabel("section")
  ax.set_ylabel("median EPE (px)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_defects(out_dir: pathlib.Path) -> dict:
  original = _load(FLAGS.num)
  d = distort_stack(original, _distortion(), progress=False)
  images = d.images.copy()
  z_count, h, w = images.shape
  images[FLAGS.blank] = 0.0
  yy, xx = np.mgrid[:h, :w]
  stripes = 1.0 + FLAGS.stripe_amplitude * np.sin(2 * np.pi * (0.8 * xx + 0.6 * yy) / FLAGS.stripe_period)
  for z in (FLAGS.stripes, FLAGS.stripes + 1):
    images[z] = np.where(images[z] != 0, np.clip(images[z] * stripes, 1e-3, None), 0.0).astype(np.float32)
  defects = d.defects.copy()
  defects[FLAGS.blank] = False
  cfg = BlockConfig(aligner=_aligner())
  res = {}
  for label, imgs in (("clean", d.images), ("defects", images)):
    for n in (1, 3):
      t0 = time.time()
      fields = align_block(imgs, voting_distance=n, defects=defects if label == "defects" else d.defects,
                           config=cfg, progress=True)
      epe = _section_epe(fields, d)
      epe[FLAGS.blank] = np.nan
      res[label, n] = dict(epe=epe, seconds=time.time() - t0)
      logging.info("%s n=%d: %.1f s, per-section EPE %s", label, n, time.time() - t0, np.round(epe, 2))
  # Sequential alignment of real sections drifts (the tissue itself changes between sections, and
  # the ground truth counts following it as error), so the defects' own effect is the excess EPE
  # over the same run on the defect-free stack.
  before = slice(1, FLAGS.blank)
  after = slice(FLAGS.stripes + 2, z_count)
  summary = {}
  excess = {}
  for n in (1, 3):
    e, c = res["defects", n]["epe"], res["clean", n]["epe"]
    excess[n] = e - c
    summary[n] = dict(epe_before=float(np.nanmedian(e[before])), epe_after=float(np.nanmedian(e[after])),
                      clean_epe_after=float(np.nanmedian(c[after])),
                      excess_after_median=float(np.nanmedian(excess[n][after])),
                      excess_after_max=float(np.nanmax(excess[n][after])),
                      excess_at_stripes=float(np.nanmax(excess[n][FLAGS.stripes:FLAGS.stripes + 2])),
                      seconds=res["defects", n]["seconds"])
  name = f"stack_defects_{FLAGS.stack}"
  marks = {"defect": [FLAGS.blank, FLAGS.stripes, FLAGS.stripes + 1]}
  title = f"{FLAGS.stack} {FLAGS.crop}px: blank {FLAGS.blank}, stripes {FLAGS.stripes}-{FLAGS.stripes + 1}"
  _plot(out_dir / f"{name}.png",
        {**{f"n={n}, defects": res["defects", n]["epe"] for n in (3, 1)},
         **{f"n={n}, defect-free": res["clean", n]["epe"] for n in (3, 1)}}, title, marks)
  _plot(out_dir / f"{name}_excess.png", {f"voting distance {n}": excess[n] for n in (3, 1)},
        title + " (EPE minus defect-free run)", marks)
  return dict(experiment="defects", stack=FLAGS.stack, crop=FLAGS.crop, num=z_count, summary=summary,
              per_section={f"{k[0]}_n{k[1]}": v["epe"].tolist() for k, v in res.items()},
              plot=[f"{name}.png", f"{name}_excess.png"])


def run_abcd(out_dir: pathlib.Path) -> dict:
  original = _load(FLAGS.num)
  z_count = original.shape[0]
  choices = choose_starters(np.ones(z_count), block_size=FLAGS.block_size, overlap=FLAGS.overlap)
  starters = [c.index for c in choices]
  plan = plan_blocks(z_count, starters, overlap=FLAGS.overlap)
  d = distort_stack(original, _distortion(undistorted=starters), progress=False)
  block_cfg = BlockConfig(aligner=_aligner())
  n = FLAGS.voting_distance
  t0 = time.time()
  single = np.asarray(align_block(d.images, voting_distance=n, defects=d.defects, config=block_cfg))
  t_single = time.time() - t0
  t0 = time.time()
  blocks = np.asarray(align_stack(d.images, block_size=FLAGS.block_size, overlap=FLAGS.overlap,
                                  voting_distance=n, decay_distance=FLAGS.decay_distance, starters=starters,
                                  defects=d.defects, config=StackConfig(block=block_cfg)))
  t_blocks = time.time() - t0
  epe_single, epe_blocks = _section_epe(single, d), _section_epe(blocks, d)
  interfaces = [plan.interface(k) for k in range(1, len(plan.blocks))]
  dist_to_iface = np.array([min([abs(z - i) for i in interfaces] + [10 ** 6]) for z in range(z_count)])
  far = dist_to_iface >= INTERFACE_MARGIN
  # Difference between the two runs, per section, over tissue that is valid in the ground truth.
  diff = np.linalg.norm(blocks - single, axis=-1)
  diff_med = np.array([np.median(diff[z][d.valid[z]]) for z in range(z_count)])
  # Seam: change of the error from one section to the next (a seam is a jump at an interface).
  err = blocks - d.fields
  jump = np.array([np.nan] + [float(np.median(np.linalg.norm(err[z] - err[z - 1], axis=-1)[d.valid[z] & d.valid[z - 1]]))
                              for z in range(1, z_count)])
  at_iface = np.isin(np.arange(z_count), interfaces)
  aligned = np.asarray(render(d.images, blocks))
  low_aligned, n_chunks = _low_cpc(aligned)
  low_original, _ = _low_cpc(original)
  # Ceiling: the distorted sections warped with the exact ground-truth fields (intensity changes,
  # noise and interpolation remain), and the single-block run for comparison.
  low_truth, _ = _low_cpc(np.asarray(render(d.images, d.fields)))
  low_single, _ = _low_cpc(np.asarray(render(d.images, single)))
  q = max(5, z_count // 4)
  summary = dict(
      blocks=len(plan.blocks), starters=starters, interfaces=interfaces,
      seconds_single=t_single, seconds_blocks=t_blocks,
      epe_single_first_quarter=float(np.nanmedian(epe_single[1:q])),
      epe_single_last_quarter=float(np.nanmedian(epe_single[-q:])),
      epe_blocks_first_quarter=float(np.nanmedian(epe_blocks[1:q])),
      epe_blocks_last_quarter=float(np.nanmedian(epe_blocks[-q:])),
      epe_blocks_max=float(np.nanmax(epe_blocks)), epe_single_max=float(np.nanmax(epe_single)),
      epe_slope_blocks_px_per_100=float(np.polyfit(np.arange(1, z_count), epe_blocks[1:], 1)[0] * 100),
      epe_slope_single_px_per_100=float(np.polyfit(np.arange(1, z_count), epe_single[1:], 1)[0] * 100),
      diff_far_median=float(np.median(diff_med[far])), diff_far_max=float(np.max(diff_med[far])),
      frac_far_sections_within_0p5=float(np.mean(diff_med[far] <= 0.5)),
      diff_near_max=float(np.max(diff_med[~far])) if np.any(~far) else float("nan"),
      jump_at_interfaces_median=float(np.nanmedian(jump[at_iface])),
      jump_elsewhere_median=float(np.nanmedian(jump[~at_iface])),
      low_cpc_aligned=low_aligned, low_cpc_single_block=low_single, low_cpc_ground_truth_fields=low_truth,
      low_cpc_original=low_original, cpc_chunks=n_chunks)
  name = f"stack_abcd_{FLAGS.stack}"
  _plot(out_dir / f"{name}.png", {"single block": epe_single, f"blocks of {FLAGS.block_size}": epe_blocks},
        f"{FLAGS.stack} {FLAGS.crop}px, {z_count} sections, n={n}, decay {FLAGS.decay_distance:g}",
        {"block interface": interfaces})
  return dict(experiment="abcd", stack=FLAGS.stack, crop=FLAGS.crop, num=z_count, summary=summary,
              per_section=dict(single=epe_single.tolist(), blocks=epe_blocks.tolist(), diff=diff_med.tolist(),
                               jump=jump.tolist()), plot=f"{name}.png")


def main(argv):
  del argv
  out_dir = pathlib.Path(FLAGS.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  result = run_defects(out_dir) if FLAGS.experiment == "defects" else run_abcd(out_dir)
  result["flags"] = {k: FLAGS[k].value for k in ("aligner", "stack", "step", "seed", "elastic", "translation", "crop",
                                                  "num", "discontinuities", "blank", "stripes", "stripe_amplitude",
                                                  "stripe_period", "block_size", "overlap", "decay_distance",
                                                  "voting_distance", "cpc_chunk")}
  path = out_dir / f"stack_{result['experiment']}_{FLAGS.stack}.json"
  path.write_text(json.dumps(result, indent=1, default=float))
  print(json.dumps(result["summary"], indent=1, default=float))


if __name__ == "__main__":
  app.run(main)
