"""Drift removal (`jaxalign.stack.drift`): weights, the removal itself, and its use in align_stack.

References are independent: the drift weights against NumPy's weighted `polyfit` in float64, the
removal against a float64 SciPy composition (`compose(out, drift) == field`) and against the analytic
cases of a drift linear in z (removed exactly) and of translation stacks (closed form).
"""

import numpy as np
import pytest

from jaxalign.stack.block import BlockConfig
from jaxalign.stack.drift import DriftConfig, drift_weights, remove_drift, section_translations, window_indices
from jaxalign.errors import InputError
from jaxalign.stack.chain import StackConfig, align_stack
from tests.references import expected_fields, phase_aligner, random_shifts, texture_stack
from tests.references import smooth_field
from tests.references import compose_ref

SIZE = 48


def _polyfit_drift(values, z, config, section_weights):
  """float64: weighted local polynomial fit of `values [Z]` around z, evaluated at z (np.polyfit)."""
  r = config.radius
  k = np.arange(max(0, z - r), min(len(values), z + r + 1))
  w = np.exp(-0.5 * ((k - z) / config.sigma) ** 2) * section_weights[k]
  keep = w > 0
  degree = min(config.degree, int(keep.sum()) - 1)
  coeffs = np.polyfit((k - z)[keep].astype(np.float64), values[k][keep], degree, w=np.sqrt(w[keep]))
  return coeffs[-1]


@pytest.mark.parametrize("degree", [0, 1, 2])
def test_drift_weights_match_weighted_polyfit(degree):
  rng = np.random.default_rng(degree)
  z_count = 17
  config = DriftConfig(sigma=1.7, degree=degree)
  section_weights = np.ones(z_count)
  section_weights[[3, 4, 11]] = 0.0  # blank sections: left out of every fit
  values = rng.standard_normal(z_count) * 5
  weights = drift_weights(z_count, config, section_weights)
  assert weights.shape == (z_count, 2 * config.radius + 1)
  for z in range(z_count):
    mine = weights[z] @ values[window_indices(z, z_count, config.radius)]
    np.testing.assert_allclose(mine, _polyfit_drift(values, z, config, section_weights), atol=1e-9)
  # A row reproduces polynomials of its degree: a drift of that degree is the drift estimate itself.
  poly = 0.3 * np.arange(z_count) ** degree + 2.0
  est = np.array([weights[z] @ poly[window_indices(z, z_count, config.radius)] for z in range(z_count)])
  np.testing.assert_allclose(est, poly, rtol=1e-9)


def test_linear_nonrigid_drift_is_removed_and_the_rest_kept():
  """fields[z] = compose(G_z, (z / Z) * S): independent per-section distortions G_z and a smooth
  non-rigid drift S growing linearly with z. Removing the drift leaves fields whose composition
  with the estimated drift gives back the input (float64 SciPy), and a pure linear drift goes
  entirely (degree 1: exact at the stack's ends too)."""
  rng = np.random.default_rng(0)
  z_count = 12
  drift_shape = smooth_field(rng, (SIZE, SIZE), 8.0, 8.0)
  drift = np.stack([drift_shape * z / z_count for z in range(z_count)])
  config = DriftConfig(sigma=2.0, degree=1, keep_translation=False)

  # Pure linear drift: removed to within the inverse's accuracy, interior pixels.
  out = np.asarray(remove_drift(drift.astype(np.float32), config=config))
  inner = (slice(None), slice(10, -10), slice(10, -10))
  assert np.abs(out[inner]).max() < 0.05, np.abs(out[inner]).max()

  # With per-section distortions: compose(out_z, L_z) == fields_z, L from float64 weights.
  distortions = np.stack([smooth_field(rng, (SIZE, SIZE), 2.0, 6.0) for _ in range(z_count)])
  fields = np.stack([compose_ref(distortions[z], drift[z]) for z in range(z_count)])
  out = np.asarray(remove_drift(fields.astype(np.float32), config=config))
  weights = drift_weights(z_count, config)
  for z in range(z_count):
    est = np.tensordot(weights[z], fields[window_indices(z, z_count, config.radius)], axes=1)
    back = compose_ref(out[z].astype(np.float64), est)
    np.testing.assert_allclose(back[10:-10, 10:-10], fields[z][10:-10, 10:-10], atol=0.05)
    # What is left is the distortion minus the neighbours' average distortion, not the drift.
    left = out[z] - (distortions[z] - np.tensordot(weights[z], distortions[window_indices(z, z_count, config.radius)], axes=1))
    assert np.median(np.linalg.norm(left[10:-10, 10:-10], axis=-1)) < 0.3


