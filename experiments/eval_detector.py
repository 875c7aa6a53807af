"""Accuracy of the defect / tissue detector and its effect on alignment near defects.

  python experiments/eval_detector.py [--weights=PATH] [--json=/tmp/eval_detector.json]
  python experiments/eval_detector.py --parts=epe --mask_threshold=0.9 --fold_opening=3
  python experiments/eval_detector.py --parts=epe --oracles

Prints markdown tables (pasted into docs/benchmarks/detector.md):

1. Held-out generated sections (the last sections of each training stack, never trained on):
   a. 128 px patches with the training appearance (`train_detector.synthesize`, held-out seeds);
   b. whole held-out sections at MIP 1 with the ground-truth generator's *own* look (folds 0.35x
      dark, cracks empty, no resin / edge lines / gamma), detected chunk-wise by `detector.detect`.
   Pooled pixel precision / recall / IoU per class at probability 0.5.
2. The real DOLW7 fold (`damaged_pair_dolw7/001.png` + `mask_001.png`, ~50 nm/px; never trained
   on) at MIP 0, 1, 2 (mask max-pooled), raw and with the fold opening / threshold of `MaskConfig`.
3. Alignment EPE near defects: held-out sections at MIP 1 with one crack and one fold each
   (generator), `align_pair(distorted, original)` with src_defects = none / detected / true;
   EPE (px) on valid pixels, all and within 16 px of a discontinuity.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from jaxalign.models import detector
from jaxalign.ops import fields
from jaxalign.bench import groundtruth
from jaxalign.models import train_detector as td

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "detector weights (path without suffix); default: shipped")
flags.DEFINE_string("data", str(td.DEFAULT_DATA_ROOT), "shared EM data folder")
flags.DEFINE_string("json", None, "also write all numbers as JSON here")
flags.DEFINE_list("parts", ["heldout", "dolw7", "epe"], "which parts to run: heldout, dolw7, epe")
flags.DEFINE_float("mask_threshold", 0.5, "EPE part: MaskConfig.defect_threshold of the detected masks")
flags.DEFINE_integer("fold_opening", 0, "EPE part: MaskConfig.fold_opening of the detected masks (px)")
flags.DEFINE_integer("dilation", 2, "EPE part: MaskConfig.dilation of the detected masks (px)")
flags.DEFINE_integer("epe_crop", 256, "centre crop (px at MIP 1) of the EPE sections")
flags.DEFINE_float("near", 16.0, "'near a defect' = within this many px of a crack line / folded strip")
flags.DEFINE_boolean("oracles", False, "EPE part: also align with detected masks corrected by the truth "
                     "(false positives removed / misses added, all or per class) to see what costs accuracy")

THRESHOLD = 0.5
# Oracle variants of the EPE part (--oracles), in table order.
ORACLES = ("detected, false positives removed (∩ true grown by the dilation)", "detected ∪ true (misses added)",
           "detected ∪ true cracks", "detected ∪ true folds")


def _scores_row(name, scores):
  return f"| {name} | " + " | ".join(f"{scores[c]['precision']:.3f} / {scores[c]['recall']:.3f} / {scores[c]['iou']:.3f}"
                                     for c in detector.CLASSES) + " |"


def _pool(parts):
  out = {}
  for c in detector.CLASSES:
    tp = sum(p[c]["tp"] for p in parts)
    fp = sum(p[c]["fp"] for p in parts)
    fn = sum(p[c]["fn"] for p in parts)
    out[c] = dict(precision=tp / max(tp + fp, 1), recall=tp / max(tp + fn, 1), iou=tp / max(tp + fp + fn, 1),
                  tp=tp, fp=fp, fn=fn)
  return out


def _to_mip(x, mip, reduce="mean"):
  x = jnp.asarray(x, jnp.float32)
  for _ in range(mip):
    x = fields.downsample_image(x[..., :x.shape[-2] // 2 * 2, :x.shape[-1] // 2 * 2], reduce=reduce)
  return np.asarray(x)


def _generator_config(seed):
  return groundtruth.DistortionConfig(seed=seed, undistorted=(), crack_probability=1.0, fold_probability=1.0,
                                      blob_probability=0.0, blank_probability=0.0, chatter_probability=0.0)


def heldout_generated(model, root, results):
  cfg = td.DetectorTrainConfig()
  rows, parts_a, parts_b = [], [], []
  for i, spec in enumerate(cfg.stacks):
    _, va = td.load_stack(pathlib.Path(root), spec)
    s = td.synthesize(va, cfg.synth, cfg.seed * 1000 + 500 + i)  # the held-out seeds of training
    sc = td.evaluate_set(model, s, THRESHOLD)
    parts_a.append(sc)
    rows.append(_scores_row(f"{spec.name}, {len(s.images)} patches (training look)", sc))
    # whole held-out sections at MIP 1, the generator's own look, one crack + one fold each
    secs = _to_mip(va, 1)
    ds = groundtruth.distort_stack(secs, _generator_config(77 + i), progress=False)
    part = {c: dict(tp=0, fp=0, fn=0) for c in detector.CLASSES}
    for z in range(len(secs)):
      pr = detector.detect(ds.images[z], model)
      truth = {"crack": ds.crack[z], "fold": ds.fold[z], "tissue": ds.tissue[z]}
      for c in detector.CLASSES:
        r = td.pixel_scores(pr[c] > THRESHOLD, truth[c])
        for k in ("tp", "fp", "fn"):
          part[c][k] += r[k]
    sc_b = _pool([part])
    parts_b.append(sc_b)
    rows.append(_scores_row(f"{spec.name}, {len(secs)} sections {secs.shape[1]}x{secs.shape[2]} (generator look)", sc_b))
  rows.append(_scores_row("**all, training look**", _pool(parts_a)))
  rows.append(_scores_row("**all, generator look**", _pool(parts_b)))
  results["heldout"] = {"training_look": _pool(parts_a), "generator_look": _pool(parts_b)}
  print("\n### Held-out generated sections (precision / recall / IoU at p > 0.5)\n")
  print("| set | crack | fold | tissue |\n|---|---|---|---|")
  print("\n".join(rows))


def dolw7(model, root, results):
  from PIL import Image
  folder = pathlib.Path(root) / "damaged_pair_dolw7"
  img = np.asarray(Image.open(folder / "001.png"), np.float32) / 255.0
  mask = np.asarray(Image.open(folder / "mask_001.png")) > 0
  print("\n### Real fold: DOLW7 section 001 (~50 nm/px at MIP 0)\n")
  print("| MIP | nm/px | size | fold P | fold R | fold IoU | crack px % | tissue px % | detect s |")
  print("|---|---|---|---|---|---|---|---|---|")
  results["dolw7"] = {}
  probs_at = {}
  for mip in (0, 1, 2):
    x = _to_mip(img, mip)
    m = _to_mip(mask, mip, "max") > 0.5
    t0 = time.perf_counter()
    pr = detector.detect(x, model)
    dt = time.perf_counter() - t0
    probs_at[mip] = (pr, m)
    s = td.pixel_scores(pr["fold"] > THRESHOLD, m)
    results["dolw7"][f"mip{mip}"] = dict(s, seconds=dt, crack_fraction=float((pr["crack"] > THRESHOLD).mean()))
    print(f"| {mip} | {50 * 2 ** mip} | {x.shape[1]}x{x.shape[0]} | {s['precision']:.3f} | {s['recall']:.3f} | "
          f"{s['iou']:.3f} | {100 * (pr['crack'] > THRESHOLD).mean():.1f} | {100 * (pr['tissue'] > 0.5).mean():.1f} | {dt:.2f} |")
  print("\nMIP 1, fold mask after `MaskConfig` post-processing (no dilation):\n")
  print("| threshold | fold_opening px | P | R | IoU |\n|---|---|---|---|---|")
  pr, m = probs_at[1]
  zeros = np.zeros_like(pr["fold"])
  results["dolw7"]["sweep"] = []
  for thr in (0.5, 0.9):
    for r in (0, 3, 6):
      got = detector.masks_for_alignment({"crack": zeros, "fold": pr["fold"]},
                                         detector.MaskConfig(defect_threshold=thr, dilation=0, fold_opening=r))
      s = td.pixel_scores(got, m)
      results["dolw7"]["sweep"].append(dict(s, threshold=thr, fold_opening=r))
      print(f"| {thr} | {r} | {s['precision']:.3f} | {s['recall']:.3f} | {s['iou']:.3f} |")


def epe_near_defects(model, root, results):
  from jaxalign.align import pair
  cfg = td.DetectorTrainConfig()
  rows = {"none": [], "detected": [], "true": []}
  near_errors = {}
  class_recall = {}
  det_scores = []
  for i, spec in enumerate(cfg.stacks):
    _, va = td.load_stack(pathlib.Path(root), spec)
    secs = _to_mip(va, 1)
    c = FLAGS.epe_crop
    h, w = secs.shape[1:]
    if h > c or w > c:
      y0, x0 = (h - c) // 2, (w - c) // 2
      secs = secs[:, y0:y0 + c, x0:x0 + c]
    ds = groundtruth.distort_stack(secs, _generator_config(900 + i), progress=False)
    for z in range(len(secs)):
      mcfg = detector.MaskConfig(defect_threshold=FLAGS.mask_threshold, dilation=FLAGS.dilation,
                                 fold_opening=FLAGS.fold_opening)
      detected = detector.masks_for_alignment(detector.detect(ds.images[z], model), mcfg)
      det_scores.append(td.pixel_scores(detected, ds.defects[z]))
      for c, truth in (("crack", ds.crack[z]), ("fold", ds.fold[z])):
        class_recall.setdefault(c, []).append((int(np.sum(detected & truth)), int(truth.sum())))
      variants = [("none", None), ("detected", detected), ("true", ds.defects[z])]
      if FLAGS.oracles:
        # the detected mask, corrected by the truth: which error of the detector costs accuracy?
        grown = np.asarray(detector.dilate(ds.defects[z], FLAGS.dilation))
        variants += [(ORACLES[0], detected & grown), (ORACLES[1], detected | ds.defects[z]),
                     (ORACLES[2], detected | ds.crack[z]), (ORACLES[3], detected | ds.fold[z])]
      for name, sd in variants:
        f = np.asarray(pair.align_pair(ds.images[z], ds.original[z], src_defects=sd))
        e = np.linalg.norm(f - ds.fields[z], axis=-1)
        v = ds.valid[z]
        near = v & (ds.disc_distance[z] < FLAGS.near)
        rows.setdefault(name, []).append((e[v].sum(), v.sum(), e[near].sum(), near.sum(),
                                          float(np.percentile(e[near], 90)) if near.any() else np.nan))
        near_errors.setdefault(name, []).append(e[near])
      logging.info("EPE %s z=%d done", spec.name, z)
  print(f"\n### Alignment EPE near defects ({len(rows['none'])} held-out sections at MIP 1, "
        f"{FLAGS.epe_crop} px, one crack + one fold each; align_pair(distorted, original))\n")
  print(f"| src_defects | EPE all valid px | EPE within {FLAGS.near:g} px of a defect | 90th pct near "
        f"(mean of sections) | 95th pct near (pooled) |")
  print("|---|---|---|---|---|")
  results["epe"] = {}
  for name, r in rows.items():
    a = np.array(r, np.float64)
    all_epe = a[:, 0].sum() / a[:, 1].sum()
    near_epe = a[:, 2].sum() / a[:, 3].sum()
    p90 = float(np.nanmean(a[:, 4]))
    p95 = float(np.percentile(np.concatenate(near_errors[name]), 95))
    results["epe"][name] = dict(all=all_epe, near=near_epe, p90_near=p90, p95_near_pooled=p95, sections=len(r))
    print(f"| {name} | {all_epe:.3f} | {near_epe:.3f} | {p90:.2f} | {p95:.2f} |")
  tp = sum(s["tp"] for s in det_scores)
  fp = sum(s["fp"] for s in det_scores)
  fn = sum(s["fn"] for s in det_scores)
  results["epe"]["detected_mask_scores"] = dict(precision=tp / max(tp + fp, 1), recall=tp / max(tp + fn, 1),
                                                iou=tp / max(tp + fp + fn, 1))
  recall = {c: sum(a for a, _ in v) / max(sum(b for _, b in v), 1) for c, v in class_recall.items()}
  results["epe"]["detected_mask_scores"].update({f"{c}_recall": r for c, r in recall.items()})
  print(f"\n(detected defect masks vs true on these sections: P {tp / max(tp + fp, 1):.3f}, "
        f"R {tp / max(tp + fn, 1):.3f} (cracks {recall['crack']:.3f}, folds {recall['fold']:.3f}), "
        f"IoU {tp / max(tp + fp + fn, 1):.3f}; threshold {FLAGS.mask_threshold}, "
        f"dilation {FLAGS.dilation} px, fold_opening {FLAGS.fold_opening} px)")


def main(argv):
  del argv
  model = detector.load_weights(FLAGS.weights) if FLAGS.weights else detector.pretrained()
  results = {"weights": FLAGS.weights or str(detector.WEIGHTS_DIR / detector.DEFAULT_WEIGHTS)}
  t0 = time.time()
  if "heldout" in FLAGS.parts:
    heldout_generated(model, FLAGS.data, results)
  if "dolw7" in FLAGS.parts:
    dolw7(model, FLAGS.data, results)
  if "epe" in FLAGS.parts:
    epe_near_defects(model, FLAGS.data, results)
  print(f"\n(total {time.time() - t0:.0f} s; 2-core CPU VM, no GPU)")
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
  app.run(main)
