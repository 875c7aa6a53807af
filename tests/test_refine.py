"""Neighbour refinement (`jaxalign.stack.refine`): weights, templates, the refinement, its chunked form, its
use in align_stack and in the volume pipeline.

References are independent: the template against a float64 SciPy rendering and NumPy statistics;
the refinement against the closed form of translation stacks (an exact translation aligner recovers
a misaligned section from its correctly aligned neighbours); align_stack's wiring against a stand-in
aligner whose answer is known (a constant residual added once to every section with data).
"""

import numpy as np
import pytest
from scipy import ndimage

from jaxalign.stack.block import BlockConfig
from jaxalign.errors import InputError
from jaxalign.stack.refine import MIN_TEMPLATE_COVERAGE, RefineConfig, neighbour_template, neighbour_weights, refine_to_neighbours, render_window
from jaxalign.stack.chain import StackConfig, align_stack
from tests.references import expected_fields, phase_aligner, random_shifts, texture_stack
from tests.references import smooth_field


def test_neighbour_weights_are_gaussian_without_the_section_blanks_or_outside():
  config = RefineConfig(radius=2, sigma=1.5)
  sw = np.array([1, 1, 0, 1, 1, 1], np.float64)
  wts = neighbour_weights(6, config, sw)
  for z in range(6):
    for j, off in enumerate(range(-2, 3)):
      k = z + off
      expect = 0.0 if (off == 0 or not 0 <= k < 6) else np.exp(-0.5 * (off / 1.5) ** 2) * sw[k]
      assert wts[z, j] == pytest.approx(expect, abs=1e-12), (z, off)


def _reference_template(images, fields, data, weights, threshold):
  """float64: SciPy bilinear renderings (0 outside), masked by the rendered data mask, each
  normalised over its data, weighted mean over the neighbours with data, coverage rule."""
  k_count, h, w = images.shape
  yy, xx = np.mgrid[:h, :w].astype(np.float64)
  num = np.zeros((h, w))
  den = np.zeros((h, w))
  for k in range(k_count):
    coords = [yy + fields[k, ..., 0], xx + fields[k, ..., 1]]
    img = ndimage.map_coordinates(images[k].astype(np.float64), coords, order=1, mode="grid-constant", cval=0.0)
    msk = ndimage.map_coordinates(data[k].astype(np.float64), coords, order=1, mode="grid-constant", cval=0.0)
    has = (msk > threshold) & (img != 0)
    if not has.any():
      continue
    normed = (img - img[has].mean()) / img[has].std()
    num += weights[k] * np.where(has, normed, 0.0)
    den += weights[k] * has
  covered = den > MIN_TEMPLATE_COVERAGE * weights.sum()
  return np.where(covered, num / np.maximum(den, 1e-300), 0.0), covered


def test_template_matches_float64_reference():
  rng = np.random.default_rng(0)
  k_count, h, w = 5, 40, 36
  images = (rng.random((k_count, h, w)) + 0.5).astype(np.float32)
  images[1, :, :12] = 0.0  # no data on a strip
  data = (images != 0).astype(np.float32)
  data[3, 10:20, 5:30] = 0.0  # a defect
  images = np.where(data > 0, images, 0.0).astype(np.float32)
  fields = np.stack([smooth_field(rng, (h, w), 3.0, 6.0) for _ in range(k_count)]).astype(np.float32)
  weights = np.array([0.1, 1.0, 0.0, 1.0, 0.1], np.float32)
  rendered = render_window(images, fields, data, 0.5)
  out = np.asarray(neighbour_template(rendered, weights))
  ref, covered = _reference_template(images, fields.astype(np.float64), data, weights.astype(np.float64), 0.5)
  assert covered.mean() > 0.8 and (~covered).any()
  # Pixels whose rendered data mask sits right at the threshold may fall either way in float32.
  decided = np.ones((h, w), bool)
  yy, xx = np.mgrid[:h, :w].astype(np.float64)
  for k in range(k_count):
    msk = ndimage.map_coordinates(data[k].astype(np.float64), [yy + fields[k, ..., 0], xx + fields[k, ..., 1]],
                                  order=1, mode="grid-constant", cval=0.0)
    decided &= np.abs(msk - 0.5) > 1e-4
  np.testing.assert_allclose(out[decided], ref[decided], atol=1e-4)


SIZE = 64


