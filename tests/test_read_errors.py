"""Unreadable input data is named, not dumped (issue 20 §6).

A chunk file of a zarr v3 volume overwritten with 50 random bytes (as a truncated upload leaves it):
reads raise `ReadError` naming the volume, section and chunk; `jaxalign eval` and `jaxalign align`
exit 2 with that one line and write nothing; `jaxalign align --on_read_error=missing` aligns the rest
of the stack as if the chunk were blank (bitwise the output of the same stack with that chunk zeroed)
and lists it in its summary.
"""

import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest

from jaxalign.volume import distributed as jd, store
from jaxalign.volume.pyramid import build_pyramid
from jaxalign.volume import pipeline
from jaxalign.stack.block import BlockConfig
from jaxalign.errors import InputError, ReadError
from jaxalign.stack.chain import StackConfig
from tests.references import phase_aligner, random_shifts, texture_stack

REPO = pathlib.Path(__file__).resolve().parents[1]
RES = (40.0, 4.0, 4.0)
TIMEOUT_S = 180
BAD_Z = 2


def corrupt(url: str, z: int, y: int = 0, x: int = 0, level: int = 0) -> pathlib.Path:
  """Overwrites chunk (z, y, x) of a jaxalign zarr v3 volume's `level` with 50 random bytes."""
  path = pathlib.Path(url) / str(level) / "c" / str(z) / str(y) / str(x)
  assert path.is_file(), path
  path.write_bytes(np.random.default_rng(1).integers(0, 256, 50, dtype=np.uint8).tobytes())
  return path


def _stack(z_count: int = 6, size: int = 64) -> np.ndarray:
  return texture_stack(random_shifts(z_count, limit=4, seed=3), size=size)


# ----------------------------------------------------------------------------- io


def test_read_error_names_volume_section_and_chunk(tmp_path):
  url = str(tmp_path / "v")
  data = _stack(3)
  store.create_volume(url, data.shape, "float32", RES, chunks=(1, 32, 32)).write(data)
  path = corrupt(url, 1, 1, 0)
  vol = store.open_volume(url)
  for z in (1, None, slice(0, 3)):  # a multi-section read names the section that fails
    with pytest.raises(ReadError) as e:
      vol.read(z)
    err = e.value
    assert isinstance(err, InputError) and err.z == 1 and err.url == url and err.level == 0
    assert err.chunk == str(path)
    msg = str(err)
    assert "\n" not in msg and url in msg and "section z=1" in msg and str(path) in msg, msg
    assert "ZSTD" in msg and "FAILED_PRECONDITION" not in msg
  again = pickle.loads(pickle.dumps(err))  # crosses process boundaries (process pools, Dask)
  assert type(again) is ReadError and str(again) == msg and again.chunk == err.chunk
  np.testing.assert_array_equal(vol.read(1, box=((0, 32), (0, 64))), data[1, :32])  # other chunks read fine


def test_missing_data_zeroes_only_the_unreadable_chunk_at_every_level(tmp_path):
  url = str(tmp_path / "v")
  data = _stack(2)
  store.create_volume(url, data.shape, "float32", RES, chunks=(1, 32, 32), levels=2).write(data)
  build_pyramid(url, 2, progress=False)
  vol = store.open_volume(url)
  lvl1 = vol.read(level=1)
  corrupt(url, 1, 1, 0)
  (u,) = pipeline.locate_unreadable(vol, 1, 0)
  assert (u.z, u.level, u.y, u.x) == (1, 0, (32, 64), (0, 32)) and u.chunk.endswith("c/1/1/0")
  md = pipeline.MissingData(vol, [u])
  want = data.copy()
  want[1, 32:, :32] = 0
  np.testing.assert_array_equal(md.read(), want)
  np.testing.assert_array_equal(md.read(1), want[1])
  np.testing.assert_array_equal(md.read(slice(0, 2), box=((16, 48), (8, 40))), want[:, 16:48, 8:40])
  want1 = lvl1.copy()
  want1[1, 16:, :16] = 0  # the chunk's region at level 1
  np.testing.assert_array_equal(md.read(level=1), want1)
  assert md.shape(1) == vol.shape(1) and md.levels == 2


# ----------------------------------------------------------------------------- pipeline


CONFIG = pipeline.VolumeConfig(block_size=4, overlap=2, decay_distance=1e6, pyramid_levels=1,
                               stack=StackConfig(drift=None, neighbour_refine=None,
                                                 block=BlockConfig(aligner=phase_aligner)))


