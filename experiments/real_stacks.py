"""jaxalign and SOFIMA side by side on the real stacks of ../shared/data/em (issue 18 item 3).

For every shared stack, in two variants:

* ``raw``: the stack as acquired (its own small section-to-section drifts; no ground truth);
* ``distorted``: the benchmark's distortions with exactly known fields
  (`jaxalign.bench.groundtruth.distort_stack` with `DistortionConfig(seed=--seed)`, the config of the
  ground-truth stack cases of `jaxalign.bench.evaluation` / experiments/eval_alignment.py). As in
  experiments/eval_stack.py (abcd), the nominal block starters of `align_stack` are left
  undistorted (`DistortionConfig.undistorted`; just section 0 for stacks of <= 25 sections), so the
  ground-truth frame is the frame the method is expected to converge to. SOFIMA, like a jaxalign
  block, maps every section into section 0's frame, which is undistorted: both are scored against
  the ground truth directly, no frame is fitted.

each method runs sequentially in this process, nothing else in parallel, and is timed wall clock:

* ``raw``: no alignment (identity fields);
* ``jaxalign``: `ja.align_stack(sections, resolution_nm=(z, y, x), voting_distance=3, defects=...)`
  with its defaults (``--jaxalign_config=precise``: refine down to the data's pixel,
  `PairConfig(finest_nm=0)`; ``--jaxalign_config=default,precise`` runs both, as
  ``jaxalign`` and ``jaxalign (precise)``); the time includes compilation (first call);
  ``--repeat_jaxalign`` also times a second call;
* ``sofima``: SOFIMA's EM stack recipe through ../shared/peers (`peers.call_peer("sofima_stack")`,
  a subprocess in the peers venv; blank sections are passed as `skip`; SOFIMA's recipe has no
  defect masks). Its time is the peer's own `elapsed_s` (without interpreter start, imports and the
  npz transfer; with its JIT compilation); the subprocess wall time is reported next to it;
* ``truth`` (distorted variant only): the ground-truth fields, as the reference of what a perfect
  alignment scores.

All methods are scored by one function (`score_group`) on the same footing: every section is
rendered with `jaxalign.ops.fields.warp` through the method's fields (defects zeroed), its data mask is
the warped data mask (`jaxalign.bench.evaluation.MASK_THRESHOLD`), and only what every method's output
covers (the intersection of the data masks over the methods of that stack/variant) is scored:

* low-CPC fraction (CPC < 0.25) between consecutive sections with data, after 2x2-mean downsampling
  to the MIP level nearest 32 nm with 64-px chunks (the paper's scale), and to the level nearest
  16 nm with 32-px chunks (ISBI at 32 nm is one chunk per section); a chunk counts only where every
  method's CPC is defined;
* tissue deformation (`jaxalign.ops.metrics.deformation`: area change of the non-affine part,
  p1 - p99 over the stack, and the worst section) of the fields, with the defects warped into the
  output frame; for ``distorted`` also of the residual field as `jaxalign eval` scores it
  (`jaxalign.ops.metrics.residual_deformation`: `e = compose(invert(fields), gt)` on the ground truth's
  grid, `warp(warp(distorted, fields), e) ≈ warp(distorted, gt)`; its area change is
  det(grad G) / det(grad F), 1 for a perfect method, the distortion's own for ``raw``). Scored on the
  ground truth's valid pixels farther than `DEFORMATION_DEFECT_MARGIN_PX` from a crack or fold,
  sections 1.. (section 0 is the undistorted anchor, as in `jaxalign.bench.evaluation`);
* endpoint error |fields - gt| (px and nm) on valid tissue of sections 1.. with data, as
  `jaxalign.bench.evaluation.score_fields`; also against `compose(gt, U)` with U the same method's
  fields on the raw variant (eval_stack's "fair reference": the motion the method finds in the
  stack itself, which real stacks have: ISBI neighbours differ by up to ~28 px by content).

Outputs: one JSON line per run appended to --output_json; the markdown table
docs/benchmarks/real_stacks.md (rebuilt from all JSON lines by --table_only); one PNG per stack
(docs/benchmarks/real_stacks_<stack>.png) with the last section of each output and an x-z reslice.

  # the table of docs/benchmarks/real_stacks.md: every stack, both variants, both jaxalign configs
  python experiments/real_stacks.py --jaxalign_config=default,precise --repeat_jaxalign
  python experiments/real_stacks.py --table_only                       # markdown from the JSON
  # a small trial (ISBI, 5 sections, 256-px crop), written outside docs/:
  nice -n 10 python experiments/real_stacks.py --stacks=isbi2012_train --num=5 --crop=256
      --methods=raw,sofima --output_json=/tmp/rs.jsonl --markdown=/tmp/rs.md --png_dir=/tmp
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"

FLAGS = flags.FLAGS
STACKS = ("isbi2012_train", "gerhard_vnc_stack1", "flyem_medulla_fibsem", "damaged_pair_dolw7")
METHODS = ("raw", "jaxalign", "sofima", "truth")
# Per stack: sections taken, slice step (FIB-SEM: every 4th slice = 40 nm sections), fold mask file.
STACK_SELECTION = {
  "isbi2012_train": dict(num=30, step=1),
  "gerhard_vnc_stack1": dict(num=20, step=1),
  "flyem_medulla_fibsem": dict(num=32, step=4),
  "damaged_pair_dolw7": dict(num=2, step=1, fold_masks={1: "mask_001.png"}),
}
VOTING_DISTANCE = 3
# CPC scales: (target nm per pixel, chunk px). The paper scores 64-px chunks at 32 nm.
PAPER_SCALE = (32.0, 64)
FINE_SCALE = (16.0, 32)
# Side (px) of the centre crop of the last section shown in the PNGs.
PNG_CROP = 256
GRID_SPACING = 32
# Stacks with fewer sections show a two-colour overlay of their last two sections instead of a reslice.
MIN_RESLICE_SECTIONS = 4


def define_flags() -> None:
  """The script's flags (defined only when run as a script, so tests can import its functions)."""
  flags.DEFINE_list("stacks", list(STACKS), f"shared stacks to run ({', '.join(STACKS)})")
  flags.DEFINE_list("variants", ["raw", "distorted"], "raw (as acquired) and/or distorted (known fields)")
  flags.DEFINE_list("methods", list(METHODS), "raw (identity), jaxalign, sofima, truth (ground truth; distorted only)")
  flags.DEFINE_integer("num", None, "sections per stack (default: all of the stack's selection: ISBI 30, Gerhard 20, "
                       "FIB-SEM 32 (every 4th slice), damaged pair 2); larger values are clipped")
  flags.DEFINE_integer("crop", 0, "centre crop (px; 0 = whole sections; larger than a section = whole)")
  flags.DEFINE_integer("seed", 0, "distortion seed (distorted variant)")
  flags.DEFINE_list("jaxalign_config", ["default"],
                    "jaxalign configurations (one run each): default = ja.align_stack defaults; precise = "
                    "PairConfig(finest_nm=0) (refine to the data's pixel); e.g. default,precise")
  flags.DEFINE_bool("repeat_jaxalign", False, "also time a second jaxalign call (compiled)")
  flags.DEFINE_string("output_json", "docs/benchmarks/real_stacks.jsonl", "JSON lines, one per run, appended")
  flags.DEFINE_bool("table_only", False, "only rebuild the markdown table from --output_json")
  flags.DEFINE_string("markdown", "docs/benchmarks/real_stacks.md", "markdown table written from --output_json")
  flags.DEFINE_string("png_dir", "docs/benchmarks", "where the per-stack PNGs go ('' = none)")


