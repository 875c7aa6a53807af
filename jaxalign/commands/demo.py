"""`jaxalign demo [--output=DIR]`: the whole pipeline on a synthetic stack, nothing to download.

1. make a realistic EM-like stack (`jaxalign.bench.synthetic`),
2. distort it with known fields: elastic + affine, cracks, folds, missing blobs, blank sections,
   knife chatter, contrast changes (`jaxalign.bench.groundtruth` via `jaxalign.bench.evaluation.make_case`),
3. align it with `jaxalign.align_stack` (blocks, vector voting, Online Field Finetuner, stitching,
   composition with decay; the shipped SEAMLeSS pyramid when present, `--model`),
4. render the aligned stack, score it against the ground truth (EPE), by neighbour CPC and by how
   much the fields deform the tissue (local area change of their non-affine part, also of the
   residual against the known distortion; `jaxalign.ops.metrics.deformation`),
5. write DIR/{distorted,aligned,fields,original}.zarr, DIR/report/index.html (+ PNGs) and
   DIR/summary.json, and print the summary table.

Everything is written into a staging folder next to DIR and moved into place at the end, so an
interrupted or failed run leaves no partial output. Defaults (20 x 384² px) take a few minutes
on 2 CPU cores; `--sections=6 --size=128` is a quick smoke run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time

import numpy as np
from absl import flags, logging
from tqdm.auto import tqdm

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "jaxalign_demo", "output folder (volumes, report, summary.json)")
flags.DEFINE_integer("sections", 20, "number of synthetic sections")
flags.DEFINE_integer("size", 384, "section height and width, px")
flags.DEFINE_integer("seed", 0, "seed of the synthetic tissue and of the distortions")
flags.DEFINE_integer("block_size", 10, "sections per block (paper: 25; smaller here to show stitching)")
flags.DEFINE_integer("overlap", 3, "sections shared by neighbouring blocks (paper: 3)")
flags.DEFINE_integer("voting_distance", 3, "previous sections each section votes over (paper: 3)")
flags.DEFINE_float("decay_distance", 100.0, "sections over which stitch fields decay (paper: 100)")
flags.DEFINE_float("finest_nm", 32.0, "pixel size (nm) of the finest computed field, upsampled to the data's "
                   "pixels (as `jaxalign align`; the paper's 32 nm)")
flags.DEFINE_boolean("precise", False, "refine fields down to the data's own pixel (overrides --finest_nm)")
flags.DEFINE_list("gammas", None, "elastic weight per working level, finest first (default: the pair "
                  "aligner's, the paper's 5-25 at 32 nm)")
# The shipped pyramid is under-trained (see BENCHMARKS.md, models) and aligns worse than the
# finetuner alone, so the demo does not use it unless asked.
flags.DEFINE_string("model", "none", "'none' (Online Field Finetuner only), 'auto' (shipped SEAMLeSS pyramid "
                    "if present) or a weights path")
flags.DEFINE_boolean("overwrite", True, "replace DIR if it holds an earlier demo output")
flags.DEFINE_boolean("progress", True, "show progress bars")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Settings of one demo run (flags map 1:1).

  Attributes:
    sections, size, seed: synthetic stack size (Z, H = W px) and seed.
    block_size, overlap, voting_distance, decay_distance: `align_stack` arguments.
    finest_nm: `PairConfig.finest_nm`: the finest field is computed at the level nearest this
      (24 nm at the demo's 6 nm pixels) and upsampled; 0 = the data's pixel (the precise setting).
    gammas: finetuner elastic weight per working level, finest first (`PairConfig.gammas`; None =
      the aligner's defaults).
    model: "auto", "none" or a weights path for `jaxalign.models.seamless.load_weights`.
    resolution: nm per pixel (z, y, x) written into the volumes (synthetic: ~6 nm px, 40 nm sections).
    elastic_amplitude: bound of the smooth distortion, px (kept below ~4 % of the section size so
      small smoke runs stay well posed).
  """
  sections: int = 20
  size: int = 384
  seed: int = 0
  block_size: int = 10
  overlap: int = 3
  voting_distance: int = 3
  decay_distance: float = 100.0
  finest_nm: float = 32.0
  gammas: tuple[float, ...] | None = None
  model: str = "none"
  resolution: tuple[float, float, float] = (40.0, 6.0, 6.0)
  elastic_amplitude: float = 12.0


# Smallest section the metrics accept: CPC uses 32-px chunks at MIP 1 (jaxalign.bench.evaluation).
MIN_SIZE = 64
MIN_SECTIONS = 3
# Relative elastic bound for small sections (px per px of section size).
ELASTIC_PER_PX = 0.04
VOLUMES = ("original", "distorted", "aligned", "fields")


