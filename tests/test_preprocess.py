"""Preprocessing: masking and normalisation over non-zero pixels only, per section and vmapped."""

import jax
import numpy as np

from jaxalign import preprocess

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
