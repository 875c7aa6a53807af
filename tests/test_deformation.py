"""Tissue deformation metric (jaxalign.ops.metrics: affine_fit, area_change, deformation), issue 18.

Every expectation is an independent reference: closed forms (rigid motion and shear keep area, a
uniform scale s multiplies it by s²) or float64 NumPy (least-squares affine fit with np.linalg.lstsq,
central differences with np.gradient, percentiles with np.percentile, Gaussian smoothing with SciPy).
"""

import numpy as np
import pytest
from scipy import ndimage

import jaxalign as ja
from jaxalign.ops import metrics
from jaxalign.errors import InputError

H, W = 80, 96


def _grid(h=H, w=W):
  return np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")


def _linear_field(m, h=H, w=W):
  """Field `u(p) = M @ (y, x, 1)` (float64 `[H, W, 2]`) of a `[2, 3]` matrix."""
  yy, xx = _grid(h, w)
  return np.stack([m[0][0] * yy + m[0][1] * xx + m[0][2], m[1][0] * yy + m[1][1] * xx + m[1][2]], -1)


def _rigid(theta, t, h=H, w=W):
  """Rotation by theta about the centre plus translation t: u(p) = R (p - c) + c + t - p."""
  c, s = np.cos(theta), np.sin(theta)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  r = np.array([[c, -s], [s, c]])
  lin = r - np.eye(2)
  off = np.array([cy, cx]) - r @ np.array([cy, cx]) + np.asarray(t)
  return _linear_field(np.c_[lin, off], h, w)


def _sinusoid(h=H, w=W):
  """A smooth non-affine field (amplitudes ~3 px, wavelengths 40-60 px: area changes ~ +-30 %)."""
  yy, xx = _grid(h, w)
  uy = 3.0 * np.sin(2 * np.pi * xx / 53.0) * np.cos(2 * np.pi * yy / 41.0) + 0.5 * np.sin(2 * np.pi * yy / 37.0)
  ux = 2.5 * np.cos(2 * np.pi * (xx + yy) / 61.0) + 1.5 * np.sin(2 * np.pi * yy / 47.0)
  return np.stack([uy, ux], -1)


def _det_ref(u):
  """float64 det(I + grad u) by central differences (np.gradient: one-sided at the border)."""
  u = np.asarray(u, np.float64)
  dyy, dyx = np.gradient(u[..., 0])
  dxy, dxx = np.gradient(u[..., 1])
  return (1 + dyy) * (1 + dxx) - dyx * dxy


def _affine_ref(u, weight=None):
  """float64 weighted least-squares affine fit: `[2, 3]` with u ≈ M @ (y, x, 1)."""
  h, w = u.shape[:2]
  yy, xx = _grid(h, w)
  a = np.stack([yy.ravel(), xx.ravel(), np.ones(h * w)], 1)
  sw = np.ones(h * w) if weight is None else np.sqrt(np.asarray(weight, np.float64).ravel())
  coef, *_ = np.linalg.lstsq(a * sw[:, None], np.asarray(u, np.float64).reshape(-1, 2) * sw[:, None], rcond=None)
  return coef.T


def _non_affine_ref(u, weight=None):
  return np.asarray(u, np.float64) - _linear_field(_affine_ref(u, weight), *u.shape[:2])


def _area(u, **kw):
  return np.asarray(metrics.area_change(np.asarray(u, np.float32), **kw), np.float64)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("remove_affine", [False, True])
@pytest.mark.parametrize("sigma", [0.0, 3.0])
def test_rigid_motion_keeps_area(remove_affine, sigma):
  u = _rigid(0.35, (7.5, -12.25))
  np.testing.assert_allclose(_area(u, sigma=sigma, remove_affine=remove_affine), 1.0, atol=2e-5)


@pytest.mark.parametrize("sigma", [0.0, 3.0])
def test_uniform_scale_gives_s_squared_without_affine_removal(sigma):
  s = 1.08
  cy, cx = (H - 1) / 2, (W - 1) / 2
  u = _linear_field([[s - 1, 0, -(s - 1) * cy + 2.0], [0, s - 1, -(s - 1) * cx - 1.0]])
  # smoothing is odd-reflect padded: an affine field stays exact up to the border
  np.testing.assert_allclose(_area(u, sigma=sigma, remove_affine=False), s * s, atol=2e-5)
  np.testing.assert_allclose(_area(u, sigma=sigma, remove_affine=True), 1.0, atol=2e-5)


