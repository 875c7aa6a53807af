"""`jaxalign view`: neuroglancer_precomputed copies and the neuroglancer state/link."""

import json
import urllib.parse

import numpy as np
import pytest
import tensorstore as ts

from jaxalign import io
from jaxalign.commands import view
from jaxalign.errors import InputError

RES = (40.0, 6.0, 4.0)


@pytest.fixture
def volumes(tmp_path):
  rng = np.random.default_rng(1)
  img = rng.uniform(0.1, 1, (3, 40, 48)).astype(np.float32)
  fld = rng.normal(0, 3, (3, 40, 48, 2)).astype(np.float32)
  io.create_volume(str(tmp_path / "raw"), img.shape, "float32", RES).write(img)
  io.create_volume(str(tmp_path / "fld"), fld.shape, "float32", RES, kind="field").write(fld)
  return tmp_path, img, fld


def test_view_writes_precomputed_and_state(volumes):
  d, img, fld = volumes
  out = d / "ng"
  state = view.write_view(str(out), {"raw": str(d / "raw"), "field": str(d / "fld")}, port=8123, progress=False)
  # read back with plain tensorstore (no jaxalign): precomputed is [x, y, z, channel]
  raw = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/raw"}).result().read().result()
  np.testing.assert_array_equal(raw[..., 0].transpose(2, 1, 0), img)
  f = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/field"}).result().read().result()
  np.testing.assert_array_equal(f.transpose(2, 1, 0, 3), fld)
  info = json.loads((out / "raw" / "info").read_text())
  assert info["scales"][0]["resolution"] == [4.0, 6.0, 40.0]
  assert json.loads((out / view.STATE_FILE).read_text()) == state
  assert [ly["source"] for ly in state["layers"]] == ["precomputed://http://localhost:8123/raw",
                                                        "precomputed://http://localhost:8123/field"]
  assert state["dimensions"] == {"x": [4e-9, "m"], "y": [6e-9, "m"], "z": [4e-8, "m"]}
  assert state["position"] == [24.0, 20.0, 1.5]
  link = view.neuroglancer_link(state)
  assert link.startswith(view.NEUROGLANCER_APP + "/#!")
  assert json.loads(urllib.parse.unquote(link.split("#!", 1)[1])) == state


def test_view_refuses_to_clobber_foreign_folder(volumes):
  d, _, _ = volumes
  (d / "mine").mkdir()
  (d / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(InputError, match="not written by jaxalign view"):
    view.write_view(str(d / "mine"), {"raw": str(d / "raw")}, progress=False)
  assert [p.name for p in (d / "mine").iterdir()] == ["notes.txt"]
