"""Progress inside blocks (issue 20 §5): `align_volume` reports each block per section with an ETA,
as a tqdm bar named after the block on the inline executor and as absl log lines from workers
(processes, Dask), and stays silent with progress off. The pair aligner is the fast FFT stand-in.
"""

import functools
import logging
import re

import pytest

from jaxalign.volume import chunking, distributed as jd, store, pipeline
from jaxalign.stack.block import BlockConfig
from jaxalign.volume.chunked import ChunkConfig, align_block_chunked
from jaxalign.stack.chain import StackConfig
from tests.references import phase_aligner, random_shifts, texture_stack

Z, SIZE = 8, 64
CONFIG = pipeline.VolumeConfig(block_size=5, overlap=2, decay_distance=1e6, pyramid_levels=1, starters=(0, 4),
                               stack=StackConfig(drift=None, neighbour_refine=None,
                                                 block=BlockConfig(aligner=phase_aligner)))


def _blocks(plan) -> list[tuple[str, int]]:
  """(bar / log name, sections) per block of a plan."""
  return [(f"block {b.index} (z {b.start}-{b.stop - 1})", b.stop - b.start) for b in plan.blocks]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
  url = str(tmp_path_factory.mktemp("progress") / "src")
  sections = texture_stack(random_shifts(Z, limit=4, seed=5), size=SIZE)
  store.create_volume(url, sections.shape, "float32", (40, 4, 4)).write(sections)
  return url


def _draw_every_update(monkeypatch) -> None:
  """tqdm bars made from here on draw every update (tqdm reads TQDM_* variables only at import)."""
  import tqdm.auto
  monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.auto.tqdm, mininterval=0, miniters=1))


def _bar_counts(err: str, desc: str) -> list[int]:
  """The `done` of every drawn state of the tqdm bar `desc` in captured stderr."""
  return [int(m) for m in re.findall(re.escape(desc) + r":\s+\d+%\|[^|]*\|\s*(\d+)/\d+", err)]


def test_inline_shows_a_bar_per_block_counting_sections(src, tmp_path, capsys, monkeypatch):
  _draw_every_update(monkeypatch)
  plan = pipeline.align_volume(src, str(tmp_path / "dst"), CONFIG, progress=True)
  err = capsys.readouterr().err
  assert len(plan.blocks) == 2
  for desc, n in _blocks(plan):
    assert _bar_counts(err, desc) == list(range(n + 1)), (desc, err[-2000:])
    # tqdm's elapsed<remaining (the ETA) and rate fields on the finished bar
    assert re.search(re.escape(desc) + rf":\s+100%\|[^|]*\|\s*{n}/{n} \[\d\d:\d\d<\d\d:\d\d, [^\]]*section", err)


def test_chunked_block_reports_sections_of_every_chunk():
  # Chunked sections (`VolumeConfig.chunk`): block_task hands the same callback to align_block_chunked,
  # which counts each section of the coarse pass and of every chunk.
  sections = texture_stack(random_shifts(3, limit=4, seed=5), size=SIZE)
  calls = []
  align_block_chunked(sections, voting_distance=1, block_config=BlockConfig(aligner=phase_aligner),
                      config=ChunkConfig(chunk=48, overlap=8, min_coarse_size=16),
                      on_section=lambda done, total: calls.append((done, total)))
  steps = 3 * (len(chunking.split((SIZE, SIZE), 48, 8)) + 1)  # sections x (chunks + the coarse pass)
  assert calls == [(k, steps) for k in range(1, steps + 1)]


def test_progress_off_draws_no_block_bar(src, tmp_path, capsys):
  pipeline.align_volume(src, str(tmp_path / "dst"), CONFIG, progress=False)
  assert "block 0 (z" not in capsys.readouterr().err


def test_workers_log_each_section_with_an_eta(src, tmp_path, caplog):
  pytest.importorskip("distributed")
  caplog.set_level(logging.INFO, logger="absl")
  # Dask threads in this process (fast); worker processes log the same lines to their stderr.
  with jd.DaskExecutor(workers=1, processes=False) as ex:
    assert pipeline.progress_mode(ex, True) == "log" and pipeline.progress_mode(ex, False) == "off"
    plan = pipeline.align_volume(src, str(tmp_path / "dst"), CONFIG, executor=ex, progress=True)
  lines = [r.getMessage() for r in caplog.records]
  for desc, n in _blocks(plan):
    mine = [ln for ln in lines if ln.startswith(desc + ": section ")]
    # the first and the last section always; those between at most every PROGRESS_LOG_INTERVAL_S
    assert mine[0].startswith(f"{desc}: section 1/{n},") and mine[-1].startswith(f"{desc}: section {n}/{n},"), mine
    assert all(re.search(r"s/section, ETA \d+ s$", ln) for ln in mine), mine
  assert pipeline.progress_mode(jd.InlineExecutor(), True) == "bar"


def test_section_progress_logs_every_section_past_the_interval(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  with pipeline.SectionProgress("block 7 (z 0-2)", "log", interval_s=0.0) as p:
    for done in range(1, 4):
      p.update(done, 3)
  got = [r.getMessage() for r in caplog.records if r.getMessage().startswith("block 7")]
  assert [g.split(",")[0] for g in got] == [f"block 7 (z 0-2): section {k}/3" for k in (1, 2, 3)]
  with pytest.raises(ValueError, match="progress mode"):
    pipeline.SectionProgress("x", "loud")


def test_block_with_a_moved_starter_counts_each_section_once():
  from jaxalign.stack.chain import align_block_task, plan_blocks
  block = plan_blocks(5, [2], overlap=2).blocks[0]  # starter 2: aligned forwards and backwards from it
  assert block.starter - block.start == 2
  calls = []
  align_block_task(texture_stack(random_shifts(5, limit=4, seed=5), size=SIZE), block, voting_distance=1,
                   config=BlockConfig(aligner=phase_aligner), on_section=lambda d, t: calls.append((d, t)))
  assert calls == [(k, 5) for k in range(1, 6)]
