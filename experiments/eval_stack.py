"""Evidence for block/stack alignment (issue 6 §4) on ground-truth stacks from ../shared/data/em.

Sections are distorted with known fields by `jaxalign.bench.groundtruth` (elastic, small affine, gain,
offset, noise). The pair aligner is the library default (`jaxalign.align.pair.align_pairs`, the Online
Field Finetuner, through `BlockConfig.aligner=None`) unless `--aligner=blockmatch`.

Three experiments:

* ``motion``: sequential alignment (n = 1) of the UNDISTORTED stack (every 4th slice, every slice
  over the same depth, one section repeated with noise, and several elastic-prior strengths):
  the motion the aligner finds in data whose ground truth is the identity.

* ``defects``: a short stack with one blank section and a pair defect *not* given to the aligner
  as a mask, aligned with voting distance 3 and 1 (plain sequential alignment). The pair defect is
  strong knife-chatter stripes in two consecutive sections (``--pair_defect=stripes``) or one
  section with a misregistered montage tile (``--pair_defect=tile``: a centre square whose
  content is shifted by ``--tile_shift`` px) or a mirrored centre square (``--pair_defect=mirror``:
  content that matches nothing, so the pair alignment of that section fails there). Each run is
  repeated on the blank-only stack; the pair defect's own effect is the field difference
  |F(blank + defect) - F(blank only)| (and the excess EPE, which can cancel against drift).
* ``abcd``: >= 100 sections, aligned as one block and with `align_stack` in blocks at several decay
  distances. Every run is repeated on the *undistorted* stack: that run's fields U are the motion
  the same pipeline finds in the data itself (FIB-SEM "registered" slices still differ by
  content shifts at 40 nm), and the fair reference for the distorted run is compose(GT, U) (what the
  distorted run returns if the aligner is exact and equivariant). Reports absolute and relative EPE
  per section, block-vs-single-block differences away from interfaces (of the fields, and of each
  run's error against its own compose(GT, U)), seams (field jumps and x-z
  reslices of the rendered stacks) and the low-CPC fraction. ``--content=repeat`` uses one section
  repeated (no tissue change: the aligner is well-posed, a check of the block machinery).
  ``--drift_sigmas`` adds one report per sigma of the same runs with their drift removed
  (`jaxalign.stack.drift`, as `StackConfig.drift` does inside `align_stack`), and ``--neighbour_refine=N``
  one more per sigma with N sweeps of neighbour refinement after it (`jaxalign.stack.refine`, as
  `StackConfig.neighbour_refine`). ``--runs_cache=F.npz`` keeps the raw abcd runs, so later reports of
  them (other sigmas, refinement) skip the alignments.

Commands of docs/benchmarks/stack.md:

  python experiments/eval_stack.py --experiment=motion --crop=160 --num=13
  python experiments/eval_stack.py --experiment=defects --pair_defect=mirror --crop=192 --num=24
  python experiments/eval_stack.py --experiment=defects --pair_defect=stripes --crop=192 --num=24
  python experiments/eval_stack.py --experiment=defects --pair_defect={mirror,stripes} --crop=192 --num=24 --drift_sigmas=2 \
      [--neighbour_refine=1]
  python experiments/eval_stack.py --experiment=defects --content=repeat --pair_defect=mirror --crop=192 --num=24
  python experiments/eval_stack.py --experiment=defects --content=repeat --pair_defect=stripes --crop=192 --num=24
  python experiments/eval_stack.py --experiment=abcd --crop=320 --num=100 --block_size=20 --decays=25,100,1e6 \
      [--drift_sigmas=2,3,4] [--neighbour_refine=1] [--runs_cache=/tmp/abcd_fibsem.npz]
  python experiments/eval_stack.py --experiment=abcd --content=repeat --crop=128 --num=100 \
      --block_size=20 --decays=25,1e6 [--stitch_refine=false]
  python experiments/eval_stack.py --experiment=defects --stack=isbi2012_train --pair_defect=stripes --crop=192 --num=24
  python experiments/eval_stack.py --experiment=defects --stack=isbi2012_train --pair_defect=mirror --crop=192 --num=24
  python experiments/eval_stack.py --experiment=defects --stack=gerhard_vnc_stack1 --pair_defect=mirror --crop=192 --num=20
  python experiments/eval_stack.py --experiment=abcd --stack=isbi2012_train --crop=160 --num=100 --block_size=20 \
      --decays=25,1e6 [--drift_sigmas=2,3] [--neighbour_refine=1]
  for g in 1 4 8 16; do python experiments/eval_stack.py --experiment=abcd --crop=320 --num=40 --block_size=10 \
      --decays=25,1e6 --gamma_scale=$g --out_dir=docs/benchmarks/stack_gamma; done
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import time

import jax
import numpy as np
from absl import app, flags, logging

from jaxalign.stack.block import BlockConfig, align_block
from jaxalign.bench.evaluation import STACK_RESOLUTION, em_data_dir, load_stack
from jaxalign.ops.fields import compose
from jaxalign.bench.groundtruth import DistortionConfig, distort_stack
from jaxalign.ops.metrics import cpc
from jaxalign.stack.render import render
from jaxalign.stack.drift import DriftConfig, remove_drift
from jaxalign.stack.refine import DEFAULT_REFINE_STIFFNESS, RefineConfig, refine_to_neighbours
from jaxalign.stack.chain import StackConfig, align_stack, choose_starters, plan_blocks

FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", "defects", ["defects", "abcd", "motion"], "which experiment")
flags.DEFINE_string("stack", "flyem_medulla_fibsem", "shared stack name (../shared/data/em/<name>)")
flags.DEFINE_integer("step", None, "slice step (default 4 for FIB-SEM: 40 nm sections, else 1)")
flags.DEFINE_integer("crop", 192, "centre crop (px)")
flags.DEFINE_integer("num", 24, "number of sections")
flags.DEFINE_integer("seed", 0, "distortion seed")
flags.DEFINE_float("elastic", 6.0, "elastic distortion amplitude (px)")
flags.DEFINE_float("translation", 3.0, "max translation of the distortion (px)")
flags.DEFINE_bool("discontinuities", False, "also draw random cracks, folds and missing blobs")
flags.DEFINE_integer("blank", 8, "defects: index of the blank section")
flags.DEFINE_enum("pair_defect", "stripes", ["stripes", "tile", "mirror"], "defects: the unmasked defect")
flags.DEFINE_integer("stripes", 14, "defects: first defective section (stripes: it and the next)")
flags.DEFINE_float("stripe_amplitude", 1.0, "defects: relative stripe modulation")
flags.DEFINE_float("stripe_period", 6.0, "defects: stripe period (px)")
flags.DEFINE_float("tile_shift", 12.0, "defects: tile misregistration (px, along x and y each)")
flags.DEFINE_float("tile_fraction", 0.75, "defects: side of the tile / mirrored square, as a fraction of the crop")
flags.DEFINE_integer("block_size", 20, "abcd: block size")
flags.DEFINE_integer("overlap", 3, "abcd: overlap")
flags.DEFINE_list("decays", ["25", "100", "1e6"], "abcd: decay distances (sections); 1e6 = plain composition")
flags.DEFINE_integer("voting_distance", 3, "abcd: voting distance")
flags.DEFINE_enum("aligner", "pairs", ["pairs", "blockmatch"], "pair aligner (pairs = library default)")
flags.DEFINE_float("gamma_scale", 1.0, "pairs: multiply PairConfig().gammas (elastic prior) by this; 1 = defaults")
flags.DEFINE_enum("content", "sequence", ["sequence", "repeat"],
                  "abcd, defects: real section sequence, or section 0 repeated (no content change between sections: "
                  "isolates the alignment machinery from the tissue's own section-to-section change)")
flags.DEFINE_bool("stitch_refine", True, "abcd: align overlap renderings for the stitch fields (paper); "
                  "False = vote the algebraic estimates only")
flags.DEFINE_list("motion_gamma_scales", ["4", "16"], "motion: gamma scales to compare")
flags.DEFINE_integer("cpc_chunk", 32, "CPC chunk (px)")
flags.DEFINE_list("drift_sigmas", [], "abcd, defects: also report every run with its drift removed "
                  "(jaxalign.stack.drift, StackConfig.drift) at these sigmas (sections); one JSON each")
flags.DEFINE_integer("drift_degree", 1, "abcd: degree of the drift fit (jaxalign.stack.drift.DriftConfig)")
flags.DEFINE_integer("neighbour_refine", 0, "abcd, defects: after each drift removal, also report the runs "
                     "refined to their neighbours (jaxalign.stack.refine, StackConfig.neighbour_refine) with this "
                     "many sweeps; 0 = off")
flags.DEFINE_float("refine_stiffness", DEFAULT_REFINE_STIFFNESS, "RefineConfig.stiffness for --neighbour_refine")
flags.DEFINE_string("out_dir", "docs/benchmarks", "where PNG/JSON results go")
flags.DEFINE_string("runs_cache", None, "abcd: .npz of the raw runs' fields; loaded when it exists (same flags), "
                    "else written after the runs (re-report drift removal / refinement without re-aligning)")

# Sections within this distance of a block interface count as "near" it.
INTERFACE_MARGIN = 3
# Low-CPC threshold (chunks below it count as misaligned).
LOW_CPC = 0.25


def _pair_config():
  """`PairConfig()` told the stack's resolution (the median stage depends on the section thickness
  in pixels), with the elastic prior scaled by --gamma_scale."""
  from jaxalign.align.pair import PairConfig
  xy, z = STACK_RESOLUTION.get(FLAGS.stack, (None, None))
  base = PairConfig(resolution_nm=None if xy is None else (z * _step(), xy, xy))
  if FLAGS.gamma_scale == 1.0:
    return base
  return dataclasses.replace(base, gammas=tuple(g * FLAGS.gamma_scale for g in base.gammas))


def _suffix() -> str:
  out = "" if FLAGS.gamma_scale == 1.0 else f"_gamma{FLAGS.gamma_scale:g}"
  out += "_repeat" if FLAGS.experiment in ("abcd", "defects") and FLAGS.content == "repeat" else ""
  return out + ("_algebraic" if FLAGS.experiment == "abcd" and not FLAGS.stitch_refine else "")


def _block_config() -> BlockConfig:
  if FLAGS.aligner == "pairs":
    # Default aligner: jaxalign.align.pair.align_pairs with the stack's resolution (and --gamma_scale).
    return BlockConfig(pair=_pair_config())
  from jaxalign.align.blockmatch import BlockMatchConfig, block_match
  cfg = BlockMatchConfig(levels=(2, 1, 0), patch=64, stride=32, smooth=1.0)

  def aligner(srcs, tgts, *, src_defects=None, tgt_defects=None, init_fields=None):
    return np.stack([np.asarray(block_match(srcs[i], tgts[i], init_field=init_fields[i],
                                            src_defects=src_defects[i], tgt_defects=tgt_defects[i],
                                            config=cfg)) for i in range(len(srcs))])
  return BlockConfig(aligner=aligner)


def _provenance() -> dict:
  from jaxalign.align.pair import PairConfig
  try:
    commit = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True,
                            check=False).stdout.strip()
    # The pair aligner may have uncommitted edits: fingerprint the files it is made of.
    dirty = subprocess.run(["git", "diff", "--stat", "--", "jaxalign/align/pair.py", "jaxalign/align/finetuner.py",
                            "jaxalign/ops/losses.py"], capture_output=True, text=True, check=False).stdout.strip()
    import hashlib
    digest = hashlib.md5(b"".join(pathlib.Path(f"jaxalign/{m}.py").read_bytes()
                                  for m in ("pair", "finetuner", "losses"))).hexdigest()[:10]
    commit = f"{commit}{' + uncommitted pair-aligner edits' if dirty else ''} (pair/finetuner/losses md5 {digest})"
  except OSError:
    commit = "?"
  return dict(commit=commit, aligner=FLAGS.aligner, pair_config=repr(_pair_config()),
              default_pair_config=repr(PairConfig()))


def _step() -> int:
  """Slice step: --step, or every 4th slice (40-nm sections) of the FIB-SEM stack."""
  return FLAGS.step or (4 if FLAGS.stack == "flyem_medulla_fibsem" else 1)


def _load(num: int, crop: int | None = -1) -> np.ndarray:
  """`[num, H, W]` sections (crop -1 = `--crop`, None = full frames)."""
  crop = FLAGS.crop if crop == -1 else crop
  step = _step()
  available = len(list((em_data_dir() / FLAGS.stack).glob("[0-9]*.png")))
  unique = min(num, (available - 1) // step + 1)
  base = load_stack(FLAGS.stack, num=unique, step=step, crop=crop)
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


def _median_epe(pred, ref, valid) -> np.ndarray:
  """`[Z]` median |pred - ref| (px) over each section's `valid` pixels (NaN where none)."""
  err = np.linalg.norm(np.asarray(pred) - np.asarray(ref), axis=-1)
  return np.array([float(np.median(err[z][valid[z]])) if valid[z].any() else np.nan
                   for z in range(err.shape[0])])


