"""Chunked composition with decay and chunked stitch fields (jaxalign.volume.chunked), alone and inside
the volume pipeline.

- `compose_with_decay_chunked` must equal the whole-section `jaxalign.stack.chain.compose_with_decay` to
  float rounding everywhere (seams included): stitch fields with translations of 20-60 px (larger
  than the margin, so per-step re-centring is exercised) plus smooth warps, blurred over several
  hierarchy levels.
- `stitch_field_chunked` is checked against a closed form: with block N+1's fields
  `next(q) = prev(q - T) - T` the stitch field is the constant T (warp(S, next) is warp(S, prev)
  shifted by T), here 37 / -45 px, larger than the chunk overlap; the FFT stand-in aligner
  (tests/references.py) is exact for integer shifts.
- The pipeline with `VolumeConfig(chunk=...)` on sections larger than the chunk (blocks, stitches,
  decay, streamed rendering and pyramid all chunked) reproduces the closed-form fields and images.
"""

import numpy as np
import pytest

from jaxalign.volume import store, pipeline
from jaxalign.stack.block import BlockConfig
from jaxalign.volume.chunked import ChunkConfig, compose_with_decay_chunked, stitch_field_chunked
from jaxalign.stack.chain import StackConfig
from tests.references import expected_fields, phase_aligner, texture_stack


def _smooth(h, w, ty, tx, amp, phase):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  return np.stack([ty + amp * np.sin(yy / 57 + phase) * np.cos(xx / 83),
                   tx + amp * np.cos(yy / 71 - phase) + 0.5 * amp * np.sin(xx / 49)], -1).astype(np.float32)


def test_compose_with_decay_chunked_equals_whole_section():
  import jax.numpy as jnp
  from jaxalign.stack.chain import compose_with_decay
  h, w = 600, 520  # decay windows of 256 px are smaller than the 768 x 768 padded section
  block_field = _smooth(h, w, 5.3, -7.2, 4.0, 0.3)
  stitches = [_smooth(h, w, 37.4, -45.6, 3.0, 1.0), _smooth(h, w, -22.1, 18.3, 2.0, 2.0),
              _smooth(h, w, 3.0, 60.0, 5.0, 0.5)]
  distances = [7.0, 33.0, 100.0]  # nearest first; the last has fully decayed (dropped)
  ref = np.asarray(compose_with_decay(jnp.asarray(block_field), jnp.asarray(np.stack(stitches)),
                                      jnp.asarray(distances, jnp.float32), decay_distance=100.0, blur_rate=0.2))
  cores = []
  compose_with_decay_chunked(block_field, stitches, distances, decay_distance=100.0, blur_rate=0.2,
                             config=ChunkConfig(chunk=128, overlap=16), sink=lambda core, f: cores.append((core, f)))
  covered = np.zeros((h, w), int)
  for core, f in cores:
    covered[core] += 1
    np.testing.assert_allclose(f, ref[core], atol=1e-4, rtol=0)
  assert len(cores) > 4 * 4 and np.all(covered == 1)  # cores tile the section


def test_stitch_field_chunked_recovers_a_large_constant_stitch():
  n, shift = 192, np.array([37, -45])
  sections = texture_stack(np.array([[0, 0], [4, -3], [-5, 6]]), size=n, margin=80)
  yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
  prev = np.stack([np.stack([8 + 3 * i + 2.5 * np.sin(yy / 40 + i), -6 + 2 * np.cos(xx / 35 - i)], -1)
                   for i in range(3)]).astype(np.float32)
  iy, ix = np.clip(np.arange(n) - shift[0], 0, n - 1), np.clip(np.arange(n) - shift[1], 0, n - 1)
  nxt = (prev[:, iy][:, :, ix] - shift).astype(np.float32)
  t = stitch_field_chunked(list(sections), list(prev), list(nxt), block_config=BlockConfig(aligner=phase_aligner),
                           config=ChunkConfig(chunk=96, overlap=12, coarse_levels=2, min_coarse_size=48))
  err = np.abs(t - shift).max(axis=-1)
  # Tolerance 0.5 px (the stand-in aligner is exact for integer shifts; voting of agreeing candidates
  # returns their value), on every pixel, seams included.
  assert err.max() <= 0.5, (err.max(), np.mean(err > 0.5))


