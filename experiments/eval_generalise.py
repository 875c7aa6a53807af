"""Generalisation benchmark of the pair aligner (issue 18 item 4): tuning part vs held-out parts.

The split is fixed in code (`jaxalign.bench.groundtruth.SPLIT`):

* ``tuning``: seeds 0-2 x families default, medium, moderate x FIB-SEM slices 0-63 (same and
  neighbour) and ISBI sections 0-19 (same). Tune heuristics and defaults on this part only.
* ``heldout_seeds`` (a): seeds 1001-1003, tuning families and slices.
* ``heldout_families`` (b): seeds 1001-1003 x families short, long, noisy, contrast, chatter, tuning slices.
* ``heldout_stacks`` (c): seeds 1001-1003, tuning families x FIB-SEM slices 64-127, ISBI 20-29 and
  the Gerhard VNC stack (never used for tuning).

Each (part, seed, family, stack range, kind) is one case (`jaxalign.bench.evaluation.make_case`) of
``--pairs_per_case`` pairs from a window of the stack range chosen from the seed (the same window for
every family of a seed, so families are paired). Kinds: ``same`` (distorted z vs original z) and
``neighbour`` (distorted z vs original z-1; FIB-SEM every 4th slice = 40 nm sections). Settings:

* ``default``: `ja.align_pair(src, tgt, src_defects=..., resolution_nm=(z, y, x))` (physical
  defaults: the finest field at ~32 nm, upsampled to the data's pixels);
* ``precise``: the same with `config=ja.PairConfig(finest_nm=0)` (refined down to the data's pixels).

Scores per case (JSON line) and pooled per (part, kind, setting) (markdown):

* EPE `|f - gt|` on the target grid over valid pixels (`evaluation.endpoint_errors`,
  `evaluation.epe_stats`, exactly as `evaluation.score_fields`): median, p95, p99 in px and in nm
  (px x the stack's nm/px); for neighbours also with the undistorted pair's content shift removed.
* Residual deformation: `jaxalign.ops.metrics.residual_deformation(f, gt, resolution_nm=...)`, i.e.
  `metrics.deformation` of the residual field `compose(invert(f), gt)`, which maps the aligned section
  onto the true one and lives on the target grid where the EPE `|f - gt|` is measured (0 iff f = gt);
  p1 - p99 of the area change of its non-affine part smoothed at 100 nm (1 = no deformation), over
  the valid pixels more than `metrics.DEFORMATION_DEFECT_MARGIN_PX` from a crack or fold (as
  `evaluation.deformation_scores` does for stack cases). Checked against the exact alternative
  `compose(pull, f)` (pull = the generator's exact inverse of gt; the inverse map, so its p1/p99 are
  the reciprocals): equal to 0.002 on FIB-SEM same and neighbour pairs.

Pooled percentiles come from per-case quantile sketches stored in the JSON lines, so `--table_only`
rebuilds the table from the JSON lines (and runs can be split with `--resume`).

Commands (docs/benchmarks/generalise.md):

  # quick tuning run: 9 cases x 2 settings x 2 pairs, ~3.3 min on the shared 2-core CPU VM (192 or 256 px)
  python experiments/eval_generalise.py --parts=tuning --max_seeds=1 --crop=256 --pairs_per_case=2 \\
      --output_json=/tmp/generalise_tuning.jsonl --output_md=/tmp/generalise_tuning.md
  # full report: all parts, both settings, 512-px crops, 3 pairs per case (135 cases, 810 alignments;
  # on that CPU ~6 s/pair default and ~30 s/pair precise at 512^2, i.e. ~4 h: use a GPU, or --resume
  # to run it in pieces)
  python experiments/eval_generalise.py
  # rebuild the markdown from the JSON lines
  python experiments/eval_generalise.py --table_only
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
import zlib

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import jaxalign as ja
from jaxalign.bench import evaluation, groundtruth
from jaxalign.ops import metrics
from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", ["tuning", *groundtruth.HELDOUT_PARTS], f"split parts: {list(groundtruth.SPLIT)}")
flags.DEFINE_list("kinds", ["same", "neighbour"], "case kinds: same, neighbour")
flags.DEFINE_list("settings", ["default", "precise"], "aligner settings: default (physical, ~32 nm finest "
                  "field), precise (PairConfig(finest_nm=0): refined to the data's pixels)")
flags.DEFINE_list("families", [], "only these distortion families (default: each part's own)")
flags.DEFINE_list("stacks", [], "only these stacks (default: each part's own)")
flags.DEFINE_integer("max_seeds", 0, "use only the first N seeds of each part (0 = all)")
flags.DEFINE_integer("pairs_per_case", 3, "pairs per case (sections loaded = pairs + 1; section 0 is the "
                     "undistorted anchor)")
flags.DEFINE_integer("crop", 512, "centre crop of the sections, px (0 = whole sections)")
flags.DEFINE_string("output_json", "docs/benchmarks/generalise.jsonl", "JSON lines, one per case and setting")
flags.DEFINE_string("output_md", "docs/benchmarks/generalise.md", "markdown report")
flags.DEFINE_bool("table_only", False, "only rebuild --output_md from --output_json")
flags.DEFINE_bool("resume", False, "keep --output_json and skip the cases and settings already in it")
flags.DEFINE_bool("progress", True, "progress bar")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = ("default", "precise")
# Quantile levels of the per-case sketches (dense in both tails: p1 and p99 are reported).
SKETCH_Q = np.unique(np.round(np.concatenate([np.linspace(0.0, 0.05, 21), np.linspace(0.05, 0.95, 37),
                                              np.linspace(0.95, 1.0, 21)]), 6))
# Issue 18 targets (held-out parts).
NEIGHBOUR_TARGET = dict(median=1.2, p95=3.5, deformation=(0.9, 1.1))
SAME_PRECISE_TARGET = dict(median=0.2, p95=1.0)


# ------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class CaseSpec:
  part: str
  seed: int
  family: str
  source: groundtruth.StackRange
  kind: str

  def window(self, pairs: int) -> tuple[int, int]:
    """(first slice, step) of this case's `pairs + 1` sections, drawn from the seed (not the family)."""
    step = self.source.step(self.kind)
    span = pairs * step + 1
    room = self.source.stop - self.source.start - span
    if room < 0:
      raise InputError(f"{self.source.stack} [{self.source.start}, {self.source.stop}) has no room for "
                       f"{pairs} {self.kind} pairs with step {step}")
    rng = np.random.default_rng([self.seed, zlib.crc32(self.source.stack.encode()), zlib.crc32(self.kind.encode())])
    return self.source.start + int(rng.integers(0, room + 1)), step

  def key(self, setting: str, pairs: int, crop: int) -> str:
    start, step = self.window(pairs)
    return (f"{self.part}/{self.kind}/{self.source.stack}/{start}:{step}/{self.family}/{self.seed}/{setting}/"
            f"p{pairs}/c{crop}")