def _mean_error(pred, ref, valid) -> np.ndarray:
  """`[Z, 2]` mean (pred - ref) (px, (dy, dx)) over each section's `valid` pixels: the rigid part of
  the error, which EPE norms cannot show (NaN where none)."""
  err = np.asarray(pred) - np.asarray(ref)
  return np.array([err[z][valid[z]].mean(axis=0) if valid[z].any() else np.full(2, np.nan)
                   for z in range(err.shape[0])])


_compose_batch = jax.jit(jax.vmap(compose))


def _fair_reference(gt, undistorted_fields) -> np.ndarray:
  """`[Z, H, W, 2]` compose(GT, U): undo the distortion, then the undistorted run's own motion."""
  return np.asarray(_compose_batch(np.asarray(gt, np.float32), np.asarray(undistorted_fields, np.float32)))


def _low_cpc(stack) -> tuple[float, int]:
  """Fraction of scored chunks with CPC < LOW_CPC over consecutive section pairs, and the count."""
  vals = []
  for z in range(1, stack.shape[0]):
    c = np.asarray(cpc(stack[z - 1], stack[z], chunk=FLAGS.cpc_chunk))
    vals.append(c[~np.isnan(c)])
  vals = np.concatenate(vals)
  return float(np.mean(vals < LOW_CPC)), int(vals.size)