# ---------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class Case:
  """One stack in one variant. All arrays `[Z, H, W]` unless stated.

  Attributes:
    stack, variant: names.
    images: float32 input sections (0 = no data).
    defects: bool, input frame: folds / cracks given to the aligners (and zeroed when scoring).
    resolution_nm: (z, y, x) nm per pixel.
    gt: optional `[Z, H, W, 2]` ground-truth fields (distorted variant): `warp(images, gt) ≈ original`.
    pull: optional `[Z, H, W, 2]`, exact inverse of gt: `images ≈ warp(original, pull)`.
    valid: optional bool, gt frame: pixels with a correct correspondence (EPE is scored there).
    disc_distance: optional float32 px, gt frame: distance to the nearest crack / fold.
    meta: JSON-able description (selection, crop, seed, starters).
  """
  stack: str
  variant: str
  images: np.ndarray
  defects: np.ndarray
  resolution_nm: tuple[float, float, float]
  gt: np.ndarray | None = None
  pull: np.ndarray | None = None
  valid: np.ndarray | None = None
  disc_distance: np.ndarray | None = None
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def has_data(self) -> np.ndarray:
    """`[Z]` bool: the section has any tissue."""
    return np.array([bool(np.any((im != 0) & ~d)) for im, d in zip(self.images, self.defects)])


def _starters(z_count: int) -> list[int]:
  """The nominal block starters of `align_stack` (its defaults) for a stack of full sections."""
  from jaxalign.stack.chain import DEFAULT_BLOCK_SIZE, DEFAULT_OVERLAP, choose_starters
  return [c.index for c in choose_starters(np.ones(z_count), block_size=DEFAULT_BLOCK_SIZE,
                                           overlap=DEFAULT_OVERLAP)]


def load_original(stack: str, num: int | None, crop: int):
  """(sections `[Z, H, W]` float32, fold masks `[Z, H, W]` bool, resolution (z, y, x) nm, meta).

  Raises InputError (via `jaxalign.bench.evaluation.load_stack`) where the stack is absent.
  """
  from PIL import Image
  from jaxalign.bench.evaluation import STACK_RESOLUTION, em_data_dir, load_stack
  sel = STACK_SELECTION[stack]
  step = sel["step"]
  folder = em_data_dir() / stack
  files = sorted(folder.glob("[0-9][0-9][0-9].png"))
  available = len(files[::step])
  n = min(num or sel["num"], sel["num"], available) if files else (num or sel["num"])
  size = None
  if files:
    with Image.open(files[0]) as im:
      size = min(im.size)
  c = crop if crop and size and crop < size else None
  images = load_stack(stack, num=n, step=step, crop=c)
  folds = np.zeros(images.shape, bool)
  for z, name in sel.get("fold_masks", {}).items():
    if z < n:
      m = np.asarray(Image.open(folder / name)) > 127
      if c is not None:
        y0, x0 = (m.shape[0] - c) // 2, (m.shape[1] - c) // 2
        m = m[y0:y0 + c, x0:x0 + c]
      folds[z] = m
  xy, zt = STACK_RESOLUTION[stack]
  res = (float(zt * step), float(xy), float(xy))
  meta = dict(num=int(n), step=step, crop=c, shape=list(images.shape), resolution_nm=list(res),
              fold_mask_sections=[int(z) for z in np.nonzero(folds.any(axis=(1, 2)))[0]])
  return images, folds, res, meta


