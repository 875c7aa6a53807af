"""warp / compose / invert / affine / MIP resampling / blur vs float64 NumPy-SciPy references."""

import numpy as np
import pytest
from scipy import ndimage

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

import jaxalign as ja
from tests.references import reference_warp, smooth_field


def smooth_image(rng, shape, sigma=4.0):
  img = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
  return (img - img.min()) / (img.max() - img.min()) + 0.5


def test_warp_matches_scipy_map_coordinates():
  rng = np.random.default_rng(0)
  img = rng.random((61, 75)) + 0.5
  field = rng.normal(scale=6.0, size=(61, 75, 2))  # samples well outside the image too
  out = np.asarray(ja.warp(jnp.float32(img), jnp.float32(field)))
  ref = reference_warp(img.astype(np.float32), field.astype(np.float32))
  assert np.max(np.abs(out - ref)) / np.ptp(img) < 1e-5


def test_warp_fill_value_outside():
  rng = np.random.default_rng(1)
  img = rng.random((32, 32)) + 1.0
  field = np.full((32, 32, 2), 100.0)
  out = np.asarray(ja.warp(jnp.float32(img), jnp.float32(field), fill=-3.0))
  np.testing.assert_array_equal(out, -3.0)
  ref = reference_warp(img, rng.normal(scale=4, size=(32, 32, 2)), cval=0.0)  # sanity: reference runs
  assert np.isfinite(ref).all()


