"""Ground-truth generator: reproducible, exact (checked with SciPy map_coordinates), defects as stated."""

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import map_coordinates, shift

from jaxalign import groundtruth as gt_mod
from jaxalign.errors import InputError
from jaxalign.fields import warp
from tests.conftest import load_sections

CROP = 128
# Geometry only (no intensity changes), a crack and a fold in every distorted section.
GEOMETRY = gt_mod.DistortionConfig(seed=7, elastic_amplitude=8.0, max_translation=3.0, crack_probability=1.0,
                                   fold_probability=1.0, blob_probability=0.0, blank_probability=0.0,
                                   chatter_probability=0.0, gain=(1.0, 1.0), offset=(0.0, 0.0),
                                   noise_sigma=(0.0, 0.0))


@pytest.fixture(scope="module")
def stack():
  return load_sections("isbi2012_train", [0, 1, 2], crop=CROP)


@pytest.fixture(scope="module")
def distorted(stack):
  return gt_mod.distort_stack(stack, GEOMETRY, progress=False)


def _sample(image, points):
  """Independent bilinear sampler (SciPy, float64): image at points [..., 2] (y, x), 0 outside."""
  return map_coordinates(np.asarray(image, np.float64), [points[..., 0], points[..., 1]], order=1,
                         mode="grid-constant", cval=0.0)


def test_reproducible_from_seed(stack):
  cfg = dataclasses.replace(GEOMETRY, blob_probability=1.0, noise_sigma=(0.02, 0.02), gain=(0.8, 1.2))
  a = gt_mod.distort_stack(stack, cfg, progress=False)
  b = gt_mod.distort_stack(stack, cfg, progress=False)
  c = gt_mod.distort_stack(stack, dataclasses.replace(cfg, seed=8), progress=False)
  for name in ("images", "fields", "valid", "crack", "fold", "missing"):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  assert a.params == b.params
  assert not np.allclose(a.fields[1], c.fields[1])
  # section 0 is the undistorted anchor
  np.testing.assert_array_equal(a.images[0], stack[0])
  assert not a.fields[0].any()


def test_ground_truth_is_exact_inverse_of_the_distortion(distorted):
  """Coordinate ramps pulled through `pull` then `fields` (both by SciPy) return to the identity."""
  yy, xx = np.mgrid[:CROP, :CROP].astype(np.float64)
  grid = np.stack([yy, xx], -1)
  for z in (1, 2):
    pull, field, valid = distorted.pull[z], distorted.fields[z], distorted.valid[z]
    assert valid.mean() > 0.5
    # linear ramps are interpolated exactly by bilinear sampling inside the image
    pos = grid + pull
    moved = np.stack([_sample(yy, pos), _sample(xx, pos)], -1)
    back = grid + field
    restored = np.stack([_sample(moved[..., 0], back), _sample(moved[..., 1], back)], -1)
    err = np.linalg.norm(restored - grid, axis=-1)[valid]
    assert err.max() < 5e-3, err.max()
    assert np.abs(field).max() > 3.0  # it really is distorted


def test_restores_real_section_within_interpolation_error(stack, distorted):
  z = 1
  field, valid = distorted.fields[z], distorted.valid[z]
  restored = np.asarray(warp(distorted.images[z], field))
  yy, xx = np.mgrid[:CROP, :CROP].astype(np.float64)
  ref = _sample(distorted.images[z], np.stack([yy, xx], -1) + field)
  np.testing.assert_allclose(restored, ref, atol=2e-5)  # jaxalign warp == SciPy for the same field
  err = np.abs(restored - stack[z])[valid].mean()
  # two bilinear resamplings smooth the image at most like a +0.5 px / -0.5 px shift round trip
  half = shift(shift(stack[z].astype(np.float64), (0.5, 0.5), order=1), (-0.5, -0.5), order=1)
  bound = np.abs(half - stack[z])[8:-8, 8:-8].mean()
  before = np.abs(distorted.images[z] - stack[z])[valid].mean()
  assert err <= 1.1 * bound, (err, bound)
  assert err < 0.2 * before


def test_crack_and_fold_geometry():
  """Without smooth parts the field is piecewise constant: the crack opens by exactly its width."""
  rng = np.random.default_rng(0)
  flat = np.clip(0.5 + 0.1 * rng.standard_normal((2, CROP, CROP)), 0.05, 1).astype(np.float32)
  cfg = dataclasses.replace(GEOMETRY, elastic_amplitude=0.0, max_rotation_deg=0.0, max_translation=0.0,
                            max_scale=0.0, max_shear=0.0, fold_probability=0.0, defect_wave_amplitude=0.0)
  d = gt_mod.distort_stack(flat, cfg, progress=False)
  width = d.params[1]["crack"]["width"]
  vals = np.unique(np.round(d.fields[1].reshape(-1, 2), 4), axis=0)
  assert len(vals) == 2
  np.testing.assert_allclose(np.linalg.norm(vals[0] - vals[1]), width, atol=1e-3)
  assert np.all(d.images[1][d.crack[1]] == 0)
  # a straight crack's gap area is its width times the line length inside the section
  assert 0.5 * width * CROP < d.crack[1].sum() < 1.5 * width * CROP * 1.42

  cfg = dataclasses.replace(cfg, crack_probability=0.0, fold_probability=1.0)
  d = gt_mod.distort_stack(flat, cfg, progress=False)
  band = d.fold[1]
  assert band.any()
  tissue = d.tissue[1] & ~band
  assert d.images[1][band].mean() < 0.5 * d.images[1][tissue].mean()  # the fold is a dark band
  vals = np.unique(np.round(d.fields[1][d.valid[1]], 4), axis=0)
  np.testing.assert_allclose(np.linalg.norm(vals[0] - vals[-1]), d.params[1]["fold"]["pull"], atol=1e-3)


def test_missing_blank_and_chatter():
  cfg = gt_mod.DistortionConfig(seed=3, blank_probability=1.0)
  rng = np.random.default_rng(1)
  d = gt_mod.distort_stack(rng.uniform(0.1, 1, (3, CROP, CROP)).astype(np.float32), cfg, progress=False)
  assert not d.images[1:].any() and not d.valid[1:].any() and d.missing[1:].all()
  # knife chatter always hits two consecutive sections
  cfg = gt_mod.DistortionConfig(seed=5, chatter_probability=0.3)
  flags = [gt_mod.sample_section_params(cfg, z, (64, 64))["stripe_amp"] > 0 for z in range(40)]
  assert any(flags)
  runs = np.diff(np.flatnonzero(np.diff(np.r_[0, np.array(flags, int), 0])))[::2]
  assert np.all(runs >= 2), runs


def test_bad_input():
  with pytest.raises(InputError, match="Z, H, W"):
    gt_mod.distort_stack(np.zeros((8, 8), np.float32))
  with pytest.raises(InputError, match="NaN"):
    gt_mod.distort_stack(np.full((2, 16, 16), np.nan, np.float32))
  with pytest.raises(InputError, match=r"\[0, 1\]"):
    gt_mod.distort_stack(np.full((2, 16, 16), 3.0, np.float32))
  with pytest.raises(InputError, match="crack_width"):
    gt_mod.DistortionConfig(crack_width=(10.0, 4.0))
  with pytest.raises(InputError, match="probability"):
    gt_mod.DistortionConfig(fold_probability=1.5)