def case_specs() -> list[CaseSpec]:
  out = []
  for name in FLAGS.parts:
    if name not in groundtruth.SPLIT:
      raise InputError(f"--parts: unknown part {name!r}; known: {list(groundtruth.SPLIT)}")
    part = groundtruth.SPLIT[name]
    seeds = part.seeds[:FLAGS.max_seeds] if FLAGS.max_seeds > 0 else part.seeds
    for seed in seeds:
      for family in part.families:
        if FLAGS.families and family not in FLAGS.families:
          continue
        for src in part.sources:
          if FLAGS.stacks and src.stack not in FLAGS.stacks:
            continue
          for kind in src.kinds:
            if kind in FLAGS.kinds:
              out.append(CaseSpec(name, seed, family, src, kind))
  return out


def build_case(spec: CaseSpec, pairs: int, crop: int | None):
  """(case, resolution_nm (z, y, x)) of `spec`."""
  start, step = spec.window(pairs)
  stack = evaluation.load_stack(spec.source.stack, num=pairs + 1, start=start, step=step, crop=crop)
  xy, z = evaluation.STACK_RESOLUTION[spec.source.stack]
  res = (z * step, xy, xy)
  config = groundtruth.distortion_family(spec.family, spec.seed)
  meta = dict(stack=spec.source.stack, start=start, step=step, crop=crop, resolution_nm=list(res),
              part=spec.part, family=spec.family, seed=spec.seed)
  return evaluation.make_case(spec.kind, stack, config=config, meta=meta), res


# ---------------------------------------------------------------------------------------- aligners


