"""Statistics of the procedural EM stack (jaxalign.bench.synthetic), against float64 NumPy references."""

import numpy as np
import pytest

from jaxalign.errors import InputError
from jaxalign.bench.synthetic import SyntheticConfig, make_stack

SMALL = SyntheticConfig(sections=10, size=160, seed=3)


@pytest.fixture(scope="module")
def stack():
  return make_stack(SMALL, progress=False)


def _pearson(a, b):
  return np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1]


def test_shapes_dtypes_and_range(stack):
  z, s = SMALL.sections, SMALL.size
  assert stack.images.shape == (z, s, s) and stack.images.dtype == np.float32
  assert stack.membranes.shape == (z, s, s) and stack.membranes.dtype == bool
  assert stack.cells.shape == (z, s, s) and stack.cells.dtype == np.int32
  # 0 means "no data" everywhere in jaxalign: synthetic tissue must never contain it
  assert stack.images.min() >= SMALL.floor > 0 and stack.images.max() <= 1.0
  assert np.isfinite(stack.images).all()


def test_seeded_reproducibility():
  cfg = SyntheticConfig(sections=2, size=SMALL.size, seed=11)
  a, b = make_stack(cfg, progress=False), make_stack(cfg, progress=False)
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.cells, b.cells)
  c = make_stack(SyntheticConfig(sections=2, size=SMALL.size, seed=12), progress=False)
  assert np.abs(a.images - c.images).mean() > 0.05


def test_neighbours_more_similar_than_far_sections(stack):
  im = stack.images
  at = lambda k: np.mean([_pearson(im[z], im[z + k]) for z in range(len(im) - k)])  # noqa: E731
  near, mid, far = at(1), at(4), at(8)
  # neighbours look alike (alignable) but are not copies of each other; similarity decays with z
  assert 0.5 < near < 0.97
  assert near > mid + 0.03 and mid > far + 0.03


def test_neurites_persist_through_z(stack):
  same = lambda k: np.mean([np.mean(stack.cells[z] == stack.cells[z + k])  # noqa: E731
                            for z in range(len(stack.cells) - k)])
  assert same(1) > 0.9                         # the same neurite under most pixels one section up
  assert 1 - same(8) > 2 * (1 - same(1)) > 0   # boundaries move on: change grows with distance


def test_membranes_dark_and_in_sane_fraction(stack):
  frac = stack.membranes.mean()
  assert 0.1 < frac < 0.4, frac
  on = stack.images[stack.membranes].astype(np.float64).mean()
  off = stack.images[~stack.membranes].astype(np.float64).mean()
  assert on < off - 0.1


def test_cell_count_matches_cell_size(stack):
  # about (size / cell_size)^2 neurites per section (power weights and warp change it modestly)
  expected = (SMALL.size / SMALL.cell_size) ** 2
  counts = [len(np.unique(c)) for c in stack.cells]
  assert 0.5 * expected < np.mean(counts) < 2.5 * expected


def test_bad_config_raises():
  with pytest.raises(InputError, match="sections"):
    make_stack(SyntheticConfig(sections=0, size=64), progress=False)
  with pytest.raises(InputError, match="size"):
    make_stack(SyntheticConfig(sections=1, size=8), progress=False)
