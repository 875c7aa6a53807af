"""`jaxalign eval VOLUME [--ground_truth=CASE_DIR] [--fields=FIELDS]`: alignment quality of a volume.

Without ground truth: CPC maps between neighbouring sections of VOLUME (after 2**level downsampling,
chunks of --chunk px) and the fraction of chunks below 0.25, per section and pooled; a PNG of the maps
and a JSON summary go to --output. With a ground-truth case directory (see `jaxalign.evaluation`,
written by `experiments/eval_alignment.py --case=stack --case_dir=...`): the same numbers for the
distorted input and the undistorted original next to VOLUME's, and, given the fields that produced
VOLUME (--fields, or VOLUME/../fields when VOLUME is a `jaxalign align` output), endpoint errors.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import flags, logging
from tqdm import tqdm

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("ground_truth", None, "ground-truth case directory (case.json + arrays.npz)")
flags.DEFINE_string("fields", None, "field volume [Z, H, W, 2] that produced VOLUME (for EPE with --ground_truth)")
flags.DEFINE_integer("level", 1, "CPC after 2**level downsampling of level-0 sections")
flags.DEFINE_integer("chunk", 32, "CPC chunk side in px at --level")
flags.DEFINE_string("output", None, "directory for cpc_maps.png and eval.json (default: ./<VOLUME name>_eval)")
flags.DEFINE_boolean("progress", True, "show progress bars")


def neighbour_cpc(stack, *, level: int, chunk: int, progress: bool = False, desc: str = "cpc"):
  """CPC maps of consecutive sections of `stack` ([Z, H, W] array or a `Volume`).

  Returns (list of Z-1 maps `[h, w]` for pairs (z-1, z), list of per-pair low-CPC fractions).
  """
  from jaxalign import evaluation as ev
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
    fracs.append(ev._fraction(ev.low_cpc_counts([m])))
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
  from jaxalign import evaluation as ev
  from jaxalign import io
  if FLAGS.level < 0 or FLAGS.chunk < 2:
    raise InputError(f"--level must be >= 0 and --chunk >= 2 (got {FLAGS.level}, {FLAGS.chunk})")
  url = argv[1]
  if "://" not in url and not pathlib.Path(url).exists():
    raise InputError(f"missing path: {url}")
  vol = io.open_volume(url)
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
  out = pathlib.Path(FLAGS.output or f"{pathlib.Path(url.rstrip('/')).name}_eval")
  threshold = ev.EvalConfig.cpc_threshold
  maps, fracs = neighbour_cpc(vol, level=FLAGS.level, chunk=FLAGS.chunk, progress=FLAGS.progress, desc="cpc")
  summary: dict = dict(volume=url, shape=list(shape), resolution_nm=list(vol.resolution), level=FLAGS.level,
                       chunk=FLAGS.chunk, threshold=threshold,
                       low_cpc=ev._fraction(ev.low_cpc_counts(maps, threshold)), low_cpc_per_pair=fracs)
  rows = [("volume", summary["low_cpc"])]
  all_maps = {"volume": maps}
  if case is not None:
    for name, stack in (("distorted input", case.src), ("undistorted original", case.tgt)):
      m, _ = neighbour_cpc(stack, level=FLAGS.level, chunk=FLAGS.chunk)
      all_maps[name] = m
      summary[f"low_cpc_{name.split()[0]}"] = ev._fraction(ev.low_cpc_counts(m, threshold))
      rows.append((name, summary[f"low_cpc_{name.split()[0]}"]))
    furl = _fields_url(url)
    if furl is None:
      logging.warning("no --fields given (and no sibling 'fields' volume): EPE skipped")
    else:
      fvol = io.open_volume(furl)
      if not fvol.is_field or tuple(fvol.shape()) != tuple(case.gt.shape):
        raise InputError(f"fields {furl}: expected a field volume of shape {tuple(case.gt.shape)}, "
                         f"got {fvol.kind} {tuple(fvol.shape())}")
      fields = np.asarray(fvol.read(), np.float32)
      summary["epe"] = ev.score_fields(fields, case, ran=np.r_[False, [bool(np.any(s)) for s in case.src[1:]]])
  out.mkdir(parents=True, exist_ok=True)
  _plot(all_maps, out / "cpc_maps.png", threshold)
  (out / "eval.json").write_text(json.dumps(summary, indent=1, default=float))
  print(f"{url}: {shape[0]} sections {shape[1]}x{shape[2]}, CPC on {FLAGS.chunk}-px chunks after "
        f"{2 ** FLAGS.level}x downsampling ({vol.resolution[1] * 2 ** FLAGS.level:g} nm/px)")
  print("| stack | low-CPC fraction (< %.2f) |\n|---|---|" % threshold)
  for name, v in rows:
    print(f"| {name} | {v:.4f} |")
  if "epe" in summary:
    e = summary["epe"]
    print(f"EPE over valid tissue: median {e['epe_median']:.3f} px, p95 {e['epe_p95']:.3f}, p99 {e['epe_p99']:.3f}, "
          f">2 px {e['epe_frac_over']:.4f}; within 20 px of cracks/folds: median {e['near_median']:.3f}, "
          f"p95 {e['near_p95']:.3f}")
  print(f"wrote {out / 'cpc_maps.png'} and {out / 'eval.json'}")
  return 0