def make_case(stack: str, variant: str, images, folds, res, meta, seed: int) -> Case:
  """The raw stack, or the stack distorted with the benchmark's DistortionConfig(seed=seed)."""
  meta = dict(meta)
  if variant == "raw":
    return Case(stack, variant, images, folds, res, meta=meta)
  import jax.numpy as jnp
  from jaxalign.ops.fields import warp
  from jaxalign.bench.groundtruth import DistortionConfig, distort_stack
  starters = _starters(images.shape[0])
  config = DistortionConfig(seed=seed, undistorted=tuple(starters))
  d = distort_stack(images, config, progress=False)
  defects = d.defects.copy()
  # A real fold of the input travels with its tissue into the distorted section.
  for z in np.nonzero(folds.any(axis=(1, 2)))[0]:
    moved = np.asarray(warp(jnp.asarray(folds[z], jnp.float32), jnp.asarray(d.pull[z]))) > 0
    defects[z] |= moved & d.tissue[z]
  blank = [int(z) for z in range(images.shape[0]) if not np.any(d.images[z])]
  meta.update(seed=seed, undistorted=starters, blank_sections=blank,
              distortion=[p for p in d.params])
  return Case(stack, variant, d.images, defects, res, gt=d.fields, pull=d.pull, valid=d.valid,
              disc_distance=d.disc_distance, meta=meta)


# ---------------------------------------------------------------------------------------------
# Methods


JAXALIGN_CONFIGS = ("default", "precise")


def jaxalign_config(name: str):
  """None (the defaults) or the 'precise' StackConfig."""
  if name == "default":
    return None
  import jaxalign as ja
  return ja.StackConfig(block=ja.BlockConfig(pair=ja.PairConfig(finest_nm=0)))


_JAXALIGN_SHAPES_SEEN: set = set()


def run_jaxalign(case: Case, config_name: str, repeat: bool) -> tuple[np.ndarray, dict]:
  import jaxalign as ja
  cfg = jaxalign_config(config_name)
  defects = case.defects if case.defects.any() else None

  def call():
    t0 = time.perf_counter()
    f = np.asarray(ja.align_stack(case.images, resolution_nm=case.resolution_nm, voting_distance=VOTING_DISTANCE,
                                  defects=defects, config=cfg, progress=False), np.float32)
    return f, time.perf_counter() - t0

  # Whether an earlier call in this process had the same section shape (some of its compiled
  # kernels may be reused; not all: defect masks and blank sections change what is traced).
  warm = case.images.shape[1:] in _JAXALIGN_SHAPES_SEEN
  _JAXALIGN_SHAPES_SEEN.add(case.images.shape[1:])
  fields, seconds = call()
  timing = dict(wall_s=seconds, same_shape_before=warm)
  if repeat:
    _, again = call()
    timing["second_call_s"] = again
  return fields, timing


def run_sofima(case: Case) -> tuple[np.ndarray, dict]:
  if str(PEERS) not in sys.path:
    sys.path.insert(0, str(PEERS))
  import peers
  blank = [int(z) for z in np.nonzero(~case.has_data)[0]]
  t0 = time.perf_counter()
  out = peers.call_peer("sofima_stack", stack=case.images.astype("float32"), skip=np.array(blank, dtype=np.int64))
  subprocess_s = time.perf_counter() - t0
  info = json.loads(str(out["info"])) if "info" in out else {}
  return np.asarray(out["fields"], np.float32), dict(wall_s=float(out["elapsed_s"]), subprocess_s=subprocess_s,
                                                    skip=blank, sofima_info=info)


def run_method(method: str, case: Case, *, jaxalign_config_name: str = "default",
               repeat_jaxalign: bool = False) -> tuple[np.ndarray, dict] | None:
  """(fields `[Z, H, W, 2]`, timing dict) or None where the method does not apply."""
  z, h, w = case.images.shape
  if method == "raw":
    t0 = time.perf_counter()
    f = np.zeros((z, h, w, 2), np.float32)
    return f, dict(wall_s=time.perf_counter() - t0)
  if method == "truth":
    if case.gt is None:
      return None
    return case.gt.astype(np.float32), dict(wall_s=float("nan"))
  if method == "jaxalign":
    return run_jaxalign(case, jaxalign_config_name, repeat_jaxalign)
  if method == "sofima":
    return run_sofima(case)
  raise app.UsageError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def method_label(method: str, jaxalign_config_name: str = "default") -> str:
  if method == "jaxalign" and jaxalign_config_name != "default":
    return f"jaxalign ({jaxalign_config_name})"
  return method


# ---------------------------------------------------------------------------------------------
# Metrics (one function for every method)


def mip_level(xy_nm: float, target_nm: float) -> int:
  """The MIP level whose pixel (xy_nm * 2**level) is nearest `target_nm` (log scale, as `jaxalign eval`)."""
  from jaxalign.ops.fields import level_nearest
  return level_nearest(xy_nm, target_nm)


def render_outputs(images, defects, fields):
  """Sections with defects zeroed, warped by `fields`, and their data masks (`[Z, H, W]` each)."""
  import jax
  import jax.numpy as jnp
  from jaxalign.bench.evaluation import MASK_THRESHOLD
  from jaxalign.ops.fields import warp
  src = np.where(defects, 0.0, images).astype(np.float32)
  data = ((images != 0) & ~defects).astype(np.float32)
  wv = jax.jit(jax.vmap(warp))
  out, mask = [], []
  for z in range(images.shape[0]):  # one section at a time keeps memory flat on 1k² stacks
    f = jnp.asarray(fields[z:z + 1])
    out.append(np.asarray(wv(jnp.asarray(src[z:z + 1]), f))[0])
    mask.append(np.asarray(wv(jnp.asarray(data[z:z + 1]), f))[0] >= MASK_THRESHOLD)
  return np.stack(out), np.stack(mask)


