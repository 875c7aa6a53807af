"""Alignment reports: one self-contained HTML page with PNG figures next to it.

`write_report(folder, ReportData(...))` writes `folder/index.html` and these figures (each only
when its data is given):

- `before_after.png`: an x-z reslice through the stack for every image stack (jagged membranes
  before alignment, continuous ones after), and a red/green overlay of two neighbouring sections.
- `cpc_maps.png`: neighbour chunked Pearson correlation (CPC) maps per stack, averaged over z, on
  a fixed [-0.25, 1] scale with the paper's 0.25 threshold marked in the title.
- `per_section.png`: one panel per per-section quantity (EPE, low-CPC fraction, ...), a line
  per stack / method.
- `field_magnitude.png`: |field| (px) of a few sections, and |field - ground truth| when given.
- `deformation.png`: per section, the p1 and p99 of the local area change of the fields'
  non-affine part (`jaxalign.ops.metrics.deformation`), one band per series (fields, residual vs the
  truth, ...), with the [0.9, 1.1] "tissue kept intact" band; a per-section table follows it.
- `deformation_map.png`: the area-change map of each series' worst section.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot global state, no
display needed). `format_table` renders the same summary rows as plain text for a terminal.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from jaxalign.errors import InputError

# CPC maps: colour scale limits and the paper's "misaligned" threshold (Popovych et al. 2024).
CPC_VMIN, CPC_VMAX = -0.25, 1.0
LOW_CPC_THRESHOLD = 0.25
FIGURE_DPI = 110
# How many sections the field-magnitude figure shows (evenly spaced, section 0 excluded when
# possible because it is the identity).
FIELD_PANELS = 4
# Overlay / reslice display: intensities are stretched between these percentiles of tissue.
DISPLAY_PERCENTILES = (1.0, 99.0)
# Reslice rows are repeated so that a section (tens of nm) is not drawn as one pixel row.
RESLICE_ROW_REPEAT = 4

# Per-section deformation tables list at most this many sections (the ones farthest from 1).
DEFORMATION_TABLE_ROWS = 40

FIGURES = ("before_after.png", "cpc_maps.png", "per_section.png", "field_magnitude.png", "deformation.png",
           "deformation_map.png")


@dataclasses.dataclass
class ReportData:
  """Everything a report shows; every part is optional except the title.

  Attributes:
    title: page title.
    images: name -> `[Z, H, W]` float stack (e.g. "original", "distorted", "aligned"), in display
      order; 0 = no data.
    fields: `[Z, H, W, 2]` float32 px (dy, dx): the estimated alignment fields.
    gt_fields: `[Z, H, W, 2]` float32 px: ground-truth fields (same convention), if known.
    valid: `[Z, H, W]` bool: where the ground truth is scorable (error maps are masked outside).
    cpc_maps: name -> `[Z-1, h, w]` neighbour CPC maps (NaN = too little tissue).
    per_section: panel title -> {series name -> `[Z]` values (NaN = undefined)}.
    summary: table rows (dicts with the same keys), shown at the top of the page.
    notes: free-text paragraphs (settings, timings, the command that reproduces it).
    section_for_overlay: the section z whose overlay with z-1 is shown (default: middle).
    deformation: series name -> `jaxalign.ops.metrics.Deformation` (e.g. "fields", "residual vs truth"),
      all of one stack `[Z, H, W]`: drawn per section and as the worst section's map.
    resolution_nm: nm per pixel (z, y, x) of the fields, for the captions' physical scale.
  """
  title: str
  images: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  fields: np.ndarray | None = None
  gt_fields: np.ndarray | None = None
  valid: np.ndarray | None = None
  cpc_maps: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  per_section: Mapping[str, Mapping[str, Sequence[float]]] = dataclasses.field(default_factory=dict)
  summary: Sequence[Mapping[str, Any]] = ()
  notes: Sequence[str] = ()
  section_for_overlay: int | None = None
  deformation: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  resolution_nm: Sequence[float] | None = None


def _figure(rows: int, cols: int, size: tuple[float, float]):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=size, dpi=FIGURE_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
  return fig, axes


def _stretch(x: np.ndarray) -> np.ndarray:
  """Maps tissue intensities to [0, 1] by percentiles (0 = no data stays black)."""
  tissue = x[x != 0]
  if tissue.size == 0:
    return np.zeros_like(x, np.float32)
  lo, hi = np.percentile(tissue, DISPLAY_PERCENTILES)
  return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32) * (x != 0)


def _check(data: ReportData) -> None:
  shapes = {name: np.shape(s) for name, s in data.images.items()}
  for name, s in shapes.items():
    if len(s) != 3:
      raise InputError(f"report: image stack {name!r} must be [Z, H, W], got shape {s}")
  if len(set(shapes.values())) > 1:
    raise InputError(f"report: image stacks have different shapes {shapes}")
  for name, f in (("fields", data.fields), ("gt_fields", data.gt_fields)):
    if f is not None and (np.ndim(f) != 4 or np.shape(f)[-1] != 2):
      raise InputError(f"report: {name} must be [Z, H, W, 2], got shape {np.shape(f)}")
  if data.fields is not None and data.gt_fields is not None and np.shape(data.fields) != np.shape(data.gt_fields):
    raise InputError(f"report: fields shape {np.shape(data.fields)} does not match gt_fields "
                     f"{np.shape(data.gt_fields)}")
  dets = {name: np.shape(getattr(d, "det", None)) for name, d in data.deformation.items()}
  for name, d in data.deformation.items():
    z = dets[name][:1]
    if len(dets[name]) != 3 or np.shape(getattr(d, "low", None)) != z or np.shape(getattr(d, "high", None)) != z:
      raise InputError(f"report: deformation {name!r} must be a jaxalign.ops.metrics.Deformation of a [Z, H, W] stack")
  if len(set(dets.values())) > 1:
    raise InputError(f"report: deformation series have different shapes {dets}")
  if data.resolution_nm is not None:
    from jaxalign.errors import check_resolution
    check_resolution(data.resolution_nm, "report: resolution_nm")


def _before_after(data: ReportData, path: pathlib.Path) -> str:
  names = list(data.images)
  z_count, h, w = np.shape(data.images[names[0]])
  z = data.section_for_overlay if data.section_for_overlay is not None else z_count // 2
  z = int(np.clip(z, 1, max(z_count - 1, 1))) if z_count > 1 else 0
  fig, axes = _figure(2, len(names), (3.2 * len(names), 3.2 + 0.02 * RESLICE_ROW_REPEAT * z_count * 3.2))
  row = h // 2
  for i, name in enumerate(names):
    stack = np.asarray(data.images[name], np.float32)
    # each section stretched on its own: contrast changes between sections would hide the structure
    reslice = np.repeat(np.stack([_stretch(s)[row] for s in stack]), RESLICE_ROW_REPEAT, axis=0)
    ax = axes[0, i]
    ax.imshow(reslice, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_title(f"{name}: x-z reslice at y={row}", fontsize=9)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("section z")
    ax.set_yticks(np.arange(z_count)[:: max(1, z_count // 6)] * RESLICE_ROW_REPEAT + RESLICE_ROW_REPEAT / 2)
    ax.set_yticklabels(np.arange(z_count)[:: max(1, z_count // 6)])
    # red = section z-1, green = section z: aligned structures look yellow/grey
    prev = _stretch(stack[max(z - 1, 0)])
    cur = _stretch(stack[z])
    rgb = np.stack([prev, cur, np.zeros_like(prev)], -1)
    ax = axes[1, i]
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title(f"{name}: z={max(z - 1, 0)} (red) / z={z} (green)", fontsize=9)
    ax.set_axis_off()
  fig.savefig(path)
  return ("Top: an x-z reslice through the middle row of every stack (membranes run continuously "
          "through z when the stack is aligned). Bottom: two neighbouring sections overlaid in red "
          "and green; aligned structures appear yellow.")


def _cpc_figure(data: ReportData, path: pathlib.Path) -> str:
  names = list(data.cpc_maps)
  fig, axes = _figure(1, len(names), (3.3 * len(names), 3.3))
  im = None
  for i, name in enumerate(names):
    maps = np.asarray(data.cpc_maps[name], np.float64)
    if maps.ndim == 2:
      maps = maps[None]
    scored = ~np.isnan(maps)
    with np.errstate(invalid="ignore"):
      mean = np.where(scored.any(0), np.nansum(maps, 0) / np.maximum(scored.sum(0), 1), np.nan)
      low = float(np.sum(scored & (maps < LOW_CPC_THRESHOLD)) / max(int(scored.sum()), 1))
    ax = axes[0, i]
    im = ax.imshow(mean, cmap="RdYlGn", vmin=CPC_VMIN, vmax=CPC_VMAX, interpolation="nearest")
    ax.set_title(f"{name}: mean CPC\n{100 * low:.1f}% chunks < {LOW_CPC_THRESHOLD}", fontsize=9)
    ax.set_axis_off()
  if im is not None:
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="CPC")
  fig.savefig(path)
  return ("Chunked Pearson correlation between neighbouring sections (z-1, z), averaged over z "
          f"per chunk; the title gives the fraction of all chunks below {LOW_CPC_THRESHOLD} (the "
          "paper's misalignment criterion). Grey = too little tissue.")


def _per_section(data: ReportData, path: pathlib.Path) -> str:
  panels = list(data.per_section)
  fig, axes = _figure(1, len(panels), (4.2 * len(panels), 3.2))
  for i, title in enumerate(panels):
    ax = axes[0, i]
    for name, values in data.per_section[title].items():
      v = np.asarray(values, np.float64)
      ax.plot(np.arange(len(v)), v, marker="o", markersize=3, label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("section z")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.savefig(path)
  return "Per-section quantities, one line per stack or method."


def _field_figure(data: ReportData, path: pathlib.Path) -> str:
  f = np.asarray(data.fields, np.float32)
  z_count = f.shape[0]
  zs = np.unique(np.linspace(min(1, z_count - 1), z_count - 1, min(FIELD_PANELS, z_count)).round().astype(int))
  rows = 2 if data.gt_fields is not None else 1
  fig, axes = _figure(rows, len(zs), (3.0 * len(zs), 2.9 * rows))
  mag = np.linalg.norm(f[zs], axis=-1)
  vmax = float(np.percentile(mag, 99.5)) or 1.0
  im = None
  for i, z in enumerate(zs):
    ax = axes[0, i]
    im = ax.imshow(mag[i], cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_title(f"|field| z={z} (max {mag[i].max():.1f} px)", fontsize=9)
    ax.set_axis_off()
  fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="px")
  caption = "Top: magnitude of the alignment field of a few sections (px)."
  if data.gt_fields is not None:
    err = np.linalg.norm(f[zs] - np.asarray(data.gt_fields, np.float32)[zs], axis=-1)
    if data.valid is not None:
      err = np.where(np.asarray(data.valid)[zs], err, np.nan)
    emax = float(np.nanpercentile(err, 99)) if np.isfinite(err).any() else 1.0
    for i, z in enumerate(zs):
      ax = axes[1, i]
      im = ax.imshow(err[i], cmap="magma", vmin=0, vmax=max(emax, 1e-3), interpolation="nearest")
      ax.set_title(f"|field - truth| z={z}", fontsize=9)
      ax.set_axis_off()
    fig.colorbar(im, ax=list(axes[1]), shrink=0.8, label="px")
    caption += " Bottom: end-point error against the known distortion (blank = not scorable)."
  fig.savefig(path)
  return caption


def _deformation_scale(results: Mapping[str, Any], resolution_nm=None) -> str:
  """"smoothed at 100 nm (25 px at 4 nm/px)" for captions (sigma in px when the resolution is unknown)."""
  from jaxalign.ops.metrics import DEFORMATION_SMOOTH_NM
  sigma = next(iter(results.values())).sigma_px
  if resolution_nm is None:
    return f"Gaussian smoothing sigma {sigma:.3g} px"
  px = 0.5 * (float(resolution_nm[1]) + float(resolution_nm[2]))
  if sigma > 0 and abs(sigma * px - DEFORMATION_SMOOTH_NM) < 1e-3 * DEFORMATION_SMOOTH_NM:
    return f"smoothed at {DEFORMATION_SMOOTH_NM:g} nm ({sigma:.3g} px at {px:g} nm/px)"
  return f"Gaussian smoothing sigma {sigma:.3g} px = {sigma * px:.3g} nm at {px:g} nm/px"


def draw_deformation(results: Mapping[str, Any], path: str | os.PathLike, *, resolution_nm=None) -> str:
  """Per-section p1 and p99 of the area change, one band per series, with the [0.9, 1.1] band.

  Args:
    results: series name -> `jaxalign.ops.metrics.Deformation` (`low`, `high`: `[Z]`).
    path: PNG to write.
    resolution_nm: nm per pixel (z, y, x) of the fields (caption only).
  Returns:
    the figure's caption.
  """
  from jaxalign.ops.metrics import DEFORMATION_BAND
  fig, axes = _figure(1, 1, (8.0, 3.6))
  ax = axes[0, 0]
  lo_band, hi_band = DEFORMATION_BAND
  ax.axhspan(lo_band, hi_band, color="tab:green", alpha=0.12, lw=0, label=f"[{lo_band:g}, {hi_band:g}]")
  ax.axhline(1.0, color="0.4", lw=0.8)
  ymin, ymax = lo_band, hi_band
  for i, (name, d) in enumerate(results.items()):
    low, high = np.asarray(d.low, np.float64), np.asarray(d.high, np.float64)
    z = np.arange(len(low))
    color = f"C{i}"
    ax.fill_between(z, low, high, color=color, alpha=0.18, lw=0)
    ax.plot(z, high, color=color, marker="o", markersize=3, lw=1.2, label=name)
    ax.plot(z, low, color=color, marker="v", markersize=3, lw=1.2, ls="--")
    if np.isfinite(low).any():
      ymin, ymax = min(ymin, np.nanmin(low)), max(ymax, np.nanmax(high))
  from matplotlib.ticker import MaxNLocator
  pad = 0.05 * (ymax - ymin)
  ax.set_ylim(ymin - pad, ymax + pad)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("section z")
  ax.set_ylabel("area change (det)")
  ax.set_title("local area change of the non-affine field per section: p99 (solid), p1 (dashed)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  fig.savefig(path)
  return (f"Local area change (Jacobian determinant) of each section's field after removing its best-fit "
          f"affine part, {_deformation_scale(results, resolution_nm)}, 1 = area kept; dashed: 1st "
          f"percentile, solid: 99th, over tissue away from cracks and folds. Green: "
          f"[{lo_band:g}, {hi_band:g}], tissue kept intact within +-10 %.")


def draw_deformation_map(results: Mapping[str, Any], path: str | os.PathLike) -> str:
  """Area-change map of each series' worst section (p1 or p99 farthest from 1), diverging about 1.

  Args:
    results: series name -> `jaxalign.ops.metrics.Deformation` (`det`: `[Z, H, W]`, NaN = not scored).
    path: PNG to write.
  Returns:
    the figure's caption.
  """
  import matplotlib
  from jaxalign.ops.metrics import DEFORMATION_BAND
  names = list(results)
  fig, axes = _figure(1, len(names), (3.4 * len(names) + 0.6, 3.4))
  lo_band, hi_band = DEFORMATION_BAND
  cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.75")
  # one colour scale for all panels, at least the band's width so the band reads the same everywhere
  span = hi_band - 1.0
  for d in results.values():
    if d.worst is not None:
      span = max(span, float(np.nanpercentile(np.abs(d.det[d.worst] - 1.0), 99.5)))
  im = None
  for i, name in enumerate(names):
    d, ax = results[name], axes[0, i]
    ax.set_axis_off()
    z = d.worst
    if z is None:
      ax.set_title(f"{name}: nothing scored", fontsize=9)
      continue
    det = np.asarray(d.det[z], np.float64)
    im = ax.imshow(np.ma.masked_invalid(det), cmap=cmap, vmin=1 - span, vmax=1 + span, interpolation="nearest")
    if np.nanmin(det) < lo_band or np.nanmax(det) > hi_band:
      ax.contour(np.nan_to_num(det, nan=1.0), levels=[lo_band, hi_band], colors="k", linewidths=0.6)
    ax.set_title(f"{name}: worst z={z}\np1 {d.low[z]:.3f}, p99 {d.high[z]:.3f}", fontsize=9)
  if im is not None:
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="area change (det)")
  fig.savefig(path)
  return (f"Area change of the section farthest from 1 in each series (red: compressed, > 1; blue: "
          f"stretched, < 1; grey: not scored: no tissue or near a crack or fold). Black lines: "
          f"{lo_band:g} and {hi_band:g}.")


def _deformation_table(results: Mapping[str, Any]) -> str:
  """HTML table of per-section p1/p99 (at most `DEFORMATION_TABLE_ROWS` sections, farthest from 1)."""
  names = list(results)
  z_count = len(next(iter(results.values())).low)
  dev = np.full(z_count, -np.inf)
  for d in results.values():
    dev = np.fmax(dev, np.fmax(1.0 - np.asarray(d.low, np.float64), np.asarray(d.high, np.float64) - 1.0))
  zs = np.arange(z_count)
  note = ""
  if z_count > DEFORMATION_TABLE_ROWS:
    zs = np.sort(np.argsort(-np.nan_to_num(dev, nan=-np.inf), kind="stable")[:DEFORMATION_TABLE_ROWS])
    note = f"<p>The {DEFORMATION_TABLE_ROWS} of {z_count} sections farthest from 1.</p>"
  f = lambda v: "-" if math.isnan(v) else f"{v:.3f}"  # noqa: E731 - 3 decimals: values sit near 1

  def row(label, lows, highs):
    cells = {"section": label}
    for n, lo, hi in zip(names, lows, highs):
      cells[f"{n} p1"], cells[f"{n} p99"] = f(float(lo)), f(float(hi))
    return cells

  rows = [row(int(z), [results[n].low[z] for n in names], [results[n].high[z] for n in names]) for z in zs]
  rows.append(row("stack", [results[n].low_all for n in names], [results[n].high_all for n in names]))
  return note + _html_table(rows)


def _deformation_figure(data: ReportData, path: pathlib.Path) -> str:
  return draw_deformation(data.deformation, path, resolution_nm=data.resolution_nm)


def _deformation_map_figure(data: ReportData, path: pathlib.Path) -> str:
  return draw_deformation_map(data.deformation, path)


def _fmt(v: Any) -> str:
  if isinstance(v, (float, np.floating)):
    if math.isnan(v):
      return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
  return str(v)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Plain-text table of `rows` (dicts; columns = keys of the first row), numbers to 3 digits."""
  if not rows:
    return ""
  cols = list(rows[0])
  cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  line = lambda vals: "  ".join(v.rjust(wd) if i else v.ljust(wd)  # noqa: E731
                                for i, (v, wd) in enumerate(zip(vals, widths)))
  return "\n".join([line(cols), line(["-" * wd for wd in widths])] + [line(r) for r in cells])


