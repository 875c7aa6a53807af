"""align_stack: block plan and starters, stitching, composition with decay (ABCD).

References are independent: the block partition is checked by brute force over sections, the
composition with decay against a float64 SciPy composition of smooth fields, and align_stack on a
stack of known integer translations against the closed form of decayed translation stitching.
"""

import numpy as np
import pytest
from scipy import ndimage

from jaxalign.stack.block import BlockConfig, align_block
from jaxalign.errors import InputError
from jaxalign.stack.chain import StackConfig, align_block_task, align_stack, choose_starters, compose_with_decay, plan_blocks, section_quality
from tests.references import compose_ref, expected_fields, phase_aligner, random_shifts, texture_stack

SIZE = 64
CFG = StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=phase_aligner))


def _check_partition(plan, z_count, block_size, overlap):
  owners = np.zeros(z_count, int)
  for b in plan.blocks:
    owners[b.own_start:b.own_stop] += 1
    assert b.stop - b.start <= block_size and b.start <= b.starter < b.stop
    if b.index > 0:
      prev = plan.blocks[b.index - 1]
      # The overlap: block N's first `overlap` sections are block N-1's last ones.
      assert list(b.overlap_sections) == list(range(b.start, b.start + overlap))
      assert prev.stop == b.start + overlap and b.starter == b.start
  assert np.all(owners == 1)  # every section gets its final field from exactly one block
  assert plan.blocks[0].start == 0 and plan.blocks[-1].stop == z_count


def test_plan_regular_grid_on_clean_stack():
  choices = choose_starters(np.ones(30), block_size=10, overlap=3)
  assert [c.index for c in choices] == [0, 7, 14, 21]
  plan = plan_blocks(30, [c.index for c in choices], overlap=3, choices=choices)
  assert [(b.start, b.stop, b.own_start, b.own_stop) for b in plan.blocks] == \
      [(0, 10, 0, 10), (7, 17, 10, 17), (14, 24, 17, 24), (21, 30, 24, 30)]
  _check_partition(plan, 30, 10, 3)


def test_starters_avoid_blank_and_defective_sections():
  tissue = np.ones(30)
  defect = np.zeros(30)
  tissue[0] = 0.0  # first section lost
  tissue[7] = 0.2  # mostly missing
  defect[13] = 0.3  # large fold
  choices = choose_starters(tissue, defect, block_size=10, overlap=3, config=StackConfig(drift=None, neighbour_refine=None, starter_search=2))
  starters = [c.index for c in choices]
  # 0 -> 1 (later, block 0 only); 7 -> 6; the next nominal is 6 + 7 = 13 (fold) -> 12; then 19, 26.
  assert starters == [1, 6, 12, 19, 26]
  assert "nominal 7" in choices[1].reason and "defects 0.300" in choices[2].reason
  plan = plan_blocks(30, starters, overlap=3, choices=choices)
  _check_partition(plan, 30, 10, 3)
  assert plan.blocks[0].start == 0 and plan.blocks[0].starter == 1
  assert "starter 6" in plan.describe()


def test_plan_rejects_bad_starters():
  with pytest.raises(InputError, match="increasing"):
    plan_blocks(20, [0, 8, 8], overlap=3)
  with pytest.raises(InputError, match="overlap"):
    plan_blocks(20, [0, 18], overlap=3)
  with pytest.raises(InputError, match="block_size"):
    choose_starters(np.ones(10), block_size=3, overlap=3)


