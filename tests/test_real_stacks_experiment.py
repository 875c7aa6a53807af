"""experiments/real_stacks.py: its metric function (`score_group`) against an independent NumPy
computation on a synthetic 4-section stack with known fields, and its table builder."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("scipy")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "real_stacks.py"


@pytest.fixture(scope="module")
def rs():
  spec = importlib.util.spec_from_file_location("real_stacks_experiment", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  try:
    spec.loader.exec_module(module)  # defines no flags: those are defined only when run as a script
  except BaseException:
    sys.modules.pop(spec.name, None)
    raise
  return module


# --------------------------------------------------------------------------- NumPy reference


def np_warp(img, field):
  """Bilinear pull, pixel centres at integers, zero outside with blending (grid-constant)."""
  h, w = img.shape
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  y = yy + field[..., 0].astype(np.float64)
  x = xx + field[..., 1].astype(np.float64)
  y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
  out = np.zeros((h, w))
  for dy in (0, 1):
    for dx in (0, 1):
      yi, xi = y0 + dy, x0 + dx
      wgt = (1 - np.abs(y - yi)) * (1 - np.abs(x - xi))
      inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
      out += np.where(inside, wgt * img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], 0.0)
  return out


def np_cpc(a, b, mask, level, chunk):
  """2**level mean downsampling (mask by min), then Pearson r per chunk over pixels where a, b != 0
  and the mask holds; NaN with less than half a chunk of such pixels."""
  f = 2 ** level
  h, w = a.shape[0] // f * f, a.shape[1] // f * f
  a, b, m = a[:h, :w], b[:h, :w], mask[:h, :w].astype(np.float64)
  if f > 1:
    a = a.reshape(h // f, f, w // f, f).mean((1, 3))
    b = b.reshape(h // f, f, w // f, f).mean((1, 3))
    m = m.reshape(h // f, f, w // f, f).min((1, 3))
  ny, nx = a.shape[0] // chunk, a.shape[1] // chunk
  out = np.full((ny, nx), np.nan)
  for i in range(ny):
    for j in range(nx):
      sl = np.s_[i * chunk:(i + 1) * chunk, j * chunk:(j + 1) * chunk]
      v = (a[sl] != 0) & (b[sl] != 0) & (m[sl] > 0)
      if v.sum() < 0.5 * chunk * chunk:
        continue
      x, y = a[sl][v], b[sl][v]
      if x.std() == 0 or y.std() == 0:
        continue
      out[i, j] = np.corrcoef(x, y)[0, 1]
  return out


def np_reference(images, gt, valid, fields_by_method, *, paper=(1, 64), fine=(0, 32)):
  """Low-CPC fractions at both scales and EPE median / p95 per method, from scratch."""
  z_count = images.shape[0]
  masks = {m: np.stack([np_warp((images[z] != 0).astype(np.float64), f[z]) >= 0.999 for z in range(z_count)])
           for m, f in fields_by_method.items()}
  aligned = {m: np.stack([np_warp(images[z].astype(np.float64), f[z]) for z in range(z_count)])
             for m, f in fields_by_method.items()}
  common = np.logical_and.reduce(list(masks.values()))
  out = {m: {} for m in fields_by_method}
  for key, (level, chunk) in (("paper", paper), ("fine", fine)):
    maps = {m: [] for m in fields_by_method}
    for z in range(1, z_count):
      per = {m: np_cpc(aligned[m][z - 1], aligned[m][z], common[z - 1] & common[z], level, chunk)
             for m in fields_by_method}
      undefined = np.any([np.isnan(v) for v in per.values()], axis=0)
      for m in per:
        maps[m].append(np.where(undefined, np.nan, per[m]).ravel())
    for m in maps:
      c = np.concatenate(maps[m])
      c = c[~np.isnan(c)]
      out[m][key] = (float(np.mean(c < 0.25)), int(np.sum(c < 0.25)), int(c.size))
  for m, f in fields_by_method.items():
    e = np.concatenate([np.linalg.norm(f[z].astype(np.float64) - gt[z], axis=-1)[valid[z]] for z in range(1, z_count)])
    out[m]["epe"] = (float(np.median(e)), float(np.percentile(e, 95)))
  return out


# --------------------------------------------------------------------------- the case


def _synthetic_case(rs):
  """4 sections of 256² at 16 nm: one smooth texture plus per-section detail, each section moved by
  a known translation (section 0 the anchor), with exact ground truth and its inverse."""
  from scipy import ndimage
  rng = np.random.default_rng(0)
  size, pad = 256, 16
  base = ndimage.gaussian_filter(rng.standard_normal((size + 2 * pad, size + 2 * pad)), 2.0)
  shifts = np.array([[0.0, 0.0], [2.5, -1.75], [-3.25, 1.5], [1.0, 4.25]], np.float32)
  original, images = [], []
  for z in range(4):
    detail = ndimage.gaussian_filter(rng.standard_normal(base.shape), 2.0)
    sec = base + (0.6 + 0.3 * z) * detail  # neighbours correlate less and less along z
    sec = (sec - sec.min()) / (sec.max() - sec.min()) * 0.8 + 0.1
    original.append(sec[pad:pad + size, pad:pad + size])
    # distorted[z](p) = original(p - shift): the true field pulls it back with +shift
    images.append(ndimage.shift(sec, shifts[z], order=1)[pad:pad + size, pad:pad + size])
  images = np.stack(images).astype(np.float32)
  gt = np.broadcast_to(shifts[:, None, None, :], (4, size, size, 2)).astype(np.float32).copy()
  pull = -gt
  valid = np.zeros((4, size, size), bool)
  valid[:, 12:-12, 12:-12] = True
  case = rs.Case("synthetic", "distorted", images, np.zeros(images.shape, bool), (40.0, 16.0, 16.0), gt=gt,
                 pull=pull, valid=valid, disc_distance=np.full(images.shape, 1e6, np.float32))
  return case, np.stack(original)


def test_mip_levels_of_the_shared_stacks(rs):
  # paper scale (nearest 32 nm) and fine scale (nearest 16 nm)
  assert [rs.mip_level(xy, 32.0) for xy in (4.0, 4.6, 10.0, 50.0)] == [3, 3, 2, 0]
  assert [rs.mip_level(xy, 16.0) for xy in (4.0, 4.6, 10.0, 50.0)] == [2, 2, 1, 0]
  assert rs.mip_level(16.0, 32.0) == 1 and rs.mip_level(16.0, 16.0) == 0


def test_score_group_matches_numpy(rs):
  case, _ = _synthetic_case(rs)
  rng = np.random.default_rng(1)
  fields = {
    "raw": np.zeros_like(case.gt),
    "truth": case.gt.copy(),
    "offset": case.gt + np.array([1.5, -1.0], np.float32),
    "noisy": case.gt + rng.normal(0, 0.7, case.gt.shape).astype(np.float32),
  }
  got = rs.score_group(case, fields)
  want = np_reference(case.images, case.gt, case.valid, fields)
  for m in fields:
    g = got[m]
    assert g["cpc_paper_level"] == 1 and g["cpc_paper_chunk"] == 64
    assert g["cpc_fine_level"] == 0 and g["cpc_fine_chunk"] == 32
    for key in ("paper", "fine"):
      frac, low, n = want[m][key]
      assert g[f"low_cpc_{key}_chunks"] == [low, n], (m, key)
      assert g[f"low_cpc_{key}"] == pytest.approx(frac)
    assert g["epe"]["median"] == pytest.approx(want[m]["epe"][0], abs=1e-4)
    assert g["epe"]["p95"] == pytest.approx(want[m]["epe"][1], abs=1e-4)
  # every method is scored on the same chunks
  assert len({tuple(got[m]["low_cpc_fine_chunks"][1:]) for m in fields}) == 1
  # the case discriminates: the true fields align, the unaligned stack does not
  assert got["truth"]["low_cpc_fine"] < got["raw"]["low_cpc_fine"]
  assert got["truth"]["epe"]["median"] == pytest.approx(0.0, abs=1e-6)
  assert got["offset"]["epe"]["median"] == pytest.approx(np.hypot(1.5, 1.0), abs=1e-4)


def test_residual_deformation_and_fair_epe(rs):
  case, _ = _synthetic_case(rs)
  u = np.zeros_like(case.gt)
  u[1:] = np.array([0.5, 0.0], np.float32)  # what the method found in the raw stack: a uniform shift
  got = rs.score_group(case, {"raw": np.zeros_like(case.gt), "truth": case.gt.copy()},
                       raw_fields_by_method={"truth": u})
  # translations only: no area change anywhere, and the truth leaves no residual
  for m in ("raw", "truth"):
    for key in ("deformation", "residual_deformation"):
      assert got[m][key]["p1"] == pytest.approx(1.0, abs=1e-4)
      assert got[m][key]["p99"] == pytest.approx(1.0, abs=1e-4)
  # compose(gt, U) = U + gt for constant fields: the truth is 0.5 px from that reference
  assert got["truth"]["epe_fair"]["median"] == pytest.approx(0.5, abs=1e-4)
  assert "epe_fair" not in got["raw"]


def test_markdown_from_rows(rs):
  rows = [
    dict(stack="isbi2012_train", variant="raw", method="sofima", label="sofima", wall_s=10.0, subprocess_s=11.0,
         resolution_nm=[50, 4, 4], shape=[5, 256, 256], meta=dict(step=1), command="cmd", date="2026-01-01T00:00",
         metrics=dict(low_cpc_paper=None, low_cpc_fine=0.0625, cpc_paper_nm=32.0, cpc_paper_chunk=64,
                      cpc_fine_nm=16.0, cpc_fine_chunk=32, deformation=dict(p1=0.99, p99=1.01, worst_section=2,
                                                                            worst_p1=0.98, worst_p99=1.02))),
    dict(stack="isbi2012_train", variant="raw", method="jaxalign", label="jaxalign", wall_s=5.0,
         resolution_nm=[50, 4, 4], shape=[5, 256, 256], meta=dict(step=1), command="cmd", date="2026-01-01T00:00",
         metrics=dict(low_cpc_fine=0.125, deformation=dict(p1=0.95, p99=1.05, worst_section=1))),
  ]
  md = rs.build_markdown(rows)
  assert "| isbi2012_train | raw | jaxalign | 5.0 | 0.50 | – | 12.5 % |" in md
  assert "| isbi2012_train | raw | sofima | 10.0 (11.0) | 1.00 | – | 6.2 % |" in md
  assert "cmd" in md and "2-core" in md
