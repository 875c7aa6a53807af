"""align_block: transitive alignment with vector voting, blank/masked targets, and render.

Expectations are closed forms: sections are crops of one texture at known integer offsets, so the
field of section z into section 0's frame is the constant `shifts[0] - shifts[z]`
(`references.expected_fields`, float64). The pair aligner is an exact FFT cross-correlation
stand-in so these tests check the block logic, not the finetuner.
"""

import numpy as np
import pytest
from scipy import ndimage

from jaxalign.stack.block import BlockConfig, align_block, nearest_valid_voters
from jaxalign.errors import InputError
from jaxalign.stack.render import render
from tests.references import expected_fields, phase_aligner, random_shifts, texture_stack

SIZE = 64
CFG = BlockConfig(aligner=phase_aligner)


@pytest.fixture(scope="module")
def stack():
  shifts = random_shifts(10, seed=1)
  return shifts, texture_stack(shifts, SIZE)


def test_first_section_is_identity_and_translations_recovered_exactly(stack):
  shifts, sec = stack
  fields, infos = align_block(sec, voting_distance=3, config=CFG, progress=False, return_info=True)
  fields = np.asarray(fields)
  assert fields.shape == (10, SIZE, SIZE, 2) and fields.dtype == np.float32
  assert np.all(fields[0] == 0.0)
  np.testing.assert_allclose(fields, expected_fields(shifts, SIZE), atol=1e-4)
  # Transitive voting: section z votes over the previous min(z, 3) sections.
  assert infos[5].targets[:3] == (4, 3, 2) and infos[1].targets == (0,)
  # Rendering with the recovered fields puts every section into section 0's frame: compare with the
  # texture crops at section 0's offset (interior, away from the zero-filled borders).
  out = np.asarray(render(sec, fields))
  m = 12
  corr = [np.corrcoef(out[z, m:-m, m:-m].ravel(), sec[0, m:-m, m:-m].ravel())[0, 1] for z in range(10)]
  assert min(corr) > 0.85  # sections differ by the texture's z-change only (~0.92 neighbours)
  moved = [z for z in range(10) if np.abs(shifts[z] - shifts[0]).max() >= 3]
  raw = [np.corrcoef(sec[z, m:-m, m:-m].ravel(), sec[0, m:-m, m:-m].ravel())[0, 1] for z in moved]
  assert moved and max(raw) < 0.6


def test_outlier_alignment_does_not_propagate_with_three_voters(stack):
  shifts, sec = stack
  bad = 5
  error = np.array([20.0, 20.0], np.float32)

  def failing(srcs, tgts, **kw):
    out = np.array(phase_aligner(srcs, tgts, **kw))
    for b in range(len(srcs)):
      if np.array_equal(np.asarray(srcs[b]), sec[bad]):
        out[b] += error  # this pair alignment fails (e.g. an artifact fooled the aligner)
    return out

  exp = expected_fields(shifts, SIZE)
  err, err_in = {}, {}
  for n in (1, 3):
    f = np.asarray(align_block(sec, voting_distance=n, config=BlockConfig(aligner=failing), progress=False))
    err[n] = np.abs(f - exp).max(axis=(1, 2, 3))
    err_in[n] = np.abs(f - exp)[:, 12:-12, 12:-12].max(axis=(1, 2, 3))
  # Plain sequential alignment: every later section inherits the outlier's error.
  assert np.all(err[1][bad:] > 15.0)
  # Voting: only the outlier itself is wrong; the next sections see a small softmin leak (below),
  # and from 4 sections on nothing is left.
  # Interior only (margin = the largest offset, 12 px): in border strips where farther targets have
  # no data fewer than 3 voters remain, and 2 voters cannot outvote each other.
  others = np.delete(err_in[3], bad)
  assert err[3][bad] > 15.0 and others.max() < 0.5
  assert np.all(err_in[3][bad + 4:] < 1e-4)
  # The leak into section 6 is the softmin's closed form: subsets {3,4} (distance 0) and {5,3}, {5,4}
  # (distance |e|) give the outlier weight 0.5 * 2q / (1 + 2q), q = exp(-|e| / T).
  q = np.exp(-np.linalg.norm(error) / CFG.temperature)
  leak = q / (1 + 2 * q) * error[0]
  f3 = np.asarray(align_block(sec[:bad + 2], voting_distance=3, config=BlockConfig(aligner=failing),
                              progress=False))
  np.testing.assert_allclose(np.median(np.abs(f3[bad + 1] - exp[bad + 1])[12:-12, 12:-12]), leak, rtol=1e-3)


