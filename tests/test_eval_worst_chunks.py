"""`jaxalign eval`'s misalignment list for proofreading (issue 20 §3): the worst CPC chunks as JSON and
as a neuroglancer point-annotation layer.

The volume is one smooth texture repeated in every section (plus a little independent noise), so every
neighbour pair correlates well, except one 128-px chunk of section 2 whose content is shifted by
(17, 23) px: pairs (1, 2) and (2, 3) must be the two worst chunks, at that chunk's centre.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from jaxalign.bench import evaluation
from jaxalign.volume import store

REPO = pathlib.Path(__file__).resolve().parents[1]
RES = (40.0, 16.0, 16.0)  # 16 nm px: CPC runs at level 1 (32 nm) with 64-px chunks = 128 level-0 px
Z, SIZE, SIDE = 5, 512, 128
BAD_Z, BAD_Y, BAD_X = 2, slice(128, 256), slice(256, 384)  # the shifted chunk (row 1, column 2)
TIMEOUT_S = 120


def _volume(url: str) -> None:
  rng = np.random.default_rng(0)
  base = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 3)
  s = np.stack([base + 0.1 * ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 3) for _ in range(Z)])
  s[BAD_Z, BAD_Y, BAD_X] = np.roll(base, (17, 23), axis=(0, 1))[BAD_Y, BAD_X]
  s = (s - s.min()) / (s.max() - s.min()) * 200 + 20  # never 0 (= no data)
  store.create_volume(url, s.shape, "uint8", RES).write(s.astype(np.uint8))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  d = tmp_path_factory.mktemp("worst")
  _volume(str(d / "vol"))
  out = d / "ev"
  r = subprocess.run([sys.executable, "-m", "jaxalign", "eval", str(d / "vol"), f"--output={out}", "--noprogress",
                      "--worst_chunks=5"], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  assert r.returncode == 0, r.stderr[-3000:]
  return r, out


def test_worst_chunks_json_names_the_misaligned_chunk(evaluated):
  r, out = evaluated
  listing = json.loads((out / "worst_chunks.json").read_text())
  assert (listing["level"], listing["chunk"], listing["chunk_level0_px"]) == (1, 64, SIDE)
  assert listing["resolution_nm"] == list(RES)
  chunks = listing["chunks"]
  assert [c["rank"] for c in chunks] == [1, 2, 3, 4, 5]
  assert all(a["cpc"] <= b["cpc"] for a, b in zip(chunks, chunks[1:]))
  worst = chunks[0]
  # the chunk centre, in level-0 voxels, lies in the shifted patch; z is a section of a pair that holds it
  assert BAD_Y.start <= worst["y"] < BAD_Y.stop and BAD_X.start <= worst["x"] < BAD_X.stop
  assert (worst["y"], worst["x"]) == (BAD_Y.start + SIDE // 2, BAD_X.start + SIDE // 2)
  assert worst["z"] in (BAD_Z, BAD_Z + 1) and worst["pair"] == [worst["z"] - 1, worst["z"]]
  # both pairs that see the shifted patch come first, and nothing else is misaligned
  assert sorted(tuple(c["pair"]) for c in chunks[:2]) == [(BAD_Z - 1, BAD_Z), (BAD_Z, BAD_Z + 1)]
  assert all(c["y_range"] == [BAD_Y.start, BAD_Y.stop] and c["x_range"] == [BAD_X.start, BAD_X.stop]
             for c in chunks[:2])
  assert chunks[1]["cpc"] < 0.25 < 0.8 < chunks[2]["cpc"]
  assert "worst chunk: z=" in r.stdout and "worst_chunks.json" in r.stdout
  summary = json.loads((out / "eval.json").read_text())
  assert summary["worst_chunks"]["count"] == 5


def test_annotation_layer_points_at_the_same_chunks(evaluated):
  _, out = evaluated
  chunks = json.loads((out / "worst_chunks.json").read_text())["chunks"]
  state = json.loads((out / "worst_chunks_layer.json").read_text())
  # the same dimensions as `jaxalign view` writes: x, y, z in metres per level-0 voxel
  assert state["dimensions"] == {"x": [RES[2] * 1e-9, "m"], "y": [RES[1] * 1e-9, "m"], "z": [RES[0] * 1e-9, "m"]}
  (layer,) = state["layers"]
  assert layer["type"] == "annotation" and layer["source"][0]["url"] == "local://annotations"
  assert layer["source"][0]["transform"]["outputDimensions"] == state["dimensions"]
  points = [a["point"] for a in layer["annotations"]]
  assert points == [[c["x"] + 0.5, c["y"] + 0.5, c["z"] + 0.5] for c in chunks]  # voxel centres, (x, y, z)
  assert all(a["type"] == "point" for a in layer["annotations"])
  np.testing.assert_allclose([a["props"][0] for a in layer["annotations"]], [c["cpc"] for c in chunks], rtol=1e-6)
  assert state["position"] == points[0]
  ng = pytest.importorskip("neuroglancer", reason="neuroglancer (optional) parses the state when installed")
  parsed = ng.ViewerState(state)
  ann = parsed.layers[layer["name"]].annotations
  assert len(ann) == len(chunks)
  np.testing.assert_allclose(ann[0].point, points[0])


def test_worst_chunks_orders_scored_chunks_and_skips_nan():
  maps = [np.array([[0.9, np.nan], [0.1, 0.5]]), np.array([[np.nan, 0.1], [0.95, -0.2]])]
  got = evaluation.worst_chunks(maps, level=2, chunk=8, count=10)
  assert [(c["cpc"], c["z"]) for c in got] == [(-0.2, 2), (0.1, 1), (0.1, 2), (0.5, 1), (0.9, 1), (0.95, 2)]
  side = 8 * 4  # level-0 px per chunk
  assert (got[0]["y"], got[0]["x"]) == (side + side // 2, side + side // 2)  # chunk (1, 1)
  assert got[0]["y_range"] == [side, 2 * side] and got[0]["pair"] == [1, 2]
  assert len(evaluation.worst_chunks(maps, level=2, chunk=8, count=2)) == 2
  assert evaluation.worst_chunks(maps, level=2, chunk=8, count=0) == []
  assert evaluation.worst_chunks_state([], (40, 4, 4))["layers"][0]["annotations"] == []