def test_compose_with_decay_limits_match_float64_reference():
  rng = np.random.default_rng(5)
  smooth = lambda s: (s * ndimage.gaussian_filter(rng.standard_normal((32, 32, 2)), (4, 4, 0))).astype(np.float32)
  field, t2, t1 = smooth(20.0), smooth(15.0), smooth(15.0)
  stitches = np.stack([t2, t1])  # nearest interface first
  # Distance 0 everywhere: the plain composition field -> t2 -> t1.
  out0 = np.asarray(compose_with_decay(field, stitches, np.zeros(2, np.float32), decay_distance=100.0))
  ref0 = compose_ref(compose_ref(field.astype(np.float64), t2.astype(np.float64)), t1.astype(np.float64))
  np.testing.assert_allclose(out0, ref0, atol=2e-3)
  # At or beyond decay_distance both stitch fields are gone: the block field alone.
  out_far = np.asarray(compose_with_decay(field, stitches, np.array([100.0, 250.0], np.float32),
                                          decay_distance=100.0))
  np.testing.assert_allclose(out_far, field, atol=1e-5)
  # Half way, for a constant stitch (blur leaves constants alone): gain 1 - d / D exactly.
  const = np.full((2, 32, 32, 2), 4.0, np.float32)
  out_half = np.asarray(compose_with_decay(np.zeros((32, 32, 2), np.float32), const,
                                           np.array([25.0, 75.0], np.float32), decay_distance=100.0))
  np.testing.assert_allclose(out_half, 4.0 * (0.75 + 0.25), atol=1e-4)


@pytest.fixture(scope="module")
def stack():
  shifts = random_shifts(24, seed=2, step=2, limit=8)
  return shifts, texture_stack(shifts, SIZE, seed=3)


def _decayed_translation_reference(shifts, plan, decay_distance):
  """float64 closed form: block field t_{s_N} - t_z plus each stitch t_{s_{k-1}} - t_{s_k} times its gain."""
  t = np.asarray(shifts, np.float64)
  out = np.zeros((len(t), 2))
  for z in range(len(t)):
    b = plan.owner(z)
    out[z] = t[b.starter] - t[z]
    for k in range(1, b.index + 1):
      d = z - plan.interface(k)
      gain = np.clip(1.0 - d / decay_distance, 0.0, 1.0)
      out[z] += gain * (t[plan.blocks[k - 1].starter] - t[plan.blocks[k].starter])
  return out


def test_align_stack_translations_plain_and_decayed(stack):
  shifts, sec = stack
  # Without decay (decay_distance far beyond the stack) the blocks compose exactly into section 0's frame.
  plain, plan = align_stack(sec, block_size=8, overlap=3, decay_distance=1e6, config=CFG, progress=False,
                            return_plan=True)
  assert [b.starter for b in plan.blocks] == [0, 5, 10, 15, 20]
  np.testing.assert_allclose(np.asarray(plain), expected_fields(shifts, SIZE), atol=1e-3)
  assert np.all(np.asarray(plain)[0] == 0)
  # With decay: every stitch is attenuated by its distance from its interface (constant fields, so
  # the blur is inert and the closed form is exact).
  decayed = np.asarray(align_stack(sec, block_size=8, overlap=3, decay_distance=10, config=CFG,
                                   progress=False))
  ref = _decayed_translation_reference(shifts, plan, 10.0)
  np.testing.assert_allclose(decayed, np.broadcast_to(ref[:, None, None], decayed.shape), atol=1e-3)


def test_algebraic_stitch_matches_closed_form_without_extra_alignments(stack):
  """stitch_refine=False: stitch fields come from the two blocks' fields of the overlap sections
  alone (no pair alignment at the interfaces) and reproduce the same float64 closed forms."""
  shifts, sec = stack
  calls = {True: 0, False: 0}

  def run(refine, decay_distance):
    def counting(srcs, tgts, **kw):
      calls[refine] += 1
      return phase_aligner(srcs, tgts, **kw)
    cfg = StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=counting), stitch_refine=refine)
    return align_stack(sec[:13], block_size=8, overlap=3, decay_distance=decay_distance, config=cfg,
                       progress=False, return_plan=True)

  plain, plan = run(False, 1e6)
  np.testing.assert_allclose(np.asarray(plain), expected_fields(shifts[:13], SIZE), atol=1e-3)
  decayed, _ = run(False, 4.0)
  ref = _decayed_translation_reference(shifts[:13], plan, 4.0)
  np.testing.assert_allclose(np.asarray(decayed), np.broadcast_to(ref[:, None, None], decayed.shape), atol=1e-3)
  # The paper's way aligns once more per interface (one batch of overlap pairs); this does not.
  calls[False] //= 2
  run(True, 1e6)
  assert calls[True] - calls[False] == len(plan.blocks) - 1 >= 1