def _phase_shift(a, b) -> np.ndarray:
  """(dy, dx) px, float64 phase correlation with parabolic sub-pixel peak: b(x) ≈ a(x + d)."""
  win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
  fa = np.fft.fft2((a - a.mean()) * win)
  fb = np.fft.fft2((b - b.mean()) * win)
  r = fb * np.conj(fa)
  corr = np.real(np.fft.ifft2(r / (np.abs(r) + 1e-12)))
  peak = np.array(np.unravel_index(np.argmax(corr), corr.shape))
  out = []
  for ax in range(2):
    n = corr.shape[ax]
    idx = [peak[0], peak[1]]
    vals = []
    for o in (-1, 0, 1):
      idx[ax] = (peak[ax] + o) % n
      vals.append(corr[tuple(idx)])
    den = vals[0] - 2 * vals[1] + vals[2]
    sub = 0.5 * (vals[0] - vals[2]) / den if den != 0 else 0.0
    p = peak[ax] + sub
    out.append(p - n if p > n / 2 else p)
  return -np.array(out)


def _plot(path, curves: dict, title: str, marks: dict | None = None, ylabel="median EPE (px)"):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 3.5))
  for label, y in curves.items():
    style = dict(marker=".", ms=3) if not label.startswith("_") else dict(ls="--")
    ax.plot(np.arange(len(y)), y, label=label.lstrip("_"), **style)
  for label, xs in (marks or {}).items():
    for i, x in enumerate(xs):
      ax.axvline(x, color="grey", ls=":", lw=1, label=label if i == 0 else None)
  ax.set_xlabel("section")
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------- defects


def _add_pair_defect(images: np.ndarray) -> list[int]:
  """Adds the unmasked defect in place; returns the defective sections."""
  z_count, h, w = images.shape
  k = FLAGS.stripes
  if FLAGS.pair_defect == "stripes":
    yy, xx = np.mgrid[:h, :w]
    stripes = 1.0 + FLAGS.stripe_amplitude * np.sin(2 * np.pi * (0.8 * xx + 0.6 * yy) / FLAGS.stripe_period)
    for z in (k, k + 1):
      images[z] = np.where(images[z] != 0, np.clip(images[z] * stripes, 1e-3, None), 0.0).astype(np.float32)
    return [k, k + 1]
  side = int(FLAGS.tile_fraction * min(h, w))
  y0, x0 = (h - side) // 2, (w - side) // 2
  if FLAGS.pair_defect == "tile":
    # A misregistered montage tile: the centre square shows the tissue from `tile_shift` px away.
    s = int(round(FLAGS.tile_shift))
    src = np.roll(images[k], (s, s), axis=(0, 1))
  else:
    # A mirrored region (e.g. a tile stored flipped): content that matches nothing nearby.
    src = images[k].copy()
    src[:, x0:x0 + side] = images[k][:, x0:x0 + side][:, ::-1]
  images[k, y0:y0 + side, x0:x0 + side] = src[y0:y0 + side, x0:x0 + side]
  return [k]