def _cpc_maps(aligned: dict, common_pairs: dict, pairs, level: int, chunk: int) -> dict | None:
  """Per method: list of CPC maps over `pairs`, NaN wherever any method's chunk is NaN; None if
  the sections are smaller than one chunk at that level."""
  from jaxalign.errors import InputError
  from jaxalign.bench.evaluation import cpc_map
  maps = {m: [] for m in aligned}
  try:
    for (a, b) in pairs:
      per = {m: cpc_map(aligned[m][a], aligned[m][b], common_pairs[(a, b)], level=level, chunk=chunk)
             for m in aligned}
      undefined = np.any([np.isnan(v) for v in per.values()], axis=0)
      for m, v in per.items():
        maps[m].append(np.where(undefined, np.nan, v))
  except InputError as e:
    logging.warning("CPC at level %d, chunk %d: %s", level, chunk, e)
    return None
  return maps


def _low_fraction(maps) -> tuple[float, int, int]:
  from jaxalign.ops.metrics import low_cpc_counts
  low, n = low_cpc_counts(maps)
  return (low / n if n else float("nan")), low, n


def _deformation_summary(d) -> dict:
  dev = np.fmax(np.abs(np.asarray(d.low) - 1.0), np.abs(np.asarray(d.high) - 1.0))
  worst = int(np.nanargmax(dev)) if np.any(np.isfinite(dev)) else -1
  return dict(p1=d.low_all, p99=d.high_all, worst_section=worst,
              worst_p1=float(d.low[worst]) if worst >= 0 else float("nan"),
              worst_p99=float(d.high[worst]) if worst >= 0 else float("nan"), sigma_px=d.sigma_px)


def _epe(pred, ref, valid, ran) -> dict:
  from jaxalign.bench.evaluation import endpoint_errors, epe_stats
  errs = [endpoint_errors(pred[z], ref[z])[valid[z]] for z in np.nonzero(ran)[0]]
  s = epe_stats(np.concatenate(errs) if errs else np.zeros(0))
  return dict(median=s["median"], p95=s["p95"], p99=s["p99"], n=s["n"])


def score_group(case: Case, fields_by_method: dict[str, np.ndarray], *,
                raw_fields_by_method: dict[str, np.ndarray] | None = None,
                paper_scale=PAPER_SCALE, fine_scale=FINE_SCALE) -> dict[str, dict[str, Any]]:
  """Scores every method's fields on one case, on the common footing described in the module doc.

  Args:
    case: the `Case` the fields were computed on.
    fields_by_method: method -> `[Z, H, W, 2]` float32 fields (`aligned[z] = warp(images[z], f[z])`).
    raw_fields_by_method: method -> fields of the same method on the raw variant (for the EPE
      against compose(gt, U)); optional.
    paper_scale, fine_scale: (target nm per pixel, chunk px) of the two CPC scales.
  Returns:
    method -> metrics dict (low_cpc_paper, low_cpc_fine with chunk counts and levels, deformation,
    residual_deformation / epe / epe_fair where there is ground truth).
  """
  import jax
  import jax.numpy as jnp
  from jaxalign.ops.fields import compose, warp
  from jaxalign.ops.metrics import DEFORMATION_DEFECT_MARGIN_PX, deformation, residual_deformation
  z_count, h, w = case.images.shape
  xy = float(case.resolution_nm[1])
  aligned, masks = {}, {}
  for m, f in fields_by_method.items():
    aligned[m], masks[m] = render_outputs(case.images, case.defects, np.asarray(f, np.float32))
  common = np.logical_and.reduce([masks[m] for m in masks])  # [Z, H, W]
  has = case.has_data
  idx = np.nonzero(has)[0]
  pairs = list(zip(idx[:-1], idx[1:]))
  common_pairs = {(a, b): common[a] & common[b] for a, b in pairs}
  scales = {}
  for key, (target, chunk) in (("paper", paper_scale), ("fine", fine_scale)):
    level = mip_level(xy, target)
    maps = _cpc_maps(aligned, common_pairs, pairs, level, chunk)
    scales[key] = (level, chunk, maps)
  ran = has.copy()
  ran[0] = False  # section 0 is the anchor: not an alignment result (as jaxalign.bench.evaluation)
  wv = jax.jit(jax.vmap(warp))
  cv = jax.jit(jax.vmap(compose))
  out = {}
  for m, f in fields_by_method.items():
    f = np.asarray(f, np.float32)
    row: dict[str, Any] = dict(common_fraction=float(common[has].mean()) if has.any() else float("nan"),
                               cpc_pairs=len(pairs))
    for key, (level, chunk, maps) in scales.items():
      frac, low, n = _low_fraction(maps[m]) if maps is not None else (float("nan"), 0, 0)
      row[f"low_cpc_{key}"] = frac
      row[f"low_cpc_{key}_chunks"] = [low, n]
      row[f"cpc_{key}_level"] = level
      row[f"cpc_{key}_nm"] = xy * 2 ** level
      row[f"cpc_{key}_chunk"] = chunk
    # Defects carried into the output frame (any overlap), excluded with the metric's margin.
    dfx_out = np.stack([np.asarray(wv(jnp.asarray(case.defects[z:z + 1], jnp.float32), jnp.asarray(f[z:z + 1])))[0] > 0
                        for z in range(z_count)])
    row["deformation"] = _deformation_summary(deformation(f, resolution_nm=case.resolution_nm, tissue=common,
                                                          defects=dfx_out if dfx_out.any() else None))
    if case.gt is not None:
      # The residual as `jaxalign eval` scores it (jaxalign.ops.metrics.residual_field):
      # e = compose(invert(fields), gt) on the ground truth's (target) grid, with
      # warp(warp(distorted, fields), e) ≈ warp(distorted, gt): it maps the method's output onto the
      # true section, and its area change is det(grad G) / det(grad F): how much more (or less) the
      # fields deform the tissue than the true distortion does (1 everywhere for a perfect method).
      # Scored on valid pixels of sections 1.. (section 0 is the anchor) that every method covers,
      # farther than the deformation margin from a crack or fold (the fields must tear there).
      keep = case.valid & (case.disc_distance > DEFORMATION_DEFECT_MARGIN_PX) & common & ran[:, None, None]
      row["residual_deformation"] = _deformation_summary(residual_deformation(
          f, case.gt, tissue=keep, resolution_nm=case.resolution_nm))
      row["epe"] = _epe(f, case.gt, case.valid, ran)
      u = (raw_fields_by_method or {}).get(m)
      if u is not None and u.shape == f.shape:
        fair = np.stack([np.asarray(cv(jnp.asarray(case.gt[z:z + 1]), jnp.asarray(u[z:z + 1])))[0]
                         for z in range(z_count)])
        row["epe_fair"] = _epe(f, fair, case.valid, ran)
    out[m] = row
  return out


