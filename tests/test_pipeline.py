"""The volume pipeline (jaxalign.volume.pipeline), chunked sections (jaxalign.volume.chunked) and the align/render CLI.

Stacks are crops of a slowly changing texture at known integer offsets (tests/references.py), so
the exact fields and the exact aligned images are closed forms (NumPy slicing); the pair aligner is
the FFT stand-in, which is exact for integer translations, so these tests check the pipeline's
plumbing (blocks, stitches, composition, rendering, records) and not the finetuner.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxalign.volume import distributed as jd, store, pipeline
from jaxalign.stack.block import BlockConfig
from jaxalign.volume.chunked import ChunkConfig, align_block_chunked, render_chunked
from jaxalign.errors import InputError
from jaxalign.stack.chain import StackConfig
from tests.references import expected_fields, phase_aligner, random_shifts, texture_stack

Z, SIZE = 10, 64
SHIFTS = random_shifts(Z, limit=8)
REPO = pathlib.Path(__file__).resolve().parents[1]
# A huge decay distance keeps stitch fields undecayed, so the exact answer stays a pure translation.
CONFIG = pipeline.VolumeConfig(block_size=5, overlap=2, decay_distance=1e6, pyramid_levels=2,
                               stack=StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=phase_aligner)))


def crashing_aligner(srcs, tgts, **kw):
  """phase_aligner that raises on its Nth call overall (N from $JAXALIGN_TEST_CRASH_AT), once."""
  counter = pathlib.Path(os.environ["JAXALIGN_TEST_CRASH_DIR"]) / "calls"
  n = int(counter.read_text()) + 1 if counter.exists() else 1
  counter.write_text(str(n))
  if n == int(os.environ["JAXALIGN_TEST_CRASH_AT"]):
    raise RuntimeError("simulated crash")
  return phase_aligner(srcs, tgts, **kw)


def expected_aligned(sections, shifts):
  """Section z pulled by the integer field d_z = shifts[0] - shifts[z]: out[r] = S_z[r + d_z], 0 outside."""
  out = np.zeros_like(sections)
  for z, (dy, dx) in enumerate(shifts[0] - shifts):
    h, w = sections.shape[1:]
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[z, ys, xs] = sections[z, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
  return out


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  sections = texture_stack(SHIFTS, size=SIZE)
  src = str(root / "src")
  store.create_volume(src, sections.shape, "float32", (40, 4, 4)).write(sections)
  dst = str(root / "dst")
  stats = jd.RunStats()
  plan = pipeline.align_volume(src, dst, CONFIG, progress=False, stats=stats)
  return dict(root=root, src=src, dst=dst, sections=sections, plan=plan, stats=stats)


def _outputs(dst):
  return store.open_volume(dst + "/fields").read(), store.open_volume(dst + "/aligned").read()


def test_align_volume_recovers_translations_and_renders(aligned_run):
  plan, stats = aligned_run["plan"], aligned_run["stats"]
  assert len(plan.blocks) == 3
  assert (stats.executed, stats.skipped, stats.batches) == (Z + 3 + 2 + Z, 0, 4)
  fields, aligned = _outputs(aligned_run["dst"])
  np.testing.assert_allclose(fields, expected_fields(SHIFTS, SIZE), atol=1e-3)
  ref = expected_aligned(aligned_run["sections"], SHIFTS)
  np.testing.assert_allclose(aligned, ref, atol=1e-4)
  vol = store.open_volume(aligned_run["dst"] + "/aligned")
  assert vol.levels == 2 and vol.resolution_at(1) == (40, 8, 8)
  lvl1 = ref.reshape(Z, SIZE // 2, 2, SIZE // 2, 2).astype(np.float64).mean(axis=(2, 4))
  np.testing.assert_allclose(vol.read(level=1), lvl1, atol=1e-4)


def test_rerun_skips_finished_work_and_redoes_only_a_lost_section(aligned_run):
  dst = aligned_run["dst"]
  before = _outputs(dst)
  stats = jd.RunStats()
  pipeline.align_volume(aligned_run["src"], dst, CONFIG, progress=False, stats=stats)
  assert stats.executed == 0 and stats.skipped == Z + 3 + 2 + Z
  # Lose section 4's output and its record: only that section is recomputed.
  jd.CompletionRecords(dst).kv.delete_range(__import__("tensorstore").KvStore.KeyRange("section/000004",
                                                                                     "section/000005")).result()
  store.open_volume(dst + "/fields").write(np.zeros((SIZE, SIZE, 2), np.float32), 4)
  stats = jd.RunStats()
  pipeline.align_volume(aligned_run["src"], dst, CONFIG, progress=False, stats=stats)
  assert stats.executed == 1
  after = _outputs(dst)
  np.testing.assert_array_equal(after[0], before[0])
  np.testing.assert_array_equal(after[1], before[1])


def test_crashed_run_resumes_without_redoing_finished_blocks(aligned_run, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXALIGN_TEST_CRASH_DIR", str(tmp_path))
  monkeypatch.setenv("JAXALIGN_TEST_CRASH_AT", "6")  # inside block 1 (block 0 makes 4 calls)
  import dataclasses
  config = dataclasses.replace(CONFIG, stack=StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=crashing_aligner)))
  dst = str(tmp_path / "dst")
  with pytest.raises(RuntimeError, match="simulated crash"):
    pipeline.align_volume(aligned_run["src"], dst, config, progress=False)
  assert jd.CompletionRecords(dst).has("block/00000") and not jd.CompletionRecords(dst).has("block/00001")
  stats = jd.RunStats()
  pipeline.align_volume(aligned_run["src"], dst, config, progress=False, stats=stats)
  assert stats.skipped == Z + 1  # quality of every section + block 0
  assert stats.executed == 2 + 2 + Z
  for a, b in zip(_outputs(dst), _outputs(aligned_run["dst"])):
    np.testing.assert_array_equal(a, b)


def test_dask_executor_gives_identical_output(aligned_run, tmp_path):
  pytest.importorskip("distributed")
  dst = str(tmp_path / "dst")
  # Threads keep this test fast (the worker shares this process's compiled functions); process
  # workers and lost workers are covered in tests/test_distributed.py.
  with jd.DaskExecutor(workers=2, processes=False) as ex:
    pipeline.align_volume(aligned_run["src"], dst, CONFIG, executor=ex, progress=False)
  for a, b in zip(_outputs(dst), _outputs(aligned_run["dst"])):
    np.testing.assert_array_equal(a, b)


def test_render_volume_and_parameter_checks(aligned_run, tmp_path):
  out = pipeline.render_volume(aligned_run["src"], aligned_run["dst"] + "/fields", str(tmp_path / "r"),
                               pipeline.VolumeConfig(pyramid_levels=2), progress=False)
  np.testing.assert_array_equal(out.read(), _outputs(aligned_run["dst"])[1])
  import dataclasses
  with pytest.raises(InputError, match="different parameters"):
    pipeline.align_volume(aligned_run["src"], aligned_run["dst"], dataclasses.replace(CONFIG, voting_distance=2),
                          progress=False)
  with pytest.raises(InputError, match="field volume"):
    pipeline.align_volume(aligned_run["dst"] + "/fields", str(tmp_path / "x"), CONFIG, progress=False)


def test_cli_bad_input_exits_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxalign", "align", str(tmp_path / "missing"), str(tmp_path / "d")],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 2 and "missing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- chunked sections


def test_render_chunked_large_displacement_matches_scipy():
  """Chunks of 48 px with a base margin of 4 px render displacements of ~30 px exactly (re-centring)."""
  from scipy.ndimage import map_coordinates
  rng = np.random.default_rng(0)
  h, w = 150, 130
  image = rng.random((h, w)).astype(np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  field = np.stack([25 + 5 * np.sin(yy / 40), -30 + 4 * np.cos(xx / 30)], -1).astype(np.float32)
  ref = map_coordinates(image.astype(np.float64), [yy + field[..., 0], xx + field[..., 1]], order=1,
                        mode="grid-constant", cval=0.0)
  out = render_chunked(image, field, config=ChunkConfig(chunk=48, overlap=4, render_margin=4, batch=4))
  np.testing.assert_allclose(out, ref, atol=5e-5)
  pieces = {}
  render_chunked(image, field, config=ChunkConfig(chunk=48, overlap=4, render_margin=4),
                 sink=lambda core, a: pieces.__setitem__((core[0].start, core[1].start), a))
  assert len(pieces) == 4 * 3 and sum(p.size for p in pieces.values()) == h * w


def test_align_block_chunked_recovers_shifts_larger_than_the_overlap():
  """Shifts up to 45 px with 64-px chunks and a 12-px overlap: re-centred chunks still give the exact
  fields, as whole-section alignment does (away from seams and everywhere here)."""
  shifts = np.array([[0, 0], [20, -25], [35, -45]])
  sections = texture_stack(shifts, size=128, margin=60)
  config = BlockConfig(aligner=phase_aligner)
  fields = align_block_chunked(sections, voting_distance=2, block_config=config,
                               config=ChunkConfig(chunk=64, overlap=12, coarse_levels=2, min_coarse_size=32))
  np.testing.assert_allclose(fields, expected_fields(shifts, 128), atol=1e-4)


def test_pair_aligner_gets_the_volume_resolution(tmp_path):
  # The median stage of the pair aligner depends on the section thickness in pixels: the pipeline
  # passes the volume's resolution at the aligned level unless the config sets one.
  from jaxalign.stack.block import BlockConfig
  from jaxalign.align.pair import PairConfig
  from jaxalign.stack.chain import StackConfig
  url = str(tmp_path / "v")
  store.create_volume(url, (3, 64, 64), "float32", (50, 25, 25), levels=2)
  src = store.open_volume(url)
  pair_cfg = pipeline._block_config(pipeline.VolumeConfig(level=1), src).pair
  assert pair_cfg.resolution_nm == (50.0, 50.0, 50.0) and not pair_cfg.median_active
  assert pipeline._block_config(pipeline.VolumeConfig(), src).pair.median_active  # 2 px thick at level 0
  given = pipeline.VolumeConfig(stack=StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(pair=PairConfig(resolution_nm=(9, 1, 1)))))
  assert pipeline._block_config(given, src).pair.resolution_nm == (9.0, 1.0, 1.0)
  custom = pipeline.VolumeConfig(stack=StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=lambda *a, **k: None)))
  assert pipeline._block_config(custom, src).pair is None