def run_defects(out_dir: pathlib.Path) -> dict:
  original = _load(FLAGS.num) if FLAGS.content == "sequence" else np.repeat(_load(1), FLAGS.num, axis=0)
  d = distort_stack(original, _distortion(), progress=False)
  z_count = d.images.shape[0]
  blank_only = d.images.copy()
  blank_only[FLAGS.blank] = 0.0
  images = blank_only.copy()
  bad = _add_pair_defect(images)
  cfg = _block_config()
  # Three stacks: defect-free, blank only, blank + pair defect. The blank shortens the chain of
  # sequential alignments (one step fewer), which changes the content-motion drift, so the pair
  # defect's own effect is measured against the blank-only run.
  stacks = {"clean": d.images, "blank": blank_only, "defects": images}

  def section_weights(label):
    # As align_stack does: a blank section's field is a copy of a neighbour's, so it is left out.
    weights = np.ones(z_count)
    if label != "clean":
      weights[FLAGS.blank] = 0.0
    return weights

  def scored(label, fields, seconds):
    epe = _median_epe(fields, d.fields, d.valid)
    if label != "clean":
      epe[FLAGS.blank] = np.nan
    return dict(epe=epe, seconds=seconds, fields=np.asarray(fields))

  res = {}
  for label, imgs in stacks.items():
    for n in (1, 3):
      t0 = time.time()
      fields = align_block(imgs, voting_distance=n, defects=d.defects, config=cfg, progress=False)
      res[label, n] = scored(label, fields, time.time() - t0)
      logging.info("%s n=%d: %.1f s, per-section EPE %s", label, n, time.time() - t0,
                   np.round(res[label, n]["epe"], 2))
  results = [_defects_report(out_dir, d, res, bad, None)]
  for sigma in FLAGS.drift_sigmas:
    drift = DriftConfig(sigma=float(sigma), degree=FLAGS.drift_degree)
    moved = {(label, n): scored(label, remove_drift(r["fields"], config=drift,
                                                    section_weights=section_weights(label)), r["seconds"])
             for (label, n), r in res.items()}
    results.append(_defects_report(out_dir, d, moved, bad, drift))
    if FLAGS.neighbour_refine:
      refine = _refine_config()
      refined = {(label, n): scored(label, _refine(stacks[label], r["fields"], d.defects, section_weights(label), refine),
                                    r["seconds"]) for (label, n), r in moved.items()}
      results.append(_defects_report(out_dir, d, refined, bad, drift, refine))
  return results


def _refine_config() -> RefineConfig:
  return RefineConfig(iterations=FLAGS.neighbour_refine, stiffness=FLAGS.refine_stiffness)


def _refine(images, fields, defects, weights, refine: RefineConfig) -> np.ndarray:
  """`refine_to_neighbours` with the experiment's pair aligner (as `align_stack` calls it)."""
  cfg = _block_config()
  t0 = time.time()
  out = np.asarray(refine_to_neighbours(images, fields, config=refine, defects=defects, section_weights=weights,
                                        aligner=cfg.aligner, pair_config=cfg.pair))
  logging.info("neighbour refinement (%d sweeps) of %d sections: %.1f s", refine.iterations, len(fields),
               time.time() - t0)
  return out