def check_config(c: DemoConfig) -> None:
  """Raises InputError for settings the demo cannot run with (before anything is computed)."""
  if c.sections < MIN_SECTIONS:
    raise InputError(f"--sections must be >= {MIN_SECTIONS}, got {c.sections}")
  if c.size < MIN_SIZE:
    raise InputError(f"--size must be >= {MIN_SIZE} px, got {c.size}")
  if c.overlap < 1 or c.block_size <= c.overlap:
    raise InputError(f"--block_size ({c.block_size}) must exceed --overlap ({c.overlap}) >= 1")
  if c.voting_distance < 1:
    raise InputError(f"--voting_distance must be >= 1, got {c.voting_distance}")
  if not c.decay_distance > 0:
    raise InputError(f"--decay_distance must be > 0, got {c.decay_distance}")
  if not c.finest_nm >= 0:
    raise InputError(f"--finest_nm must be >= 0 nm (0 = the data's pixel), got {c.finest_nm}")
  if c.gammas is not None and (not c.gammas or any(not g >= 0 for g in c.gammas)):
    raise InputError(f"--gammas must be non-negative numbers, got {c.gammas}")
  if c.model not in ("auto", "none") and not pathlib.Path(c.model).with_suffix(".npz").is_file():
    raise InputError(f"--model: no weights file {pathlib.Path(c.model).with_suffix('.npz')}")


def _check_output(out: pathlib.Path, overwrite: bool) -> None:
  if out.exists() and not out.is_dir():
    raise InputError(f"--output {out} is an existing file")
  if out.is_dir() and any(out.iterdir()):
    if not (out / "summary.json").is_file():
      raise InputError(f"--output {out} is a non-empty folder that is not an earlier demo output")
    if not overwrite:
      raise InputError(f"--output {out} holds an earlier demo; pass --overwrite to replace it")


def _load_model(spec: str):
  """The pair model for `align_stack` (None = Online Field Finetuner only) and its description."""
  if spec == "none":
    return None, "Online Field Finetuner (no model)"
  try:
    from jaxalign.models import seamless
  except ImportError as e:  # models need flax; the finetuner does not
    if spec == "auto":
      return None, f"Online Field Finetuner (jaxalign.models.seamless unavailable: {e})"
    raise InputError(f"--model {spec}: jaxalign.models.seamless unavailable ({e})") from None
  if spec == "auto":
    try:
      return seamless.pretrained(), "shipped SEAMLeSS pyramid + finetuner"
    except (InputError, AttributeError, FileNotFoundError) as e:
      logging.info("no shipped pyramid (%s): using the finetuner alone", e)
      return None, "Online Field Finetuner (no shipped pyramid)"
  return seamless.load_weights(spec), f"SEAMLeSS pyramid {spec}"


def _neighbour_cpc(stack: np.ndarray) -> np.ndarray:
  """Neighbour CPC maps `[Z-1, h, w]` of a stack `[Z, H, W]` (CPC of sections z-1 and z)."""
  from jaxalign.bench.evaluation import cpc_map
  return np.stack([cpc_map(stack[z - 1], stack[z]) for z in range(1, len(stack))])


def _per_section_epe(fields: np.ndarray, case) -> np.ndarray:
  """Median end-point error per section `[Z]` (px) over its scorable pixels; NaN if none."""
  from jaxalign.bench.evaluation import endpoint_errors
  err = endpoint_errors(fields, case.gt)
  out = np.full(len(err), np.nan)
  for z in range(1, len(err)):   # section 0 is the undistorted anchor
    v = case.valid[z]
    if v.any() and np.any(case.src[z]):
      out[z] = float(np.median(err[z][v]))
  return out


def _write_volumes(folder: pathlib.Path, arrays: dict[str, np.ndarray], resolution, progress: bool) -> None:
  from jaxalign.volume import store
  from jaxalign.volume.pyramid import build_pyramid
  for name, arr in arrays.items():
    vol = store.create_volume(str(folder / f"{name}.zarr"), arr.shape, "float32", resolution,
                           kind="field" if arr.ndim == 4 else "image")
    vol.write(arr.astype(np.float32))
    if name == "aligned":
      levels = max(1, int(math.floor(math.log2(arr.shape[1] / MIN_SIZE))) + 1)
      if levels > 1:
        build_pyramid(vol, levels, progress=progress)