def _translation_case(z_count=13, outlier=5, blank=9, error=(9, -7)):
  shifts = random_shifts(z_count, seed=7, step=2, limit=8)
  sections = texture_stack(shifts, SIZE, seed=8, change=0.2)
  sections[blank] = 0.0
  exact = expected_fields(shifts, SIZE).astype(np.float32)
  fields = exact.copy()
  fields[outlier] += np.asarray(error, np.float32)
  fields[blank] += 5.0  # a blank section's field is whatever the block gave it: never used
  return sections, fields, exact


def test_refinement_recovers_a_misaligned_section_from_its_neighbours():
  """Exact integer-translation aligner: the misaligned section gets its exact field back, every
  other section keeps its (exact) field, the end sections use their one-sided templates, and the
  blank section is neither refined nor anyone's neighbour."""
  outlier, blank = 5, 9
  sections, fields, exact = _translation_case(outlier=outlier, blank=blank)
  out = np.asarray(refine_to_neighbours(sections, fields, aligner=phase_aligner))
  data = [z for z in range(len(sections)) if z != blank]
  np.testing.assert_allclose(out[data], exact[data], atol=1e-4)
  np.testing.assert_array_equal(out[blank], fields[blank])


def test_chunked_refinement_matches_the_whole_section():
  from jaxalign.volume.chunked import ChunkConfig, refine_section_chunked
  sections, fields, exact = _translation_case()
  config = RefineConfig()
  wts = neighbour_weights(len(sections), config, (sections.reshape(len(sections), -1) != 0).any(axis=1) * 1.0)
  for z in (0, 5, 9):
    idx = np.clip(np.arange(z - 2, z + 3), 0, len(sections) - 1)
    out = refine_section_chunked([sections[k] for k in idx], [fields[k] for k in idx], wts[z], 2,
                                 aligner=phase_aligner, config=ChunkConfig(chunk=40, overlap=8, render_margin=4))
    expect = fields[z] if z == 9 else exact[z]
    np.testing.assert_allclose(out, expect, atol=1e-4)


def test_align_stack_refines_each_section_once_after_composition():
  """A stand-in aligner adding a known constant to its initial field: align_stack's translation
  fields are constant, so refinement must add exactly the constant residual c to every section with
  data and leave the blank section alone; the templates it aligns to are the float64 reference."""
  shifts = random_shifts(12, seed=3, step=2, limit=6)
  sections = texture_stack(shifts, 48, seed=4)
  sections[7] = 0.0
  c = np.array([0.25, -0.5], np.float32)
  calls = []

  def aligner(srcs, tgts, *, src_defects=None, tgt_defects=None, init_fields=None):
    # Exact on sections (the blocks); + c on templates (normalised: they have negative values).
    calls.append((np.asarray(srcs), np.asarray(tgts)))
    template = np.asarray(tgts).reshape(len(tgts), -1).min(axis=1) < 0
    return np.asarray(phase_aligner(srcs, tgts)) + np.where(template[:, None, None, None], c, 0)

  def run(refine):
    cfg = StackConfig(drift=None, block=BlockConfig(aligner=aligner), neighbour_refine=refine)
    return np.asarray(align_stack(sections, block_size=6, overlap=2, voting_distance=1, decay_distance=1e6,
                                  config=cfg, progress=False))

  plain = run(None)
  n_plain = len(calls)
  data = [z for z in range(12) if z != 7]
  np.testing.assert_allclose(plain[data], expected_fields(shifts, 48)[data], atol=1e-4)
  refined = run(RefineConfig(batch=4))
  refine_calls = calls[2 * n_plain:]
  assert len(refine_calls) == 3  # 11 sections with data in batches of 4
  # The blocks are exact, so on their renderings the phase shift to a template is 0: the residual is
  # c, and compose(F, c) = F + c for constant F.
  np.testing.assert_allclose(refined[data], plain[data] + c, atol=1e-4)
  np.testing.assert_array_equal(refined[7], plain[7])
  # The first refined section's template, against the float64 reference from the unrefined fields.
  data_mask = (sections != 0).astype(np.float32)
  wts = neighbour_weights(12, RefineConfig(), np.ones(12) * (np.arange(12) != 7))
  idx = np.clip(np.arange(-2, 3), 0, 11)
  ref, covered = _reference_template(sections[idx], plain[idx].astype(np.float64), data_mask[idx],
                                     wts[0].astype(np.float64), 0.5)
  inner = np.zeros_like(covered)
  inner[4:-4, 4:-4] = True  # away from the edges, where the bilinear data mask sits at the threshold
  np.testing.assert_allclose(refine_calls[0][1][0][inner], ref[inner], atol=1e-4)