@pytest.mark.parametrize("shift", [(3, -5), (-7, 2), (0, 0)])
def test_integer_translation_is_exact(shift):
  rng = np.random.default_rng(2)
  img = rng.random((40, 48)).astype(np.float32)
  field = np.broadcast_to(np.array(shift, np.float32), (40, 48, 2))
  out = np.asarray(ja.warp(img, field))
  dy, dx = shift
  expected = np.zeros_like(img)
  ys = slice(max(0, -dy), min(40, 40 - dy))
  xs = slice(max(0, -dx), min(48, 48 - dx))
  expected[ys, xs] = img[ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
  np.testing.assert_array_equal(out, expected)


def test_nearest_mode_exact():
  rng = np.random.default_rng(3)
  img = rng.random((33, 29)).astype(np.float32)
  field = rng.uniform(-4, 4, size=(33, 29, 2)).astype(np.float32)
  out = np.asarray(ja.warp(img, field, mode="nearest", fill=-1.0))
  yy, xx = np.mgrid[0:33, 0:29]
  yi = np.floor(yy + field[..., 0].astype(np.float64) + 0.5).astype(int)
  xi = np.floor(xx + field[..., 1].astype(np.float64) + 0.5).astype(int)
  inside = (yi >= 0) & (yi < 33) & (xi >= 0) & (xi < 29)
  expected = np.where(inside, img[np.clip(yi, 0, 32), np.clip(xi, 0, 28)], -1.0)
  np.testing.assert_array_equal(out, expected)


def test_warp_channels_last_and_batch():
  rng = np.random.default_rng(4)
  enc = rng.random((2, 20, 24, 3)).astype(np.float32)
  field = rng.normal(scale=2, size=(2, 20, 24, 2)).astype(np.float32)
  out = np.asarray(ja.warp(enc, field))
  for b in range(2):
    for c in range(3):
      ref = reference_warp(enc[b, ..., c], field[b])
      np.testing.assert_allclose(out[b, ..., c], ref, atol=1e-5)


def test_warp_differentiable_in_image_and_field():
  rng = np.random.default_rng(5)
  img = jnp.float32(smooth_image(rng, (16, 16)))
  field = jnp.float32(rng.normal(scale=0.7, size=(16, 16, 2)) + 0.3)
  check_grads(lambda i, f: ja.warp(i, f), (img, field), order=1, modes=["rev"],
                            eps=1e-2, atol=5e-2, rtol=5e-2)


def test_compose_semantics_against_sequential_warps():
  rng = np.random.default_rng(6)
  shape = (96, 96)
  img = smooth_image(rng, shape, sigma=12)
  a = smooth_field(rng, shape, 5.0, 16)
  b = smooth_field(rng, shape, 5.0, 16)
  c = np.asarray(ja.compose(jnp.float32(a), jnp.float32(b)))
  # c(r) = b(r) + a(r + b(r)) in float64 as an independent check of the formula...
  yy, xx = np.mgrid[0:96, 0:96].astype(np.float64)
  coords = [np.clip(yy + b[..., 0], 0, 95), np.clip(xx + b[..., 1], 0, 95)]
  c_ref = b + np.stack([ndimage.map_coordinates(a[..., k], coords, order=1) for k in range(2)], -1)
  np.testing.assert_allclose(c, c_ref, atol=1e-4)
  # ...and of its meaning: warp(warp(M, a), b) == warp(M, c) in the interior.
  # Cubic image interpolation so the check measures the composed field, not image resampling.
  twice = reference_warp(reference_warp(img, a, order=3), b, order=3)
  once = reference_warp(img, c, order=3)
  interior = (slice(12, -12), slice(12, -12))
  assert np.max(np.abs(twice - once)[interior]) < 1e-3 * np.ptp(img)


def test_compose_with_identity_is_noop():
  rng = np.random.default_rng(7)
  f = jnp.float32(smooth_field(rng, (40, 40), 4.0, 6))
  zero = ja.identity((40, 40))
  np.testing.assert_allclose(ja.compose(f, zero), f, atol=1e-6)
  np.testing.assert_allclose(ja.compose(zero, f), f, atol=1e-6)


@pytest.mark.parametrize("amplitude", [3.0, 10.0])
def test_invert_smooth_fields(amplitude):
  rng = np.random.default_rng(8)
  f = smooth_field(rng, (128, 128), amplitude, 20)
  g = ja.invert(jnp.float32(f))
  residual = np.asarray(ja.compose(jnp.float32(f), g))
  interior = residual[16:-16, 16:-16]
  assert np.max(np.linalg.norm(interior, axis=-1)) < 0.01


def test_from_affine_closed_form():
  m = np.array([[1.02, 0.05, -3.0], [-0.04, 0.97, 2.5]])
  f = np.asarray(ja.from_affine(jnp.float32(m), (30, 40)))
  yy, xx = np.mgrid[0:30, 0:40].astype(np.float64)
  ref = np.stack([m[0, 0] * yy + m[0, 1] * xx + m[0, 2] - yy, m[1, 0] * yy + m[1, 1] * xx + m[1, 2] - xx], -1)
  np.testing.assert_allclose(f, ref, atol=1e-4)
  # The image warped by the affine field equals the image sampled at the affine points.
  rng = np.random.default_rng(9)
  img = smooth_image(rng, (30, 40), 3)
  pts = [m[0, 0] * yy + m[0, 1] * xx + m[0, 2], m[1, 0] * yy + m[1, 1] * xx + m[1, 2]]
  ref_img = ndimage.map_coordinates(img, pts, order=1, mode="grid-constant")
  np.testing.assert_allclose(ja.warp(jnp.float32(img), f), ref_img, atol=1e-4)


def test_field_levels_translation_8px_is_4px_and_back():
  f0 = np.broadcast_to(np.array([8.0, -8.0], np.float32), (64, 64, 2))
  f1 = np.asarray(ja.downsample_field(f0))
  assert f1.shape == (32, 32, 2)
  np.testing.assert_allclose(f1, np.broadcast_to([4.0, -4.0], (32, 32, 2)), atol=1e-6)
  np.testing.assert_allclose(ja.upsample_field(f1), f0, atol=1e-6)


def test_downsample_field_and_upsample_vs_numpy():
  rng = np.random.default_rng(10)
  f = rng.normal(size=(2, 12, 16, 2))
  ref = 0.5 * f.reshape(2, 6, 2, 8, 2, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(ja.downsample_field(jnp.float32(f)), ref, atol=1e-6)
  # Upsampling a linear ramp reproduces the ramp at the fine pixel centres (half-pixel convention).
  coarse = np.broadcast_to(np.arange(8, dtype=np.float64)[None, :, None], (8, 8, 2))
  fine = np.asarray(ja.upsample_field(jnp.float32(coarse)))
  x_fine = np.clip((np.arange(16) - 0.5) / 2, 0, 7)
  np.testing.assert_allclose(fine[4, :, 1], 2 * x_fine, atol=1e-5)


@pytest.mark.parametrize("reduce,fn", [("mean", np.mean), ("max", np.max), ("min", np.min)])
def test_pyramid_vs_numpy(reduce, fn):
  rng = np.random.default_rng(11)
  img = rng.random((32, 48))
  levels = ja.pyramid(jnp.float32(img), 3, reduce=reduce)
  ref = img
  assert len(levels) == 3
  for lv in levels[1:]:
    ref = fn(ref.reshape(ref.shape[0] // 2, 2, ref.shape[1] // 2, 2), axis=(1, 3))
    np.testing.assert_allclose(lv, ref, atol=1e-6)


def test_odd_size_downsample_is_a_clear_error():
  with pytest.raises(ja.InputError, match="even"):
    ja.downsample_image(jnp.zeros((7, 8)))


def test_gaussian_blur_vs_scipy():
  rng = np.random.default_rng(12)
  img = rng.random((50, 60))
  out = np.asarray(ja.gaussian_blur(jnp.float32(img), 2.0))
  ref = ndimage.gaussian_filter(img, 2.0, mode="mirror", truncate=3.0)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  f = rng.random((50, 60, 2))
  ref_f = np.stack([ndimage.gaussian_filter(f[..., k], 2.0, mode="mirror", truncate=3.0) for k in range(2)], -1)
  np.testing.assert_allclose(ja.blur_field(jnp.float32(f), 2.0), ref_f, atol=1e-5)


@pytest.mark.parametrize("size", [3, 7, 31, 45])
def test_median_filter_field_vs_scipy(size):
  # Reference: SciPy's running median along x, then along y, edge-replicated ("nearest"), in float64.
  rng = np.random.default_rng(size)
  f = rng.normal(size=(2, 41, 57, 2))
  out = np.asarray(ja.median_filter_field(jnp.float32(f), size))
  ref = ndimage.median_filter(ndimage.median_filter(f, size=(1, 1, size, 1), mode="nearest"),
                              size=(1, size, 1, 1), mode="nearest")
  np.testing.assert_allclose(out, ref, atol=1e-6)
  assert np.asarray(ja.median_filter_field(jnp.float32(f), 1)).tolist() == np.float32(f).tolist()


def test_strided_median_filter_vs_scipy_footprint():
  # stride 2: the median of every other pixel of a 45-px window (23 taps), as a SciPy footprint.
  rng = np.random.default_rng(3)
  f = rng.normal(size=(50, 70, 2))
  foot = (np.arange(45) % 2 == 0)
  out = np.asarray(ja.median_filter_field(jnp.float32(f), 45, stride=2))
  ref = ndimage.median_filter(f, footprint=foot[None, :, None], mode="nearest")
  ref = ndimage.median_filter(ref, footprint=foot[:, None, None], mode="nearest")
  np.testing.assert_allclose(out, ref, atol=1e-6)
  with pytest.raises(ja.InputError, match="stride"):
    ja.median_filter_field(jnp.float32(f), 31, stride=2)


def test_median_filter_keeps_trends_and_tears_drops_compact_excursions():
  yy, xx = np.mgrid[0:96, 0:96].astype(np.float64)
  affine = np.stack([0.05 * xx - 0.03 * yy + 2.0, 0.02 * yy + 1.0], -1)
  tear = np.where((xx > 50)[..., None], 6.0, 0.0) * np.array([1.0, -0.5])
  inner = (slice(15, -15), slice(15, -15))  # away from the edge-replicated border
  out = np.asarray(ja.median_filter_field(jnp.float32(affine + tear), 31))
  np.testing.assert_allclose(out[inner], (affine + tear)[inner], atol=1e-4)
  # A 4 px excursion narrower than half the window (13 < 31 / 2 px) goes; what is left (<= 10 %) is the
  # order statistic's shift along the ramp: slope 0.05 px/px times about half the excursion's width.
  disc = (yy - 30) ** 2 + (xx - 25) ** 2 < 7 ** 2
  bump = 4.0 * disc[..., None] * np.array([0.6, 0.8])
  out = np.asarray(ja.median_filter_field(jnp.float32(affine + tear + bump), 31))
  err = np.linalg.norm(out - affine - tear, axis=-1)[inner]
  assert err.max() <= 0.4, err.max()
  assert np.linalg.norm(bump, axis=-1).max() == pytest.approx(4.0)


def test_median_filter_rejects_even_size():
  with pytest.raises(ja.InputError, match="odd"):
    ja.median_filter_field(jnp.zeros((8, 8, 2)), 4)


def test_kernels_compile_once_per_shape():
  rng = np.random.default_rng(13)
  img = jnp.float32(rng.random((24, 24)))
  f = jnp.float32(rng.normal(size=(24, 24, 2)))
  calls = [
    (ja.warp, (img, f)), (ja.compose, (f, f)), (ja.invert, (f * 0.1,)), (ja.upsample_field, (f,)),
    (ja.downsample_field, (f,)), (ja.elastic_loss, (f,)), (ja.elastic_energy, (f,)),
    (ja.vector_vote, (jnp.stack([f, f, f]),)), (ja.decay_field, (f, 3.0)),
    (ja.cpc, (img, img)), (ja.normalize, (img,)), (ja.gaussian_blur, (img, 1.5)),
    (ja.median_filter_field, (f, 5)),
  ]
  for fn, args in calls:
    fn(*args)
    before = fn._cache_size()
    fn(*[a + 1e-3 if isinstance(a, jax.Array) else a for a in args])  # new values, same shapes
    assert fn._cache_size() == before, f"{fn.__name__} recompiled for the same shape"
