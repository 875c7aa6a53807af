"""`jaxalign eval VOLUME [--ground_truth=CASE_DIR] [--fields=FIELDS]`: alignment quality of a volume.

CPC maps between neighbouring sections of VOLUME and the fraction of chunks below 0.25, per section
and pooled. The default scale is the paper's: 64-px chunks at the MIP level nearest 32 nm/px (smaller
chunks, then a finer level, when sections are too small for that); --level / --chunk override it.
A PNG of the maps and a JSON summary go to --output.

For proofreading, the --worst_chunks chunks with the lowest CPC are listed worst first in
worst_chunks.json (level-0 voxel (z, y, x) of each chunk centre, z the later section of the pair
compared, its CPC, and the level / chunk size used) and as a neuroglancer point-annotation layer in
worst_chunks_layer.json (a viewer state in the volume's voxel space, dimensions in metres as
`jaxalign view` writes them; its layer can be added to a `jaxalign view` state.json).

Given the fields that produced VOLUME (--fields, or VOLUME/../fields when VOLUME is a `jaxalign
align` output; at VOLUME's level 0 or any coarser MIP level, found from their shape): how much they
deform the tissue (`jaxalign.ops.metrics.deformation`: local area change of each section's non-affine
part, smoothed at 100 nm, over VOLUME's tissue; p1 - p99 over the stack and per section), with a
per-section plot (deformation.png) and the worst section's map (deformation_map.png). Without a
ground-truth case eval knows no crack or fold masks in the aligned frame, so fields that tear there
show up as large area changes (the worst section's map shows where).

With a ground-truth case directory (see `jaxalign.bench.evaluation`, written by
`experiments/eval_alignment.py --case=stack --case_dir=...`): the same CPC numbers for the distorted
input and the undistorted original next to VOLUME's and, with the fields, endpoint errors and the
deformation of the residual field `compose(invert(fields), truth)` (`jaxalign.ops.metrics.residual_field`:
it maps the aligned sections onto the truth, on the grid where the endpoint error is measured) and of
the truth itself, all left out within 20 px of cracks and folds.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import flags, logging
from tqdm import tqdm

from jaxalign.errors import InputError
from jaxalign.bench.evaluation import WORST_CHUNKS, cpc_scale
from jaxalign.ops.metrics import low_cpc_fraction

FLAGS = flags.FLAGS
flags.DEFINE_string("ground_truth", None, "ground-truth case directory (case.json + arrays.npz)")
flags.DEFINE_string("fields", None, "field volume [Z, H, W, 2] that produced VOLUME (tissue deformation; "
                    "EPE with --ground_truth); default: VOLUME/../fields for a `jaxalign align` output")
flags.DEFINE_integer("level", None, "CPC after 2**level downsampling of level-0 sections (default: the level "
                     "nearest 32 nm/px, the paper's)")
flags.DEFINE_integer("chunk", None, "CPC chunk side in px at --level (default: 64, the paper's)")
flags.DEFINE_string("output", None, "directory for cpc_maps.png and eval.json (default: ./<VOLUME name>_eval)")
flags.DEFINE_boolean("progress", True, "show progress bars")
flags.DEFINE_integer("worst_chunks", WORST_CHUNKS, "chunks with the lowest CPC listed for proofreading in "
                     "worst_chunks.json and worst_chunks_layer.json (neuroglancer annotations); 0 = none")


# Fields may be this many MIP levels coarser than VOLUME's level 0.
MAX_FIELD_LEVEL = 12
# Per-section deformation rows printed at most (the sections farthest from 1).
PRINT_SECTIONS = 40
WORST_CHUNKS_FILE = "worst_chunks.json"
WORST_CHUNKS_LAYER_FILE = "worst_chunks_layer.json"


def neighbour_cpc(stack, *, level: int, chunk: int, progress: bool = False, desc: str = "cpc"):
  """CPC maps of consecutive sections of `stack` ([Z, H, W] array or a `Volume`).

  Returns (list of Z-1 maps `[h, w]` for pairs (z-1, z), list of per-pair low-CPC fractions).
  """
  from jaxalign.bench import evaluation as ev
  read = (lambda z: np.asarray(stack.read(z=z), np.float32)) if hasattr(stack, "read") else (lambda z: stack[z])
  n = stack.shape()[0] if hasattr(stack, "read") else stack.shape[0]
  maps, fracs = [], []
  prev = read(0)
  any_data = bool(np.any(prev))
  for z in tqdm(range(1, n), desc=desc, disable=not progress, leave=False):
    cur = read(z)
    any_data = any_data or bool(np.any(cur))
    m = ev.cpc_map(prev, cur, level=level, chunk=chunk)
    maps.append(m)
    fracs.append(low_cpc_fraction([m]))
    prev = cur
  if not any_data:
    raise InputError("the volume has no data (every section is all zeros)")
  return maps, fracs


def _plot(maps_by_name: dict[str, list[np.ndarray]], path: pathlib.Path, threshold: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(maps_by_name)
  n = max(len(v) for v in maps_by_name.values())
  fig, axes = plt.subplots(len(names), n, figsize=(1.6 * n + 1, 1.8 * len(names) + 0.4), squeeze=False)
  cmap = matplotlib.colormaps["viridis"].copy()
  cmap.set_bad("0.6")
  im = None
  for r, name in enumerate(names):
    for c in range(n):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c < len(maps_by_name[name]):
        m = maps_by_name[name][c]
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-0.2, vmax=1.0)
        low = np.argwhere(m < threshold)
        if len(low):
          ax.scatter(low[:, 1], low[:, 0], marker="x", c="red", s=8)
        if r == 0:
          ax.set_title(f"{c}->{c + 1}", fontsize=7)
      if c == 0:
        ax.set_ylabel(name, fontsize=8)
  if im is not None:
    fig.colorbar(im, ax=axes, shrink=0.8, label=f"CPC (red x: < {threshold})")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _open_fields(furl: str, url: str, shape):
  """Opens and checks the fields volume; returns (Volume, MIP level of VOLUME its sections match)."""
  from jaxalign.volume import store
  if "://" not in furl and not pathlib.Path(furl).exists():
    raise InputError(f"--fields: missing path {furl}")
  try:
    fvol = store.open_volume(furl)
  except InputError as e:
    raise InputError(f"--fields: {e}") from None
  fshape = tuple(fvol.shape())
  if not fvol.is_field:
    raise InputError(f"--fields {furl}: expected a field volume [Z, H, W, 2], got {fvol.kind} {fshape}")
  if fshape[0] != shape[0]:
    raise InputError(f"--fields {furl}: {fshape[0]} sections, but {url} has {shape[0]}")
  level = next((k for k in range(MAX_FIELD_LEVEL + 1) if tuple(store.level_shape(shape, k)[1:3]) == fshape[1:3]),
               None)
  if level is None:
    raise InputError(f"--fields {furl}: sections of {fshape[1]}x{fshape[2]} px match no MIP level of {url} "
                     f"({shape[1]}x{shape[2]} px at level 0)")
  return fvol, level


def _tissue(vol, level: int) -> np.ndarray:
  """`[Z, h, w]` bool: where VOLUME has data at MIP `level` (a pixel counts when all of it has data)."""
  if level < vol.levels:
    return np.asarray(vol.read(level=level)) != 0
  m = np.asarray(vol.read()) != 0
  for _ in range(level):  # 2x2 min (masks go down by min), odd edges replicated
    m = np.pad(m, ((0, 0), (0, m.shape[1] % 2), (0, m.shape[2] % 2)), mode="edge")
    m = m[:, 0::2, 0::2] & m[:, 1::2, 0::2] & m[:, 0::2, 1::2] & m[:, 1::2, 1::2]
  return m


def _deformation_text(results: dict, sigma_px: float, resolution_nm, level: int) -> str:
  """The printed deformation summary: stack p1 - p99 per series, then per-section p1 / p99."""
  from jaxalign.ops.metrics import DEFORMATION_BAND, DEFORMATION_SMOOTH_NM
  px = 0.5 * (resolution_nm[1] + resolution_nm[2])
  f = lambda v: "-" if np.isnan(v) else f"{v:.4f}"  # noqa: E731
  lines = [f"tissue deformation: local area change of the non-affine field, smoothed at {DEFORMATION_SMOOTH_NM:g} nm "
           f"(sigma {sigma_px:.3g} px at level {level}, {px:g} nm/px); intact within "
           f"[{DEFORMATION_BAND[0]:g}, {DEFORMATION_BAND[1]:g}]",
           "| series | p1 | p99 | worst section (p1, p99) |", "|---|---|---|---|"]
  for name, d in results.items():
    z = d.worst
    worst = "-" if z is None else f"{z} ({f(d.low[z])}, {f(d.high[z])})"
    lines.append(f"| {name} | {f(d.low_all)} | {f(d.high_all)} | {worst} |")
  z_count = len(next(iter(results.values())).low)
  dev = np.full(z_count, -np.inf)
  for d in results.values():
    dev = np.fmax(dev, np.fmax(1.0 - d.low.astype(np.float64), d.high.astype(np.float64) - 1.0))
  zs = np.arange(z_count)
  head = "per section p1 / p99:"
  if z_count > PRINT_SECTIONS:
    zs = np.sort(np.argsort(-np.nan_to_num(dev, nan=-np.inf), kind="stable")[:PRINT_SECTIONS])
    head = f"per section p1 / p99 (the {PRINT_SECTIONS} of {z_count} sections farthest from 1; all in eval.json):"
  lines += [head, "| z | " + " | ".join(f"{n} p1 | {n} p99" for n in results) + " |",
            "|---|" + "---|---|" * len(results)]
  for z in zs:
    lines.append(f"| {z} | " + " | ".join(f"{f(d.low[z])} | {f(d.high[z])}" for d in results.values()) + " |")
  return "\n".join(lines)


def _fields_url(volume_url: str) -> str | None:
  if FLAGS.fields:
    return FLAGS.fields
  p = volume_url.rstrip("/")
  if p.endswith("/aligned"):
    cand = p[: -len("aligned")] + "fields"
    if pathlib.Path(cand).exists():
      return cand
  return None


def main(argv):
  if len(argv) != 2:
    raise InputError(f"usage: jaxalign eval VOLUME [--ground_truth=CASE_DIR] [--fields=FIELDS] "
                     f"(got {len(argv) - 1} positional args)")
  from jaxalign.bench import evaluation as ev
  from jaxalign.volume import store
  if (FLAGS.level is not None and FLAGS.level < 0) or (FLAGS.chunk is not None and FLAGS.chunk < 2):
    raise InputError(f"--level must be >= 0 and --chunk >= 2 (got {FLAGS.level}, {FLAGS.chunk})")
  if FLAGS.worst_chunks < 0:
    raise InputError(f"--worst_chunks must be >= 0 (0 = no list), got {FLAGS.worst_chunks}")
  url = argv[1]
  if "://" not in url and not pathlib.Path(url).exists():
    raise InputError(f"missing path: {url}")
  vol = store.open_volume(url)
  if vol.is_field:
    raise InputError(f"{url} is a field volume; eval expects an image volume (pass fields with --fields)")
  shape = vol.shape()
  if shape[0] < 2:
    raise InputError(f"{url} has {shape[0]} section(s); CPC needs at least 2")
  # Checked before any progress output; level 0 because coarser levels may not be built yet.
  if not any(np.any(np.asarray(vol.read(z=z))) for z in range(shape[0])):
    raise InputError(f"{url}: the volume has no data (every section is all zeros)")
  case = ev.load_case(FLAGS.ground_truth) if FLAGS.ground_truth else None
  if case is not None:
    if case.kind != "stack":
      raise InputError(f"{FLAGS.ground_truth} is a {case.kind!r} case; eval VOLUME needs a 'stack' case")
    if tuple(case.src.shape) != tuple(shape):
      raise InputError(f"volume shape {tuple(shape)} does not match the case's stack {tuple(case.src.shape)}")
  furl = _fields_url(url)
  fvol, field_level = _open_fields(furl, url, shape) if furl is not None else (None, None)
  if case is not None and fvol is not None and tuple(fvol.shape()) != tuple(case.gt.shape):
    raise InputError(f"fields {furl}: expected a field volume of shape {tuple(case.gt.shape)}, "
                     f"got {fvol.kind} {tuple(fvol.shape())}")
  fields = None if fvol is None else np.asarray(fvol.read(), np.float32)
  if fields is not None and not np.all(np.isfinite(fields)):
    raise InputError(f"--fields {furl}: contains NaN or Inf values")
  out = pathlib.Path(FLAGS.output or f"{pathlib.Path(url.rstrip('/')).name}_eval")
  threshold = ev.EvalConfig.cpc_threshold
  level, chunk, scale_note = cpc_scale(shape, vol.resolution, FLAGS.level, FLAGS.chunk)
  cpc_nm = vol.resolution[1] * 2 ** level
  maps, fracs = neighbour_cpc(vol, level=level, chunk=chunk, progress=FLAGS.progress, desc="cpc")
  summary: dict = dict(volume=url, shape=list(shape), resolution_nm=list(vol.resolution), level=level,
                       chunk=chunk, cpc_nm_per_px=cpc_nm, threshold=threshold,
                       low_cpc=low_cpc_fraction(maps, threshold=threshold), low_cpc_per_pair=fracs)
  worst = ev.worst_chunks(maps, level=level, chunk=chunk, count=FLAGS.worst_chunks)
  rows = [("volume", summary["low_cpc"])]
  all_maps = {"volume": maps}
  if case is not None:
    for name, stack in (("distorted input", case.src), ("undistorted original", case.tgt)):
      m, _ = neighbour_cpc(stack, level=level, chunk=chunk)
      all_maps[name] = m
      summary[f"low_cpc_{name.split()[0]}"] = low_cpc_fraction(m, threshold=threshold)
      rows.append((name, summary[f"low_cpc_{name.split()[0]}"]))
  deform = None
  if fvol is None:
    logging.warning("no --fields given (and no sibling 'fields' volume): %s skipped",
                    "EPE and deformation" if case is not None else "deformation")
  else:
    from jaxalign.ops import metrics
    ran = None
    if case is not None:
      ran = np.r_[False, [bool(np.any(s)) for s in case.src[1:]]]
      summary["epe"] = ev.score_fields(fields, case, ran=ran)
    field_res = store.level_resolution(vol.resolution, field_level)
    if not np.allclose(fvol.resolution, field_res, rtol=1e-6):
      logging.warning("fields %s say %s nm/px, but they match %s at level %d (%s nm/px): using the latter",
                      furl, fvol.resolution, url, field_level, field_res)
    deform = ev.deformation_scores(fields, _tissue(vol, field_level), resolution_nm=field_res, case=case, ran=ran)
    first = next(iter(deform.values()))
    summary["deformation"] = dict(
        fields_url=furl, level=field_level, resolution_nm=list(field_res), smooth_nm=metrics.DEFORMATION_SMOOTH_NM,
        sigma_px=first.sigma_px, margin_px=metrics.DEFORMATION_DEFECT_MARGIN_PX,
        band=list(metrics.DEFORMATION_BAND), **{name: d.summary() for name, d in deform.items()})
  out.mkdir(parents=True, exist_ok=True)
  _plot(all_maps, out / "cpc_maps.png", threshold)
  written = [out / "cpc_maps.png"]
  if FLAGS.worst_chunks:
    listing = dict(volume=url, resolution_nm=list(vol.resolution), level=level, chunk=chunk,
                   chunk_level0_px=chunk * 2 ** level, cpc_nm_per_px=cpc_nm, threshold=threshold,
                   coordinates="level-0 voxel indices (z, y, x) of each chunk's centre; z is the later "
                               "section of the pair compared; y_range / x_range: level-0 voxels covered",
                   chunks=worst)
    (out / WORST_CHUNKS_FILE).write_text(json.dumps(listing, indent=1))
    (out / WORST_CHUNKS_LAYER_FILE).write_text(json.dumps(ev.worst_chunks_state(worst, vol.resolution), indent=1))
    summary["worst_chunks"] = dict(count=len(worst), file=WORST_CHUNKS_FILE, layer_file=WORST_CHUNKS_LAYER_FILE)
    written += [out / WORST_CHUNKS_FILE, out / WORST_CHUNKS_LAYER_FILE]
  if deform is not None:
    from jaxalign.bench import report
    report.draw_deformation(deform, out / "deformation.png", resolution_nm=field_res)
    report.draw_deformation_map(deform, out / "deformation_map.png")
    written += [out / "deformation.png", out / "deformation_map.png"]
  (out / "eval.json").write_text(json.dumps(summary, indent=1, default=float))
  print(f"{url}: {shape[0]} sections {shape[1]}x{shape[2]}, CPC at level {level} ({cpc_nm:g} nm/px), "
        f"{chunk}-px chunks{scale_note}")
  print("| stack | low-CPC fraction (< %.2f) |\n|---|---|" % threshold)
  for name, v in rows:
    print(f"| {name} | {v:.4f} |")
  if "epe" in summary:
    e = summary["epe"]
    print(f"EPE over valid tissue: median {e['epe_median']:.3f} px, p95 {e['epe_p95']:.3f}, p99 {e['epe_p99']:.3f}, "
          f">2 px {e['epe_frac_over']:.4f}; within 20 px of cracks/folds: median {e['near_median']:.3f}, "
          f"p95 {e['near_p95']:.3f}")
  if worst:
    w = worst[0]
    print(f"worst chunk: z={w['z']} y={w['y']} x={w['x']} (sections {w['pair'][0]}-{w['pair'][1]}), "
          f"CPC {w['cpc']:.3f}; {len(worst)} worst chunks listed in {out / WORST_CHUNKS_FILE}")
  if deform is not None:
    print(_deformation_text(deform, first.sigma_px, field_res, field_level))
  print(f"wrote {', '.join(str(p) for p in written)} and {out / 'eval.json'}")
  return 0
