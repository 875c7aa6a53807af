"""Ground-truth benchmark cases and metrics, usable with any aligner.

Case kinds (issue 3 §4):
* ``same``: distorted section z vs original z (pure registration precision; ssTEM stacks fine);
* ``neighbour``: distorted section z vs original z-1 (includes natural section-to-section change;
  use `flyem_medulla_fibsem` every 4th slice: FIB-SEM slices are intrinsically aligned);
* ``stack``: the whole distorted stack, aligned into the frame of its (undistorted) section 0.

An aligner follows the team protocol (`jaxalign.align.protocols.PairAligner`) `aligner(src, tgt, *,
init_field=None, src_defects=None, tgt_defects=None) -> [H, W, 2]` with `warp(src, f) ≈ tgt`. For stack
cases either a stack aligner (`StackAligner`) `fn(sections [Z, H, W], *, defects=[Z, H, W]) -> [Z, H, W, 2]`
is passed (`stack_aligner=True`) or the pair aligner is chained section by section (each section to the
previous aligned one).

On disk a case is a directory with `case.json` (kind, metadata, distortion config, per-section
parameters, format version) and `arrays.npz` (compressed NumPy arrays, names as in `Case`).

Metrics: endpoint error (px) over valid tissue -- median, p95, p99, fraction > 2 px -- and the same
within `near_distance` px of a discontinuity; fraction of CPC chunks below 0.25 after downsampling by
2**cpc_level, next to the fraction with the exact ground-truth field and the undistorted stack's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxalign.errors import InputError
from jaxalign.ops.fields import FULL_SUPPORT, downsample_image, level_nearest, warp
from jaxalign.bench.groundtruth import DistortionConfig, distort_stack
from jaxalign.ops.metrics import LOW_CPC_THRESHOLD, cpc, low_cpc_fraction
from jaxalign.align.protocols import PairAligner, StackAligner

CASE_FORMAT_VERSION = 1
CASE_KINDS = ("same", "neighbour", "stack")
ARRAY_NAMES = ("src", "tgt", "gt", "valid", "src_defects", "disc_distance", "reference")
# nm per pixel (xy) and section thickness (nm) of the shared stacks (../shared/data/em/*/SOURCE.txt)
STACK_RESOLUTION = {
  "isbi2012_train": (4.0, 50.0),
  "gerhard_vnc_stack1": (4.6, 50.0),
  "flyem_medulla_fibsem": (10.0, 10.0),
  "damaged_pair_dolw7": (50.0, 50.0),
}
# A warped data mask counts as data where all bilinear taps had data.
MASK_THRESHOLD = FULL_SUPPORT


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Metric settings.

  Attributes:
    near_distance: px; "near a discontinuity" means within this distance of a crack line or fold strip.
    epe_threshold: px; reported as the fraction of valid pixels with EPE above it.
    cpc_level: CPC is computed after 2**cpc_level downsampling (images by mean, masks by min).
    cpc_chunk: CPC chunk side in pixels of that level.
    cpc_threshold: a chunk below this correlation counts as misaligned (paper: 0.25).
  """
  near_distance: float = 20.0
  epe_threshold: float = 2.0
  cpc_level: int = 1
  cpc_chunk: int = 32
  cpc_threshold: float = LOW_CPC_THRESHOLD


@dataclasses.dataclass(frozen=True)
class Case:
  """A benchmark case. N = pairs (same/neighbour) or sections (stack).

  Attributes:
    kind: "same", "neighbour" or "stack".
    src: `[N, H, W]` float32 distorted sections (0 = no data).
    tgt: `[N, H, W]` float32 targets: original section z (same), z-1 (neighbour), z (stack: the frame).
    gt: `[N, H, W, 2]` float32 px (dy, dx), ground truth on the target grid:
      `warp(src[i], gt[i]) ≈` original section on valid tissue.
    valid: `[N, H, W]` bool, target frame: pixels scored for EPE.
    src_defects: `[N, H, W]` bool, source frame: cracks and folds (given to aligners).
    disc_distance: `[N, H, W]` float32 px, target frame: distance to the nearest discontinuity.
    reference: `[N, H, W]` float32: the undistorted source section (for the reference CPC).
    meta: JSON-able metadata (stack, indices, resolution, seed, distortion config, parameters).
  """
  kind: str
  src: np.ndarray
  tgt: np.ndarray
  gt: np.ndarray
  valid: np.ndarray
  src_defects: np.ndarray
  disc_distance: np.ndarray
  reference: np.ndarray
  meta: dict

  def __len__(self) -> int:
    return int(self.src.shape[0])