def _defects_report(out_dir, d, res, bad, drift, refine=None) -> dict:
  """Metrics, plots and the result dict of the defects runs `res` (raw, or with `drift` removed)."""
  z_count = d.images.shape[0]
  before = slice(1, FLAGS.blank)
  after = slice(max(bad) + 1, z_count)
  summary = {}
  excess = {}
  divergence = {}
  for n in (1, 3):
    e, b, c = (res[x, n]["epe"] for x in ("defects", "blank", "clean"))
    excess[n] = e - b
    blank_excess = b - c
    # The error the pair defect adds, as a vector: |F(blank + defect) - F(blank only)|. The
    # difference of EPE norms above can cancel against the content-motion drift; this cannot.
    divergence[n] = _median_epe(res["defects", n]["fields"], res["blank", n]["fields"], d.valid)
    divergence[n][FLAGS.blank] = np.nan
    summary[n] = dict(epe_before=float(np.nanmedian(e[before])), epe_after=float(np.nanmedian(e[after])),
                      blank_only_epe_after=float(np.nanmedian(b[after])),
                      clean_epe_after=float(np.nanmedian(c[after])),
                      excess_after_median=float(np.nanmedian(excess[n][after])),
                      excess_after_max=float(np.nanmax(excess[n][after])),
                      excess_last=float(excess[n][-1]),
                      excess_at_defect=float(np.nanmax(excess[n][bad])),
                      divergence_at_defect=float(np.nanmax(divergence[n][bad])),
                      divergence_after_median=float(np.nanmedian(divergence[n][after])),
                      divergence_after_max=float(np.nanmax(divergence[n][after])),
                      divergence_last=float(divergence[n][-1]),
                      blank_excess_after_median=float(np.nanmedian(blank_excess[FLAGS.blank + 1:])),
                      blank_excess_after_max=float(np.nanmax(blank_excess[FLAGS.blank + 1:])),
                      seconds=res["defects", n]["seconds"])
  drift_suffix = _drift_suffix(drift, refine)
  name = f"stack_defects_{FLAGS.pair_defect}_{FLAGS.stack}{_suffix()}{drift_suffix}"
  marks = {"blank": [FLAGS.blank], FLAGS.pair_defect: bad}
  what = {"stripes": f"stripes {bad[0]}-{bad[-1]}",
          "tile": f"tile shifted {FLAGS.tile_shift:g} px in {bad[0]}",
          "mirror": f"mirrored {FLAGS.tile_fraction:g}-side square in {bad[0]}"}[FLAGS.pair_defect]
  title = (f"{FLAGS.stack}{' (section 0 repeated)' if FLAGS.content == 'repeat' else ''} {FLAGS.crop}px, "
           f"{FLAGS.aligner} gamma x{FLAGS.gamma_scale:g}: blank {FLAGS.blank}, {what}"
           f"{'' if drift is None else f', drift removed (sigma {drift.sigma:g})'}"
           f"{'' if refine is None else f', neighbour-refined x{refine.iterations}'}")
  _plot(out_dir / f"{name}.png",
        {**{f"n={n}, blank + {FLAGS.pair_defect}": res["defects", n]["epe"] for n in (3, 1)},
         **{f"_n={n}, blank only": res["blank", n]["epe"] for n in (3, 1)}}, title, marks)
  _plot(out_dir / f"{name}_excess.png",
        {**{f"voting distance {n}: {FLAGS.pair_defect} (vs blank only)": excess[n] for n in (3, 1)},
         **{f"_voting distance {n}: blank (vs defect-free)": res["blank", n]["epe"] - res["clean", n]["epe"]
            for n in (3, 1)}},
        title + ": excess EPE", marks, ylabel="excess median EPE (px)")
  _plot(out_dir / f"{name}_divergence.png",
        {f"voting distance {n}": divergence[n] for n in (3, 1)},
        title + ": median |F(blank + defect) - F(blank only)|", marks, ylabel="px")
  summary["drift"] = None if drift is None else dataclasses.asdict(drift)
  summary["neighbour_refine"] = None if refine is None else dataclasses.asdict(refine)
  return dict(experiment="defects", name=name, stack=FLAGS.stack, crop=FLAGS.crop, num=z_count,
              defect_sections=bad, summary=summary,
              per_section={**{f"{k[0]}_n{k[1]}": v["epe"].tolist() for k, v in res.items()},
                           **{f"divergence_n{n}": divergence[n].tolist() for n in (1, 3)}},
              plot=[f"{name}.png", f"{name}_excess.png", f"{name}_divergence.png"])


# --------------------------------------------------------------------------- motion


def run_motion(out_dir: pathlib.Path) -> dict:
  """Sequential alignment (n = 1) of UNDISTORTED stacks: whatever the fields do is motion the
  aligner finds in the data itself (the ground truth of every section is the identity)."""
  from jaxalign.align.pair import PairConfig
  num = FLAGS.num
  step4 = load_stack(FLAGS.stack, num=num, step=4, crop=FLAGS.crop)
  # Same tissue depth at 10 nm: 4x the alignment steps, each over a quarter of the content change.
  step1 = load_stack(FLAGS.stack, num=4 * (num - 1) + 1, step=1, crop=FLAGS.crop)
  rng = np.random.default_rng(FLAGS.seed)
  noise = DistortionConfig().noise_sigma[1]
  repeat = np.stack([np.clip(step4[0] + rng.normal(0, noise, step4[0].shape), 1e-3, 1.0)
                     for _ in range(num)]).astype(np.float32)
  frames = load_stack(FLAGS.stack, num=num, step=4).astype(np.float64)
  pc = [_phase_shift(frames[z - 1], frames[z]) for z in range(1, num)]
  # Every 4th slice vs every slice: the latter has 1-px sections, so its median stage is off.
  xy, z = STACK_RESOLUTION[FLAGS.stack]
  thick, thin = PairConfig(resolution_nm=(4 * z, xy, xy)), PairConfig(resolution_nm=(z, xy, xy))
  runs = {}
  cases = [("40 nm (every 4th slice)", step4, thick, 1),
           ("40 nm, median stage off", step4, dataclasses.replace(thick, median_sizes=(1,)), 1),
           ("10 nm (every slice), same depth", step1, thin, 4),
           ("one section repeated + noise", repeat, thick, 1)]
  cases += [(f"40 nm, gamma x{float(g):g}", step4, dataclasses.replace(thick, gammas=tuple(x * float(g) for x in thick.gammas)), 1)
            for g in FLAGS.motion_gamma_scales if float(g) != 1.0]
  for key, st, pc_cfg, every in cases:
    t0 = time.time()
    f = np.asarray(align_block(st, voting_distance=1, config=BlockConfig(pair=pc_cfg), progress=False))[::every]
    runs[key] = dict(median_abs=[float(np.median(np.linalg.norm(x, axis=-1))) for x in f],
                     mean_dy=f[..., 0].mean(axis=(1, 2)).tolist(), mean_dx=f[..., 1].mean(axis=(1, 2)).tolist(),
                     seconds=time.time() - t0)
    logging.info("%s: %.1f s, median |U| %s", key, time.time() - t0, np.round(runs[key]["median_abs"], 2))
  name = f"stack_motion_{FLAGS.stack}"
  _plot(out_dir / f"{name}.png", {k: v["median_abs"] for k, v in runs.items()},
        f"{FLAGS.stack} {FLAGS.crop}px, UNDISTORTED, sequential (n=1): median |field| (40-nm section index)",
        ylabel="median |field| (px)")
  summary = {k: dict(last=v["median_abs"][-1], max=max(v["median_abs"]), mean_last=[v["mean_dy"][-1], v["mean_dx"][-1]],
                     seconds=v["seconds"]) for k, v in runs.items()}
  summary["phase_correlation_whole_frame"] = dict(
      median_abs_step=float(np.median(np.linalg.norm(pc, axis=1))),
      cumulative=np.sum(pc, axis=0).tolist())
  return dict(experiment="motion", name=name, stack=FLAGS.stack, crop=FLAGS.crop, num=num, summary=summary,
              per_section=dict(runs=runs, phase_correlation_steps=[list(map(float, x)) for x in pc]), plot=[f"{name}.png"])