# ---------------------------------------------------------------------------------------------
# Pictures


def picture_panels(case: Case, fields_by_method: dict[str, np.ndarray]) -> dict[str, dict]:
  """Per method: the last section with data (centre crop) with a grid carried by the tissue, and an
  x-z reslice through the centre row of the rendered stack.

  The grid is drawn on the input section (raw variant: bent lines = the method bent the tissue) or,
  with ground truth, on the true section and carried through the residual `compose(pull, fields)`
  (bent lines = the output is deformed relative to the truth).
  """
  import jax.numpy as jnp
  from jaxalign.ops.fields import compose, warp
  z_count, h, w = case.images.shape
  with_data = np.nonzero(case.has_data)[0]
  last = int(with_data[-1])
  prev = int(with_data[-2]) if len(with_data) > 1 else last
  grid = np.zeros((h, w), np.float32)
  for o in (0, 1):  # 2-px lines stay visible after bilinear resampling
    grid[GRID_SPACING // 2 + o::GRID_SPACING, :] = 1.0
    grid[:, GRID_SPACING // 2 + o::GRID_SPACING] = 1.0
  c = min(PNG_CROP, h, w)
  y0, x0 = (h - c) // 2, (w - c) // 2
  panels = {}
  for m, f in fields_by_method.items():
    f = np.asarray(f, np.float32)
    img, _ = render_outputs(case.images[[prev, last]], case.defects[[prev, last]], f[[prev, last]])
    carry = f[last] if case.pull is None else np.asarray(compose(jnp.asarray(case.pull[last]), jnp.asarray(f[last])))
    g = np.asarray(warp(jnp.asarray(grid), jnp.asarray(carry)))
    row = h // 2
    res_rows, _ = render_outputs(case.images, case.defects, f)
    panels[m] = dict(section=img[1][y0:y0 + c, x0:x0 + c], previous=img[0][y0:y0 + c, x0:x0 + c],
                     grid=g[y0:y0 + c, x0:x0 + c], reslice=res_rows[:, row, :], last=last, prev=prev)
  return panels


def _stretch(img):
  vals = img[img != 0]
  lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0))
  return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * (img != 0)


def _composite(a, b):
  """RGB: `a` in red, `b` in green + blue (grey where they agree)."""
  a, b = _stretch(a), _stretch(b)
  return np.stack([a, b, b], -1)