def test_translations_and_their_steps_are_kept_the_nonrigid_drift_removed():
  """fields[z] = t_z + (z / Z) * S with S a smooth non-rigid field of zero mean and t_z a translation
  path with a 12-px step (a section moved during acquisition). The default fit leaves each section's
  mean translation out: the output keeps t_z exactly in the mean (so the step is not smeared over
  the neighbours) and loses the non-rigid drift; without it, the step leaks into the neighbours."""
  rng = np.random.default_rng(5)
  z_count = 15
  shape = smooth_field(rng, (SIZE, SIZE), 6.0, 8.0)
  shape -= shape.mean(axis=(0, 1))
  t = np.zeros((z_count, 2))
  t[:, 1] = 0.3 * np.arange(z_count)
  t[8:, 0] += 12.0
  fields = np.stack([t[z] + shape * z / z_count for z in range(z_count)]).astype(np.float32)
  out = np.asarray(remove_drift(fields, config=DriftConfig(sigma=2.0)))
  inner = (slice(None), slice(10, -10), slice(10, -10))
  # The non-rigid part: a linear drift is removed exactly, what is left is the translation.
  np.testing.assert_allclose(out[inner], np.broadcast_to(t[:, None, None], out[inner].shape), atol=0.05)
  # Without keep_translation the local-linear fit smears the step: sections 7 and 8 end up 2.4 px
  # off their (exact) relative translation.
  plain = np.asarray(remove_drift(fields, config=DriftConfig(sigma=2.0, keep_translation=False)))
  step = (plain[8] - plain[7])[inner[1:]].mean(axis=(0, 1))[0]
  assert abs(step - 12.0) > 1.5, step
  np.testing.assert_allclose(section_translations(fields), t, atol=1e-4)


def test_blank_sections_do_not_enter_the_estimate():
  rng = np.random.default_rng(1)
  fields = rng.normal(size=(9, 8, 8, 2)).astype(np.float32)
  cfg = DriftConfig(sigma=1.0, degree=0)
  weights = np.ones(9)
  weights[4] = 0
  a = np.asarray(remove_drift(fields, config=cfg, section_weights=weights))
  changed = fields.copy()
  changed[4] += 50.0  # whatever the blank section carries
  b = np.asarray(remove_drift(changed, config=cfg, section_weights=weights))
  others = [z for z in range(9) if z != 4]
  np.testing.assert_allclose(a[others], b[others], atol=1e-5)


def test_bad_input_is_named():
  with pytest.raises(InputError, match="sigma"):
    DriftConfig(sigma=0)
  with pytest.raises(InputError, match="degree"):
    DriftConfig(degree=3)
  with pytest.raises(InputError, match="Z, H, W, 2"):
    remove_drift(np.zeros((8, 8, 2), np.float32))
  with pytest.raises(InputError, match="NaN"):
    remove_drift(np.full((3, 8, 8, 2), np.nan, np.float32))
  with pytest.raises(InputError, match="section_weights"):
    remove_drift(np.zeros((3, 8, 8, 2), np.float32), section_weights=[1, -1, 1])


def _translation_reference(truth, config):
  """float64 `[Z, 2]`: constant fields `truth` with their drift (weighted polyfit) taken out; for
  translations `compose(F, invert(L))` is exactly `F - L`."""
  ones = np.ones(len(truth))
  return np.array([[truth[z, c] - _polyfit_drift(truth[:, c], z, config, ones) for c in range(2)]
                   for z in range(len(truth))])


def _biased(bias):
  """The exact translation aligner plus a constant `bias` per pair alignment: a stand-in for an
  aligner that follows the tissue a little at every step, so a chain drifts linearly."""
  def aligner(srcs, tgts, **kw):
    return np.asarray(phase_aligner(srcs, tgts, **kw)) + np.asarray(bias, np.float32)
  return aligner


def test_align_stack_drift_removal_makes_blocks_match_a_single_block():
  """Blocks restart the drift at each starter, so with a drifting aligner they depart from a single
  block; with drift removal both equal the closed form truth - lowpass(truth) away from interfaces."""
  z_count, block_size, size, decay = 34, 16, 96, 2.0
  shifts = random_shifts(z_count, seed=4, step=2, limit=6)
  sec = texture_stack(shifts, size, seed=5, margin=48)
  # Integer, so every rendering stays exact and the chain's drift is exactly linear.
  bias = np.array([1.0, 0.0])
  # The drift here is a translation, which the default keeps (`keep_translation`).
  drift_cfg = DriftConfig(sigma=1.0, degree=1, keep_translation=False)

  def run(block, drift, decay=1e6):
    cfg = StackConfig(neighbour_refine=None, block=BlockConfig(aligner=_biased(bias)), drift=drift)
    return align_stack(sec, block_size=block, overlap=3, voting_distance=1, decay_distance=decay,
                       config=cfg, progress=False, return_plan=True)

  single, _ = run(z_count, None)
  blocks, plan = run(block_size, None, decay=decay)
  truth = expected_fields(shifts, size)[:, 0, 0]  # [Z, 2] float64
  # The single chain drifts by the bias at every section; the blocks restart and decay it away.
  np.testing.assert_allclose(np.asarray(single)[:, 0, 0], truth + np.arange(z_count)[:, None] * bias, atol=1e-3)
  interfaces = [plan.interface(k) for k in range(1, len(plan.blocks))]
  # The blocks' fields are linear in z between breaks: a jump between the last section of block N
  # and the interface (the first of block N+1), and a kink where the decayed stitch reaches 0. A
  # local-linear fit is exact where its window spans neither.
  r = drift_cfg.radius
  far = [z for z in range(interfaces[0], z_count)
         if all(i <= z - r or i - 1 >= z + r for i in interfaces)
         and all(i + decay <= z - r or i + decay >= z + r for i in interfaces)]
  assert len(far) >= 5, far
  gap = np.abs(np.asarray(blocks)[far, 0, 0] - np.asarray(single)[far, 0, 0]).max()
  assert gap > 2.0, gap

  single_d, _ = run(z_count, drift_cfg)
  blocks_d, _ = run(block_size, drift_cfg, decay=decay)
  ref = _translation_reference(truth, drift_cfg)
  np.testing.assert_allclose(np.asarray(single_d)[:, 0, 0], ref, atol=1e-3)
  np.testing.assert_allclose(np.asarray(blocks_d)[far, 0, 0], ref[far], atol=1e-3)


