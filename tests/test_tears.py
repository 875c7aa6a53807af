"""Tears: nearest-tissue maps vs SciPy's exact distance transform; spring cuts on analytic cracks."""

import numpy as np
import jax.numpy as jnp
import pytest
from scipy import ndimage

from jaxalign import tears
from jaxalign.losses import SPRING_OFFSETS


def _band(h, w, y0, width):
  m = np.zeros((h, w), bool)
  m[y0:y0 + width] = True
  return m


def test_nearest_tissue_matches_scipy_edt():
  yy, xx = np.mgrid[:90, :120]
  m = np.abs(yy - 0.4 * xx - 20 + 4 * np.sin(xx / 9.0)) < 5
  m |= (yy - 70) ** 2 + (xx - 30) ** 2 < 15 ** 2
  nt = np.asarray(tears.nearest_tissue(m))
  dist = np.hypot(nt[..., 0] - yy, nt[..., 1] - xx)
  np.testing.assert_allclose(dist, ndimage.distance_transform_edt(m), atol=0.1)
  iy, ix = nt[..., 0].astype(int), nt[..., 1].astype(int)
  assert not m[iy, ix].any()  # every answer is a tissue pixel
  np.testing.assert_array_equal(nt[~m], np.stack([yy, xx], -1)[~m])


def _cut_springs(weights):
  """Set of (y, x, k) with weight 0 whose neighbour lies inside the image."""
  h, w = weights.shape[:2]
  out = set()
  for y, x, k in zip(*np.nonzero(np.asarray(weights) == 0)):
    dy, dx = SPRING_OFFSETS[k]
    if 0 <= y + dy < h and 0 <= x + dx < w:
      out.add((int(y), int(x), int(k)))
  return out


def test_identity_field_cuts_only_at_the_medial_axis():
  # A horizontal crack of rows 10..17 (8 px); identity field: target pixels inside the gap stay tied
  # to their side, and only the springs between rows 13 and 14 (the medial axis) are cut.
  h, w = 32, 24
  gap = _band(h, w, 10, 8)
  weights = tears.tear_springs(jnp.zeros((h, w, 2)), tears.nearest_tissue(gap))
  cut = _cut_springs(weights)
  assert cut, "no spring cut across an 8 px crack"
  for y, x, k in cut:
    dy = SPRING_OFFSETS[k][0]
    assert dy == 1 and y == 13, (y, x, k)
  assert len(cut) == w + 2 * (w - 1)  # vertical + both diagonals across row 13|14


def test_torn_field_cuts_the_stretched_springs_only():
  # The field that closes a 6 px crack: rows < 12 sample y - 0, rows >= 12 sample y + 6.
  h, w = 32, 20
  gap = _band(h, w, 12, 6)
  field = np.zeros((h, w, 2), np.float32)
  field[12:, :, 0] = 6.0
  weights = tears.tear_springs(jnp.asarray(field), tears.nearest_tissue(gap))
  for y, x, k in _cut_springs(weights):
    assert y == 11 and SPRING_OFFSETS[k][0] == 1, (y, x, k)
  assert len(_cut_springs(weights)) == w + 2 * (w - 1)


def test_coarse_level_cuts_a_subpixel_crack():
  # 4 px crack at full resolution, seen at level 3 (8 px per pixel): still cut.
  h, w = 64, 64
  gap = _band(h, w, 30, 4)
  weights = tears.tear_springs(jnp.zeros((h // 8, w // 8, 2)), tears.nearest_tissue(gap), scale=8)
  cut = _cut_springs(weights)
  rows = {y for y, _, _ in cut}
  assert rows == {3}, rows  # level-3 rows 3|4 hold full-res rows 24..31 | 32..39: the crack's axis at 31.5


def test_no_defects_no_cuts():
  weights = tears.tear_springs(jnp.asarray(np.random.default_rng(0).normal(size=(16, 16, 2)), jnp.float32),
                               tears.nearest_tissue(np.zeros((16, 16), bool)))
  assert float(jnp.min(weights)) == 1.0


def test_spring_pairs_equals_pixel_mask_in_elastic_loss():
  from jaxalign.losses import elastic_loss
  rng = np.random.default_rng(1)
  f = jnp.asarray(rng.normal(scale=0.5, size=(12, 10, 2)), jnp.float32)
  mask = rng.random((12, 10)) > 0.3
  np.testing.assert_allclose(float(elastic_loss(f, None, tears.spring_pairs(mask))) * 120 / mask.sum(),
                             float(elastic_loss(f, mask)), rtol=1e-5)


def test_coarse_level_cuts_even_when_its_own_mask_lost_the_crack():
  # A 3 px crack is below half a pixel at level 3 (8 px per pixel): the level's own (thresholded)
  # defect mask is empty, but the springs must still be cut from the full-resolution mask.
  from jaxalign.finetuner import FinetuneConfig, _spring_weights
  h = w = 64
  gap = _band(h, w, 30, 3)
  coarse_mask = jnp.zeros((h // 8, w // 8))
  weights = _spring_weights(jnp.zeros((h // 8, w // 8, 2)), tears.nearest_tissue(gap), jnp.asarray(gap.any()),
                            coarse_mask, 8, FinetuneConfig())
  assert _cut_springs(weights), "the sub-pixel crack was bridged"
