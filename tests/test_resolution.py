"""Physical resolution (issue 18): working levels in nm, the same stack at 4 and 8 nm/px picks
corresponding levels and gives the same fields after rescaling, and bad resolutions are named.

Ground truth: tgt = warp(src, u) for a smooth analytic field u on a real ssTEM crop (ISBI 2012); the
8 nm/px version of the pair is the 2x2 mean of the 4 nm/px one, so the pyramids coincide from 8 nm up.
"""

import numpy as np
import jax.numpy as jnp
import pytest
from scipy import ndimage

import jaxalign as ja
from jaxalign.ops import fields
from jaxalign.errors import InputError
from jaxalign.ops.fields import level_nearest
from jaxalign.align import pair
from jaxalign.align.pair import PairConfig
from tests.conftest import load_sections

N = 512  # the whole ISBI section: 64 px at the 32 nm working level


@pytest.mark.parametrize("pixel, target, level", [(4.0, 32.0, 3), (4.6, 32.0, 3), (10.0, 32.0, 2), (8.0, 32.0, 2),
                                                  (50.0, 32.0, 0), (100.0, 32.0, 0), (4.0, 0.0, 0),
                                                  (4.0, 512.0, 7)])
def test_level_nearest_on_a_log_scale(pixel, target, level):
  # Closed form: round(log2(target / pixel)), never below the images' own level.
  assert level_nearest(pixel, target) == level


@pytest.mark.parametrize("res, shape, plan", [
    ((50, 4, 4), (256, 256), (4, 3)),      # 32 nm finest; coarsest capped at 32 px (64 nm)
    ((50, 8, 8), (128, 128), (3, 2)),      # the same tissue at 8 nm: the same 32 nm and 64 nm levels
    ((50, 4, 4), (4096, 4096), (8, 3)),    # 512 nm coarsest (2048 nm / 4 px) as the paper's FAFB levels
    ((40, 10, 10), (520, 520), (5, 2)),    # FIB-SEM every 4th slice: 40 nm finest
    ((50, 50, 50), (1000, 1000), (4, 0)),  # 50 nm data: computed at its own pixel, coarsest 400 nm
    (None, (256, 256), (4, 0)),            # unknown resolution: the images' pixels, legacy levels
])
def test_plan_in_physical_units(res, shape, plan):
  assert PairConfig(resolution_nm=res).plan(shape) == plan


def test_precise_setting_and_overrides():
  assert PairConfig(resolution_nm=(50, 4, 4), finest_nm=0).plan((256, 256)) == (4, 0)
  assert PairConfig(resolution_nm=(50, 4, 4), finest_level=1).plan((256, 256)) == (4, 1)
  assert PairConfig(resolution_nm=(50, 4, 4), levels=5).plan((2048, 2048)) == (5, 3)
  # gammas follow the working level: the paper's strong prior when the finest field is coarse.
  cfg = PairConfig(resolution_nm=(50, 4, 4))
  assert cfg.physical and cfg.level_config(3, 3).gamma == pair.COARSE_GAMMAS[0]
  # 50 nm data is computed at its own pixel, with the physical (strong) prior all the same...
  assert PairConfig(resolution_nm=(50, 50, 50)).level_config(0, 0).gamma == pair.COARSE_GAMMAS[0]
  # ...while the precise setting and unknown resolutions polish at the pixel with a light prior.
  for c in (PairConfig(resolution_nm=(50, 4, 4), finest_nm=0), PairConfig()):
    assert not c.physical and c.level_config(0, 0).gamma == pair.DEFAULT_GAMMAS[0]
    assert c.median_window(0, 0)[0] == pair.DEFAULT_MEDIAN_SIZES[0]
  assert cfg.median_window(3, 3)[0] == 1  # off