@pytest.mark.parametrize("remove_affine", [False, True])
def test_shear_keeps_area(remove_affine):
  u = _linear_field([[0.0, 0.2, 1.0], [0.0, 0.0, 0.0]])   # y' = y + 0.2 x
  np.testing.assert_allclose(_area(u, remove_affine=remove_affine), 1.0, atol=2e-5)
  u = _linear_field([[0.0, 0.0, 0.0], [-0.15, 0.0, 3.0]])  # x' = x - 0.15 y
  np.testing.assert_allclose(_area(u, remove_affine=remove_affine), 1.0, atol=2e-5)


# --------------------------------------------------------------------------- float64 references


def test_non_affine_field_matches_finite_difference_reference():
  u = _sinusoid()
  ref = _det_ref(u)
  assert ref.min() < 0.85 and ref.max() > 1.15  # the test field really deforms
  np.testing.assert_allclose(_area(u, remove_affine=False), ref, atol=1e-4)
  # with an affine (rotation + scale + shear + shift) on top, affine removal leaves the sinusoid's
  # own non-affine part: the reference removes the float64 least-squares fit of the whole field
  v = u + _rigid(-0.2, (4.0, 9.0)) + _linear_field([[0.05, 0.1, 2.0], [0.0, -0.03, 1.0]])
  np.testing.assert_allclose(_area(v, remove_affine=True), _det_ref(_non_affine_ref(v)), atol=1e-4)
  np.testing.assert_allclose(_area(v, remove_affine=True), _det_ref(_non_affine_ref(u)), atol=1e-4)


def test_smoothing_matches_scipy_gaussian_in_the_interior():
  u = _sinusoid() + np.random.default_rng(1).normal(0, 0.3, (H, W, 2))
  sigma = 2.0
  radius = int(np.ceil(3 * sigma))  # jaxalign.ops.fields.GAUSSIAN_TRUNCATE = 3
  smooth = np.stack([ndimage.gaussian_filter(u[..., c], sigma, truncate=radius / sigma) for c in range(2)], -1)
  ref = _det_ref(smooth)
  got = _area(u, sigma=sigma, remove_affine=False)
  inner = (slice(radius + 1, -radius - 1),) * 2  # where the padding does not reach
  np.testing.assert_allclose(got[inner], ref[inner], atol=1e-4)


def test_affine_fit_recovers_known_affine_with_weight_mask():
  m = np.array([[0.03, -0.12, 5.5], [0.09, -0.02, -3.25]])
  u = _linear_field(m)
  rng = np.random.default_rng(0)
  weight = rng.random((H, W)) < 0.4
  # garbage where the weight is zero must not matter
  garbage = np.where(weight[..., None], u, rng.normal(0, 50, (H, W, 2)))
  got = np.asarray(metrics.affine_fit(garbage.astype(np.float32), weight), np.float64)
  np.testing.assert_allclose(got, m, atol=1e-4)
  np.testing.assert_allclose(np.asarray(metrics.affine_fit(u.astype(np.float32))), m, atol=1e-4)
  # consistent with ja.from_affine (sample point (y', x') = A @ (y, x, 1), field = sample point - p)
  a = np.array([[0.98, 0.05, 3.0], [-0.04, 1.03, -2.0]])
  f = np.asarray(ja.from_affine(a.astype(np.float32), (H, W)))
  np.testing.assert_allclose(np.asarray(metrics.affine_fit(f)), a - np.c_[np.eye(2), np.zeros(2)], atol=1e-4)
  # a non-affine field with a weight: the float64 weighted least squares
  v = _sinusoid()
  np.testing.assert_allclose(np.asarray(metrics.affine_fit(v.astype(np.float32), weight)),
                             _affine_ref(v, weight), atol=1e-4)


# --------------------------------------------------------------------------- deformation()