# --------------------------------------------------------------------------- ABCD


def _reslice(stack: np.ndarray) -> np.ndarray:
  """`[Z, W]` x-z reslice through the centre row."""
  return np.asarray(stack)[:, stack.shape[1] // 2, :]


def _plot_reslices(path, slices: dict, interfaces, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 5.5), sharey=True)
  for ax, (label, img) in zip(axes, slices.items()):
    ax.imshow(img, cmap="gray", aspect="auto", interpolation="nearest")
    for i in interfaces:
      ax.axhline(i - 0.5, color="red", lw=0.6, ls=":")
      ax.annotate("", xy=(0, i), xytext=(-8, i), arrowprops=dict(arrowstyle="->", color="red"),
                  annotation_clip=False)
    ax.set_title(label, fontsize=8)
    ax.set_xlabel("x (px)")
  axes[0].set_ylabel("section (interfaces dotted red)")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_abcd(out_dir: pathlib.Path) -> dict:
  original = _load(FLAGS.num) if FLAGS.content == "sequence" else np.repeat(_load(1), FLAGS.num, axis=0)
  z_count = original.shape[0]
  choices = choose_starters(np.ones(z_count), block_size=FLAGS.block_size, overlap=FLAGS.overlap)
  starters = [c.index for c in choices]
  plan = plan_blocks(z_count, starters, overlap=FLAGS.overlap)
  interfaces = [plan.interface(k) for k in range(1, len(plan.blocks))]
  # Starters undistorted: a coarsely pre-aligned stack whose starters define the frame, so the
  # ground-truth frame is the frame ABCD converges to far from interfaces.
  d = distort_stack(original, _distortion(undistorted=starters), progress=False)
  cfg = _block_config()
  n = FLAGS.voting_distance
  decays = [float(x) for x in FLAGS.decays]
  runs, seconds = {}, {}

  def timed(key, fn):
    t0 = time.time()
    runs[key] = np.asarray(fn())
    seconds[key] = time.time() - t0
    logging.info("%s: %.1f s", key, seconds[key])

  cache = pathlib.Path(FLAGS.runs_cache) if FLAGS.runs_cache else None
  if cache is not None and cache.exists():
    runs, seconds = _load_runs(cache)
  else:
    for label, imgs, dfx in (("undistorted", original, None), ("distorted", d.images, d.defects)):
      timed((label, "single"), lambda: align_block(imgs, voting_distance=n, defects=dfx, config=cfg,
                                                   progress=False))
      for dd in decays:
        timed((label, dd), lambda: align_stack(imgs, block_size=FLAGS.block_size, overlap=FLAGS.overlap,
                                               voting_distance=n, decay_distance=dd, starters=starters,
                                               defects=dfx, config=StackConfig(block=cfg, stitch_refine=FLAGS.stitch_refine),
                                               progress=False))
    if cache is not None:
      _save_runs(cache, runs, seconds)
  results = [_abcd_report(out_dir, original, d, runs, seconds, plan, starters, interfaces, decays, None)]
  for sigma in FLAGS.drift_sigmas:
    # The same runs with the drift taken out (StackConfig.drift does this inside align_stack; the
    # single block is align_stack with one block, i.e. align_block + remove_drift).
    drift = DriftConfig(sigma=float(sigma), degree=FLAGS.drift_degree)
    t0 = time.time()
    moved = {key: np.asarray(remove_drift(f, config=drift)) for key, f in runs.items()}
    logging.info("drift removal (sigma %s) of %d runs: %.1f s", sigma, len(runs), time.time() - t0)
    results.append(_abcd_report(out_dir, original, d, moved, seconds, plan, starters, interfaces, decays, drift))
    if FLAGS.neighbour_refine:
      refine = _refine_config()
      refined = {key: _refine(original if key[0] == "undistorted" else d.images, f,
                              None if key[0] == "undistorted" else d.defects, None, refine)
                 for key, f in moved.items()}
      results.append(_abcd_report(out_dir, original, d, refined, seconds, plan, starters, interfaces, decays,
                                  drift, refine))
  return results


def _drift_suffix(drift, refine) -> str:
  return (("" if drift is None else f"_drift{drift.sigma:g}d{drift.degree}")
          + ("" if refine is None else f"_nr{refine.iterations}"
             + ("" if refine.stiffness == DEFAULT_REFINE_STIFFNESS else f"s{refine.stiffness:g}")))


def _cache_key() -> str:
  """The flags that determine the raw abcd runs (a cache written under others is refused)."""
  return json.dumps({k: FLAGS[k].value for k in (
      "aligner", "stack", "step", "seed", "elastic", "translation", "crop", "num", "discontinuities", "block_size",
      "overlap", "decays", "voting_distance", "gamma_scale", "content", "stitch_refine")}, sort_keys=True)


def _save_runs(path: pathlib.Path, runs: dict, seconds: dict) -> None:
  keys = list(runs)
  np.savez(path, key=_cache_key(), names=json.dumps([[a, b] for a, b in keys]),
           seconds=json.dumps([seconds[k] for k in keys]), **{f"run{i}": runs[k] for i, k in enumerate(keys)})