# ---------------------------------------------------------------------------------------------
# Shared data and case construction


def em_data_dir() -> pathlib.Path:
  """`$JAXALIGN_EM_DATA`, else `../shared/data/em` next to the repository."""
  env = os.environ.get("JAXALIGN_EM_DATA")
  if env:
    return pathlib.Path(env)
  return (pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "em").resolve()


def load_stack(name: str, *, num: int | None = None, start: int = 0, step: int = 1,
               crop: int | None = None) -> np.ndarray:
  """Loads sections `start, start+step, ...` (`num` of them) of a shared stack.

  Returns `[Z, H, W]` float32 in [0, 1], centre-cropped to `crop` px if given.
  Raises InputError when the stack or a section is missing.
  """
  from PIL import Image
  folder = em_data_dir() / name
  if not folder.is_dir():
    raise InputError(f"shared stack {name!r} not found at {folder} (set JAXALIGN_EM_DATA)")
  files = sorted(p for p in folder.glob("[0-9][0-9][0-9].png"))
  picked = files[start::step]
  if num is not None:
    if len(picked) < num:
      raise InputError(f"stack {name!r} has only {len(picked)} sections from {start} with step {step}, need {num}")
    picked = picked[:num]
  if not picked:
    raise InputError(f"stack {name!r}: no sections selected")
  out = []
  for p in picked:
    img = np.asarray(Image.open(p), dtype=np.float32) / 255.0
    if crop is not None:
      h, w = img.shape
      if crop > min(h, w):
        raise InputError(f"crop {crop} is larger than the sections ({h}x{w})")
      y0, x0 = (h - crop) // 2, (w - crop) // 2
      img = img[y0:y0 + crop, x0:x0 + crop]
    out.append(img)
  return np.stack(out)


def make_case(kind: str, stack, *, config: DistortionConfig | None = None, meta: dict | None = None,
              progress: bool = False) -> Case:
  """Distorts `stack [Z, H, W]` and builds a case of `kind` from it.

  same: pairs (distorted z, original z), z >= 1; neighbour: (distorted z, original z-1), z >= 1;
  stack: all sections, targets are the original sections (the common frame).
  """
  if kind not in CASE_KINDS:
    raise InputError(f"case kind must be one of {CASE_KINDS}, got {kind!r}")
  config = config or DistortionConfig()
  d = distort_stack(stack, config, progress=progress)
  z_count = d.images.shape[0]
  if kind != "stack" and z_count < 2:
    raise InputError(f"a {kind} case needs at least 2 sections, got {z_count}")
  if kind == "stack":
    src_idx = np.arange(z_count)
    tgt_idx = src_idx
  else:
    src_idx = np.array([z for z in range(1, z_count)])
    tgt_idx = src_idx if kind == "same" else src_idx - 1
  tgt = d.original[tgt_idx]
  valid = d.valid[src_idx] & (tgt != 0)
  m = dict(meta or {})
  m.update(kind=kind, src_sections=src_idx.tolist(), tgt_sections=tgt_idx.tolist(),
           distortion=_config_json(config), params=[d.params[z] for z in src_idx])
  return Case(kind=kind, src=d.images[src_idx], tgt=tgt, gt=d.fields[src_idx], valid=valid,
              src_defects=d.defects[src_idx], disc_distance=d.disc_distance[src_idx],
              reference=d.original[src_idx], meta=m)


def shared_case(kind: str, stack_name: str, *, num: int = 5, step: int | None = None, crop: int | None = None,
                seed: int = 0, config: DistortionConfig | None = None) -> Case:
  """A case from a shared stack; neighbour/stack cases default to every 4th slice of FIB-SEM."""
  if step is None:
    step = 4 if stack_name == "flyem_medulla_fibsem" and kind != "same" else 1
  stack = load_stack(stack_name, num=num, step=step, crop=crop)
  xy, z = STACK_RESOLUTION.get(stack_name, (float("nan"), float("nan")))
  config = dataclasses.replace(config or DistortionConfig(), seed=seed)
  meta = dict(stack=stack_name, step=step, crop=crop, resolution_nm=[z * step, xy, xy])
  return make_case(kind, stack, config=config, meta=meta)


