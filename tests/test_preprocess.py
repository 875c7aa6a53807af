"""Preprocessing: masking and normalisation over non-zero pixels only, per section and vmapped."""

import jax
import numpy as np

from jaxalign.ops import preprocess

from tests.conftest import load_sections


def _np_normalize(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """float64 reference over the valid pixels; everything else 0."""
  x = x.astype(np.float64)
  v = x[valid]
  out = np.zeros_like(x)
  out[valid] = (v - v.mean()) / np.sqrt(v.var() + preprocess.NORMALIZE_EPS)
  return out


def _sections_with_resin():
  x = load_sections("isbi2012_train", [3, 4], crop=128).astype(np.float32)
  x[0, :, :40] = 0.0  # a strip with no data
  x[1, 90:, 70:] = 0.0
  return x


def test_normalize_ignores_zeros_and_keeps_them_zero():
  x = _sections_with_resin()
  got = np.asarray(preprocess.normalize(x[0]))
  np.testing.assert_allclose(got, _np_normalize(x[0], x[0] != 0), atol=1e-5)
  assert np.all(got[:, :40] == 0)
  nz = got[x[0] != 0]
  assert abs(nz.mean()) < 1e-5 and abs(nz.std() - 1) < 1e-4
  # tissue mask: pixels outside it are excluded from the statistics and zeroed
  tissue = np.ones(x[0].shape, bool)
  tissue[:30] = False
  got = np.asarray(preprocess.normalize(x[0], tissue))
  np.testing.assert_allclose(got, _np_normalize(x[0], (x[0] != 0) & tissue), atol=1e-5)


def test_masking_then_normalising_a_stack_vmapped():
  x = _sections_with_resin()
  rng = np.random.default_rng(0)
  defects = rng.uniform(size=x.shape) > 0.9
  tissue = np.ones(x.shape, bool)
  tissue[1, :20] = False
  masked = np.asarray(preprocess.apply_mask(x, defects))
  np.testing.assert_array_equal(masked, np.where(defects, 0, x))
  got = np.asarray(preprocess.preprocess_stack(x, defects, tissue))
  for z in range(2):
    valid = (x[z] != 0) & ~defects[z] & tissue[z]
    np.testing.assert_allclose(got[z], _np_normalize(x[z], valid), atol=1e-5)
  # per section: the stack result equals the section-by-section one, and normalize vmaps
  np.testing.assert_allclose(got[1], preprocess.preprocess_section(x[1], defects[1], tissue[1]), atol=1e-6)
  stacked = np.asarray(jax.vmap(preprocess.normalize)(x))
  for z in range(2):
    np.testing.assert_allclose(stacked[z], _np_normalize(x[z], x[z] != 0), atol=1e-5)


def _stripes(shape, period, angle_deg, amplitude):
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  a = np.deg2rad(angle_deg)
  return 1.0 + amplitude * np.sin(2 * np.pi * (np.cos(a) * yy + np.sin(a) * xx) / period)


def test_destripe_removes_knife_chatter_and_leaves_clean_sections_alone():
  # Reference: the clean section itself. Knife chatter multiplies it by (1 + a sin); destriping must
  # bring it at least 2x closer (RMS) for periods 6-16 px, axis-aligned and oblique, a = 0.3 and 1.
  for name in ("isbi2012_train", "flyem_medulla_fibsem"):
    clean = load_sections(name, [1], crop=256)[0]
    assert np.abs(np.asarray(preprocess.destripe(clean)) - clean).max() < 1e-5
    for period, angle, amplitude in ((6.0, 0.0, 1.0), (10.0, 37.0, 0.3), (16.0, 90.0, 1.0)):
      striped = np.clip(clean * _stripes(clean.shape, period, angle, amplitude), 1e-3, None).astype(np.float32)
      out = np.asarray(preprocess.destripe(striped))
      before = np.sqrt(np.mean((striped - clean) ** 2))
      after = np.sqrt(np.mean((out - clean) ** 2))
      assert after <= before / 2, (name, period, angle, amplitude, before, after)


def test_destripe_keeps_no_data_and_blank_sections():
  img = load_sections("isbi2012_train", [2], crop=128)[0]
  img[:, :30] = 0
  striped = (img * _stripes(img.shape, 8.0, 20.0, 0.5)).astype(np.float32)
  out = np.asarray(preprocess.destripe(striped))
  assert np.all(out[:, :30] == 0) and np.all(out[:, 30:] != 0)
  assert np.all(np.asarray(preprocess.destripe(np.zeros((64, 64), np.float32))) == 0)


def test_dilate_erode_match_scipy():
  from scipy import ndimage as ndi
  rng = np.random.default_rng(3)
  mask = rng.random((2, 23, 31)) > 0.85
  for radius in (2, 8):  # 8: windows wider than a third of the image (borders on both sides)
    square = np.ones((1, 2 * radius + 1, 2 * radius + 1), bool)
    np.testing.assert_array_equal(np.asarray(preprocess.dilate(mask, radius)), ndi.binary_dilation(mask, square))
    np.testing.assert_array_equal(np.asarray(preprocess.erode(~mask, radius)),
                                  ndi.binary_erosion(~mask, square, border_value=1))
  np.testing.assert_array_equal(np.asarray(preprocess.dilate(mask, 0)), mask)