def test_default_residual_aligner_is_stiffer_by_the_configured_factor(monkeypatch):
  """The default residual aligner is align_pairs with PairConfig.gammas times `stiffness` (the
  given pair config's other settings kept); a custom aligner is used as it is."""
  from jaxalign.stack import block
  from jaxalign.align.pair import PairConfig
  from jaxalign.stack.refine import refine_aligner
  seen = []
  monkeypatch.setattr(block, "default_aligner", lambda model, pair: seen.append((model, pair)) or "aligner")
  pair = PairConfig(gammas=(1.0, 2.0, 3.0), resolution_nm=(40.0, 4.0, 4.0))
  assert refine_aligner(RefineConfig(stiffness=2.5), None, "model", pair) == "aligner"
  model, got = seen[-1]
  assert model == "model" and got.gammas == pair.gammas and got.resolution_nm == pair.resolution_nm
  assert got.gamma_scale == 2.5
  refine_aligner(RefineConfig(stiffness=3.0))
  assert seen[-1][1].gamma_scale == 3.0
  assert refine_aligner(RefineConfig(), phase_aligner) is phase_aligner


def test_bad_input_is_named():
  with pytest.raises(InputError, match="radius"):
    RefineConfig(radius=0)
  with pytest.raises(InputError, match="sigma"):
    RefineConfig(sigma=float("nan"))
  with pytest.raises(InputError, match="iterations"):
    RefineConfig(iterations=0)
  with pytest.raises(InputError, match="stiffness"):
    RefineConfig(stiffness=0.0)
  with pytest.raises(InputError, match="fields"):
    refine_to_neighbours(np.ones((3, 8, 8), np.float32), np.zeros((3, 8, 9, 2), np.float32), aligner=phase_aligner)
  with pytest.raises(InputError, match="NaN"):
    refine_to_neighbours(np.ones((3, 8, 8), np.float32), np.full((3, 8, 8, 2), np.nan, np.float32),
                         aligner=phase_aligner)
  with pytest.raises(InputError, match="section_weights"):
    neighbour_weights(3, RefineConfig(), [1, -1, 1])