def _load_runs(path: pathlib.Path) -> tuple[dict, dict]:
  with np.load(path) as z:
    if str(z["key"]) != _cache_key():
      raise app.UsageError(f"--runs_cache {path} was written with other flags: {z['key']}")
    names = [tuple(k) for k in json.loads(str(z["names"]))]
    secs = json.loads(str(z["seconds"]))
    runs = {k: z[f"run{i}"] for i, k in enumerate(names)}
  logging.info("loaded %d runs from %s", len(runs), path)
  return runs, dict(zip(names, secs))


def _abcd_report(out_dir, original, d, runs, seconds, plan, starters, interfaces, decays, drift, refine=None) -> dict:
  """Metrics, plots and the result dict of one set of abcd runs (raw, or with `drift` removed)."""
  z_count = original.shape[0]
  n = FLAGS.voting_distance
  valid = d.valid
  keys = ["single"] + decays
  label_of = {k: ("single block" if k == "single" else
                  ("blocks, plain composition" if k >= 1e5 else f"blocks, decay {k:g}")) for k in keys}
  per = {}
  summary = dict(blocks=len(plan.blocks), starters=starters, interfaces=interfaces, seconds=
                 {f"{a}_{b}": s for (a, b), s in seconds.items()},
                 drift=None if drift is None else dataclasses.asdict(drift),
                 neighbour_refine=None if refine is None else dataclasses.asdict(refine))
  zs = np.arange(1, z_count)
  q = max(5, z_count // 4)
  # Content motion of the data itself: the undistorted run's rigid part (mean field) and its
  # cumulative whole-image phase-correlation shift (float64, independent of the aligner).
  u = runs["undistorted", "single"]
  frames = (_load(FLAGS.num, crop=None) if FLAGS.content == "sequence" else
            np.repeat(_load(1, crop=None), FLAGS.num, axis=0)).astype(np.float64)  # whole frames: a robust rigid estimate
  pc = np.cumsum([np.zeros(2)] + [_phase_shift(frames[z - 1], frames[z]) for z in range(1, z_count)], axis=0)
  del frames
  per["undistorted_single_mean_dy"] = u[..., 0].mean(axis=(1, 2)).tolist()
  per["undistorted_single_mean_dx"] = u[..., 1].mean(axis=(1, 2)).tolist()
  per["phasecorr_cumulative_dy"] = pc[:, 0].tolist()
  per["phasecorr_cumulative_dx"] = pc[:, 1].tolist()
  full = np.ones_like(valid)
  own_error = {}  # per run: field - compose(GT, U) of the same configuration (the aligner's own error)
  for k in keys:
    fk = runs["distorted", k]
    uk = runs["undistorted", k]
    ref = _fair_reference(d.fields, uk)
    own_error[k] = fk - ref
    a = _median_epe(fk, d.fields, valid)
    r = _median_epe(fk, ref, valid)
    mot = _median_epe(uk, np.zeros_like(uk), full)  # how far the undistorted run moved each section
    per[f"abs_{k}"], per[f"rel_{k}"], per[f"motion_undistorted_{k}"] = a.tolist(), r.tolist(), mot.tolist()
    rigid = _mean_error(fk, ref, valid)  # vs the fair reference: the aligner's own rigid error
    per[f"rel_mean_dy_{k}"], per[f"rel_mean_dx_{k}"] = rigid[:, 0].tolist(), rigid[:, 1].tolist()
    summary[f"{k}"] = dict(
        abs_first_quarter=float(np.nanmedian(a[1:q])), abs_last_quarter=float(np.nanmedian(a[-q:])),
        abs_max=float(np.nanmax(a)), abs_slope_px_per_100=float(np.polyfit(zs, a[1:], 1)[0] * 100),
        rel_first_quarter=float(np.nanmedian(r[1:q])), rel_last_quarter=float(np.nanmedian(r[-q:])),
        rel_max=float(np.nanmax(r)), rel_slope_px_per_100=float(np.polyfit(zs, r[1:], 1)[0] * 100),
        motion_undistorted_last_quarter=float(np.median(mot[-q:])), motion_undistorted_max=float(np.max(mot)),
        rel_mean_error_last_quarter=np.nanmean(rigid[-q:], axis=0).tolist())
  # Blocks vs single block away from interfaces, per decay; and seams (field jumps between
  # neighbouring sections at interfaces vs elsewhere, relative to the same jumps of the reference).
  dist_iface = np.array([min([abs(z - i) for i in interfaces] + [10 ** 6]) for z in range(z_count)])
  far = dist_iface >= INTERFACE_MARGIN
  at_iface = np.isin(np.arange(z_count), interfaces)
  # Block 0 *is* the single block; "later" leaves it out of the comparison.
  later = far & (np.arange(z_count) >= (interfaces[0] if interfaces else z_count))
  single = runs["distorted", "single"]
  for k in decays:
    fk = runs["distorted", k]
    diff = _median_epe(fk, single, valid)
    # The same comparison with each run's own content motion taken out (its error vs
    # compose(GT, U) of the same configuration): what the block machinery changes in the recovery
    # of the distortion, apart from where decay deliberately leaves the tissue's motion behind.
    err = own_error[k]
    diff_rel = _median_epe(err, own_error["single"], valid)
    jump = np.array([np.nan] + [float(np.median(np.linalg.norm(err[z] - err[z - 1], axis=-1)[valid[z] & valid[z - 1]]))
                                for z in range(1, z_count)])
    per[f"diff_single_{k}"], per[f"jump_{k}"] = diff.tolist(), jump.tolist()
    per[f"diff_single_rel_{k}"] = diff_rel.tolist()
    summary[f"{k}"].update(
        diff_single_far_median=float(np.median(diff[far])), diff_single_far_p90=float(np.percentile(diff[far], 90)),
        diff_single_far_max=float(np.max(diff[far])),
        frac_far_within_0p5=float(np.mean(diff[far] <= 0.5)),
        diff_single_later_median=float(np.median(diff[later])) if later.any() else None,
        frac_later_within_0p5=float(np.mean(diff[later] <= 0.5)) if later.any() else None,
        diff_single_rel_later_median=float(np.median(diff_rel[later])) if later.any() else None,
        diff_single_rel_later_p90=float(np.percentile(diff_rel[later], 90)) if later.any() else None,
        frac_later_rel_within_0p5=float(np.mean(diff_rel[later] <= 0.5)) if later.any() else None,
        error_jump_at_interfaces_median=float(np.nanmedian(jump[at_iface])),
        error_jump_at_interfaces_max=float(np.nanmax(jump[at_iface])),
        error_jump_elsewhere_median=float(np.nanmedian(jump[~at_iface & (np.arange(z_count) > 0)])),
        error_jump_elsewhere_p90=float(np.nanpercentile(jump[~at_iface & (np.arange(z_count) > 0)], 90)))
  # Low-CPC fraction of aligned stacks vs the undistorted original (and its own aligned version).
  rendered = {k: np.asarray(render(d.images, runs["distorted", k])) for k in keys}
  low = {"original": _low_cpc(original)[0], "ground_truth_fields": _low_cpc(np.asarray(render(d.images, d.fields)))[0],
         "distorted_unaligned": _low_cpc(d.images)[0]}
  low.update({f"aligned_{k}": _low_cpc(rendered[k])[0] for k in keys})
  low.update({f"undistorted_aligned_{k}": _low_cpc(np.asarray(render(original, runs['undistorted', k])))[0]
              for k in keys})
  summary["low_cpc"] = low
  summary["cpc_chunks"] = _low_cpc(original)[1]
  drift_suffix = _drift_suffix(drift, refine)
  name = f"stack_abcd_{FLAGS.stack}{_suffix()}{drift_suffix}"
  title = (f"{FLAGS.stack}{' (section 0 repeated)' if FLAGS.content == 'repeat' else ''} {FLAGS.crop}px, "
           f"{z_count} sections, n={n}, blocks of {FLAGS.block_size}, gamma x{FLAGS.gamma_scale:g}"
           f"{'' if drift is None else f', drift removed (sigma {drift.sigma:g}, degree {drift.degree})'}"
           f"{'' if refine is None else f', neighbour-refined x{refine.iterations}'}")
  marks = {"block interface": interfaces}
  _plot(out_dir / f"{name}_abs.png", {label_of[k]: per[f"abs_{k}"] for k in keys},
        title + ": EPE vs ground truth", marks)
  _plot(out_dir / f"{name}_rel.png", {label_of[k]: per[f"rel_{k}"] for k in keys},
        title + ": EPE vs compose(GT, undistorted run)", marks)
  _plot(out_dir / f"{name}_motion.png",
        {**{f"undistorted run, {label_of[k]}: median |U|": per[f"motion_undistorted_{k}"] for k in keys},
         "_undistorted single block: mean dy": per["undistorted_single_mean_dy"],
         "_undistorted single block: mean dx": per["undistorted_single_mean_dx"],
         "_phase correlation, cumulative dy": per["phasecorr_cumulative_dy"],
         "_phase correlation, cumulative dx": per["phasecorr_cumulative_dx"]},
        title + ": motion found in the UNDISTORTED stack", marks, ylabel="px")
  _plot(out_dir / f"{name}_vs_single.png", {label_of[k]: per[f"diff_single_{k}"] for k in decays},
        title + ": median |blocks - single block|", marks, ylabel="px")
  mid = decays[len(decays) // 2] if len(decays) > 1 else decays[0]
  slices = {"original (undistorted)": _reslice(original), "distorted, unaligned": _reslice(d.images),
            "single block": _reslice(rendered["single"]), label_of[mid]: _reslice(rendered[mid]),
            label_of[decays[-1]]: _reslice(rendered[decays[-1]])}
  _plot_reslices(out_dir / f"{name}_reslice.png", slices, interfaces, title + ": x-z reslice, centre row")
  return dict(experiment="abcd", name=name, stack=FLAGS.stack, crop=FLAGS.crop, num=z_count, summary=summary,
              per_section=per, plot=[f"{name}_{s}.png" for s in ("abs", "rel", "motion", "vs_single", "reslice")])


def main(argv):
  del argv
  # The command line's XLA settings, so timings are what a user of `jaxalign align` gets.
  from jaxalign import compile_cache
  compile_cache.quick_cpu_compile()
  out_dir = pathlib.Path(FLAGS.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  provenance = _provenance()  # before the run: the pair aligner's files may change while it runs
  results = {"defects": run_defects, "abcd": run_abcd, "motion": run_motion}[FLAGS.experiment](out_dir)
  for result in results if isinstance(results, list) else [results]:
    result["provenance"] = provenance
    result["seconds_total"] = time.time() - t0
    result["loadavg"] = list(__import__("os").getloadavg())
    result["flags"] = {k: FLAGS[k].value for k in (
        "aligner", "stack", "step", "seed", "elastic", "translation", "crop", "num", "discontinuities", "blank",
        "pair_defect", "stripes", "stripe_amplitude", "stripe_period", "tile_shift", "tile_fraction", "block_size",
        "overlap", "decays", "voting_distance", "gamma_scale", "content", "stitch_refine", "cpc_chunk",
        "drift_sigmas", "drift_degree", "neighbour_refine", "refine_stiffness")}
    path = out_dir / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result["summary"], indent=1, default=float))


if __name__ == "__main__":
  app.run(main)
