"""`jaxalign eval` with fields: tissue deformation (issue 18) and the paper's CPC scale (issue 20).

The CLI runs as a user runs it (`python -m jaxalign eval`), the three runs concurrently (they are
mostly interpreter start-up). Expected numbers are float64 NumPy references written here.
"""

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from jaxalign.bench import evaluation as ev
from jaxalign.volume import store
from jaxalign.ops import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
Z, N = 3, 96
COARSE = (40.0, 128.0, 128.0)  # pixels coarser than 100 nm: no smoothing, so p1/p99 are exact
FINE = (40.0, 4.0, 4.0)


def _grid(n):
  return np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")


def _fields(n):
  """Section 0 identity; 1 a sinusoid; 2 a rotation plus a stronger sinusoid. float64 `[Z, n, n, 2]`."""
  yy, xx = _grid(n)
  wave = np.stack([2.0 * np.sin(2 * np.pi * xx / 37.0) * np.cos(2 * np.pi * yy / 45.0),
                   1.5 * np.cos(2 * np.pi * (xx + yy) / 53.0)], -1)
  c, s = np.cos(0.2), np.sin(0.2)
  cy = (n - 1) / 2
  rot = np.stack([(c - 1) * (yy - cy) - s * (xx - cy), s * (yy - cy) + (c - 1) * (xx - cy)], -1)
  return np.stack([np.zeros_like(wave), wave, 1.6 * wave + rot + 3.0])


def _det_ref(u):
  dyy, dyx = np.gradient(u[..., 0])
  dxy, dxx = np.gradient(u[..., 1])
  return (1 + dyy) * (1 + dxx) - dyx * dxy


def _non_affine_ref(u, keep):
  """u minus its float64 least-squares affine fit over `keep`."""
  yy, xx = _grid(u.shape[0])
  a = np.stack([yy.ravel(), xx.ravel(), np.ones(yy.size)], 1)
  k = keep.ravel()
  coef, *_ = np.linalg.lstsq(a[k], u.reshape(-1, 2)[k], rcond=None)
  return u - (a @ coef).reshape(u.shape)


def _run(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "jaxalign", "eval", "--noprogress", *map(str, args)],
                        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  images = rng.uniform(0.1, 1.0, (Z, N, N)).astype(np.float32)
  images[2, :, :12] = 0  # resin: not tissue, not scored
  fields = _fields(N)
  vol = store.create_volume(str(d / "coarse"), (Z, N, N), "float32", COARSE)
  vol.write(images)
  store.create_volume(str(d / "coarse_fields"), (Z, N, N, 2), "float32", COARSE, kind="field").write(
      fields.astype(np.float32))
  # fields at MIP level 1 of a 4 nm/px volume: 8 nm/px, so 100 nm is 12.5 px
  vol = store.create_volume(str(d / "fine"), (Z, 2 * N, 2 * N), "float32", FINE)
  vol.write(np.repeat(np.repeat(images, 2, axis=1), 2, axis=2))
  store.create_volume(str(d / "fine_fields"), (Z, N, N, 2), "float32", store.level_resolution(FINE, 1),
                   kind="field").write(fields.astype(np.float32))
  nan = fields.astype(np.float32)
  nan[1, 5, 5, 0] = np.nan
  store.create_volume(str(d / "nan_fields"), (Z, N, N, 2), "float32", COARSE, kind="field").array(0).write(nan).result()
  store.create_volume(str(d / "odd_fields"), (Z, 40, 40, 2), "float32", COARSE, kind="field")
  cases = {
    "coarse": (d / "coarse", f"--fields={d / 'coarse_fields'}", f"--output={d / 'out_coarse'}"),
    "fine": (d / "fine", f"--fields={d / 'fine_fields'}", f"--output={d / 'out_fine'}"),
    "bad_fields": (d / "coarse", f"--fields={d / 'nowhere'}", f"--output={d / 'out_bad'}"),
    "nan_fields": (d / "coarse", f"--fields={d / 'nan_fields'}", f"--output={d / 'out_nan'}"),
    "odd_fields": (d / "coarse", f"--fields={d / 'odd_fields'}", f"--output={d / 'out_odd'}"),
    "image_as_fields": (d / "coarse", f"--fields={d / 'coarse'}", f"--output={d / 'out_img'}"),
  }
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    futures = {k: pool.submit(_run, *a, cwd=d) for k, a in cases.items()}
    res = {k: f.result() for k, f in futures.items()}
  return d, images, fields, res


def test_eval_reports_deformation_against_reference(runs):
  d, images, fields, res = runs
  r = res["coarse"]
  assert r.returncode == 0, r.stderr[-3000:]
  assert "tissue deformation" in r.stdout and "| fields |" in r.stdout
  # 128 nm/px: the paper's 32 nm is level 0 here, with the paper's 64-px chunks
  assert "CPC at level 0 (128 nm/px), 64-px chunks" in r.stdout
  out = d / "out_coarse"
  for png in ("cpc_maps.png", "deformation.png", "deformation_map.png"):
    assert (out / png).stat().st_size > 1000
  s = json.loads((out / "eval.json").read_text())
  dd = s["deformation"]
  assert dd["sigma_px"] == 0 and dd["level"] == 0 and dd["resolution_nm"] == list(COARSE)
  assert dd["smooth_nm"] == 100 and dd["band"] == [0.9, 1.1]
  keep = images != 0
  refs = []
  for z in range(Z):
    ref = _det_ref(_non_affine_ref(fields[z], keep[z]))[keep[z]]
    refs.append(ref)
    p1, p99 = np.percentile(ref, [1, 99])
    assert dd["fields"]["per_section_p1"][z] == pytest.approx(p1, abs=1e-4)
    assert dd["fields"]["per_section_p99"][z] == pytest.approx(p99, abs=1e-4)
  p1, p99 = np.percentile(np.concatenate(refs), [1, 99])
  assert dd["fields"]["p1"] == pytest.approx(p1, abs=1e-4) and dd["fields"]["p99"] == pytest.approx(p99, abs=1e-4)
  assert dd["fields"]["worst_section"] == 2
  assert f"{p1:.4f}" in r.stdout and f"{p99:.4f}" in r.stdout