def make_aligner(setting: str, res):
  """Team-protocol pair aligner of `setting` for data at `res` (z, y, x) nm."""
  config = ja.PairConfig(finest_nm=0) if setting == "precise" else None

  def aligner(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
    return ja.align_pair(src, tgt, src_defects=src_defects, tgt_defects=tgt_defects, init_field=init_field,
                         resolution_nm=res, config=config)
  return aligner


# ----------------------------------------------------------------------------------------- scoring


def sketch(values) -> list[float]:
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    return []
  return [float(f"{x:.4g}") for x in np.quantile(v, SKETCH_Q)]


def pooled_quantiles(sketches, weights, qs, scales=None, levels=None) -> list[float]:
  """Quantiles `qs` (0-1) of the mixture of per-case distributions given by their sketches
  (values at the quantile `levels[i]`, default `SKETCH_Q`, linear in between) weighted by `weights`
  (pixel counts), each multiplied by `scales[i]`."""
  items = [(np.asarray(s, np.float64) * (1.0 if scales is None else scales[i]),
            np.asarray(SKETCH_Q if levels is None or levels[i] is None else levels[i], np.float64), float(w))
           for i, (s, w) in enumerate(zip(sketches, weights)) if len(s) and w > 0]
  if not items:
    return [float("nan")] * len(qs)
  total = sum(w for _, _, w in items)
  lo = min(s[0] for s, _, _ in items)
  hi = max(s[-1] for s, _, _ in items)

  def cdf(x):
    return sum(w * np.interp(x, s, q, left=0.0, right=1.0) for s, q, w in items) / total

  out = []
  for q in qs:
    a, b = lo, hi
    for _ in range(60):
      m = 0.5 * (a + b)
      if cdf(m) < q:
        a = m
      else:
        b = m
    out.append(0.5 * (a + b))
  return out


def score(case, fields, ran, res) -> dict:
  """EPE (px, nm), shift-corrected EPE (neighbours) and residual deformation of one case."""
  errors, shifted = [], []
  for i in np.nonzero(ran)[0]:
    e = evaluation.endpoint_errors(fields[i], case.gt[i])
    v = case.valid[i]
    errors.append(e[v])
    if case.kind == "neighbour":
      s = evaluation.content_shift(case.reference[i], case.tgt[i]).astype(np.float32)
      shifted.append(evaluation.endpoint_errors(fields[i], case.gt[i] + s)[v])
  e = np.concatenate(errors) if errors else np.zeros(0, np.float32)
  xy = res[1]
  px = evaluation.epe_stats(e)
  out = dict(epe_px={k: px[k] for k in ("median", "p95", "p99", "frac_over", "n")},
             epe_nm={k: px[k] * xy for k in ("median", "p95", "p99")})
  sk = dict(q=[float(q) for q in SKETCH_Q], epe_px=sketch(e))
  if shifted:
    sc = evaluation.epe_stats(np.concatenate(shifted))
    out["epe_shift_corrected_px"] = {k: sc[k] for k in ("median", "p95", "p99")}
    sk["epe_shift_px"] = sketch(np.concatenate(shifted))
  if ran.any():
    far = case.valid & (case.disc_distance > metrics.DEFORMATION_DEFECT_MARGIN_PX)
    dfm = metrics.residual_deformation(fields[ran], case.gt[ran], resolution_nm=res, tissue=far[ran])
    det = dfm.det[np.isfinite(dfm.det)]
    out["deformation"] = dict(p1=dfm.low_all, p99=dfm.high_all, n=int(det.size), sigma_px=dfm.sigma_px)
    sk["det"] = sketch(det)
  out["sketch"] = sk
  return out


# ------------------------------------------------------------------------------------------ report


def _row_key(r):
  return (r["part"], r["kind"], r["setting"])


def _targets(part: str, kind: str, setting: str, stacks) -> str:
  if part == "tuning":
    return ""
  if kind == "neighbour" and set(stacks) == {"flyem_medulla_fibsem"}:
    t = NEIGHBOUR_TARGET
    lo, hi = t["deformation"]
    return f"median ≤ {t['median']}, p95 ≤ {t['p95']}, deformation in [{lo}, {hi}]"
  if kind == "same" and setting == "precise":
    return f"median ≤ {SAME_PRECISE_TARGET['median']}, p95 ≤ {SAME_PRECISE_TARGET['p95']}"
  if kind == "same":
    return "(reported; target is on precise)"
  return ""


def _verdict(target: str, med, p95, dlo, dhi, kind, setting) -> str:
  if not target or target.startswith("("):
    return ""
  if kind == "neighbour":
    t = NEIGHBOUR_TARGET
    ok = med <= t["median"] and p95 <= t["p95"] and t["deformation"][0] <= dlo and dhi <= t["deformation"][1]
  else:
    ok = med <= SAME_PRECISE_TARGET["median"] and p95 <= SAME_PRECISE_TARGET["p95"]
  return "met" if ok else "**not met**"


def _pool(rows) -> dict:
  w = [r["epe_px"]["n"] for r in rows]
  lv = [r["sketch"].get("q") for r in rows]
  med, p95, p99 = pooled_quantiles([r["sketch"]["epe_px"] for r in rows], w, (0.5, 0.95, 0.99), levels=lv)
  scales = [r["resolution_nm"][1] for r in rows]
  nmed, n95, n99 = pooled_quantiles([r["sketch"]["epe_px"] for r in rows], w, (0.5, 0.95, 0.99), scales, lv)
  out = dict(cases=len(rows), pairs=sum(r["pairs"] for r in rows), median=med, p95=p95, p99=p99,
             nm_median=nmed, nm_p95=n95, nm_p99=n99,
             stacks=sorted({r["stack"] for r in rows}), families=sorted({r["family"] for r in rows}),
             s_per_pair=float(np.median([r["s_per_pair"] for r in rows])))
  sh = [r for r in rows if "epe_shift_px" in r["sketch"]]
  out["shift_median"], out["shift_p95"] = (pooled_quantiles([r["sketch"]["epe_shift_px"] for r in sh],
                                                            [r["epe_px"]["n"] for r in sh], (0.5, 0.95),
                                                            levels=[r["sketch"].get("q") for r in sh])
                                           if sh else (float("nan"),) * 2)
  dr = [r for r in rows if "det" in r["sketch"]]
  out["def_p1"], out["def_p99"] = (pooled_quantiles([r["sketch"]["det"] for r in dr],
                                                    [r["deformation"]["n"] for r in dr], (0.01, 0.99),
                                                    levels=[r["sketch"].get("q") for r in dr])
                                   if dr else (float("nan"),) * 2)
  return out


def _fmt(x, f="{:.2f}"):
  return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f.format(x)


HEAD = ("| part | kind | setting | stacks | cases / pairs | EPE median px | p95 px | p99 px | median / p95 nm | "
        "content shift removed: median / p95 px | residual deformation p1 - p99 | s/pair | issue 18 target | verdict |")


def _table_line(label, kind, setting, p, target=""):
  verdict = _verdict(target, p["median"], p["p95"], p["def_p1"], p["def_p99"], kind, setting)
  shift = (f"{_fmt(p['shift_median'])} / {_fmt(p['shift_p95'])}" if np.isfinite(p["shift_median"]) else "")
  return (f"| {label} | {kind} | {setting} | {', '.join(p['stacks'])} | {p['cases']} / {p['pairs']} | "
          f"{_fmt(p['median'])} | {_fmt(p['p95'])} | {_fmt(p['p99'])} | "
          f"{_fmt(p['nm_median'], '{:.1f}')} / {_fmt(p['nm_p95'], '{:.1f}')} | {shift} | "
          f"{_fmt(p['def_p1'], '{:.3f}')} - {_fmt(p['def_p99'], '{:.3f}')} | {_fmt(p['s_per_pair'])} | {target} | "
          f"{verdict} |")


def _drawn_amplitudes(config, shape=(512, 512)) -> np.ndarray:
  """Sum of the elastic mode amplitudes (px) actually drawn (after the strain bound), seeds 0-2, z 1-20."""
  return np.array([np.linalg.norm(groundtruth.sample_section_params(dataclasses.replace(config, seed=s), z, shape)
                                  ["amp"], axis=-1).sum() for s in range(3) for z in range(1, 21)])


def _families_table() -> list[str]:
  lines = ["| family | used in | elastic wavelength px | amplitude bound px | max strain | drawn amplitude px "
           "(median, max) | noise σ | gain | offset | chatter p / amplitude / period px |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, c in groundtruth.FAMILIES.items():
    used = "tuning, (a), (c)" if name in groundtruth.TUNING_FAMILIES else "held-out (b)"
    amp = _drawn_amplitudes(c)
    lines.append(f"| {name} | {used} | {c.elastic_wavelength[0]:g}-{c.elastic_wavelength[1]:g} | "
                 f"{c.elastic_amplitude:g} | {c.max_strain:g} | {np.median(amp):.1f}, {amp.max():.1f} | "
                 f"{c.noise_sigma[0]:g}-{c.noise_sigma[1]:g} | "
                 f"{c.gain[0]:g}-{c.gain[1]:g} | ±{max(abs(c.offset[0]), abs(c.offset[1])):g} | "
                 f"{c.chatter_probability:g} / {c.chatter_amplitude:g} / "
                 f"{c.chatter_period[0]:g}-{c.chatter_period[1]:g} |")
  return lines


def _split_table() -> list[str]:
  lines = ["| part | seeds | families | stack slices (kinds) |", "|---|---|---|---|"]
  for p in groundtruth.SPLIT.values():
    src = "; ".join(f"{s.stack} [{s.start}, {s.stop}) ({', '.join(s.kinds)}"
                    + (f"; neighbours every {s.neighbour_step}th slice" if s.neighbour_step > 1 else "") + ")"
                    for s in p.sources)
    lines.append(f"| {p.name}: {p.description} | {', '.join(map(str, p.seeds))} | {', '.join(p.families)} | {src} |")
  return lines


def write_report(rows: list[dict], path: pathlib.Path, command: str):
  order = {n: i for i, n in enumerate(groundtruth.SPLIT)}
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault(_row_key(r), []).append(r)
  keys = sorted(groups, key=lambda k: (order.get(k[0], 99), k[1], SETTINGS.index(k[2]) if k[2] in SETTINGS else 9))
  sep = "|" + "---|" * (HEAD.count("|") - 1)
  lines = [HEAD, sep]
  for part, kind, setting in keys:
    p = _pool(groups[(part, kind, setting)])
    lines.append(_table_line(part, kind, setting, p, _targets(part, kind, setting, p["stacks"])))
  # all held-out parts pooled
  for kind in ("neighbour", "same"):
    for setting in SETTINGS:
      held = [r for r in rows
              if r["part"] in groundtruth.HELDOUT_PARTS and r["kind"] == kind and r["setting"] == setting]
      if not held:
        continue
      p = _pool(held)
      lines.append(_table_line("**all held-out**", kind, setting, p, _targets("heldout", kind, setting, p["stacks"])))
  detail = ["| part | kind | setting | stack | family | cases / pairs | EPE median px | p95 px | p99 px | "
            "residual deformation p1 - p99 |", "|---|---|---|---|---|---|---|---|---|---|"]
  sub: dict[tuple, list] = {}
  for r in rows:
    sub.setdefault((r["part"], r["kind"], r["setting"], r["stack"], r["family"]), []).append(r)
  for k in sorted(sub, key=lambda k: (order.get(k[0], 99), k[1], k[2], k[3], k[4])):
    p = _pool(sub[k])
    detail.append(f"| {' | '.join(k)} | {p['cases']} / {p['pairs']} | {_fmt(p['median'])} | {_fmt(p['p95'])} | "
                  f"{_fmt(p['p99'])} | {_fmt(p['def_p1'], '{:.3f}')} - {_fmt(p['def_p99'], '{:.3f}')} |")
  crops = sorted({str(r["crop"]) for r in rows})
  pairs = sorted({str(r["pairs_per_case"]) for r in rows})
  devices = sorted({r.get("device", "?") for r in rows})
  text = f"""# Generalisation of the pair aligner: tuning vs held-out ground truth (issue 18 item 4)

Command: `{command}`

Crop {', '.join(crops)} px, {', '.join(pairs)} pairs per case; device: {', '.join(devices)}.
Produced by `experiments/eval_generalise.py` (see its docstring); JSON lines: `{FLAGS.output_json}`.

## Split (fixed in `jaxalign.bench.groundtruth.SPLIT`)

Tune on `tuning` only. Held-out parts change one thing at a time: (a) seeds, (b) seeds and
distortion families, (c) seeds and data (FIB-SEM and ISBI slices after the tuning ones, and the
Gerhard VNC stack, 4.6 nm/px, never used for tuning). A case is `--pairs_per_case` pairs from a
window of the slices drawn from the seed (the same window for every family of that seed); section 0
of the window is the undistorted anchor. `same`: distorted z vs original z; `neighbour`: distorted z
vs original z-1 (FIB-SEM every 4th slice: 40 nm sections at 10 nm/px). The generator draws section
z's parameters from (seed, z) only, so one seed gives the same crack/fold/blob layout and the same
random phases in every family and stack: (a), (b) and (c) are paired comparisons that differ from
each other in one factor.

{chr(10).join(_split_table())}

Distortion families (`jaxalign.bench.groundtruth.FAMILIES`; cracks, folds, blobs, blank sections and the
affine part are the generator's defaults in all of them; the elastic amplitude is also bounded by
`max_strain`, so short wavelengths move tissue by ~1 px at most):

{chr(10).join(_families_table())}

## Settings and metrics

- `default`: `ja.align_pair(src, tgt, src_defects=..., resolution_nm=(z, y, x))` (finest field at
  ~32 nm, upsampled); `precise`: the same with `config=ja.PairConfig(finest_nm=0)`.
- EPE: `|f - gt|` on the target grid over valid pixels, as `jaxalign.bench.evaluation.score_fields`;
  nm = px × the stack's nm/px. Neighbours also with the undistorted pair's content shift removed.
- Residual deformation: `jaxalign.ops.metrics.residual_deformation(f, gt, resolution_nm=...)`: the
  area change of the residual `compose(invert(f), gt)` (maps the aligned section onto the true one,
  on the target grid where EPE is measured), non-affine part smoothed at 100 nm, p1 - p99 over valid
  pixels more than `metrics.DEFORMATION_DEFECT_MARGIN_PX` px from a crack or fold.
- s/pair: median per-call time of the pairs of a case (the first call of each resolution and
  setting includes compilation), pooled by median over cases.
- Pooled rows combine per-case quantile sketches weighted by pixel counts.

## Results

{chr(10).join(lines)}

### By stack and family

{chr(10).join(detail)}
"""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  print("\n".join(lines))


def read_rows(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -------------------------------------------------------------------------------------------- main


def main(argv):
  del argv
  # The command line's XLA settings, so timings are what a user of `jaxalign align` gets.
  from jaxalign import compile_cache
  compile_cache.quick_cpu_compile()
  out_json, out_md = ROOT / FLAGS.output_json, ROOT / FLAGS.output_md  # absolute paths stay as given
  command = "python experiments/eval_generalise.py " + " ".join(sys.argv[1:])
  if FLAGS.table_only:
    rows = read_rows(out_json)
    if not rows:
      raise InputError(f"{out_json}: no rows")
    write_report(rows, out_md, command)
    return
  for s in FLAGS.settings:
    if s not in SETTINGS:
      raise InputError(f"--settings: unknown setting {s!r}; known: {SETTINGS}")
  crop = FLAGS.crop or None
  pairs = FLAGS.pairs_per_case
  specs = case_specs()
  if not specs:
    raise InputError("no cases selected (check --parts, --kinds, --families, --stacks)")
  rows = read_rows(out_json) if FLAGS.resume else []
  done = {r["key"] for r in rows}
  out_json.parent.mkdir(parents=True, exist_ok=True)
  if not FLAGS.resume:
    out_json.write_text("")
  device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
  todo = [(spec, s) for spec in specs for s in FLAGS.settings if spec.key(s, pairs, FLAGS.crop) not in done]
  logging.info("%d cases x settings to run (%d already done)", len(todo), len(specs) * len(FLAGS.settings) - len(todo))
  bar = tqdm(total=len(todo) * pairs, desc="pairs", unit="pair", disable=not FLAGS.progress, smoothing=0.1)
  cache = {}
  for spec, setting in todo:
    ck = (spec, pairs, crop)
    if ck not in cache:
      cache.clear()
      cache[ck] = build_case(spec, pairs, crop)
    case, res = cache[ck]
    bar.set_postfix_str(f"{spec.part} {spec.kind} {spec.source.stack[:6]} {spec.family} s{spec.seed} {setting}")
    t0 = time.perf_counter()
    fields, ran, times = evaluation.align_case(make_aligner(setting, res), case, progress=False)
    wall = time.perf_counter() - t0
    row = dict(key=spec.key(setting, pairs, FLAGS.crop), part=spec.part, kind=spec.kind, setting=setting,
               stack=spec.source.stack, family=spec.family, seed=spec.seed, start=case.meta["start"],
               step=case.meta["step"], crop=FLAGS.crop, pairs_per_case=pairs, pairs=int(ran.sum()),
               skipped=int((~ran).sum()), resolution_nm=list(res), device=device,
               s_per_pair=float(np.median(times)) if times else float("nan"), wall_s=wall)
    row.update(score(case, np.asarray(fields), ran, res))
    with out_json.open("a") as f:
      f.write(json.dumps(row) + "\n")
    rows.append(row)
    logging.info("%s: EPE median %.3f p95 %.3f px, deformation %s", row["key"], row["epe_px"]["median"],
                 row["epe_px"]["p95"], row.get("deformation"))
    bar.update(pairs)
  bar.close()
  write_report(rows, out_md, command)


def _main(argv):
  try:
    main(argv)
  except InputError as e:
    print(f"eval_generalise: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_main)