def case_from_volume(kind: str, url: str, *, num: int | None = None, start: int = 0, step: int = 1,
                     seed: int = 0, config: DistortionConfig | None = None, level: int = 0) -> Case:
  """A case from any `jaxalign.volume.store` image volume (sections `start::step`, `num` of them, at `level`).

  Integer volumes are scaled to [0, 1] by their dtype's maximum.
  """
  from jaxalign.volume import store
  vol = store.open_volume(url)
  if vol.is_field:
    raise InputError(f"{url} is a field volume; a case needs an image volume")
  z_count = vol.shape(level)[0]
  idx = list(range(start, z_count, step))[:num]
  if len(idx) < (1 if kind == "stack" else 2):
    raise InputError(f"{url}: only {len(idx)} sections selected from {z_count}")
  data = np.stack([np.asarray(vol.read(z=z, level=level)) for z in idx])
  if np.issubdtype(data.dtype, np.integer):
    data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
  res = vol.resolution_at(level)
  config = dataclasses.replace(config or DistortionConfig(), seed=seed)
  meta = dict(stack=url, step=step, start=start, level=level, resolution_nm=[res[0] * step, res[1], res[2]])
  return make_case(kind, data, config=config, meta=meta)


def write_distorted_volume(case: Case, url: str) -> str:
  """Writes a stack case's distorted sections to a float32 image volume at `url` (zarr v3) and its
  crack/fold masks to `url + "_defects"`, so `jaxalign align` can run on them. Returns `url`."""
  from jaxalign.volume import store
  if case.kind != "stack":
    raise InputError(f"only a 'stack' case is a volume to align, got {case.kind!r}")
  res = case.meta.get("resolution_nm") or [1.0, 1.0, 1.0]
  vol = store.create_volume(url, case.src.shape, np.float32, res, kind="image")
  vol.write(case.src.astype(np.float32))
  dvol = store.create_volume(url.rstrip("/") + "_defects", case.src.shape, np.uint8, res, kind="defect")
  dvol.write(case.src_defects.astype(np.uint8))
  return url


def _config_json(config: DistortionConfig) -> dict:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def save_case(case: Case, directory: str | os.PathLike) -> pathlib.Path:
  """Writes `case.json` + `arrays.npz` into `directory` (written to a temp dir, then moved in place)."""
  directory = pathlib.Path(directory)
  if directory.exists() and any(directory.iterdir()):
    if not (directory / "case.json").exists():
      raise InputError(f"{directory} exists and is not a case directory; refusing to overwrite")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".case-", dir=directory.parent))
  try:
    np.savez_compressed(tmp / "arrays.npz", **{k: getattr(case, k) for k in ARRAY_NAMES})
    header = dict(format_version=CASE_FORMAT_VERSION, kind=case.kind, shape=list(case.src.shape),
                  arrays=list(ARRAY_NAMES), meta=case.meta)
    (tmp / "case.json").write_text(json.dumps(header, indent=1))
    if directory.exists():
      shutil.rmtree(directory)
    tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def load_case(directory: str | os.PathLike) -> Case:
  """Reads a case written by `save_case`. Raises InputError if missing or inconsistent."""
  directory = pathlib.Path(directory)
  header_path = directory / "case.json"
  if not header_path.is_file() or not (directory / "arrays.npz").is_file():
    raise InputError(f"{directory} is not a ground-truth case directory (needs case.json and arrays.npz)")
  try:
    header = json.loads(header_path.read_text())
  except json.JSONDecodeError as e:
    raise InputError(f"{header_path}: invalid JSON ({e})") from None
  if header.get("format_version") != CASE_FORMAT_VERSION or header.get("kind") not in CASE_KINDS:
    raise InputError(f"{header_path}: unsupported case format/kind")
  with np.load(directory / "arrays.npz") as z:
    missing = [k for k in ARRAY_NAMES if k not in z]
    if missing:
      raise InputError(f"{directory}/arrays.npz lacks arrays {missing}")
    arrays = {k: z[k] for k in ARRAY_NAMES}
  n, h, w = arrays["src"].shape
  for k, v in arrays.items():
    want = (n, h, w, 2) if k == "gt" else (n, h, w)
    if v.shape != want:
      raise InputError(f"{directory}: array {k} has shape {v.shape}, expected {want}")
  return Case(kind=header["kind"], meta=header.get("meta", {}), **arrays)