@pytest.mark.parametrize("chunked,drift", [(False, True), (True, True), (False, False)])
def test_volume_pipeline_refines_and_renders(tmp_path, chunked, drift):
  """align_volume with StackConfig.neighbour_refine after drift removal (whole sections, and chunk
  by chunk), with an exact translation aligner that gets one section wrong in the block: the final
  fields are `refine_to_neighbours` of the drift stage's output (DST/work/drifted; without drift
  removal and with two sweeps, of the composed fields DST/work/composed), which pulls that
  section back; the aligned volume is SRC warped by them (float64 SciPy); a re-run skips everything."""
  from jaxalign.volume import distributed as jd, store, pipeline
  from jaxalign.volume.chunked import ChunkConfig
  from jaxalign.stack.drift import DriftConfig
  from tests.references import reference_warp
  z_count, size, bad = 10, (96 if chunked else 64), 6
  shifts = random_shifts(z_count, seed=6, limit=8)
  sections = texture_stack(shifts, size=size)
  sections[bad] += 2.0  # a marker the faulty aligner recognises in any window (alignment ignores the offset)
  src = str(tmp_path / "src")
  store.create_volume(src, sections.shape, "float32", (40, 4, 4)).write(sections)
  error = np.array([2.0, -3.0], np.float32)

  def faulty(srcs, tgts, **kw):
    # Off by `error` whenever section `bad` is aligned to a section (block alignment), not when it is
    # aligned to a template (refinement: normalised, so it has negative values).
    out = np.asarray(phase_aligner(srcs, tgts, **kw)).copy()
    for b in range(len(srcs)):
      if srcs[b].min() > 2.0 and tgts[b].min() >= 0:
        out[b] += error
    return out

  chunk = ChunkConfig(chunk=48, overlap=8, coarse_levels=1, min_coarse_size=32, render_margin=4) if chunked else None
  stack = StackConfig(block=BlockConfig(aligner=faulty), drift=DriftConfig(sigma=1.0) if drift else None,
                      neighbour_refine=RefineConfig(iterations=1 if drift else 2))
  config = pipeline.VolumeConfig(block_size=z_count, overlap=2, decay_distance=1e6, pyramid_levels=1,
                                 starters=(0,), voting_distance=3, chunk=chunk, stack=stack)
  dst = str(tmp_path / "dst")
  stats = jd.RunStats()
  pipeline.align_volume(src, dst, config, progress=False, stats=stats)
  # quality, 1 block, sections, then drift and one refinement sweep, or two sweeps (through
  # DST/work/refined_1).
  assert (stats.executed, stats.batches) == (4 * z_count + 1, 5)
  drifted = store.open_volume(dst + ("/work/drifted" if drift else "/work/composed")).read()
  fields = store.open_volume(dst + "/fields").read()
  # The refinement stage equals refine_to_neighbours (tested above against closed forms) on the
  # drift stage's output; whole sections: it undid most of section `bad`'s error.
  if chunked:
    # Chunk windows may settle a near-tie of the integer aligner differently from whole sections:
    # the stage is compared with the chunked refinement (tested above) of the same windows.
    from jaxalign.volume.chunked import refine_section_chunked
    wts = neighbour_weights(z_count, stack.neighbour_refine)
    expect = np.stack([refine_section_chunked([sections[k] for k in idx], [drifted[k] for k in idx], wts[z],
                                              list(idx).index(z), aligner=faulty, config=chunk)
                       for z in range(z_count) for idx in [np.clip(np.arange(z - 2, z + 3), 0, z_count - 1)]])
  else:
    expect = np.asarray(refine_to_neighbours(sections, drifted, config=stack.neighbour_refine, aligner=faulty))
  np.testing.assert_allclose(fields, expect, atol=1e-4)
  if not chunked:  # (chunked blocks apply the fault in the coarse pass and again in each chunk)
    change = (fields[bad] - drifted[bad])[8:-8, 8:-8].reshape(-1, 2).mean(axis=0)
    np.testing.assert_allclose(change, -error, atol=1.0)
  aligned = store.open_volume(dst + "/aligned").read()
  for z in (0, bad, 9):
    np.testing.assert_allclose(aligned[z], reference_warp(sections[z], fields[z].astype(np.float64)), atol=1e-4)
  stats = jd.RunStats()
  pipeline.align_volume(src, dst, config, progress=False, stats=stats)
  assert stats.executed == 0


@pytest.mark.parametrize("backend, expected", [("cpu", [3]), ("gpu", [8])])
def test_refinement_batch_is_padded_only_where_the_aligner_is_vmapped(monkeypatch, backend, expected):
  """Three sections in batches of 8: three alignments on CPU (pair by pair), one full batch of 8 on
  accelerators (one vmapped compile); the results are the same."""
  from jaxalign.align import pair
  monkeypatch.setattr(pair.jax, "default_backend", lambda: backend)
  sections, fields, exact = (a[:3] for a in _translation_case(outlier=1, error=(0, 0)))
  sizes = []

  def counting(srcs, tgts, **kw):
    sizes.append(len(srcs))
    return phase_aligner(srcs, tgts, **kw)

  out = np.asarray(refine_to_neighbours(sections, fields, aligner=counting, config=RefineConfig(batch=8)))
  assert sizes == expected
  np.testing.assert_allclose(out, exact, atol=1e-4)


def test_two_section_stack_is_not_refined():
  """With two sections each one's template is the other: a Jacobi sweep would swap their
  misregistration. align_stack skips it: one pair alignment (the block's), exact fields."""
  assert not RefineConfig().applies_to(2) and RefineConfig().applies_to(3)
  shifts = random_shifts(2, seed=5, step=2, limit=6)
  sections = texture_stack(shifts, 48, seed=6)
  calls = []

  def counting(srcs, tgts, **kw):
    calls.append(len(srcs))
    return phase_aligner(srcs, tgts, **kw)

  cfg = StackConfig(drift=None, block=BlockConfig(aligner=counting), neighbour_refine=RefineConfig())
  out = np.asarray(align_stack(sections, config=cfg, progress=False))
  assert sum(calls) == 1
  np.testing.assert_allclose(out, expected_fields(shifts, 48), atol=1e-4)
