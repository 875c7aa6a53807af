"""Tears: nearest-tissue maps vs SciPy's exact distance transform; spring cuts on analytic cracks."""

import numpy as np
import jax.numpy as jnp
import pytest
from scipy import ndimage

from jaxalign.ops import tears
from jaxalign.ops.losses import SPRING_OFFSETS


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
  from jaxalign.ops.losses import elastic_loss
  rng = np.random.default_rng(1)
  f = jnp.asarray(rng.normal(scale=0.5, size=(12, 10, 2)), jnp.float32)
  mask = rng.random((12, 10)) > 0.3
  np.testing.assert_allclose(float(elastic_loss(f, None, tears.spring_pairs(mask))) * 120 / mask.sum(),
                             float(elastic_loss(f, mask)), rtol=1e-5)


def test_coarse_level_cuts_even_when_its_own_mask_lost_the_crack():
  # A 3 px crack is below half a pixel at level 3 (8 px per pixel): the level's own (thresholded)
  # defect mask is empty, but the springs must still be cut from the full-resolution mask.
  from jaxalign.align.finetuner import FinetuneConfig, _spring_weights
  h = w = 64
  gap = _band(h, w, 30, 3)
  coarse_mask = jnp.zeros((h // 8, w // 8))
  weights = _spring_weights(jnp.zeros((h // 8, w // 8, 2)), tears.nearest_tissue(gap), jnp.asarray(gap.any()),
                            coarse_mask, 8, FinetuneConfig())
  assert _cut_springs(weights), "the sub-pixel crack was bridged"


def _refine_reference(field, src, tgt, src_valid, tgt_valid, zone, iterations, radius):
  """float64 NumPy/SciPy propagation: every sweep compares each zone pixel's displacement with its 8
  neighbours' by the window cost (bilinear samples, `GAP_COST` without data) and takes the cheapest."""
  h, w = zone.shape
  yy, xx = np.mgrid[:h, :w].astype(np.float64)

  def cost(f):
    at = [yy + f[..., 0], xx + f[..., 1]]
    s = ndimage.map_coordinates(src, at, order=1, mode="grid-constant", cval=0.0)
    v = ndimage.map_coordinates(src_valid, at, order=1, mode="grid-constant", cval=0.0)
    diff = np.where(v > 0.999, (s - tgt) ** 2, tears.GAP_COST)
    return ndimage.uniform_filter(diff * tgt_valid, 2 * radius + 1, mode="constant", cval=0.0)

  f = field.astype(np.float64)
  for _ in range(iterations):
    best_f, best_c = f.copy(), cost(f)
    for dy, dx in tears._PROPAGATION:
      cand = np.zeros_like(f)
      inside = np.zeros((h, w), bool)
      ys, xs = slice(max(-dy, 0), h - max(dy, 0)), slice(max(-dx, 0), w - max(dx, 0))
      cand[ys, xs] = f[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
      inside[ys, xs] = True
      c = cost(cand)
      take = zone & inside & (c < best_c)
      best_f[take], best_c[take] = cand[take], c[take]
    f = best_f
  return f


@pytest.mark.parametrize("sparse", [True, False])
def test_refine_tears_matches_float64_propagation(sparse, monkeypatch):
  """A torn pair: the source is the target split along a crack, the lower part shifted by 3 px. The
  initial field puts a band of pixels on the wrong side; the refinement (sparse zone sweep, or the
  dense sweep when the zone is too large for its list) equals the float64 propagation."""
  rng = np.random.default_rng(3)
  h, w = 192, 64
  y0 = 40  # crack rows y0 .. y0 + 5 of the source; rows >= y0 + 3 of tgt come from 3 px further down
  tgt = ndimage.gaussian_filter(rng.normal(size=(h, w)), 1.5)
  tgt = (tgt - tgt.mean()) / tgt.std()
  true = np.zeros((h, w, 2))
  true[y0 + 3:, :, 0] = 3.0
  src = np.zeros((h, w))
  src[:y0] = tgt[:y0]
  src[y0 + 6:] = tgt[y0 + 3:h - 3]
  src_valid = np.ones((h, w))
  src_valid[y0:y0 + 6] = 0.0
  tgt_valid = np.ones((h, w))
  init = true.copy()
  init[y0 + 3:y0 + 7, :, 0] = 0.0  # a 4-px band on the wrong side of the tear
  zone = np.zeros((h, w), bool)
  zone[y0 - 2:y0 + 10, 4:-4] = True
  ring = ndimage.uniform_filter(zone.astype(float), 5, mode="constant") > 0
  if sparse:
    assert ring.mean() <= max(tears.SPARSE_ZONE_FRACTIONS)  # a list tier holds the ring
  else:
    monkeypatch.setattr(tears, "SPARSE_ZONE_FRACTIONS", (1e-6,))
  args = [a.astype(np.float32) for a in (init, src, tgt, src_valid, tgt_valid)]
  out = np.asarray(tears.refine_tears(*map(jnp.asarray, args), jnp.asarray(zone), iterations=6, radius=2))
  ref = _refine_reference(init, src, tgt, src_valid, tgt_valid, zone, 6, 2)
  same = np.all(np.abs(out - ref) < 1e-4, axis=-1)
  assert same.mean() > 0.995, same.mean()
  # ...and it fixed the band: the truth there, away from the zone's ends.
  inner = np.zeros((h, w), bool)
  inner[y0 + 3:y0 + 7, 8:-8] = True
  assert np.abs(out[inner] - true[inner]).max() < 1e-4


@pytest.mark.parametrize("tiers", [None, (1e-6, 0.25)], ids=["default_tiers", "second_tier"])
def test_list_sweep_makes_the_dense_sweeps_decisions(monkeypatch, tiers):
  """Random images, a random field and a blob-shaped zone: every candidate's cost differs, so the
  list sweep (ring and zone lists, separable window sums) must take the dense sweep's decisions,
  pixel for pixel, up to float ties. `second_tier`: the ring overflows the first list tier and is
  swept on the second."""
  rng = np.random.default_rng(11)
  h, w = 128, 96
  src = ndimage.gaussian_filter(rng.normal(size=(h, w)), 1.0).astype(np.float32)
  tgt = ndimage.gaussian_filter(rng.normal(size=(h, w)), 1.0).astype(np.float32)
  valid = (rng.random((h, w)) > 0.05).astype(np.float32)
  field = (3.0 * rng.normal(size=(h, w, 2))).astype(np.float32)
  zone = ndimage.binary_dilation(np.pad(np.ones((1, 1), bool), ((40, h - 41), (30, w - 31))), iterations=6)
  zone[:3, :20] = True  # touching the image border
  if tiers is not None:
    monkeypatch.setattr(tears, "SPARSE_ZONE_FRACTIONS", tiers)
  ring = (ndimage.uniform_filter(zone.astype(float), 5) > 0).mean()
  assert 0.01 < ring <= max(tears.SPARSE_ZONE_FRACTIONS)
  assert ring > min(tears.SPARSE_ZONE_FRACTIONS) or tiers is None
  args = [jnp.asarray(a) for a in (field, src, tgt, valid, valid)] + [jnp.asarray(zone)]
  lists = np.asarray(tears.refine_tears(*args, iterations=3, radius=2))
  monkeypatch.setattr(tears, "SPARSE_ZONE_FRACTIONS", (1e-6,))
  dense = np.asarray(tears.refine_tears(*args, iterations=3, radius=2))
  assert not np.array_equal(dense, field)  # the sweeps did change the zone
  np.testing.assert_array_equal(dense[~zone], field[~zone])
  same = np.all(np.abs(lists - dense) < 1e-5, axis=-1)
  assert same.mean() > 0.999, same.mean()