def test_eval_fields_at_a_coarser_level(runs):
  d, _, _, res = runs
  r = res["fine"]
  assert r.returncode == 0, r.stderr[-3000:]
  dd = json.loads((d / "out_fine" / "eval.json").read_text())["deformation"]
  # the fields match the volume's MIP level 1 (8 nm/px): 100 nm = 12.5 px
  assert dd["level"] == 1 and dd["resolution_nm"] == [40.0, 8.0, 8.0]
  assert dd["sigma_px"] == pytest.approx(12.5)
  assert "sigma 12.5 px at level 1, 8 nm/px" in r.stdout
  # 4 nm/px: the paper's 32 nm is level 3, where 192 px sections are 24 px: too small for 64-px chunks
  assert "CPC at level 3 (32 nm/px), 16-px chunks (sections of 192x192 px are too small" in r.stdout


@pytest.mark.parametrize("name, out, words", [
    ("bad_fields", "out_bad", ["--fields", "missing", "nowhere"]),
    ("nan_fields", "out_nan", ["--fields", "nan"]),
    ("odd_fields", "out_odd", ["--fields", "40x40", "level"]),
    ("image_as_fields", "out_img", ["--fields", "field volume"]),
])
def test_eval_bad_fields_exits_2(runs, name, out, words):
  d, _, _, res = runs
  r = res[name]
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert len(lines) == 1 and lines[0].startswith("jaxalign eval: error: "), r.stderr
  for w in words:
    assert w.lower() in lines[0].lower(), (w, lines[0])
  assert not (d / out).exists()


@pytest.mark.parametrize("res, shape, given, expected", [
    ((40.0, 4.0, 4.0), (3, 4096, 4096), (None, None), (3, 64)),    # 4 nm: level 3 = 32 nm
    ((50.0, 6.0, 6.0), (3, 2048, 2048), (None, None), (2, 64)),    # 6 nm: 24 nm is nearer 32 than 48
    ((10.0, 10.0, 10.0), (3, 1024, 1024), (None, None), (2, 64)),  # 10 nm: 40 nm
    ((50.0, 50.0, 50.0), (3, 1024, 1024), (None, None), (0, 64)),  # 50 nm: already coarser than 32 nm
    ((40.0, 4.0, 4.0), (3, 128, 128), (None, None), (3, 16)),      # small: chunks shrink to 16 px
    ((40.0, 4.0, 4.0), (3, 64, 64), (None, None), (2, 16)),        # smaller: then a finer level
    ((40.0, 4.0, 4.0), (3, 64, 64), (1, 32), (1, 32)),             # given values are kept
    ((40.0, 4.0, 4.0), (3, 4096, 4096), (1, None), (1, 64)),
])
def test_cpc_scale(res, shape, given, expected):
  level, chunk, note = ev.cpc_scale(shape, res, *given)
  assert (level, chunk) == expected
  assert (note == "") == (expected[1] == 64 or given != (None, None))


def test_residual_deformation_with_ground_truth():
  # fields equal to the truth: the residual maps nothing anywhere (area change 1 up to the bilinear
  # interpolation of the inverse); the truth's own deformation is the truth's
  class Case:
    pass
  n = 96
  case = Case()
  gt = (0.8 * _fields(n)).astype(np.float32)
  case.gt = gt
  case.valid = np.ones((Z, n, n), bool)
  case.disc_distance = np.full((Z, n, n), 1e3, np.float32)
  rows = np.arange(n)[:, None]
  case.disc_distance[1] = np.maximum(0, np.maximum(40 - rows, rows - 43))  # a crack along rows 40-43
  ran = np.array([False, True, True])
  case.src = np.ones((Z, n, n), np.float32)
  out = ev.deformation_scores(gt, np.ones((Z, n, n), bool), resolution_nm=COARSE, case=case)
  assert list(out) == ["fields", "residual vs truth", "truth"]
  r = out["residual vs truth"]
  # section 0 is not scored (the anchor), nor are the pixels within 20 px of the crack
  assert np.all(np.isnan(r.det[0])) and np.all(np.isnan(r.det[1][20:64])) and np.isfinite(r.det[1][:20]).any()
  # nor where the truth samples outside the image (the fields' inverse is unknown there)
  yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  inside = (yy + gt[..., 0] >= 0) & (yy + gt[..., 0] <= n - 1) & (xx + gt[..., 1] >= 0) & (xx + gt[..., 1] <= n - 1)
  assert not inside.all()
  inside = ndimage.binary_erosion(inside, np.ones((1, 5, 5)), border_value=0)  # 2 px in, also from the border
  scored = case.valid & (case.disc_distance > 20) & inside & ran[:, None, None]
  np.testing.assert_array_equal(np.isfinite(r.det), scored)
  # what remains is the bilinear interpolation of the inverse: well inside the +-10 % band
  assert 0.98 < r.low_all <= r.high_all < 1.02
  t = metrics.deformation(gt, sigma_px=0, tissue=scored)
  np.testing.assert_allclose(out["truth"].high, t.high)
  assert out["truth"].high_all > 1.1  # the truth itself deforms the tissue beyond the band