def test_deformation_excludes_defect_margin_and_matches_percentiles():
  z = 3
  fields = np.stack([_sinusoid() * k for k in (0.0, 1.0, 0.6)])
  fields[2] += _rigid(0.1, (2.0, -3.0))
  defects = np.zeros((z, H, W), bool)
  defects[1, 30:33, 40:60] = True  # a fold strip
  tissue = np.ones((z, H, W), bool)
  tissue[2, :, :10] = False        # resin at the left edge
  margin = 6
  d = metrics.deformation(fields, sigma_px=0, tissue=tissue, defects=defects, margin_px=margin)
  assert d.det.shape == (z, H, W) and d.sigma_px == 0
  # the excluded pixels: the strip grown by `margin` px in the max norm (square dilation), and no tissue
  yy, xx = _grid()
  near = (yy >= 30 - margin) & (yy <= 32 + margin) & (xx >= 40 - margin) & (xx <= 59 + margin)
  keep = tissue.copy()
  keep[1] &= ~near
  np.testing.assert_array_equal(np.isnan(d.det), ~keep)
  refs = []
  for i in range(z):
    ref = _det_ref(_non_affine_ref(fields[i], keep[i]))  # affine fitted over the scored pixels only
    np.testing.assert_allclose(d.det[i][keep[i]], ref[keep[i]], atol=1e-4)
    p1, p99 = np.percentile(ref[keep[i]], [1, 99])
    assert d.low[i] == pytest.approx(p1, abs=1e-4) and d.high[i] == pytest.approx(p99, abs=1e-4)
    refs.append(ref[keep[i]])
  all_p1, all_p99 = np.percentile(np.concatenate(refs), [1, 99])
  assert d.low_all == pytest.approx(all_p1, abs=1e-4) and d.high_all == pytest.approx(all_p99, abs=1e-4)
  # identity section: exactly area-preserving; the deformed sections are outside the +-10 % band
  assert d.low[0] == pytest.approx(1.0, abs=1e-6) and d.high[0] == pytest.approx(1.0, abs=1e-6)
  assert d.low[1] < 0.9 and d.high[1] > 1.1
  assert d.worst == 1
  s = d.summary()
  assert s["worst_section"] == 1 and s["p1"] == pytest.approx(all_p1, abs=1e-4) and len(s["per_section_p99"]) == z


def test_deformation_section_without_tissue_is_nan():
  fields = np.stack([_sinusoid(), _sinusoid()])
  tissue = np.ones((2, H, W), bool)
  tissue[0] = False
  d = metrics.deformation(fields, sigma_px=1.0, tissue=tissue)
  assert np.isnan(d.low[0]) and np.isnan(d.high[0]) and np.all(np.isnan(d.det[0]))
  assert np.isfinite(d.low[1]) and d.worst == 1 and d.summary()["per_section_p1"][0] is None


def test_deformation_sigma_from_resolution():
  assert metrics.deformation_sigma_px((40.0, 4.0, 4.0)) == pytest.approx(25.0)  # 100 nm at 4 nm/px
  assert metrics.deformation_sigma_px(8.0) == pytest.approx(12.5)
  assert metrics.deformation_sigma_px((50.0, 10.0, 10.0), smooth_nm=200) == pytest.approx(20.0)
  assert metrics.deformation_sigma_px((50.0, 128.0, 128.0)) == 0.0  # pixels already coarser than 100 nm
  h = w = 64
  u = _sinusoid(h, w)[None].astype(np.float32)
  d = metrics.deformation(u, resolution_nm=(40.0, 4.0, 4.0))
  assert d.sigma_px == pytest.approx(25.0)
  # smoothing at 25 px flattens 40-60 px waves: far less area change than unsmoothed
  d0 = metrics.deformation(u, sigma_px=0)
  assert d.high_all - d.low_all < 0.5 * (d0.high_all - d0.low_all)
  # sigma_px overrides the physical scale
  assert metrics.deformation(u, resolution_nm=(40.0, 4.0, 4.0), sigma_px=0).sigma_px == 0


@pytest.mark.parametrize("kwargs, words", [
    (dict(fields="nan", sigma_px=1), ["fields", "nan"]),
    (dict(fields=np.zeros((2, 16, 16, 3), np.float32), sigma_px=1), ["fields", "shape"]),
    (dict(fields=np.zeros((16, 16), np.float32), sigma_px=1), ["fields", "shape"]),
    (dict(fields=np.zeros((2, 2, 8, 8, 2), np.float32), sigma_px=1), ["fields", "shape"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32)), ["resolution_nm", "sigma_px"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32), resolution_nm=(40.0, 0.0, 4.0)), ["resolution", "> 0"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32), resolution_nm=-4.0), ["resolution", "> 0"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32), resolution_nm=(40.0, 4.0)), ["resolution", "(z, y, x)"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32), sigma_px=-1), ["sigma_px", ">= 0"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32), sigma_px=1, tissue=np.ones((2, 8, 16), bool)), ["tissue"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32), sigma_px=1, defects=np.ones((16, 16), bool)), ["defects"]),
    (dict(fields=np.zeros((2, 16, 16, 2), np.float32), sigma_px=1, margin_px=-2), ["margin_px"]),
])
def test_deformation_bad_input_raises_input_error(kwargs, words):
  if isinstance(kwargs.get("fields"), str):
    f = np.zeros((2, 16, 16, 2), np.float32)
    f[1, 3, 4, 1] = np.nan
    kwargs = dict(kwargs, fields=f)
  with pytest.raises(InputError) as e:
    metrics.deformation(**kwargs)
  msg = str(e.value).lower()
  for w in words:
    assert w.lower() in msg, (w, msg)