def test_chunked_volume_pipeline_matches_closed_form(tmp_path):
  """Sections of 320 px with 128-px chunks: blocks, stitches, composition with decay (on 256-px
  decay windows of the 512-px padded section) and the streamed rendering + pyramid all run chunk
  by chunk; shifts up to 20 px exceed the 16 px chunk overlap."""
  size = 320
  shifts = np.array([[0, 0], [6, -4], [12, -9], [15, -14], [20, -12], [17, -6], [11, 2]])
  sections = texture_stack(shifts, size=size)
  src = str(tmp_path / "src")
  store.create_volume(src, sections.shape, "float32", (40, 4, 4)).write(sections)
  config = pipeline.VolumeConfig(block_size=5, overlap=2, starters=(0, 3), decay_distance=1e6, pyramid_levels=2,
                                 chunk=ChunkConfig(chunk=128, overlap=16, coarse_levels=2, min_coarse_size=64),
                                 stack=StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=phase_aligner)))
  plan = pipeline.align_volume(src, str(tmp_path / "dst"), config, progress=False)
  assert len(plan.blocks) == 2
  fields = store.open_volume(str(tmp_path / "dst" / "fields")).read()
  np.testing.assert_allclose(fields, expected_fields(shifts, size), atol=1e-3)
  aligned = store.open_volume(str(tmp_path / "dst" / "aligned"))
  ref = np.zeros_like(sections)
  for z, (dy, dx) in enumerate(shifts[0] - shifts):
    ys, xs = slice(max(0, -dy), min(size, size - dy)), slice(max(0, -dx), min(size, size - dx))
    ref[z, ys, xs] = sections[z, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
  np.testing.assert_allclose(aligned.read(), ref, atol=1e-3)
  lvl1 = ref.reshape(-1, size // 2, 2, size // 2, 2).astype(np.float64).mean(axis=(2, 4))
  np.testing.assert_allclose(aligned.read(level=1), lvl1, atol=1e-3)


def test_coarse_levels_keep_enough_context():
  from jaxalign.volume.chunked import coarse_levels_for
  cfg = ChunkConfig()  # up to 2^3 coarser, at least 128 px per side
  assert [coarse_levels_for(cfg, n, 2 * n) for n in (100, 256, 512, 1023, 8192)] == [0, 1, 2, 2, 3]


@pytest.mark.parametrize("chunked", [False, True])
def test_volume_pipeline_honours_stitch_refine(tmp_path, chunked):
  # StackConfig.stitch_refine=False must reach the stitch task (whole-section and chunked): the run
  # makes fewer pair alignments (none for the stitch) and still gives the closed-form fields.
  size = 192
  shifts = np.array([[0, 0], [5, -4], [9, -7], [12, -3], [8, 2], [4, 6]])
  sections = texture_stack(shifts, size=size)
  src = str(tmp_path / "src")
  store.create_volume(src, sections.shape, "float32", (40, 4, 4)).write(sections)
  calls = []
  for refine in (True, False):
    def counting(*args, **kwargs):
      calls.append(refine)
      return phase_aligner(*args, **kwargs)
    config = pipeline.VolumeConfig(
        block_size=4, overlap=2, starters=(0, 2), decay_distance=1e6, pyramid_levels=1,
        chunk=ChunkConfig(chunk=96, overlap=16, coarse_levels=1, min_coarse_size=64) if chunked else None,
        stack=StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=counting), stitch_refine=refine))
    pipeline.align_volume(src, str(tmp_path / f"dst_{refine}"), config, progress=False)
    fields = store.open_volume(str(tmp_path / f"dst_{refine}" / "fields")).read()
    np.testing.assert_allclose(fields, expected_fields(shifts, size), atol=1e-3)
  assert 0 < calls.count(False) < calls.count(True), (calls.count(False), calls.count(True))