# ---------------------------------------------------------------------------------------------
# Metrics


def endpoint_errors(pred, gt) -> np.ndarray:
  """Per-pixel endpoint error `|pred - gt|` in px: `[..., H, W, 2]` x 2 -> `[..., H, W]` float32."""
  return np.asarray(jnp.linalg.norm(jnp.asarray(pred, jnp.float32) - jnp.asarray(gt, jnp.float32), axis=-1))


def epe_stats(errors: np.ndarray, threshold: float = EvalConfig.epe_threshold) -> dict[str, float]:
  """Median, p95, p99 and fraction above `threshold` of a 1-D array of endpoint errors (px)."""
  e = np.asarray(errors, np.float64).ravel()
  if e.size == 0:
    return dict(median=float("nan"), p95=float("nan"), p99=float("nan"), frac_over=float("nan"), n=0)
  p50, p95, p99 = np.percentile(e, [50, 95, 99])
  return dict(median=float(p50), p95=float(p95), p99=float(p99), frac_over=float(np.mean(e > threshold)),
              n=int(e.size))


def cpc_map(a, b, mask=None, *, level: int = EvalConfig.cpc_level, chunk: int = EvalConfig.cpc_chunk) -> np.ndarray:
  """CPC map after `2**level` downsampling: `[H, W]` x 2 (+ mask) -> `[H' // chunk, W' // chunk]`.

  Images are cropped to a multiple of `2**level`, downsampled by mean; the mask by min.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  m = jnp.ones(a.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  f = 2 ** level
  h, w = a.shape[-2] // f * f, a.shape[-1] // f * f
  a, b, m = a[..., :h, :w], b[..., :h, :w], m[..., :h, :w]
  for _ in range(level):
    a, b, m = downsample_image(a), downsample_image(b), downsample_image(m, reduce="min")
  if min(a.shape[-2:]) < chunk:
    raise InputError(f"section {a.shape[-2:]} at level {level} is smaller than a CPC chunk of {chunk} px")
  return np.asarray(cpc(a, b, chunk=chunk, mask=m > 0))


# ---------------------------------------------------------------------------------------------
# Running aligners on cases


def identity_aligner(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  """The do-nothing baseline (team aligner protocol): returns `init_field` or zeros `[H, W, 2]`."""
  h, w = np.shape(src)
  return np.zeros((h, w, 2), np.float32) if init_field is None else np.asarray(init_field, np.float32)


def _has_data(image) -> bool:
  return bool(np.any(np.asarray(image) != 0))


def _chain_stack(aligner: PairAligner, case: Case, progress: bool):
  """Sequential stack alignment with a pair aligner: section z to the last aligned section with data."""
  n, h, w = case.src.shape
  fields = np.zeros((n, h, w, 2), np.float32)
  times = []
  last = 0
  prev_aligned = np.where(case.src_defects[0], 0.0, case.src[0])
  for z in tqdm(range(1, n), desc="stack", disable=not progress, leave=False):
    if not _has_data(case.src[z]):
      continue
    t0 = time.perf_counter()
    f = np.asarray(aligner(case.src[z], prev_aligned, init_field=None, src_defects=case.src_defects[z],
                           tgt_defects=None), np.float32)
    times.append(time.perf_counter() - t0)
    fields[z] = f
    prev_aligned = np.asarray(warp(jnp.asarray(np.where(case.src_defects[z], 0.0, case.src[z])), jnp.asarray(f)))
    last = z
  logging.info("chained %d sections (last with data: %d)", n, last)
  return fields, times


def align_case(aligner: PairAligner | StackAligner, case: Case, *, stack_aligner: bool = False, progress: bool = True):
  """Runs `aligner` on every pair (or the stack) of `case`.

  Returns (fields `[N, H, W, 2]`, run mask `[N]` bool: pairs actually aligned, per-call times in s).
  Pairs whose source has no data (blank sections) are skipped (field 0, not scored).
  """
  n, h, w = case.src.shape
  ran = np.array([_has_data(s) for s in case.src])
  if case.kind == "stack":
    if stack_aligner:
      t0 = time.perf_counter()
      fields = np.asarray(aligner(case.src, defects=case.src_defects), np.float32)
      times = [time.perf_counter() - t0]
    else:
      fields, times = _chain_stack(aligner, case, progress)
    ran[0] = False  # section 0 is the undistorted anchor: not an alignment result
    return fields, ran, times
  fields = np.zeros((n, h, w, 2), np.float32)
  times = []
  for i in tqdm(range(n), desc="pairs", disable=not progress, leave=False):
    if not ran[i]:
      continue
    t0 = time.perf_counter()
    fields[i] = np.asarray(aligner(case.src[i], case.tgt[i], init_field=None, src_defects=case.src_defects[i],
                                   tgt_defects=None), np.float32)
    times.append(time.perf_counter() - t0)
  return fields, ran, times


def _aligned(case: Case, field, i: int):
  """Source i (defects zeroed) warped by `field`, and where it has data: (`[H, W]` float32, bool)."""
  fj = jnp.asarray(field)
  data = jnp.asarray((case.src[i] != 0) & ~case.src_defects[i], jnp.float32)
  img = warp(jnp.asarray(np.where(case.src_defects[i], 0.0, case.src[i])), fj)
  return np.asarray(img), np.asarray(warp(data, fj) >= MASK_THRESHOLD)


def content_shift(moving, fixed) -> np.ndarray:
  """Translation `s` (px, (dy, dx)) with `fixed(r) ≈ moving(r + s)`, by phase correlation (float64 NumPy).

  Used to measure how far two *undistorted* neighbouring sections are apart by content (slices of a
  "registered" FIB-SEM stack still differ by ~1 px; oblique neurites). Sub-pixel by a matrix DFT of
  the normalised cross-power spectrum near the peak; a Hann window keeps the borders from dominating.
  Args:
    moving, fixed: `[H, W]` images.
  Returns:
    `[2]` float64, pixels, (dy, dx).
  """
  a = np.asarray(moving, np.float64)
  b = np.asarray(fixed, np.float64)
  win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
  fa = np.fft.fft2((a - a.mean()) * win)
  fb = np.fft.fft2((b - b.mean()) * win)
  cross = fa * np.conj(fb)
  spectrum = cross / np.maximum(np.abs(cross), 1e-12)
  corr = np.real(np.fft.ifft2(spectrum))
  peak = np.array(np.unravel_index(np.argmax(corr), corr.shape), np.float64)
  n = np.array(corr.shape, np.float64)
  peak = np.where(peak > n / 2, peak - n, peak)
  # Sub-pixel: the correlation evaluated by a matrix DFT on a 0.05 px grid around the integer peak
  # (Guizar-Sicairos et al. 2008), which has no parabola-fit bias.
  offsets = np.arange(-1.0, 1.0 + 1e-9, 0.05)
  ky = np.fft.fftfreq(corr.shape[0])
  kx = np.fft.fftfreq(corr.shape[1])
  ey = np.exp(2j * np.pi * np.outer(peak[0] + offsets, ky))
  ex = np.exp(2j * np.pi * np.outer(kx, peak[1] + offsets))
  fine = np.real(ey @ spectrum @ ex)
  iy, ix = np.unravel_index(np.argmax(fine), fine.shape)
  shift = [peak[0] + offsets[iy], peak[1] + offsets[ix]]
  return np.asarray(shift)


def score_fields(fields, case: Case, ran=None, *, config: EvalConfig | None = None) -> dict[str, Any]:
  """Scores fields `[N, H, W, 2]` against a case (see the module docstring for the metrics)."""
  config = config or EvalConfig()
  fields = np.asarray(fields, np.float32)
  if fields.shape != case.gt.shape:
    raise InputError(f"fields shape {fields.shape} does not match the case's ground truth {case.gt.shape}")
  if not np.all(np.isfinite(fields)):
    raise InputError("fields contain NaN or Inf values")
  ran = np.array([_has_data(s) for s in case.src]) if ran is None else np.asarray(ran, bool)
  all_e, near_e, shifted_e = [], [], []
  for i in np.nonzero(ran)[0]:
    e = endpoint_errors(fields[i], case.gt[i])
    v = case.valid[i]
    all_e.append(e[v])
    near_e.append(e[v & (case.disc_distance[i] <= config.near_distance)])
    if case.kind == "neighbour":
      # The ground truth maps src onto *its own* undistorted section; the target is the previous
      # section, which is displaced by content. Removing that translation (measured on the undistorted
      # pair, independently of any aligner) leaves the aligner's error plus local content motion.
      s = content_shift(case.reference[i], case.tgt[i]).astype(np.float32)
      shifted_e.append(endpoint_errors(fields[i], case.gt[i] + s)[v])
  cpc_kw = dict(level=config.cpc_level, chunk=config.cpc_chunk)
  maps, maps_gt, maps_ref = [], [], []
  if case.kind == "stack":
    # neighbour CPC of the aligned stack (section z-1 vs z, both with data; section 0 is the anchor)
    has = np.array([_has_data(s) for s in case.src])
    for f, out in ((fields, maps), (case.gt, maps_gt)):
      prev = None
      for i in np.nonzero(has)[0]:
        cur = _aligned(case, f[i], i)
        if prev is not None:
          out.append(cpc_map(prev[0], cur[0], prev[1] & cur[1], **cpc_kw))
        prev = cur
    maps_ref = [cpc_map(case.tgt[i - 1], case.tgt[i], **cpc_kw) for i in range(1, len(case))]
  else:
    for i in np.nonzero(ran)[0]:
      for f, out in ((fields[i], maps), (case.gt[i], maps_gt)):
        img, mask = _aligned(case, f, i)
        out.append(cpc_map(img, case.tgt[i], mask & (case.tgt[i] != 0), **cpc_kw))
      maps_ref.append(cpc_map(case.reference[i], case.tgt[i], **cpc_kw))
  s = epe_stats(np.concatenate(all_e) if all_e else np.zeros(0), config.epe_threshold)
  sn = epe_stats(np.concatenate(near_e) if near_e else np.zeros(0), config.epe_threshold)
  ss = epe_stats(np.concatenate(shifted_e) if shifted_e else np.zeros(0), config.epe_threshold)
  return dict(
    pairs=int(ran.sum()), skipped=int((~ran).sum()) - (1 if case.kind == "stack" else 0),
    epe_median=s["median"], epe_p95=s["p95"], epe_p99=s["p99"], epe_frac_over=s["frac_over"], epe_n=s["n"],
    near_median=sn["median"], near_p95=sn["p95"], near_frac_over=sn["frac_over"], near_n=sn["n"],
    shift_corrected_median=ss["median"], shift_corrected_p95=ss["p95"],
    low_cpc=low_cpc_fraction(maps, threshold=config.cpc_threshold),
    low_cpc_gt=low_cpc_fraction(maps_gt, threshold=config.cpc_threshold),
    low_cpc_undistorted=low_cpc_fraction(maps_ref, threshold=config.cpc_threshold),
  )


def evaluate(aligner: PairAligner | StackAligner, case: Case, *, name: str | None = None, stack_aligner: bool = False,
             config: EvalConfig | None = None, progress: bool = True) -> dict[str, Any]:
  """Runs an aligner on a case and returns one table row (dict).

  Args:
    aligner: team-protocol pair aligner, or (with `stack_aligner=True`, stack cases only)
      `fn(sections, *, defects) -> [Z, H, W, 2]`.
    case: a `Case`.
    name: method name for the row.
  Returns:
    dict with method, case, EPE stats (px; all valid tissue and near discontinuities), low-CPC
    fractions (method / exact ground-truth field / undistorted stack), timings (first call including
    compilation, and the median of the later calls).
  """
  config = config or EvalConfig()
  fields, ran, times = align_case(aligner, case, stack_aligner=stack_aligner, progress=progress)
  row = dict(method=name or getattr(aligner, "__name__", "aligner"), case=case.kind,
             stack=case.meta.get("stack", "?"))
  row.update(score_fields(fields, case, ran, config=config))
  row["first_s"] = float(times[0]) if times else float("nan")
  row["per_call_s"] = float(np.median(times[1:])) if len(times) > 1 else row["first_s"]
  return row


ROW_COLUMNS = (
  ("method", "method", "{}"), ("case", "case", "{}"), ("pairs", "pairs", "{}"),
  ("epe_median", "EPE median", "{:.3f}"), ("epe_p95", "p95", "{:.3f}"), ("epe_p99", "p99", "{:.3f}"),
  ("epe_frac_over", ">2px", "{:.4f}"), ("near_median", "near median", "{:.3f}"), ("near_p95", "near p95", "{:.3f}"),
  ("shift_corrected_median", "median, content shift removed", "{:.3f}"),
  ("shift_corrected_p95", "p95, content shift removed", "{:.3f}"),
  ("low_cpc", "low CPC", "{:.4f}"), ("low_cpc_gt", "low CPC (gt field)", "{:.4f}"),
  ("low_cpc_undistorted", "low CPC (undistorted)", "{:.4f}"), ("per_call_s", "s/pair", "{:.2f}"),
)


def format_table(rows: list[dict]) -> str:
  """Markdown table of evaluation rows."""
  head = "| " + " | ".join(title for _, title, _ in ROW_COLUMNS) + " |"
  sep = "|" + "---|" * len(ROW_COLUMNS)
  lines = [head, sep]
  for r in rows:
    cells = []
    for key, _, fmt in ROW_COLUMNS:
      v = r.get(key, "")
      cells.append(fmt.format(v) if v != "" else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def deformation_scores(fields, tissue, *, resolution_nm, case: Case | None = None, ran=None) -> dict[str, Any]:
  """Tissue deformation (issue 18, `jaxalign.ops.metrics.deformation`) of alignment fields, and with a
  stack case also of the residual field (`metrics.residual_deformation`) and of the truth itself.

  Args:
    fields: `[Z, H, W, 2]` float32 px (dy, dx) at `resolution_nm`: the fields that made the aligned stack.
    tissue: `[Z, H, W]` bool: where the aligned stack has data (the fields' scored pixels).
    resolution_nm: nm per pixel (z, y, x) of the fields.
    case: optional stack `Case` whose ground truth is on the fields' grid: pixels within
      `metrics.DEFORMATION_DEFECT_MARGIN_PX` of its cracks and folds are left out everywhere, and
      the residual and the truth are scored over its valid pixels of the sections in `ran`.
    ran: `[Z]` bool, sections aligned (default: those with data, section 0, the anchor, excluded).
  Returns:
    series name -> `metrics.Deformation`: "fields"[, "residual vs truth", "truth"] (the truth over
    the residual's pixels).
  """
  from jaxalign.ops import metrics
  tissue = np.asarray(tissue, bool)
  if case is None:
    return {"fields": metrics.deformation(fields, resolution_nm=resolution_nm, tissue=tissue)}
  if ran is None:
    ran = np.r_[False, [_has_data(s) for s in case.src[1:]]]
  far = case.disc_distance > metrics.DEFORMATION_DEFECT_MARGIN_PX
  out = {"fields": metrics.deformation(fields, resolution_nm=resolution_nm, tissue=tissue & far)}
  scored = case.valid & far & np.asarray(ran, bool)[:, None, None]
  res = metrics.residual_deformation(fields, case.gt, resolution_nm=resolution_nm, tissue=scored)
  out["residual vs truth"] = res
  out["truth"] = metrics.deformation(case.gt, resolution_nm=resolution_nm, tissue=np.isfinite(res.det))
  return out


# The paper's CPC (Popovych et al. 2024): 64-px chunks at 32 nm/px.
PAPER_CPC_NM = 32.0
PAPER_CPC_CHUNK = 64
# Default chunks shrink (powers of two) down to this on sections too small for the paper's.
MIN_DEFAULT_CHUNK = 16


def cpc_scale(shape, resolution_nm, level: int | None = None, chunk: int | None = None) -> tuple[int, int, str]:
  """CPC level and chunk for sections of `shape` `[Z, H, W]` at `resolution_nm` (z, y, x) nm/px.

  Defaults: the level nearest (in log scale) `PAPER_CPC_NM`, chunks of `PAPER_CPC_CHUNK` px. A
  defaulted chunk halves (down to `MIN_DEFAULT_CHUNK`), then a defaulted level gets finer, until a
  chunk fits the section; given values are kept (too large a chunk is an error later).
  Returns (level, chunk, note): note says why the paper's scale was not used ("" when it was).
  """
  px = 0.5 * (float(resolution_nm[1]) + float(resolution_nm[2]))
  auto_level, auto_chunk = level is None, chunk is None
  paper_level = level_nearest(px, PAPER_CPC_NM)
  level = paper_level if auto_level else level
  chunk = PAPER_CPC_CHUNK if auto_chunk else chunk
  side = lambda lv: min(shape[1], shape[2]) // 2 ** lv  # noqa: E731
  while auto_chunk and chunk > max(side(level), MIN_DEFAULT_CHUNK):
    chunk //= 2
  while auto_level and level > 0 and side(level) < chunk:
    level -= 1
  note = ""
  if (auto_chunk and chunk != PAPER_CPC_CHUNK) or (auto_level and level != paper_level):
    note = (f" (sections of {shape[1]}x{shape[2]} px are too small for the paper's {PAPER_CPC_CHUNK}-px "
            f"chunks at {PAPER_CPC_NM:g} nm)")
  return level, chunk, note


# ---------------------------------------------------------------------------------------------
# Misalignment list for proofreading


# Chunks listed by default (`jaxalign eval --worst_chunks`).
WORST_CHUNKS = 100
WORST_CHUNKS_LAYER = "worst chunks"


def worst_chunks(maps, *, level: int, chunk: int, count: int = WORST_CHUNKS) -> list[dict[str, Any]]:
  """The `count` chunks with the lowest CPC over neighbour CPC maps, worst first.

  Args:
    maps: Z-1 CPC maps `[h, w]` float (NaN = unscored chunk); map i compares sections (i, i+1), as
      `jaxalign.commands.eval.neighbour_cpc` returns them.
    level, chunk: the maps' scale: chunks of `chunk` px at MIP level `level` (`cpc_map`), so chunk
      (i, j) covers level-0 pixels `[i s, (i+1) s) x [j s, (j+1) s)` with `s = chunk * 2**level`.
    count: how many chunks to return (at most the number of scored chunks).
  Returns:
    list of dicts, lowest CPC first (ties: lower z, y, x first): `rank` (1 = worst), `z`, `y`, `x`
    (level-0 voxel indices of the chunk centre; z is the later section of the pair, `y0 + s // 2`),
    `pair` ([z-1, z]), `cpc`, and `y_range` / `x_range` ([start, stop) level-0 voxels covered).
  """
  if count <= 0:
    return []
  side = chunk * 2 ** level
  cands = []  # (cpc, z, i, j): the `count` lowest of each map, merged below
  for p, m in enumerate(maps):
    m = np.asarray(m, np.float64)
    flat = np.where(np.isnan(m), np.inf, m).ravel()
    keep = np.flatnonzero(np.isfinite(flat))
    if len(keep) > count:
      keep = keep[np.argpartition(flat[keep], count - 1)[:count]]
    cands += [(float(flat[k]), p + 1, int(k // m.shape[1]), int(k % m.shape[1])) for k in keep]
  cands.sort()
  out = []
  for rank, (value, z, i, j) in enumerate(cands[:count], start=1):
    y0, x0 = i * side, j * side
    out.append(dict(rank=rank, z=z, y=y0 + side // 2, x=x0 + side // 2, pair=[z - 1, z], cpc=value,
                    y_range=[y0, y0 + side], x_range=[x0, x0 + side]))
  return out


def worst_chunks_state(chunks: list[dict[str, Any]], resolution_nm, *,
                       name: str = WORST_CHUNKS_LAYER) -> dict[str, Any]:
  """A neuroglancer viewer state with one local point-annotation layer on `chunks` (`worst_chunks`).

  Coordinates follow `jaxalign view`'s state: dimensions x, y, z in metres per level-0 voxel of the
  volume (`resolution_nm` (z, y, x) nm/px), positions in voxels where voxel (z, y, x) spans
  `[i, i + 1)` along each axis, so a chunk centre voxel is the point `[x + 0.5, y + 0.5, z + 0.5]`.
  Each point carries its CPC as the annotation property `cpc`; the layer (`state["layers"][0]`) can
  be added to the layers of a `jaxalign view` state.json. Returns a JSON-able dict.
  """
  from jaxalign.volume.store import neuroglancer_dimensions  # deferred: io pulls in tensorstore
  dims = neuroglancer_dimensions(resolution_nm)
  points = [dict(type="point", id=f"worst-{c['rank']:06d}",
                 point=[c["x"] + 0.5, c["y"] + 0.5, c["z"] + 0.5], props=[float(c["cpc"])],
                 description=f"#{c['rank']} CPC {c['cpc']:.3f}, sections {c['pair'][0]}-{c['pair'][1]}")
            for c in chunks]
  layer = {"type": "annotation", "name": name,
           "source": [{"url": "local://annotations", "transform": {"outputDimensions": dims}}],
           "annotationProperties": [{"id": "cpc", "type": "float32", "description": "CPC of the chunk"}],
           "annotations": points, "annotationColor": "#ff3030", "tab": "annotations"}
  state = {"dimensions": dims, "layers": [layer], "selectedLayer": {"layer": name, "visible": True}}
  if points:
    state["position"] = list(points[0]["point"])
  return state
