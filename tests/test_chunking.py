"""Chunked processing: split geometry, crop exactness, seamless blending, shifted reads, batching."""

import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxalign.volume import chunking
from jaxalign.ops import fields
from jaxalign.errors import InputError

from tests.conftest import load_sections


@pytest.mark.parametrize("shape,chunk,overlap", [((200, 173), 64, 12), ((50, 300), (64, 96), (8, 16)),
                                                 ((40, 40), 64, 10), ((129, 65), 65, 0)])
def test_split_cores_tile_the_section_with_overlap_margins(shape, chunk, overlap):
  specs = chunking.split(shape, chunk, overlap)
  h, w = shape
  oy, ox = (overlap, overlap) if np.ndim(overlap) == 0 else overlap
  cover = np.zeros(shape, int)
  sizes = {s.size for s in specs}
  assert len(sizes) == 1  # one window shape: one compilation
  for s in specs:
    (wy, wx), (sh, sw) = s.origin, s.size
    assert 0 <= wy and wy + sh <= h and 0 <= wx and wx + sw <= w
    cover[s.core] += 1
    cy, cx = s.core
    # the core keeps `overlap` px from every window edge that lies inside the section
    assert cy.start - wy >= oy or wy == 0
    assert wy + sh - cy.stop >= oy or wy + sh == h
    assert cx.start - wx >= ox or wx == 0
    assert wx + sw - cx.stop >= ox or wx + sw == w
    assert s.crop == (slice(cy.start - wy, cy.stop - wy), slice(cx.start - wx, cx.stop - wx))
  assert np.all(cover == 1)


def test_crop_reproduces_local_operation_exactly():
  x = load_sections("isbi2012_train", [0], crop=200)[0]
  x = x[:, :173]  # ragged size: the last chunk of a row is shifted inside
  sigma = 2.0  # gaussian_blur radius ceil(4 * sigma) = 8 < overlap
  whole = np.asarray(fields.gaussian_blur(x, sigma))
  out = chunking.map_chunks(lambda a: fields.gaussian_blur(a, sigma), x, 64, 12, mode="crop", batch=3)
  np.testing.assert_array_equal(out, whole)
  # an independent (SciPy, non-JAX, unbatched) local operation on a field [H, W, 2]
  f = np.stack([x, 1 - x], -1).astype(np.float64)
  ref = ndi.maximum_filter(f, size=(9, 9, 1), mode="nearest")
  got = chunking.map_chunks(lambda a: ndi.maximum_filter(a, size=(9, 9, 1), mode="nearest"), f, 48, 5,
                            mode="crop", batch=None, dtype=np.float64)
  np.testing.assert_array_equal(got, ref)


def test_pair_input_and_last_batch_padded_not_recompiled():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 130, 100)).astype(np.float32)
  traces = []

  def fn(s, t):
    traces.append(s.shape)  # runs once per trace
    return np.float32(2.0) * s - t

  specs = chunking.split(a.shape, 48, 6)
  assert len(specs) % 5 != 0
  out = chunking.map_chunks(fn, (a, b), 48, 6, mode="crop", batch=5)
  np.testing.assert_allclose(out, 2 * a.astype(np.float64) - b, rtol=1e-6, atol=1e-6)
  assert len(traces) == 1


def test_blend_reproduces_smooth_function_and_is_seamless():
  yy, xx = np.mgrid[0:150, 0:170].astype(np.float64)
  smooth = np.sin(yy / 23.0) * np.cos(xx / 31.0) + 0.01 * xx
  out = chunking.map_chunks(lambda c: c, smooth.astype(np.float32), 64, 10, mode="blend", batch=4)
  np.testing.assert_allclose(out, smooth, atol=1e-6)
  # weights are a partition of unity
  ones = chunking.map_chunks(lambda c: c, np.ones((150, 170), np.float32), 64, 10, mode="blend", batch=None)
  np.testing.assert_allclose(ones, 1.0, atol=1e-6)

  # each chunk returns a different constant: crop steps at seams, blending ramps between them
  specs = chunking.split((150, 170), 64, 10)
  level = {s.origin: float(i % 2) for i, s in enumerate(specs)}  # neighbours differ by 1

  def offset_chunk(spec_out, spec):
    return np.full(spec.size, level[spec.origin])

  cropped = chunking.assemble([offset_chunk(None, s) for s in specs], specs, (150, 170), mode="crop")
  blended = chunking.assemble([offset_chunk(None, s) for s in specs], specs, (150, 170), mode="blend")
  step = lambda img: max(np.abs(np.diff(img, axis=0)).max(), np.abs(np.diff(img, axis=1)).max())
  assert step(cropped) == pytest.approx(1.0)
  # raised-cosine ramp over an overlap of >= 2*10 px: slope <= pi / (2 * 20) per px
  assert step(blended) <= np.pi / 40 + 1e-6


def test_shifted_reads_for_recentring():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(90, 80)).astype(np.float32)
  spec = chunking.split(x.shape, 40, 5)[0]
  got = chunking.read_chunk(x, spec, offset=(-3, 7), fill=-1.0)
  ref = np.full((40, 40), -1.0, np.float32)
  ref[3:, :] = x[0:37, 7:47]
  np.testing.assert_array_equal(got, ref)
  # every chunk of `src` read 4 px down / 2 px left: the identity on it yields the shifted section
  out = chunking.map_chunks(lambda s, t: s, (x, x), 40, 5, offsets=lambda s: [(4, -2), None], batch=2)
  ref = np.zeros_like(x)
  ref[:-4, 2:] = x[4:, :-2]
  np.testing.assert_array_equal(out, ref)


def test_bad_arguments():
  with pytest.raises(InputError, match="twice the overlap"):
    chunking.split((100, 100), 20, 10)
  with pytest.raises(InputError, match="share"):
    chunking.map_chunks(lambda a, b: a, (np.zeros((10, 10)), np.zeros((10, 11))), 8, 1)
  with pytest.raises(InputError, match="mode"):
    chunking.map_chunks(lambda a: a, np.zeros((10, 10)), 8, 1, mode="average")


def test_chunks_stream_from_a_volume(tmp_path):
  from jaxalign.volume import store
  x = load_sections("isbi2012_train", [5, 6], crop=128)
  vol = store.create_volume(str(tmp_path / "v"), x.shape, np.float32, (50, 4, 4), chunks=(1, 32, 32))
  vol.write(x)
  ref = ndi.maximum_filter(x[1], size=7, mode="nearest")
  got = chunking.map_chunks(lambda a: ndi.maximum_filter(a, size=7, mode="nearest"), vol.array(0)[1], 48, 4,
                            batch=None)
  np.testing.assert_array_equal(got, ref)