def test_missing_aligns_as_if_the_chunk_were_blank(tmp_path):
  data = _stack()
  bad, blank = str(tmp_path / "bad"), str(tmp_path / "blank")
  for url in (bad, blank):
    store.create_volume(url, data.shape, "float32", RES, chunks=(1, 32, 32), levels=2).write(data)
  zeroed = data.copy()
  zeroed[BAD_Z, :32, 32:] = 0
  store.open_volume(blank).write(zeroed)
  for url in (bad, blank):
    build_pyramid(url, 2, progress=False)
  chunk = corrupt(bad, BAD_Z, 0, 1)

  with pytest.raises(ReadError, match=f"section z={BAD_Z}"):
    pipeline.align_volume(bad, str(tmp_path / "stopped"), CONFIG, progress=False)
  assert not (tmp_path / "stopped").exists()  # nothing written

  pipeline.align_volume(blank, str(tmp_path / "ref"), CONFIG, progress=False)
  dst = str(tmp_path / "out")
  pipeline.align_volume(bad, dst, CONFIG, progress=False, on_read_error="missing")
  (u,) = pipeline.read_errors(dst)
  assert (u.z, u.level, u.y, u.x, u.chunk) == (BAD_Z, 0, (0, 32), (32, 64), str(chunk))
  for name in ("fields", "aligned"):
    np.testing.assert_array_equal(store.open_volume(f"{dst}/{name}").read(),
                                  store.open_volume(f"{tmp_path}/ref/{name}").read())
  assert not np.any(store.open_volume(f"{dst}/aligned").read(BAD_Z, box=((0, 16), (48, 64))))

  stats = jd.RunStats()  # a re-run resumes (same unreadable chunks)...
  pipeline.align_volume(bad, dst, CONFIG, progress=False, stats=stats, on_read_error="missing")
  assert stats.executed == 0 and stats.skipped > 0
  store.open_volume(bad).write(data[BAD_Z], BAD_Z)  # ...a repaired input is refused (whole chunks: no read)
  with pytest.raises(InputError, match="different parameters.*unreadable"):
    pipeline.align_volume(bad, dst, CONFIG, progress=False, on_read_error="missing")
  with pytest.raises(InputError, match="on_read_error"):
    pipeline.align_volume(bad, dst, CONFIG, progress=False, on_read_error="skip")


def test_unreadable_coarse_level_is_found_before_anything_is_written(tmp_path):
  data = _stack(4)
  url = str(tmp_path / "v")
  store.create_volume(url, data.shape, "float32", RES, levels=3).write(data)
  build_pyramid(url, 3, progress=False)
  corrupt(url, 1, level=2)  # the quality stage reads the coarsest level
  with pytest.raises(ReadError, match="section z=1 at level 2"):
    pipeline.align_volume(url, str(tmp_path / "d"), CONFIG, progress=False)
  assert not (tmp_path / "d").exists()
  dst = str(tmp_path / "m")
  pipeline.align_volume(url, dst, CONFIG, progress=False, on_read_error="missing")
  assert [(u.z, u.level) for u in pipeline.read_errors(dst)] == [(1, 2)]


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  d = tmp_path_factory.mktemp("read_errors")
  data = (_stack(4) * 100).astype(np.uint8)
  src = str(d / "src")
  store.create_volume(src, data.shape, "uint8", RES).write(data)
  chunk = corrupt(src, BAD_Z)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

  def run(*args):
    return subprocess.run([sys.executable, "-m", "jaxalign", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env, cwd=REPO)

  return d, src, chunk, run


def _one_line_error(r, command: str) -> str:
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"jaxalign {command}: error: "), lines[0]
  return lines[0]


def test_eval_exits_2_naming_volume_section_and_chunk(cli):
  d, src, chunk, run = cli
  line = _one_line_error(run("eval", src, f"--output={d / 'ev'}", "--noprogress"), "eval")
  assert src in line and f"section z={BAD_Z}" in line and str(chunk) in line, line
  assert not (d / "ev").exists()


def test_align_stops_by_default_and_writes_nothing(cli):
  d, src, chunk, run = cli
  line = _one_line_error(run("align", src, str(d / "stopped"), "--noprogress"), "align")
  assert src in line and f"section z={BAD_Z}" in line and str(chunk) in line, line
  assert not (d / "stopped").exists()


def test_align_missing_completes_and_lists_the_section(cli):
  d, src, chunk, run = cli
  dst = d / "missing"
  r = run("align", src, str(dst), "--noprogress", "--on_read_error=missing", "--neighbour_refine=0",
          "--drift_sigma=0", "--voting_distance=1")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"1 chunk(s) in section(s) {BAD_Z}" in r.stdout, r.stdout
  assert f"section {BAD_Z} (level 0" in r.stdout and str(chunk) in r.stdout
  aligned = store.open_volume(str(dst / "aligned")).read()
  assert not np.any(aligned[BAD_Z]) and all(np.any(aligned[z]) for z in range(4) if z != BAD_Z)
  assert np.all(np.isfinite(store.open_volume(str(dst / "fields")).read()))
