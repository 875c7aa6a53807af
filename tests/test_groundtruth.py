"""Ground-truth generator: reproducible, exact (checked with SciPy map_coordinates), defects as stated."""

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import map_coordinates, shift

from jaxalign.bench import groundtruth as gt_mod
from jaxalign.errors import InputError
from jaxalign.ops.fields import warp
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


# ---------------------------------------------------------------------------------------------
# Distortion families and the generalisation split (issue 18 item 4)

FAMILY_CROP = 96


def _phi64(points, p):
  """Independent float64 NumPy forward map `Phi = E o C` of one section's parameters (see the module
  docstring of jaxalign.bench.groundtruth): `points [..., 2]` (y, x) original -> distorted."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  q = np.asarray(points, np.float64).copy()
  for j in range(gt_mod.MAX_DISCONTINUITIES):
    if p["d_on"][j] <= 0:
      continue
    ang = p["d_angle"][j]
    n = np.array([np.sin(ang), np.cos(ang)])
    t = np.array([np.cos(ang), -np.sin(ang)])
    d = q - p["d_p0"][j]
    s = d @ n + p["d_wave_amp"][j] * np.sin(p["d_wave_k"][j] * (d @ t) + p["d_wave_phase"][j])
    strip, pull, alpha = p["d_strip"][j], p["d_pull"][j], p["d_alpha"][j]
    inside = alpha * pull - pull * s / (strip if strip > 0 else 1.0)
    tau = np.where(s < 0, alpha * pull, np.where(s >= strip, -(1 - alpha) * pull, inside))
    q = q + tau[..., None] * n
  arg = 2 * np.pi * (q[..., 0:1] * p["freq"][:, 0] + q[..., 1:2] * p["freq"][:, 1])
  e = np.sum(p["amp"] * np.sin(arg[..., :, None] + p["phase"]), axis=-2)
  return p["centre"] + (q + e - p["centre"]) @ p["matrix"].T + p["translation"]


def _elastic_jacobian_det64(points, p):
  """det of the smooth map's Jacobian `M (I + De)` in float64 (analytic)."""
  arg = 2 * np.pi * (points[..., 0:1] * p["freq"][:, 0] + points[..., 1:2] * p["freq"][:, 1])
  c = np.cos(arg[..., :, None] + p["phase"])  # [..., K, 2]
  # De[a, b] = sum_k amp[k, a] cos(.) 2 pi freq[k, b]
  de = np.einsum("...ka,kb->...ab", p["amp"].astype(np.float64) * c, 2 * np.pi * p["freq"].astype(np.float64))
  jac = np.asarray(p["matrix"], np.float64) @ (np.eye(2) + de)
  return np.linalg.det(jac)


def _geometry_only(cfg):
  """Same geometry (drawn first from the section RNG), no intensity changes / blobs / blanks."""
  return dataclasses.replace(cfg, gain=(1.0, 1.0), offset=(0.0, 0.0), noise_sigma=(0.0, 0.0),
                             chatter_probability=0.0, blob_probability=0.0, blank_probability=0.0)


@pytest.fixture(scope="module")
def family_stack():
  return load_sections("isbi2012_train", [0, 1, 2], crop=FAMILY_CROP)


def test_default_family_is_the_unchanged_default_config():
  assert gt_mod.FAMILIES["default"] == gt_mod.DistortionConfig()
  assert gt_mod.distortion_family("default", 5) == gt_mod.DistortionConfig(seed=5)
  with pytest.raises(InputError, match="unknown distortion family"):
    gt_mod.distortion_family("nope")
  # wavelength bands span ~30 to 300 px
  bands = [gt_mod.FAMILIES[n].elastic_wavelength for n in ("short", "medium", "long")]
  assert bands[0][0] <= 30 and bands[-1][1] >= 300
  assert all(a[1] <= b[0] for a, b in zip(bands, bands[1:]))


@pytest.mark.parametrize("name", sorted(gt_mod.FAMILIES))
def test_family_ground_truth_is_exact_and_invertible(name, family_stack):
  cfg = gt_mod.distortion_family(name, seed=11)
  geo = _geometry_only(cfg)
  d = gt_mod.distort_stack(family_stack, geo, progress=False)
  full = gt_mod.distort_stack(family_stack, cfg, progress=False)
  np.testing.assert_array_equal(full.fields, d.fields)  # intensity changes leave the geometry alone
  yy, xx = np.mgrid[:FAMILY_CROP, :FAMILY_CROP].astype(np.float64)
  grid = np.stack([yy, xx], -1)
  for z in (1, 2):
    p = gt_mod.sample_section_params(geo, z, (FAMILY_CROP, FAMILY_CROP))
    field, valid = d.fields[z], d.valid[z]
    assert valid.mean() > 0.3, valid.mean()
    # gt(r) = Phi(r) - r against the independent float64 forward map
    np.testing.assert_allclose(field, _phi64(grid, p) - grid, atol=2e-3)
    # the smooth map is a diffeomorphism: det of its Jacobian stays >= (1 - strain)^2 det(M)
    det = _elastic_jacobian_det64(grid, p)
    assert det.min() >= (1 - geo.max_strain) ** 2 * np.linalg.det(p["matrix"]) - 1e-6, det.min()
    # pull is the exact inverse: coordinate ramps through pull, then gt (SciPy) return to the identity
    pos = grid + d.pull[z]
    moved = np.stack([_sample(yy, pos), _sample(xx, pos)], -1)
    back = grid + field
    restored = np.stack([_sample(moved[..., 0], back), _sample(moved[..., 1], back)], -1)
    assert np.linalg.norm(restored - grid, axis=-1)[valid].max() < 5e-3
    # gt maps the distorted section back onto the original (SciPy sampling at the float64 map)
    back_img = _sample(d.images[z], _phi64(grid, p))
    err = np.abs(back_img - family_stack[z])[valid].mean()
    half = shift(shift(family_stack[z].astype(np.float64), (0.5, 0.5), order=1), (-0.5, -0.5), order=1)
    bound = np.abs(half - family_stack[z])[8:-8, 8:-8].mean()
    before = np.abs(d.images[z] - family_stack[z])[valid].mean()
    assert err <= 1.1 * bound, (err, bound)
    assert err < 0.5 * before, (err, before)