def test_chunked_removal_matches_the_whole_section():
  """Chunk cores (with margins grown to the drift, up to ~20 px here) equal the whole-section result."""
  from jaxalign.volume.chunked import ChunkConfig, remove_drift_chunked
  rng = np.random.default_rng(3)
  z_count, h, w = 7, 150, 130
  fields = np.stack([smooth_field(rng, (h, w), 4.0 + 3.0 * z, 20.0) for z in range(z_count)]).astype(np.float32)
  for config in (DriftConfig(sigma=1.0), DriftConfig(sigma=1.0, keep_translation=False)):
    whole = np.asarray(remove_drift(fields, config=config))
    weights = drift_weights(z_count, config)
    shifts = section_translations(fields) if config.keep_translation else None
    for z in (0, 3, 6):
      idx = window_indices(z, z_count, config.radius)
      out = remove_drift_chunked(fields[z], [fields[k] for k in idx], weights[z],
                                 translations=None if shifts is None else shifts[idx],
                                 config=ChunkConfig(chunk=48, overlap=8, render_margin=4))
      np.testing.assert_allclose(out, whole[z], atol=1e-3)


@pytest.mark.parametrize("chunked", [False, True])
def test_volume_pipeline_removes_drift_and_renders(tmp_path, chunked):
  """align_volume with StackConfig.drift (whole sections, and every stage chunk by chunk): fields
  are the closed form truth - lowpass(truth) (exact translation aligner), the aligned volume is SRC
  warped by them (float64 SciPy), and a re-run skips everything."""
  from jaxalign.volume import distributed as jd, store, pipeline
  from jaxalign.volume.chunked import ChunkConfig
  from tests.references import reference_warp
  z_count, size = 10, (192 if chunked else 64)
  shifts = random_shifts(z_count, seed=6, limit=8)
  sections = texture_stack(shifts, size=size)
  src = str(tmp_path / "src")
  store.create_volume(src, sections.shape, "float32", (40, 4, 4)).write(sections)
  # Its 7-section window fits the 10 sections; translations (all there is here) are not kept.
  drift_cfg = DriftConfig(sigma=1.0, degree=1, keep_translation=False)
  chunk = ChunkConfig(chunk=96, overlap=16, coarse_levels=1, min_coarse_size=64) if chunked else None
  config = pipeline.VolumeConfig(block_size=5, overlap=2, decay_distance=1e6, pyramid_levels=1, starters=(0, 3, 6),
                                 chunk=chunk,
                                 stack=StackConfig(neighbour_refine=None, block=BlockConfig(aligner=phase_aligner), drift=drift_cfg))
  dst = str(tmp_path / "dst")
  stats = jd.RunStats()
  pipeline.align_volume(src, dst, config, progress=False, stats=stats)
  # quality (always, for the drift weights), 3 blocks, 2 stitches, sections, drift.
  assert (stats.executed, stats.batches) == (z_count + 3 + 2 + z_count + z_count, 5)
  truth = expected_fields(shifts, size)[:, 0, 0]
  ref = _translation_reference(truth, drift_cfg)
  fields = store.open_volume(dst + "/fields").read()
  np.testing.assert_allclose(fields, np.broadcast_to(ref[:, None, None], fields.shape), atol=1e-3)
  aligned = store.open_volume(dst + "/aligned").read()
  for z in (0, 4, 9):
    np.testing.assert_allclose(aligned[z], reference_warp(sections[z], fields[z].astype(np.float64)), atol=1e-4)
  stats = jd.RunStats()
  pipeline.align_volume(src, dst, config, progress=False, stats=stats)
  assert stats.executed == 0