def test_smoothing_ignores_the_field_outside_the_weight():
  # garbage outside the scored pixels (resin, defects) must not leak into the tissue's smoothed field
  u = _sinusoid()
  weight = np.ones((H, W), bool)
  weight[:, 60:] = False
  garbage = np.where(weight[..., None], u, np.random.default_rng(2).normal(0, 50, (H, W, 2)))
  clean = _area(u, sigma=3.0, remove_affine=False)
  got = _area(garbage, sigma=3.0, remove_affine=False, weight=weight)
  # far from the mask edge: untouched; within 2 sigma of it: only the extrapolation of the tissue's
  # field (a weighted local mean) differs from the true continuation
  np.testing.assert_allclose(got[:, :50], clean[:, :50], atol=1e-4)
  assert np.max(np.abs(got[:, :54] - clean[:, :54])) < 0.05
  assert np.max(np.abs(got[:, :60] - clean[:, :60])) < 0.25
  assert np.max(np.abs(_area(garbage, sigma=3.0, remove_affine=False)[:, :60] - clean[:, :60])) > 1.0


# --------------------------------------------------------------------------- residual vs truth


def _truth_and_residual(n=96):
  """Analytic truth G, a non-affine residual E, and F = G ∘ E⁻¹ (E⁻¹ by float64 fixed point), so that
  the fields F map the aligned image onto the truth by E: `(f, g, e)` float64 `[n, n, 2]`."""
  yy, xx = _grid(n, n)

  def g_an(y, x):  # rotation-like shear, sinusoids, shift
    return np.stack([3 * np.sin(2 * np.pi * x / 50) + 0.08 * (x - 48) + 1.0,
                     2.5 * np.cos(2 * np.pi * y / 45) - 0.08 * (y - 48) - 0.5], -1)

  def e_an(y, x):
    return np.stack([1.2 * np.sin(2 * np.pi * x / 31) * np.cos(2 * np.pi * y / 43),
                     1.0 * np.cos(2 * np.pi * (x + y) / 39)], -1)

  r = np.stack([yy, xx], -1)
  q = r.copy()
  for _ in range(100):  # q = E⁻¹(r): q + e(q) = r
    q = r - e_an(q[..., 0], q[..., 1])
  f = q + g_an(q[..., 0], q[..., 1]) - r
  return f, g_an(yy, xx), e_an(yy, xx)


def test_residual_field_maps_aligned_onto_truth():
  f, g, e = _truth_and_residual()
  got = np.asarray(metrics.residual_field(f.astype(np.float32), g.astype(np.float32)))
  inner = (slice(8, -8),) * 2
  # bilinear sampling of the fields' inverse: a few hundredths of a pixel
  np.testing.assert_allclose(got[inner], e[inner], atol=0.05)
  # neither the difference of the fields nor the other composition order is this field
  assert np.abs(f - g - e)[inner].max() > 1.0
  other = np.asarray(ja.compose(f.astype(np.float32), ja.invert(g.astype(np.float32))))
  assert np.abs(other - e)[inner].max() > 1.0
  np.testing.assert_allclose(np.asarray(metrics.residual_field(g.astype(np.float32), g.astype(np.float32)))[inner],
                             0.0, atol=0.02)


def test_residual_deformation_matches_reference():
  f, g, e = _truth_and_residual()
  d = metrics.residual_deformation(f[None].astype(np.float32), g[None].astype(np.float32), sigma_px=0)
  keep = np.isfinite(d.det[0])
  # scored: where the truth samples inside the image, 2 px in (and 2 px in from the border)
  yy, xx = _grid(96, 96)
  sy, sx = yy + g[..., 0], xx + g[..., 1]
  inside = ndimage.binary_erosion((sy >= 0) & (sy <= 95) & (sx >= 0) & (sx <= 95), np.ones((5, 5)), border_value=0)
  np.testing.assert_array_equal(keep, inside)
  ref = _det_ref(_non_affine_ref(e, keep))
  assert ref[keep].min() < 0.8 and ref[keep].max() > 1.2
  np.testing.assert_allclose(d.det[0][keep], ref[keep], atol=0.02)
  p1, p99 = np.percentile(ref[keep], [1, 99])
  assert d.low_all == pytest.approx(p1, abs=0.01) and d.high_all == pytest.approx(p99, abs=0.01)
  with pytest.raises(InputError, match="truth"):
    metrics.residual_deformation(f[None].astype(np.float32), g[None, :50].astype(np.float32), sigma_px=0)