def plot_stack(path: pathlib.Path, stack: str, by_variant: dict[str, tuple[Case, dict]]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  variants = list(by_variant)
  methods = list(dict.fromkeys(m for _, panels in by_variant.values() for m in panels))
  ratios = []
  for v in variants:
    case = by_variant[v][0]
    z_count, _, w = case.images.shape
    ratios += [1.0, 1.0 if z_count < MIN_RESLICE_SECTIONS else
               float(np.clip(z_count * case.resolution_nm[0] / case.resolution_nm[1] / w, 0.2, 1.0))]
  fig, axes = plt.subplots(len(ratios), len(methods), figsize=(3.3 * len(methods), 3.4 * sum(ratios) + 0.6),
                           squeeze=False, gridspec_kw=dict(height_ratios=ratios))
  for vi, v in enumerate(variants):
    case, panels = by_variant[v]
    zr, xy = case.resolution_nm[0], case.resolution_nm[1]
    for mi, m in enumerate(methods):
      ax_s, ax_r = axes[2 * vi, mi], axes[2 * vi + 1, mi]
      if m not in panels:
        ax_s.axis("off")
        ax_r.axis("off")
        continue
      p = panels[m]
      sec = p["section"]
      vals = sec[sec != 0]
      lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0, 1))
      ax_s.imshow(sec, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
      overlay = np.zeros(sec.shape + (4,), np.float32)
      overlay[..., 1] = overlay[..., 2] = 1.0  # cyan
      overlay[..., 3] = 0.8 * np.clip(p["grid"], 0, 1)
      ax_s.imshow(overlay, interpolation="nearest")
      grid_on = "the true (undistorted) section" if case.pull is not None else "the input section"
      ax_s.set_title(f"{v} / {m}: section {p['last']}\ngrid drawn on {grid_on}", fontsize=7)
      ax_s.axis("off")
      if case.images.shape[0] < MIN_RESLICE_SECTIONS:
        # Too few sections for a reslice: the last two aligned sections in red (previous) and cyan.
        ax_r.imshow(_composite(p["previous"], p["section"]), interpolation="nearest")
        ax_r.set_title(f"{v} / {m}: section {p['prev']} red, {p['last']} cyan", fontsize=7)
        ax_r.axis("off")
        continue
      rs = p["reslice"]
      vals = rs[rs != 0]
      lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0, 1))
      ax_r.imshow(rs, cmap="gray", vmin=lo, vmax=hi, aspect=zr / xy, interpolation="nearest")
      ax_r.set_title(f"{v} / {m}: x-z reslice, centre row", fontsize=7)
      ax_r.set_xlabel("x (px)", fontsize=6)
      ax_r.set_ylabel("section", fontsize=6)
      ax_r.tick_params(labelsize=6)
  fig.suptitle(f"{stack}: last section with data ({PNG_CROP}-px centre crop; straight grid = tissue not bent)\n"
               f"and x-z reslice (z to scale; below {MIN_RESLICE_SECTIONS} sections: the last two sections overlaid)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Table


def _fmt(v, spec="{:.3f}") -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "–"
  return spec.format(v)


def _pct(v) -> str:
  return _fmt(None if v is None else 100.0 * v, "{:.1f} %")


def _range(d) -> str:
  if not d:
    return "–"
  return f"{_fmt(d.get('p1'))} – {_fmt(d.get('p99'))}"


def _worst(d) -> str:
  if not d or d.get("worst_section", -1) < 0:
    return "–"
  return f"z{d['worst_section']}: {_fmt(d.get('worst_p1'))} – {_fmt(d.get('worst_p99'))}"


def _epe_cell(e, xy) -> str:
  if not e:
    return "–"
  med, p95 = e.get("median"), e.get("p95")
  nm = (lambda v: None if v is None else v * xy)
  return (f"{_fmt(med, '{:.2f}')} / {_fmt(p95, '{:.2f}')} "
          f"({_fmt(nm(med), '{:.0f}')} / {_fmt(nm(p95), '{:.0f}')} nm)")


def read_rows(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  # A later run of the same (stack, variant, method) replaces the earlier one (re-running a stack
  # after a change appends to the JSON).
  by_key: dict = {}
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      row = json.loads(line)
      by_key.pop((row["stack"], row["variant"], row.get("label", row["method"])), None)
      by_key[(row["stack"], row["variant"], row.get("label", row["method"]))] = row
  return list(by_key.values())


def build_markdown(rows: list[dict]) -> str:
  """The page docs/benchmarks/real_stacks.md from JSON rows (the last row of each stack/variant/method)."""
  latest: dict[tuple, dict] = {}
  for r in rows:
    latest[(r["stack"], r["variant"], r["method"])] = r
  rows = list(latest.values())
  order_s = {s: i for i, s in enumerate(STACKS)}
  order_v = {"raw": 0, "distorted": 1}
  order_m = {"raw": 0, "truth": 1, "sofima": 2}
  rows.sort(key=lambda r: (order_s.get(r["stack"], 99), r["stack"], order_v.get(r["variant"], 9),
                           order_m.get(r["method"], 3), r["method"]))
  sofima_s = {(r["stack"], r["variant"]): r.get("wall_s") for r in rows if r["method"] == "sofima"}
  # The common mask of a row is that of the methods run with it: rows of a stack/variant that came from
  # another invocation than its SOFIMA row (or its first row) are marked.
  group_run = {}
  for r in rows:
    key = (r["stack"], r["variant"])
    if r["method"] == "sofima" or key not in group_run:
      group_run[key] = (r.get("date"), r.get("command"))
  separate = {id(r) for r in rows if (r.get("date"), r.get("command")) != group_run[(r["stack"], r["variant"])]}
  commands = list(dict.fromkeys(r.get("command", "?") for r in rows))
  dates = sorted({r.get("date", "?")[:10] for r in rows})
  lines = [
    "# Real stacks: jaxalign and SOFIMA side by side",
    "",
    "Every shared real stack (`../shared/data/em`), as acquired (`raw`: the stack's own small drifts, no",
    "ground truth) and distorted with the benchmark's known fields (`distorted`:",
    "`distort_stack(stack, DistortionConfig(seed))`, the block starters left undistorted as in",
    "experiments/eval_stack.py; section 0 is the undistorted anchor, the frame of every method), aligned",
    "by `jaxalign.align_stack` with its defaults (`resolution_nm=(z, y, x)`, voting distance 3, defect",
    "masks given) and by SOFIMA's EM stack recipe (`peers.sofima_stack`, ../shared/peers; no defect",
    "masks, blank sections skipped). `raw` is the unaligned input, `truth` the ground-truth fields.",
    "",
    "Command" + ("s" if len(commands) > 1 else "") + ":",
    "",
    "```",
    *commands,
    "```",
    "",
    f"Machine: the team's 2-core x86_64 CPU VM, no GPU, shared with other jobs (absolute times are rough; "
    f"compare within a row group). Date: {', '.join(dates)}.",
    "",
    "Columns:",
    "- **wall s**: wall clock of the call in the benchmark's process, compilation included (jaxalign: first call;",
    "  `2nd` = a second, compiled call with `--repeat_jaxalign`). SOFIMA: the peer's own `elapsed_s` (its JIT",
    "  included, interpreter start and npz transfer not), the subprocess wall time in brackets.",
    "  Each SOFIMA call is a fresh process, so it always compiles. jaxalign runs in the benchmark's process:",
    "  the distorted variant may reuse some kernels compiled for the raw variant of the same stack (same",
    "  section shape), not all (defect masks and blank sections change what is traced); `2nd` is fully compiled.",
    "- **ratio**: wall s / SOFIMA's wall s on the same stack and variant (< 1 = faster than SOFIMA).",
    "- **low CPC**: fraction of chunks with CPC < 0.25 between consecutive aligned sections with data, at the",
    "  MIP level nearest 32 nm with 64-px chunks (paper) and nearest 16 nm with 32-px chunks (fine); the scales",
    "  used are in the `scales` column as nm/chunk px. Only chunks every method's output covers are scored (the",
    "  intersection of the warped data masks over the methods of the stack/variant; chunk counts in the JSON).",
    "- **deformation**: `jaxalign.ops.metrics.deformation` of the fields: p1 – p99 of the local area change",
    "  (Jacobian determinant, 1 = kept) of each field's non-affine part smoothed at 100 nm, over the stack, and",
    "  the worst section. **residual**: `jaxalign.ops.metrics.residual_deformation`, the same for",
    "  `compose(invert(fields), gt)` (maps the output onto the true section; as `jaxalign eval`): how much more or",
    "  less the fields deform the tissue than the true distortion (1 – 1 for a perfect method), on valid tissue",
    "  of sections 1.. farther than 20 px from a crack or fold.",
    "- **EPE**: endpoint error |fields − gt| on valid tissue of sections 1.. (as `jaxalign.bench.evaluation`), median /",
    "  p95 in px (nm). **EPE vs compose(gt, U)**: the same against the ground truth followed by the motion U the",
    "  method finds in the raw variant of the stack (the stack's own drifts; eval_stack's fair reference).",
    "",
    "| stack | variant | method | wall s | ratio to SOFIMA | low CPC (paper) | low CPC (fine) | scales | "
    "deformation p1–p99 | worst section | residual p1–p99 | EPE median / p95 px (nm) | "
    "EPE vs compose(gt, U) px |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    wall = r.get("wall_s")
    wall_s = _fmt(wall, "{:.1f}")
    if r.get("second_call_s") is not None:
      wall_s += f" (2nd {_fmt(r['second_call_s'], '{:.1f}')})"
    if r.get("subprocess_s") is not None:
      wall_s += f" ({_fmt(r['subprocess_s'], '{:.1f}')})"
    sref = sofima_s.get((r["stack"], r["variant"]))
    ratio = (wall / sref if (wall is not None and sref and r["method"] not in ("raw", "truth")) else None)
    m = r.get("metrics", {})
    xy = r.get("resolution_nm", [0, 1, 1])[1]
    scales = (f"{_fmt(m.get('cpc_paper_nm'), '{:.0f}')}/{m.get('cpc_paper_chunk', '–')}, "
              f"{_fmt(m.get('cpc_fine_nm'), '{:.0f}')}/{m.get('cpc_fine_chunk', '–')}")
    fair = m.get("epe_fair")
    mark = " †" if id(r) in separate else ""
    lines.append(
      f"| {r['stack']} | {r['variant']} | {r['label']} | {wall_s} | {_fmt(ratio, '{:.2f}')} | "
      f"{_pct(m.get('low_cpc_paper'))}{mark} | {_pct(m.get('low_cpc_fine'))}{mark} | {scales} | "
      f"{_range(m.get('deformation'))} | "
      f"{_worst(m.get('deformation'))} | {_range(m.get('residual_deformation'))} | {_epe_cell(m.get('epe'), xy)} | "
      f"{'–' if not fair else _fmt(fair['median'], '{:.2f}') + ' / ' + _fmt(fair['p95'], '{:.2f}')} |")
  if separate:
    lines += ["", "† from a separate run: its low CPC is scored on the common mask of the methods run with it "
              "(`methods_in_common_mask` in the JSON), not of this row group."]
  shapes = {}
  for r in rows:
    shapes.setdefault(r["stack"], (r.get("shape"), r.get("resolution_nm"), r.get("meta", {})))
  lines += ["", "Stacks as run:", ""]
  for s, (shape, res, meta) in shapes.items():
    lines.append(f"- {s}: {shape[0]} sections of {shape[1]}×{shape[2]} px, (z, y, x) = "
                 f"{'×'.join(f'{v:g}' for v in res)} nm"
                 + (f", every {meta['step']}th slice" if meta.get("step", 1) > 1 else "")
                 + (f", fold mask on sections {meta['fold_mask_sections']}" if meta.get("fold_mask_sections") else "")
                 + f". Picture: [real_stacks_{s}.png](real_stacks_{s}.png)")
  lines.append("")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _provenance() -> dict:
  try:
    commit = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True, cwd=ROOT,
                            check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxalign"], capture_output=True, text=True,
                           cwd=ROOT, check=False).stdout.strip()
  except OSError:
    commit, dirty = "?", ""
  return dict(commit=commit + (" + uncommitted jaxalign edits" if dirty else ""), host=platform.node(),
              cpus=os.cpu_count(), loadavg=list(os.getloadavg()))


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return v if np.isfinite(v) else None
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  return x


def main(argv):
  del argv
  # The command line's XLA settings, so timings are what a user of `jaxalign align` gets.
  from jaxalign import compile_cache
  compile_cache.quick_cpu_compile()
  out_json = pathlib.Path(FLAGS.output_json)
  markdown = pathlib.Path(FLAGS.markdown)
  if FLAGS.table_only:
    rows = read_rows(out_json)
    if not rows:
      raise app.UsageError(f"--table_only: no rows in {out_json}")
    markdown.write_text(build_markdown(rows))
    logging.info("wrote %s from %d rows", markdown, len(rows))
    return 0
  for s in FLAGS.stacks:
    if s not in STACK_SELECTION:
      raise app.UsageError(f"unknown stack {s!r}; known: {', '.join(STACKS)}")
  for v in FLAGS.variants:
    if v not in ("raw", "distorted"):
      raise app.UsageError(f"unknown variant {v!r}; known: raw, distorted")
  for m in FLAGS.methods:
    if m not in METHODS:
      raise app.UsageError(f"unknown method {m!r}; known: {', '.join(METHODS)}")
  for c in FLAGS.jaxalign_config:
    if c not in JAXALIGN_CONFIGS:
      raise app.UsageError(f"unknown --jaxalign_config {c!r}; known: {', '.join(JAXALIGN_CONFIGS)}")
  # (label, method, jaxalign configuration): one run each per stack and variant
  specs = [(method_label(m, c), m, c) for m in FLAGS.methods
           for c in (FLAGS.jaxalign_config if m == "jaxalign" else [None])]
  from jaxalign.errors import InputError
  command = "python experiments/real_stacks.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  provenance = _provenance()
  date = datetime.datetime.now().isoformat(timespec="seconds")
  runs = [(s, v, spec) for s in FLAGS.stacks for v in FLAGS.variants for spec in specs
          if not (spec[1] == "truth" and v == "raw")]
  out_json.parent.mkdir(parents=True, exist_ok=True)
  bar = tqdm(total=len(runs), desc="runs", unit="run")
  for stack in FLAGS.stacks:
    try:
      images, folds, res, meta = load_original(stack, FLAGS.num, FLAGS.crop)
    except InputError as e:
      logging.warning("skipping %s: %s", stack, e)
      bar.update(sum(1 for r in runs if r[0] == stack))
      continue
    logging.info("%s: %s sections of %s px, resolution %s nm", stack, images.shape[0], images.shape[1:], res)
    raw_fields: dict[str, np.ndarray] = {}
    pictures = {}
    for variant in FLAGS.variants:
      case = make_case(stack, variant, images, folds, res, meta, FLAGS.seed)
      fields, timings = {}, {}
      config_of = {}
      for label, method, config in specs:
        if method == "truth" and variant == "raw":
          continue
        bar.set_description(f"{stack} {variant} {label}")
        got = run_method(method, case, jaxalign_config_name=config or "default",
                         repeat_jaxalign=FLAGS.repeat_jaxalign)
        bar.update(1)
        if got is None:
          continue
        fields[label], timings[label] = got
        config_of[label] = config
        logging.info("%s %s %s: %.1f s", stack, variant, label, timings[label]["wall_s"])
      bar.set_description(f"{stack} {variant} scoring")
      scores = score_group(case, fields, raw_fields_by_method=raw_fields if variant == "distorted" else None)
      sofima_s = timings.get("sofima", {}).get("wall_s")
      with open(out_json, "a") as fh:
        for method in fields:  # method = the run's label
          t = timings[method]
          row = dict(stack=stack, variant=variant, method=method, label=method, num=int(images.shape[0]),
                     shape=list(images.shape),
                     crop=meta["crop"], resolution_nm=list(res), seed=FLAGS.seed if variant == "distorted" else None,
                     jaxalign_config=config_of[method],
                     wall_s=t.get("wall_s"), second_call_s=t.get("second_call_s"), subprocess_s=t.get("subprocess_s"),
                     ratio_to_sofima=(t["wall_s"] / sofima_s if sofima_s and method not in ("raw", "truth")
                                      else None),
                     jaxalign_same_shape_before=t.get("same_shape_before"),
                     sofima_skip=t.get("skip"), sofima_info=t.get("sofima_info"),
                     methods_in_common_mask=list(fields), metrics=scores[method],
                     meta={k: v for k, v in case.meta.items() if k != "distortion"},
                     command=command, date=date, provenance=provenance)
          fh.write(json.dumps(_jsonable(row)) + "\n")
          m = scores[method]
          logging.info("%s %s %s: low CPC %s / %s, deformation %s, EPE %s", stack, variant, method,
                       _pct(m["low_cpc_paper"]), _pct(m["low_cpc_fine"]), _range(m["deformation"]),
                       _epe_cell(m.get("epe"), res[1]))
      if variant == "raw":
        raw_fields = fields
      if FLAGS.png_dir:
        pictures[variant] = (case, picture_panels(case, fields))
      del fields
    if FLAGS.png_dir and pictures:
      png = pathlib.Path(FLAGS.png_dir) / f"real_stacks_{stack}.png"
      png.parent.mkdir(parents=True, exist_ok=True)
      plot_stack(png, stack, pictures)
      logging.info("wrote %s", png)
  bar.close()
  rows = read_rows(out_json)
  if not rows:
    logging.warning("no runs: nothing written (%s has no rows)", out_json)
    return 0
  markdown.parent.mkdir(parents=True, exist_ok=True)
  markdown.write_text(build_markdown(rows))
  logging.info("wrote %s and %s", out_json, markdown)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  define_flags()
  app.run(main)