@pytest.mark.parametrize("name", sorted(gt_mod.FAMILIES))
def test_family_parameters_lie_in_its_ranges(name):
  cfg = gt_mod.FAMILIES[name]
  lam, noise, gain, offset, periods, amps = [], [], [], [], [], []
  for seed in (0, 1001):
    c = gt_mod.distortion_family(name, seed)
    for z in range(1, 41):
      p = gt_mod.sample_section_params(c, z, (256, 256))
      wl = 1.0 / np.linalg.norm(p["freq"], axis=-1)
      norm = np.linalg.norm(p["amp"], axis=-1)
      lam.extend(wl)
      assert norm.sum() <= cfg.elastic_amplitude * (1 + 1e-5)
      assert (norm * 2 * np.pi / wl).sum() <= cfg.max_strain * (1 + 1e-4)  # Lipschitz (strain) bound
      noise.append(p["noise"])
      gain.append(p["gain"])
      offset.append(p["offset"])
      if p["stripe_amp"] > 0:
        amps.append(p["stripe_amp"])
        periods.append(p["stripe_period"])
  tol = 1e-3
  assert cfg.elastic_wavelength[0] - tol <= min(lam) and max(lam) <= cfg.elastic_wavelength[1] + tol
  assert cfg.noise_sigma[0] - 1e-6 <= min(noise) and max(noise) <= cfg.noise_sigma[1] + 1e-6
  assert cfg.gain[0] - 1e-6 <= min(gain) and max(gain) <= cfg.gain[1] + 1e-6
  assert cfg.offset[0] - 1e-6 <= min(offset) and max(offset) <= cfg.offset[1] + 1e-6
  assert amps, "no knife chatter drawn in 80 sections"
  np.testing.assert_allclose(amps, cfg.chatter_amplitude, rtol=1e-6)
  assert cfg.chatter_period[0] - tol <= min(periods) and max(periods) <= cfg.chatter_period[1] + tol
  # the drawn values really spread over the range (not stuck at one end)
  lo, hi = cfg.elastic_wavelength
  assert max(lam) - min(lam) > 0.5 * (hi - lo)


def test_split_parts_are_disjoint_from_tuning():
  split = gt_mod.SPLIT
  tuning = split["tuning"]
  assert set(gt_mod.HELDOUT_PARTS) | {"tuning"} == set(split)
  for part in split.values():
    assert part.seeds and part.families and part.sources
    assert set(part.families) <= set(gt_mod.FAMILIES)
    for s in part.sources:
      assert 0 <= s.start < s.stop and set(s.kinds) <= {"same", "neighbour"}
  # every held-out part: seeds never used for tuning
  for name in gt_mod.HELDOUT_PARTS:
    assert not set(split[name].seeds) & set(tuning.seeds), name
  # (a) held-out seeds on the tuning families and slices
  assert split["heldout_seeds"].families == tuning.families
  assert split["heldout_seeds"].sources == tuning.sources
  # (b) held-out families: none of them is a tuning family
  assert not set(split["heldout_families"].families) & set(tuning.families)
  assert split["heldout_families"].sources == tuning.sources
  # (c) held-out data: no slice of a held-out source is a tuning slice of the same stack, and at
  # least one stack is never used for tuning
  held_slices = {(s.stack, z) for s in split["heldout_stacks"].sources for z in range(s.start, s.stop)}
  tuning_slices = {(s.stack, z) for s in tuning.sources for z in range(s.start, s.stop)}
  assert not held_slices & tuning_slices
  assert {s.stack for s in split["heldout_stacks"].sources} - {s.stack for s in tuning.sources}
  assert split["heldout_stacks"].families == tuning.families
  # neighbour cases only on FIB-SEM, every 4th slice (40 nm sections)
  for part in split.values():
    for s in part.sources:
      if "neighbour" in s.kinds:
        assert s.stack == "flyem_medulla_fibsem" and s.neighbour_step == 4
