"""Jobs, barriers, completion records, executors and fault tolerance (jaxalign.volume.distributed).

The toy job writes chunk-aligned rows of a zarr array through tensorstore; the expected array is a
closed form computed independently in float64 NumPy, so every executor's output is checked against
the same reference, not against another run of the code.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorstore as ts

from jaxalign import compile_cache
from jaxalign.volume import distributed as jd

ROWS, ROW = 8, 16  # chunk-aligned: one task writes exactly one [ROW, 32] chunk
REPO = pathlib.Path(__file__).resolve().parents[1]


def expected_array() -> np.ndarray:
  """float64 closed form of what the job writes, cast to the stored float32."""
  y, x = np.mgrid[0:ROWS * ROW, 0:32].astype(np.float64)
  return (np.sin(0.1 * y) * np.cos(0.05 * x) + y / 100.0).astype(np.float32)


def _open(url: str, create: bool = False):
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": url}}
  if create:
    return ts.open(spec, create=True, open=True, dtype=ts.float32, shape=[ROWS * ROW, 32],
                   chunk_layout=ts.ChunkLayout(chunk_shape=[ROW, 32])).result()
  return ts.open(spec).result()


def _log(log: str, key: str) -> None:
  with open(log, "a") as f:  # O_APPEND: one short line per write is atomic enough for counting
    f.write(key + "\n")


def write_row(url: str, i: int, log: str, crash_marker: str | None = None) -> float:
  """Task: writes chunk row `i`; with `crash_marker`, the first attempt kills its process instead
  (os._exit: no cleanup, as when a node is preempted or OOM-killed) after a partial write."""
  y, x = np.mgrid[i * ROW:(i + 1) * ROW, 0:32].astype(np.float64)
  block = (np.sin(0.1 * y) * np.cos(0.05 * x) + y / 100.0).astype(np.float32)
  arr = _open(url)
  if crash_marker is not None and not os.path.exists(crash_marker):
    pathlib.Path(crash_marker).touch()
    arr[i * ROW:i * ROW + 3].write(np.full((3, 32), -1, np.float32)).result()  # a torn chunk
    os._exit(17)
  arr[i * ROW:(i + 1) * ROW].write(block).result()
  _log(log, f"row/{i}")
  return float(block.sum())


def row_job(url: str, log: str, crash_at: int | None = None, crash_marker: str | None = None):
  """Two barriers: rows, then a summary task that needs all row results (dynamic dispatch)."""
  sums = yield jd.Batch([jd.Task(f"row/{i}", write_row, (url, i, log),
                                 {"crash_marker": crash_marker} if i == crash_at else {})
                         for i in range(ROWS)], "rows")
  total = yield [jd.Task("total", add_all, (sums, log))]
  return total[0]


def add_all(values, log):
  _log(log, "total")
  return float(np.sum(values))


def _count(log) -> dict:
  lines = pathlib.Path(log).read_text().split() if os.path.exists(log) else []
  return {k: lines.count(k) for k in set(lines)}


def test_inline_job_barriers_records_and_resume(tmp_path):
  url, log = str(tmp_path / "out"), str(tmp_path / "log")
  _open(url, create=True)
  records = jd.CompletionRecords(url)
  stats = jd.RunStats()
  total = jd.run_job(row_job(url, log), jd.InlineExecutor(), records=records, progress=False, stats=stats)
  ref = expected_array()
  np.testing.assert_array_equal(_open(url).read().result(), ref)
  assert total == pytest.approx(ref.astype(np.float64).sum(), rel=1e-6)
  assert (stats.executed, stats.skipped, stats.batches) == (ROWS + 1, 0, 2)
  assert records.keys() == sorted([f"row/{i}" for i in range(ROWS)] + ["total"])
  # A second run skips everything and still returns the job's result (from the records).
  stats2 = jd.RunStats()
  assert jd.run_job(row_job(url, log), records=records, progress=False, stats=stats2) == total
  assert (stats2.executed, stats2.skipped) == (0, ROWS + 1)
  assert all(c == 1 for c in _count(log).values())


def test_task_validation(tmp_path):
  with pytest.raises(TypeError, match="module-level"):
    jd.Task("a", lambda: 1)
  with pytest.raises(ValueError, match="whitespace"):
    jd.Task("a b", add_all)
  with pytest.raises(ValueError, match="duplicate"):
    jd.run_batch([jd.Task("k", add_all, ([1], str(tmp_path / "l")))] * 2, jd.InlineExecutor(), progress=False)
  with pytest.raises(jd.InputError, match="unknown executor"):
    jd.make_executor("threads")


def test_processes_worker_killed_mid_run_equals_serial(tmp_path):
  """A worker dies mid-task (after a torn partial write); the pool is rebuilt, the task re-runs,
  and the output equals the serial reference bit for bit."""
  url, log, marker = str(tmp_path / "out"), str(tmp_path / "log"), str(tmp_path / "crashed")
  _open(url, create=True)
  with jd.ProcessExecutor(workers=2) as ex:
    total = jd.run_job(row_job(url, log, crash_at=3, crash_marker=marker), ex,
                       records=jd.CompletionRecords(url), progress=False)
    assert ex.restarts >= 1
  assert os.path.exists(marker)
  ref = expected_array()
  np.testing.assert_array_equal(_open(url).read().result(), ref)
  assert total == pytest.approx(ref.astype(np.float64).sum(), rel=1e-6)


def test_killed_driver_restarts_without_redoing_finished_tasks(tmp_path):
  """The whole run (driver + inline worker) is killed at row 5; the restarted run completes, no
  finished task is executed again, and the torn chunk is rewritten."""
  url, log, marker = str(tmp_path / "out"), str(tmp_path / "log"), str(tmp_path / "crashed")
  _open(url, create=True)
  script = textwrap.dedent(f"""
    import sys; sys.path.insert(0, {str(REPO)!r})
    from tests.test_distributed import row_job
    from jaxalign.volume import distributed as jd
    jd.run_job(row_job({url!r}, {log!r}, crash_at=5, crash_marker={marker!r}),
               records=jd.CompletionRecords({url!r}), progress=False)
  """)
  first = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
  assert first.returncode == 17, first.stderr.decode()[-2000:]
  assert _count(log) == {f"row/{i}": 1 for i in range(5)}
  stats = jd.RunStats()
  total = jd.run_job(row_job(url, log, crash_at=5, crash_marker=marker), records=jd.CompletionRecords(url),
                     progress=False, stats=stats)
  assert (stats.executed, stats.skipped) == (ROWS - 5 + 1, 5)
  assert _count(log) == {**{f"row/{i}": 1 for i in range(ROWS)}, "total": 1}
  ref = expected_array()
  np.testing.assert_array_equal(_open(url).read().result(), ref)
  assert total == pytest.approx(ref.astype(np.float64).sum(), rel=1e-6)


def test_dask_local_cluster_matches_reference(tmp_path):
  pytest.importorskip("distributed")
  url, log = str(tmp_path / "out"), str(tmp_path / "log")
  _open(url, create=True)
  with jd.make_executor("dask", workers=2) as ex:
    total = jd.run_job(row_job(url, log), ex, records=jd.CompletionRecords(url), progress=False)
  ref = expected_array()
  np.testing.assert_array_equal(_open(url).read().result(), ref)
  assert total == pytest.approx(ref.astype(np.float64).sum(), rel=1e-6)
  assert all(c == 1 for c in _count(log).values())


# ----------------------------------------------------------------------------- volume pipeline on Dask


def killing_aligner(srcs, tgts, **kw):
  """The FFT stand-in aligner (exact for integer shifts), which can kill its own process:
  - $JAXALIGN_TEST_KILL_AT=N (counter in $JAXALIGN_TEST_KILL_DIR): `os._exit` at the Nth call, as
    when the driver of an inline run is killed;
  - $JAXALIGN_TEST_KILL_MARKER: the first call anywhere (marker file absent) SIGKILLs its worker."""
  from tests.references import phase_aligner
  if os.environ.get("JAXALIGN_TEST_KILL_AT"):
    counter = pathlib.Path(os.environ["JAXALIGN_TEST_KILL_DIR"]) / "calls"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    if n == int(os.environ["JAXALIGN_TEST_KILL_AT"]):
      os._exit(17)
  marker = os.environ.get("JAXALIGN_TEST_KILL_MARKER")
  if marker and not os.path.exists(marker):
    pathlib.Path(marker).touch()
    os.kill(os.getpid(), 9)
  return phase_aligner(srcs, tgts, **kw)


def _volume_config():
  from jaxalign.volume import pipeline
  from jaxalign.stack.block import BlockConfig
  from jaxalign.stack.chain import StackConfig
  return pipeline.VolumeConfig(block_size=4, overlap=2, decay_distance=1e6, pyramid_levels=1,
                               stack=StackConfig(drift=None, neighbour_refine=None, block=BlockConfig(aligner=killing_aligner)))


def test_dask_volume_run_survives_killed_driver_and_worker(tmp_path, monkeypatch):
  """align_volume on 6 sections of 64^2: (1) an inline run whose process is killed in block 1;
  (2) its restart on a 2-process Dask LocalCluster, during which a worker is SIGKILLed mid-task.
  The restart skips every recorded task, runs each other task once, and its output equals an
  uninterrupted inline run bit for bit. The Dask workers (and the killed driver) share a JAX
  persistent compilation cache, which must not change a bit either."""
  pytest.importorskip("distributed")
  from jaxalign.volume import store, pipeline
  from tests.references import random_shifts, texture_stack
  sections = texture_stack(random_shifts(6, limit=5), size=64)
  src = str(tmp_path / "src")
  store.create_volume(src, sections.shape, "float32", (40, 4, 4)).write(sections)
  config = _volume_config()
  ref_dst, dst = str(tmp_path / "ref"), str(tmp_path / "dst")
  pipeline.align_volume(src, ref_dst, config, progress=False)  # uninterrupted, no cache, this process
  for k, v in compile_cache.env(tmp_path / "xla_cache", min_compile_seconds=0).items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  # Blocks [0, 4) and [2, 6): block 0 makes 3 pair alignments (one per section), block 1 is killed.
  script = textwrap.dedent(f"""
    import sys; sys.path.insert(0, {str(REPO)!r})
    from tests.test_distributed import _volume_config
    from jaxalign.volume import pipeline
    pipeline.align_volume({src!r}, {dst!r}, _volume_config(), progress=False)
  """)
  env = dict(os.environ, JAXALIGN_TEST_KILL_AT="4", JAXALIGN_TEST_KILL_DIR=str(tmp_path))
  first = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, env=env)
  assert first.returncode == 17, first.stderr.decode()[-2000:]
  done = {k for k in jd.CompletionRecords(dst).keys() if k != "params"}
  assert done == {f"quality/{z:06d}" for z in range(6)} | {"block/00000"}
  marker = str(tmp_path / "worker_killed")
  monkeypatch.setenv("JAXALIGN_TEST_KILL_MARKER", marker)
  stats = jd.RunStats()
  with jd.DaskExecutor(workers=2) as ex:
    pipeline.align_volume(src, dst, config, executor=ex, progress=False, stats=stats)
  assert os.path.exists(marker)  # a worker was killed mid-task (in block 1) and the run went on
  assert (stats.skipped, stats.executed) == (len(done), 1 + 1 + 6)  # block 1, stitch 1, 6 sections
  for name in ("fields", "aligned"):
    np.testing.assert_array_equal(store.open_volume(f"{dst}/{name}").read(), store.open_volume(f"{ref_dst}/{name}").read())
