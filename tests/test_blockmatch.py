"""Block matching: masked NCC vs brute force, recovery of known translations and smooth fields."""

import dataclasses

import jax
import numpy as np
import pytest
from scipy.ndimage import shift

from jaxalign.align import blockmatch as bm
from jaxalign.bench import groundtruth as gt_mod
from jaxalign.errors import InputError
from tests.conftest import load_sections

CROP = 128
# One level (iterated twice) keeps the compile short; ±12 px covers the displacements used here.
CONFIG = bm.BlockMatchConfig(levels=(0, 0), search=12)


@pytest.fixture(scope="module")
def section():
  return load_sections("isbi2012_train", [3], crop=CROP)[0]


def test_masked_ncc_matches_brute_force():
  rng = np.random.default_rng(0)
  p, r = 8, 3
  tpl = rng.random((p, p))
  win = rng.random((p + 2 * r, p + 2 * r))
  tm = (rng.random((p, p)) > 0.2).astype(np.float64)
  wm = (rng.random(win.shape) > 0.2).astype(np.float64)
  got = np.asarray(bm.masked_ncc(*(jax.numpy.asarray(x, np.float32) for x in (tpl, tm, win, wm)), 0.3))
  for i in range(2 * r + 1):
    for j in range(2 * r + 1):
      m = (tm * wm[i:i + p, j:j + p]) > 0
      a, b = tpl[m], win[i:i + p, j:j + p][m]
      want = np.corrcoef(a, b)[0, 1]
      np.testing.assert_allclose(got[i, j], want, atol=2e-4)


def test_recovers_translation(section):
  true = np.array([2.3, -3.6])
  # src(x) = tgt(x - true)  =>  warp(src, f) = tgt for f = +true
  src = np.clip(shift(section, true, order=3, mode="nearest"), 1e-3, 1).astype(np.float32)
  f = np.asarray(bm.block_match(src, section, config=CONFIG))
  inner = f[16:-16, 16:-16].reshape(-1, 2)
  np.testing.assert_allclose(np.median(inner, 0), true, atol=0.1)
  assert np.percentile(np.linalg.norm(inner - true, axis=-1), 95) < 0.3
  # an initial field at the answer is kept (team aligner protocol)
  f2 = np.asarray(bm.block_match(src, section, init_field=np.broadcast_to(true, f.shape).astype(np.float32),
                                 config=CONFIG))
  np.testing.assert_allclose(np.median(f2[16:-16, 16:-16].reshape(-1, 2), 0), true, atol=0.1)


def test_recovers_smooth_field_on_real_section():
  stack = load_sections("isbi2012_train", [0, 5], crop=CROP)
  cfg = gt_mod.DistortionConfig(seed=2, elastic_amplitude=10.0, max_translation=3.0, crack_probability=0.0,
                                fold_probability=0.0, blob_probability=0.0, blank_probability=0.0,
                                chatter_probability=0.0)
  d = gt_mod.distort_stack(stack, cfg, progress=False)
  f = np.asarray(bm.block_match(d.images[1], d.original[1], config=CONFIG))
  valid = d.valid[1]
  epe = np.linalg.norm(f - d.fields[1], axis=-1)[valid]
  before = np.linalg.norm(d.fields[1], axis=-1)[valid]
  assert np.median(before) > 2.0
  assert np.median(epe) < 0.3, np.median(epe)
  assert np.percentile(epe, 95) < 1.5


def test_defect_masks_and_zero_regions(section):
  true = np.array([-1.5, 2.0])
  src = np.clip(shift(section, true, order=3, mode="nearest"), 1e-3, 1).astype(np.float32)
  src[40:60, :] = 0.0  # a band without data must not attract the field
  defects = np.zeros_like(src, bool)
  defects[90:96, :] = True
  f = np.asarray(bm.block_match(src, section, src_defects=defects, config=CONFIG))
  np.testing.assert_allclose(np.median(f[16:-16, 16:-16].reshape(-1, 2), 0), true, atol=0.15)


def test_bad_input(section):
  with pytest.raises(InputError, match="shape"):
    bm.block_match(section, section[:64])
  bad = section.copy()
  bad[0, 0] = np.nan
  with pytest.raises(InputError, match="NaN"):
    bm.block_match(bad, section)
  with pytest.raises(InputError, match="zero"):
    bm.block_match(np.zeros_like(section), section)
  with pytest.raises(InputError, match="src_defects"):
    bm.block_match(section, section, src_defects=np.zeros((3, 3), bool))
  with pytest.raises(InputError, match="patch"):
    bm.BlockMatchConfig(patch=7)
  with pytest.raises(InputError, match="smaller than"):
    bm.block_match(section[:16, :16], section[:16, :16], config=dataclasses.replace(CONFIG, patch=32))