@pytest.fixture(scope="module")
def pair_at_two_resolutions():
  section = load_sections("isbi2012_train", [3], crop=N)[0].astype(np.float64)
  yy, xx = np.mgrid[0:N, 0:N].astype(np.float64)
  u = np.stack([6 * np.sin(2 * np.pi * xx / N + 0.3) + 3 * np.cos(2 * np.pi * yy / N) + 2.0,
                4 * np.cos(3 * np.pi * yy / N) - 3.0], -1)
  # Independent reference warp (SciPy, float64, the DESIGN convention's grid-constant border).
  tgt = np.stack([ndimage.map_coordinates(section, [yy + u[..., 0], xx + u[..., 1]], order=1,
                                          mode="grid-constant", cval=0.0)])[0]
  down = lambda x: x.reshape(N // 2, 2, N // 2, 2).mean(axis=(1, 3))
  return section, tgt, u, down(section), down(tgt)


def test_same_stack_at_4_and_8_nm_gives_the_same_field(pair_at_two_resolutions):
  src4, tgt4, u, src8, tgt8 = pair_at_two_resolutions
  f4 = np.asarray(ja.align_pair(src4.astype(np.float32), tgt4.astype(np.float32), resolution_nm=(50, 4, 4)))
  f8 = np.asarray(ja.align_pair(src8.astype(np.float32), tgt8.astype(np.float32), resolution_nm=(50, 8, 8)))
  assert f4.shape == (N, N, 2) and f8.shape == (N // 2, N // 2, 2)
  interior = (slice(24, N - 24), slice(24, N - 24))
  # Both are computed on the same 32 nm images: the 8 nm field, upsampled and doubled to 4 nm px,
  # agrees with the 4 nm one.
  f8_at_4 = 2.0 * np.stack([ndimage.zoom(f8[..., c].astype(np.float64), 2, order=1, grid_mode=True,
                                         mode="grid-constant") for c in range(2)], -1)
  diff = np.linalg.norm(f4 - f8_at_4, axis=-1)[interior]
  assert np.median(diff) < 0.1 and np.percentile(diff, 95) < 0.3, (np.median(diff), np.percentile(diff, 95))
  # ...and both recover the known smooth field to a fraction of the 32 nm working pixel (8 px here).
  err = np.linalg.norm(f4 - u, axis=-1)[interior]
  assert np.median(err) < 1.2, np.median(err)


def test_resolution_reaches_block_and_stack():
  # A translated real crop: the stack aligners accept resolution_nm and give the known shift.
  n = 256
  section = load_sections("isbi2012_train", [3], crop=n)[0]
  shifted = np.asarray(fields.warp(jnp.asarray(section), jnp.asarray(np.broadcast_to(
      np.float32([2.0, -3.0]), (n, n, 2)).copy())))
  stack = np.stack([shifted, section])
  abcd = ja.StackConfig(drift=None, neighbour_refine=None)
  for out in (ja.align_block(stack, resolution_nm=(50, 4, 4), progress=False),
              ja.align_stack(stack, block_size=2, overlap=1, resolution_nm=(50, 4, 4), config=abcd, progress=False)):
    f = np.asarray(out)[1]
    # section 1 (unshifted) into section 0's frame: warp(section, (2, -3)) is section 0.
    err = np.linalg.norm(f[24:-24, 24:-24] - np.float32([2.0, -3.0]), axis=-1)
    # Within 1/8 of the 32 nm working pixel (8 px here; a 256² crop is 32 px wide there).
    assert np.median(err) < 1.0, np.median(err)


@pytest.mark.parametrize("bad, words", [(-4.0, "> 0"), ((50, 0, 4), "> 0"), ((50, 4), "(z, y, x)"),
                                        ("four", "numbers"), ((50, float("nan"), 4), "finite")])
def test_bad_resolution_is_named(bad, words):
  img = np.ones((64, 64), np.float32)
  with pytest.raises(InputError, match="resolution_nm") as e:
    ja.align_pair(img, img, resolution_nm=bad)
  assert words in str(e.value)


def test_mismatched_resolutions_are_refused():
  img = np.ones((64, 64), np.float32)
  with pytest.raises(InputError, match="does not match"):
    ja.align_pair(img, img, resolution_nm=(50, 8, 8), config=PairConfig(resolution_nm=(50, 4, 4)))
  with pytest.raises(InputError, match="finest_nm"):
    PairConfig(finest_nm=-1.0)
  with pytest.raises(InputError, match="max_displacement_nm"):
    PairConfig(max_displacement_nm=0.0)


def test_gamma_scale_equals_scaled_gammas(pair_at_two_resolutions):
  # The traced factor (no recompile) must act exactly as multiplying every level's gamma.
  src4, tgt4, *_ = pair_at_two_resolutions
  src, tgt = src4[:256, :256].astype(np.float32), tgt4[:256, :256].astype(np.float32)
  base = PairConfig(resolution_nm=(50, 4, 4))
  scaled = np.asarray(ja.align_pair(src, tgt, config=PairConfig(resolution_nm=(50, 4, 4), gamma_scale=3.0)))
  explicit = np.asarray(ja.align_pair(src, tgt, config=PairConfig(
      resolution_nm=(50, 4, 4), gammas=tuple(3.0 * g for g in pair.COARSE_GAMMAS))))
  plain = np.asarray(ja.align_pair(src, tgt, config=base))
  np.testing.assert_allclose(scaled, explicit, atol=1e-4)
  assert np.abs(scaled - plain).max() > 1e-2


def test_natural_motion_stays_within_the_deformation_bound():
  # Real FIB-SEM (10 nm px), every 4th slice: 40 nm sections whose content moves from one section
  # to the next (neurites cut obliquely) although the stack is registered. The default stack
  # aligner must not turn that motion into tissue deformation that grows along z: the area change
  # of every section's non-affine part (smoothed at 100 nm) stays within [0.9, 1.1].
  stack = load_sections("flyem_medulla_fibsem", range(0, 64, 4), crop=256)  # 16: drift removal runs
  fields_ = np.asarray(ja.align_stack(stack, block_size=8, overlap=3, resolution_nm=(40, 10, 10), progress=False))
  d = ja.deformation(fields_, resolution_nm=(40, 10, 10))
  assert 0.9 <= d.low_all and d.high_all <= 1.1, (d.low_all, d.high_all)
  # ...and not larger at the end of the stack than near its start.
  spread = np.asarray(d.high) - np.asarray(d.low)
  assert spread[-3:].mean() <= spread[1:4].mean() + 0.05, spread


def test_drift_removal_needs_its_window():
  # Closed form: sigma 2 -> radius ceil(3 * 2) = 6 sections each side -> a 13-section window. A
  # shorter stack is left to ABCD (the local fit would span it and remove the alignment itself).
  assert ja.DriftConfig(sigma=2).radius == 6
  assert not ja.DriftConfig(sigma=2).applies_to(12) and ja.DriftConfig(sigma=2).applies_to(13)
  assert ja.DriftConfig(sigma=1).applies_to(7) and not ja.DriftConfig(sigma=1).applies_to(6)