def run_demo(output: str | os.PathLike, config: DemoConfig = DemoConfig(), *, overwrite: bool = True,
             progress: bool = True) -> dict:
  """Runs the demo into `output`; returns the summary (also written to output/summary.json).

  Raises:
    InputError: bad settings or output folder (nothing is written).
  """
  from jaxalign.ops.metrics import low_cpc_fraction  # deferred: `--help` stays light
  check_config(config)
  out = pathlib.Path(output).resolve()
  _check_output(out, overwrite)
  import jaxalign as ja
  from jaxalign.bench import evaluation, report, synthetic
  from jaxalign.ops import metrics
  from jaxalign.stack.block import BlockConfig
  from jaxalign.bench.groundtruth import DistortionConfig
  from jaxalign.align.pair import PairConfig
  from jaxalign.stack.chain import StackConfig

  model, model_desc = _load_model(config.model)
  times = {}
  t = time.perf_counter()
  syn = synthetic.make_stack(synthetic.SyntheticConfig(sections=config.sections, size=config.size,
                                                       seed=config.seed), progress=progress)
  times["synthetic stack"] = time.perf_counter() - t

  t = time.perf_counter()
  dcfg = DistortionConfig(seed=config.seed,
                          elastic_amplitude=min(config.elastic_amplitude, ELASTIC_PER_PX * config.size))
  case = evaluation.make_case("stack", syn.images, config=dcfg, progress=progress,
                              meta={"stack": "synthetic", "size": config.size})
  times["distortion"] = time.perf_counter() - t

  t = time.perf_counter()
  fields, plan = ja.align_stack(case.src, block_size=config.block_size, overlap=config.overlap,
                                voting_distance=config.voting_distance, decay_distance=config.decay_distance,
                                model=model, defects=case.src_defects, progress=progress, return_plan=True,
                                resolution_nm=config.resolution,
                                config=StackConfig(block=BlockConfig(pair=PairConfig(
                                    finest_nm=config.finest_nm,
                                    gammas=None if config.gammas is None else tuple(config.gammas)))))
  fields = np.asarray(fields, np.float32)
  times["alignment"] = time.perf_counter() - t

  t = time.perf_counter()
  aligned = np.asarray(ja.render(case.src, fields), np.float32)
  exact = np.asarray(ja.render(case.src, case.gt), np.float32)
  times["render"] = time.perf_counter() - t

  t = time.perf_counter()
  zeros = np.zeros_like(fields)
  scores = {"unaligned": evaluation.score_fields(zeros, case), "jaxalign": evaluation.score_fields(fields, case)}
  stacks = {"original": case.tgt, "distorted": case.src, "aligned": aligned, "exact inverse": exact}
  cpc_maps = {name: _neighbour_cpc(st) for name, st in tqdm(stacks.items(), desc="neighbour CPC", unit="stack",
                                                            disable=not progress)}
  epe = {"unaligned": _per_section_epe(zeros, case), "jaxalign": _per_section_epe(fields, case)}
  # tissue deformation (issue 18) of the fields, of the residual against the known distortion, and
  # of the known distortion itself; fields and truth are on the aligned (= original) grid
  deform = evaluation.deformation_scores(fields, aligned != 0, resolution_nm=config.resolution, case=case)
  times["evaluation"] = time.perf_counter() - t

  def spread(d):
    return "-" if d is None or math.isnan(d.low_all) else f"{d.low_all:.3f}–{d.high_all:.3f}"

  def row(name, s, maps, d=None, residual=None):
    return {"stack": name,
            "EPE median (px)": s["epe_median"] if s else float("nan"),
            "EPE p95 (px)": s["epe_p95"] if s else float("nan"),
            "EPE > 2 px (%)": 100 * s["epe_frac_over"] if s else float("nan"),
            "low CPC vs truth (%)": 100 * s["low_cpc"] if s else float("nan"),
            "neighbour low CPC (%)": 100 * low_cpc_fraction(maps),
            "area change p1–p99": spread(d),
            "residual area change": spread(residual)}

  summary_rows = [row("original (undistorted)", None, cpc_maps["original"]),
                  row("distorted (unaligned)", scores["unaligned"], cpc_maps["distorted"]),
                  row("aligned (jaxalign)", scores["jaxalign"], cpc_maps["aligned"], deform["fields"],
                      deform["residual vs truth"]),
                  row("exact inverse (truth)", None, cpc_maps["exact inverse"], deform["truth"])]
  command = "jaxalign demo " + " ".join(f"--{k}={v}" for k, v in (
      ("sections", config.sections), ("size", config.size), ("seed", config.seed),
      ("block_size", config.block_size), ("overlap", config.overlap),
      ("voting_distance", config.voting_distance), ("finest_nm", config.finest_nm),
      ("gammas", "default" if config.gammas is None else ",".join(f"{g:g}" for g in config.gammas)),
      ("model", config.model)))
  summary = {
    "command": command,
    "config": dataclasses.asdict(config),
    "aligner": model_desc,
    "plan": plan.describe(),
    "rows": summary_rows,
    "scores": scores,
    "per_section_epe_median": {k: [None if np.isnan(x) else float(x) for x in v] for k, v in epe.items()},
    "deformation": {"resolution_nm": list(config.resolution), "smooth_nm": metrics.DEFORMATION_SMOOTH_NM,
                    "sigma_px": deform["fields"].sigma_px, "margin_px": metrics.DEFORMATION_DEFECT_MARGIN_PX,
                    "band": list(metrics.DEFORMATION_BAND), **{k: d.summary() for k, d in deform.items()}},
    "seconds": times,
  }

  parent = out.parent
  parent.mkdir(parents=True, exist_ok=True)
  stage = parent / f".{out.name}.partial-{os.getpid()}"
  shutil.rmtree(stage, ignore_errors=True)
  try:
    t = time.perf_counter()
    _write_volumes(stage, {"original": case.tgt, "distorted": case.src, "aligned": aligned, "fields": fields},
                   config.resolution, progress)
    data = report.ReportData(
        title="jaxalign demo: synthetic EM stack, distorted and re-aligned",
        images={"original": case.tgt, "distorted": case.src, "aligned": aligned},
        fields=fields, gt_fields=case.gt, valid=case.valid,
        cpc_maps={k: cpc_maps[k] for k in ("original", "distorted", "aligned")},
        per_section={
          "median EPE (px) vs known distortion": epe,
          # entry z is the pair (z-1, z), so the curves share the EPE panel's x axis
          "neighbour low-CPC fraction (z-1, z)": {k: np.concatenate([[np.nan], low_cpc_fraction(v, axis=(1, 2))])
                                                  for k, v in cpc_maps.items() if k != "exact inverse"},
        },
        summary=summary_rows,
        deformation=deform, resolution_nm=config.resolution,
        notes=[f"Reproduce: {command}",
               f"{config.sections} sections of {config.size}² px; aligner: {model_desc}; "
               f"voting distance {config.voting_distance}, blocks of {config.block_size} overlapping by "
               f"{config.overlap}, decay distance {config.decay_distance:g} sections.",
               "Block plan: " + plan.describe().replace("\n", "; "),
               "EPE = |estimated field - known field| over scorable tissue (section 0 is the undistorted "
               "anchor). Neighbour low CPC = fraction of 32-px chunks (at MIP 1) whose Pearson correlation "
               "with the previous section is below 0.25 (the paper's criterion).",
               "Area change = Jacobian determinant of each section's field after removing its best-fit affine "
               f"part, smoothed at {metrics.DEFORMATION_SMOOTH_NM:g} nm, over tissue more than "
               f"{metrics.DEFORMATION_DEFECT_MARGIN_PX} px from cracks and folds (p1–p99 over the stack; 1 = "
               "tissue kept intact). The residual is compose(invert(field), truth), the field that maps the "
               "aligned stack onto the truth.",
               "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items())])
    report.write_report(stage / "report", data)
    times["writing"] = time.perf_counter() - t
    (stage / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    if out.exists():
      shutil.rmtree(out)
    os.replace(stage, out)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return summary


def _parse_gammas(values) -> tuple[float, ...] | None:
  if values is None:
    return None
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise InputError(f"--gammas must be numbers, got {','.join(values)}") from None


def main(argv):
  if len(argv) > 1:
    raise InputError(f"demo takes no positional arguments, got {argv[1:]}")
  from jaxalign.bench.report import format_table
  config = DemoConfig(sections=FLAGS.sections, size=FLAGS.size, seed=FLAGS.seed, block_size=FLAGS.block_size,
                      overlap=FLAGS.overlap, voting_distance=FLAGS.voting_distance,
                      decay_distance=FLAGS.decay_distance, finest_nm=0.0 if FLAGS.precise else FLAGS.finest_nm,
                      gammas=_parse_gammas(FLAGS.gammas), model=FLAGS.model)
  t0 = time.perf_counter()
  summary = run_demo(FLAGS.output, config, overwrite=FLAGS.overwrite, progress=FLAGS.progress)
  out = pathlib.Path(FLAGS.output).resolve()
  sys.stdout.write(f"\n{format_table(summary['rows'])}\n\n"
                   f"aligner: {summary['aligner']}\n"
                   f"total {time.perf_counter() - t0:.0f} s ("
                   + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()) + ")\n"
                   f"aligned volume: {out / 'aligned.zarr'}\n"
                   f"report:         {out / 'report' / 'index.html'}\n"
                   f"view in neuroglancer: jaxalign view --output={out / 'neuroglancer'} "
                   f"--raw={out / 'distorted.zarr'} --aligned={out / 'aligned.zarr'} --field={out / 'fields.zarr'}\n")
  return 0