def test_block_task_aligns_sections_before_a_moved_starter(stack):
  shifts, sec = stack
  plan = plan_blocks(8, [2], overlap=3)
  f = np.asarray(align_block_task(sec[:8], plan.blocks[0], voting_distance=3, config=CFG.block))
  d = shifts[2][None] - shifts[:8]
  np.testing.assert_allclose(f, np.broadcast_to(d[:, None, None].astype(np.float64), f.shape), atol=1e-4)


def test_align_stack_with_blank_starter_position(stack):
  shifts, sec = stack
  sec = sec[:12].copy()
  sec[5] = 0.0  # the nominal starter of block 1 is blank
  tissue, defect = section_quality(sec)
  assert tissue[5] == 0 and tissue[4] == 1
  fields, plan = align_stack(sec, block_size=8, overlap=3, decay_distance=1e6, config=CFG, progress=False,
                             return_plan=True)
  assert [b.starter for b in plan.blocks] == [0, 4]
  keep = [z for z in range(12) if z != 5]
  np.testing.assert_allclose(np.asarray(fields)[keep], expected_fields(shifts[:12], SIZE)[keep], atol=1e-3)


@pytest.mark.slow
def test_align_stack_rotations_match_truth_and_single_block():
  """Non-commuting distortions (rotations): blocks + stitching reproduce the exact inverse affine
  fields (float64 matrix inverse) and the single-block run, with a real dense aligner."""
  import jaxalign as ja
  from jaxalign.align.blockmatch import BlockMatchConfig, block_match
  z_count, size = 10, 96
  tex = texture_stack(np.zeros((z_count, 2), int), size, seed=4, change=0.3, smooth=2.0)
  rng = np.random.default_rng(0)
  c = (size - 1) / 2
  mats = [np.array([[1.0, 0, 0], [0, 1.0, 0]])]
  for _ in range(z_count - 1):
    a = np.deg2rad(rng.uniform(-1.5, 1.5))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    mats.append(np.concatenate([rot, (rng.uniform(-3, 3, 2) + c - rot @ [c, c])[:, None]], 1))
  distort = np.stack([np.asarray(ja.from_affine(m.astype(np.float32), (size, size))) for m in mats])
  sec = np.asarray(ja.warp(tex, distort), np.float32)
  inverse = lambda m: np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
  truth = np.stack([np.asarray(ja.from_affine(inverse(m).astype(np.float32), (size, size))) for m in mats])
  bm = BlockMatchConfig(levels=(1, 0, 0), patch=32, stride=16, smooth=1.0)

  def aligner(srcs, tgts, *, src_defects=None, tgt_defects=None, init_fields=None):
    return np.stack([np.asarray(block_match(srcs[i], tgts[i], init_field=init_fields[i], src_defects=src_defects[i],
                                            tgt_defects=tgt_defects[i], config=bm)) for i in range(len(srcs))])

  bc = BlockConfig(aligner=aligner)
  single = np.asarray(align_block(sec, voting_distance=3, config=bc, progress=False))
  blocks = np.asarray(align_stack(sec, block_size=5, overlap=3, decay_distance=1e6,
                                  config=StackConfig(drift=None, neighbour_refine=None, block=bc), progress=False))
  m = 16  # interior: the field at the border is extrapolated
  med = lambda a, b: np.median(np.linalg.norm(a - b, axis=-1)[:, m:-m, m:-m], axis=(1, 2))
  assert med(single, truth).max() < 0.3
  assert med(blocks, truth).max() < 0.3
  assert med(blocks, single).max() < 0.15