def _html_table(rows: Sequence[Mapping[str, Any]]) -> str:
  if not rows:
    return ""
  cols = list(rows[0])
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                 for r in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}figure{margin:2em 0}
img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:90%}code,pre{background:#f6f6f6}"""


def write_report(folder: str | os.PathLike, data: ReportData) -> pathlib.Path:
  """Writes `folder/index.html` and its PNG figures; returns the HTML path.

  Figures are written under temporary names and renamed once all of them and the page exist, so
  a failure leaves no half-written report behind.
  """
  _check(data)
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  plan = []
  if data.images:
    plan.append(("before_after.png", "Before / after", _before_after))
  if data.cpc_maps:
    plan.append(("cpc_maps.png", "CPC maps", _cpc_figure))
  if data.per_section:
    plan.append(("per_section.png", "Per-section error", _per_section))
  if data.fields is not None:
    plan.append(("field_magnitude.png", "Field magnitude", _field_figure))
  if data.deformation:
    plan.append(("deformation.png", "Tissue deformation per section", _deformation_figure))
    plan.append(("deformation_map.png", "Tissue deformation, worst section", _deformation_map_figure))

  written: list[tuple[pathlib.Path, pathlib.Path]] = []
  try:
    sections = []
    for name, heading, draw in plan:
      tmp = folder / f".{name}.partial.png"
      caption = draw(data, tmp)
      written.append((tmp, folder / name))
      sections.append(f'<figure><h2>{html.escape(heading)}</h2><img src="{name}" alt="{html.escape(heading)}">'
                      f"<figcaption>{html.escape(caption)}</figcaption></figure>")
      if name == "deformation.png":
        sections.append(_deformation_table(data.deformation))
    notes = "".join(f"<p>{html.escape(n)}</p>" for n in data.notes)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(data.title)}</h1>"
            f"{_html_table(data.summary)}{notes}{''.join(sections)}</body></html>\n")
    tmp_html = folder / ".index.html.partial"
    tmp_html.write_text(page, encoding="utf-8")
    written.append((tmp_html, folder / "index.html"))
  except BaseException:
    for name, _, _ in plan:
      (folder / f".{name}.partial.png").unlink(missing_ok=True)
    (folder / ".index.html.partial").unlink(missing_ok=True)
    raise
  for tmp, final in written:
    os.replace(tmp, final)
  return folder / "index.html"