def test_blank_section_and_masked_region_vote_over_sections_with_data(stack):
  shifts, sec = stack
  sec = sec.copy()
  sec[4] = 0.0  # a lost section
  defects = np.zeros(sec.shape, bool)
  defects[6, :, : SIZE // 2] = True  # left half of section 6 masked (fold)
  exp = expected_fields(shifts, SIZE)
  for n in (1, 3):
    f, infos = align_block(sec, voting_distance=n, config=CFG, defects=defects, progress=False,
                           return_info=True)
    f = np.asarray(f)
    assert infos[4].status == "blank" and all(4 not in i.targets for i in infos)
    np.testing.assert_array_equal(f[4], f[3])  # blank: the previous field is carried on
    keep = [z for z in range(10) if z != 4]
    np.testing.assert_allclose(f[keep], exp[keep], atol=1e-4)
    # Section 5 needs sections with data: 3 (and 2, 1 with n = 3), not the blank 4.
    assert infos[5].targets[:n] == tuple(range(3, 3 - n, -1))
  # Section 7 with n = 1: where section 6 is masked it votes with section 5, so both are aligned.
  assert infos[7].targets[:3] == (6, 5, 3)


def test_first_sections_vote_over_what_exists(stack):
  shifts, sec = stack
  f, infos = align_block(sec[:3], voting_distance=5, config=CFG, progress=False, return_info=True)
  assert [i.targets for i in infos] == [(), (0,), (1, 0)]
  np.testing.assert_allclose(np.asarray(f), expected_fields(shifts[:3], SIZE), atol=1e-4)


def test_nearest_valid_voters_matches_loop_reference():
  rng = np.random.default_rng(3)
  valid = rng.random((6, 5, 7)) < 0.4
  voter = np.asarray(nearest_valid_voters(valid, 3))
  for y in range(5):
    for x in range(7):
      hits = [m for m in range(6) if valid[m, y, x]][:3]
      assert [m for m in range(6) if voter[m, y, x]] == hits


def test_render_matches_scipy_map_coordinates():
  rng = np.random.default_rng(4)
  sec = rng.random((3, 24, 20)).astype(np.float32) + 0.5
  fld = (3 * ndimage.gaussian_filter(rng.standard_normal((3, 24, 20, 2)), (0, 3, 3, 0))).astype(np.float32)
  out = np.asarray(render(sec, fld, batch_size=2))  # 2 batches, the last padded
  yy, xx = np.mgrid[:24, :20].astype(np.float64)
  for z in range(3):
    ref = ndimage.map_coordinates(sec[z].astype(np.float64), [yy + fld[z, ..., 0], xx + fld[z, ..., 1]],
                                  order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(out[z], ref, atol=1e-5)


def test_bad_input_raises():
  with pytest.raises(InputError, match="voting_distance"):
    align_block(np.ones((3, 8, 8), np.float32), voting_distance=0, config=CFG)
  with pytest.raises(InputError, match="sections"):
    align_block(np.ones((8, 8), np.float32), config=CFG)
  with pytest.raises(InputError, match="NaN"):
    align_block(np.full((2, 8, 8), np.nan, np.float32), config=CFG)
  with pytest.raises(InputError, match="fields"):
    render(np.ones((2, 8, 8), np.float32), np.zeros((2, 8, 9, 2), np.float32))


@pytest.mark.parametrize("backend, expected", [("cpu", [1, 2, 3]), ("gpu", [3, 3, 3])])
def test_batches_are_padded_only_where_the_aligner_is_vmapped(stack, monkeypatch, backend, expected):
  """On CPU the default aligner runs pair by pair, so a padded batch row is an alignment for
  nothing; on accelerators one vmapped program per batch size wants every batch full."""
  from jaxalign.align import pair
  monkeypatch.setattr(pair.jax, "default_backend", lambda: backend)
  shifts, sec = stack
  sizes = []

  def counting(srcs, tgts, **kw):
    sizes.append(len(srcs))
    return phase_aligner(srcs, tgts, **kw)

  f = align_block(sec[:4], voting_distance=3, config=BlockConfig(aligner=counting), progress=False)
  assert sizes == expected
  np.testing.assert_allclose(np.asarray(f), expected_fields(shifts[:4], SIZE), atol=1e-4)


def test_one_pair_program_for_a_block_with_some_defects(stack, caplog):
  """On a CPU a block in which only some sources have defects compiles the (tear-aware) pair program
  once, not a tear-free one too; pairs without defects still recover the known shifts."""
  import logging

  import jax

  from jaxalign.align.pair import PairConfig
  shifts, sec = stack
  defects = np.zeros(sec[:4].shape, bool)
  defects[2, 20:24, 10:50] = True  # a crack in section 2 only
  cfg = BlockConfig(pair=PairConfig(levels=3))
  jax.clear_caches()  # programs compiled by earlier tests would not be logged
  with caplog.at_level(logging.WARNING), jax.log_compiles(True):
    f = align_block(sec[:4], voting_distance=2, defects=defects, config=cfg, progress=False)
  compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation of jit(_coarse_to_fine)" in r.getMessage()]
  assert len(compiled) == 1, compiled
  ok = np.ones(sec.shape[1:], bool)
  ok[8:-8, 8:-8] = True
  ok[:8] = ok[-8:] = ok[:, :8] = ok[:, -8:] = False
  ok[14:30] = False  # away from the crack
  err = np.linalg.norm(np.asarray(f) - expected_fields(shifts[:4], SIZE), axis=-1)
  assert np.median(err[1][ok]) < 0.3 and np.median(err[3][ok]) < 0.3
