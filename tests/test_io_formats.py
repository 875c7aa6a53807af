"""Volumes other tools write open in place: plain zarr v2 / v3 arrays, OME-Zarr 0.4 / 0.5, N5 (n5-viewer,
BigDataViewer); values and nm resolution match what was written. jaxalign's own zarr volumes read back
through ome-zarr-py. A missing resolution is an InputError naming --resolution, also on the command line."""

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts
from PIL import Image

from jaxalign.volume import store
from jaxalign.volume.pyramid import build_pyramid
from jaxalign.errors import InputError

REPO = pathlib.Path(__file__).resolve().parents[1]
RES = (50.0, 4.0, 6.0)  # z, y, x nm; y != x so axis mix-ups show
SHAPE = (3, 10, 12)  # [Z, Y, X]; H != W so transposes show
TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _no_resolution_from_the_environment(monkeypatch):
  monkeypatch.delenv(store.RESOLUTION_ENV, raising=False)


def _image(shape=SHAPE, dtype=np.uint16, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(1, 1000, size=shape).astype(dtype)


def _ts_write(path, data: np.ndarray, driver: str, **metadata) -> None:
  """Writes `data` as it is (on-disk axis order = data's) with tensorstore alone, no jaxalign metadata."""
  metadata = dict(metadata, **{"dimensions" if driver == "n5" else "shape": list(data.shape)})
  if driver == "n5":
    metadata.update(blockSize=[max(1, s // 2) for s in data.shape], compression={"type": "raw"})
  spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(path)}, "dtype": data.dtype.name,
          "metadata": metadata, "create": True, "delete_existing": True}
  ts.open(spec).result().write(data).result()


def _write_json(path: pathlib.Path, name: str, obj: dict) -> None:
  path.mkdir(parents=True, exist_ok=True)
  (path / name).write_text(json.dumps(obj))


def _mip(img: np.ndarray) -> np.ndarray:
  """A level-1 stand-in (any array of the right shape: the test only checks it comes back)."""
  return img[:, ::2, ::2].copy()


# ----------------------------------------------------------------------------------------------
# Plain arrays


@pytest.mark.parametrize("writer", ["tensorstore-zarr2", "tensorstore-zarr3", "zarr-v2", "zarr-v3"])
def test_plain_zarr_array_without_attributes(tmp_path, writer):
  img = _image()
  url = tmp_path / "plain.zarr"
  if writer.startswith("tensorstore"):
    _ts_write(url, img, "zarr" if writer.endswith("zarr2") else "zarr3")
  else:
    zarr = pytest.importorskip("zarr")
    a = zarr.create_array(str(url), shape=img.shape, chunks=(1, 8, 8), dtype=img.dtype,
                          zarr_format=2 if writer == "zarr-v2" else 3)
    a[:] = img
  with pytest.raises(InputError, match="--resolution"):
    store.open_volume(str(url))
  vol = store.open_volume(str(url), resolution=RES)
  assert vol.layout == "array" and vol.format == ("zarr2" if writer.endswith(("zarr2", "v2")) else "zarr3")
  assert vol.kind == "image" and vol.dtype == np.uint16 and vol.levels == 1
  assert vol.shape() == SHAPE and vol.resolution == RES
  assert np.array_equal(vol.read(), img)
  assert np.array_equal(vol.read(1, box=((2, 9), (3, 11))), img[1, 2:9, 3:11])


def test_tensorstore_units_and_funlib_resolution_are_read(tmp_path):
  img = _image()
  # tensorstore zarr3: attributes.dimension_units (any length unit)
  ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "units.zarr")},
           "create": True, "dtype": "uint16", "schema": {"domain": {"shape": list(SHAPE)},
                                                         "dimension_units": ["0.05um", "4nm", "60 angstrom"]}}
          ).result().write(img).result()
  vol = store.open_volume(str(tmp_path / "units.zarr"))
  assert vol.resolution == RES and np.array_equal(vol.read(), img)
  # the caller's resolution wins over the recorded one
  assert store.open_volume(str(tmp_path / "units.zarr"), resolution=(40, 8, 8)).resolution == (40.0, 8.0, 8.0)
  # zarr v2 with funlib / gunpowder `.zattrs` {"resolution": [z, y, x]} (nm)
  _ts_write(tmp_path / "funlib.zarr", img, "zarr")
  (tmp_path / "funlib.zarr" / ".zattrs").write_text(json.dumps({"resolution": list(RES), "offset": [0, 0, 0]}))
  assert store.open_volume(str(tmp_path / "funlib.zarr")).resolution == RES


@pytest.mark.parametrize("trailing", [True, False])
def test_plain_4d_field_array(tmp_path, trailing):
  field = np.random.default_rng(1).normal(size=SHAPE + (2,)).astype(np.float32)
  disk = field if trailing else np.moveaxis(field, -1, 0)  # [Z, Y, X, 2] or channels-first [2, Z, Y, X]
  _ts_write(tmp_path / "f.zarr", disk, "zarr3")
  vol = store.open_volume(str(tmp_path / "f.zarr"), resolution=RES)
  assert vol.kind == "field" and vol.is_field and vol.shape() == SHAPE + (2,)
  assert np.array_equal(vol.read(), field)
  # a 4-d array whose layout is not obvious is refused with the reason
  _ts_write(tmp_path / "odd.zarr", np.zeros((2, 4, 5, 2), np.float32), "zarr3")
  with pytest.raises(InputError, match="axes"):
    store.open_volume(str(tmp_path / "odd.zarr"), resolution=RES)


# ----------------------------------------------------------------------------------------------
# OME-Zarr


def _ome_multiscales(axes, scales, paths=("0", "1"), version=None) -> list:
  ms = {"name": "em", "axes": axes, "datasets": [
      {"path": p, "coordinateTransformations": [{"type": "scale", "scale": s}]} for p, s in zip(paths, scales)]}
  if version:
    ms["version"] = version
  return [ms]


def test_ome_zarr_04_tczyx_hand_built(tmp_path):
  img = _image()
  url = tmp_path / "ome04.zarr"
  axes = [{"name": "t", "type": "time", "unit": "second"}, {"name": "c", "type": "channel"}] + [
      {"name": n, "type": "space", "unit": "micrometer"} for n in ("z", "y", "x")]
  um = [r / 1000 for r in RES]
  scales = [[1, 1] + um, [1, 1, um[0], um[1] * 2, um[2] * 2]]
  levels = [img, _mip(img)]
  for k, data in enumerate(levels):
    _ts_write(url / str(k), data[None, None], "zarr")  # [1, 1, Z, Y, X], no dimension names
  (url / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
  (url / ".zattrs").write_text(json.dumps({"multiscales": _ome_multiscales(axes, scales, version="0.4")}))
  vol = store.open_volume(str(url))
  assert vol.layout == "ome-zarr 0.4" and vol.format == "zarr2" and vol.levels == 2
  assert vol.resolution == RES and vol.resolution_at(1) == (50.0, 8.0, 12.0)
  for k, data in enumerate(levels):
    assert vol.shape(k) == data.shape and np.array_equal(vol.read(level=k), data)
  # one dataset of the image: axes and resolution come from the image's metadata
  one = store.open_volume(str(url / "1"))
  assert one.resolution == (50.0, 8.0, 12.0) and np.array_equal(one.read(), levels[1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ome-zarr-py's own Scaler default
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_written_by_ome_zarr_py(tmp_path, version):
  pytest.importorskip("ome_zarr")
  zarr = pytest.importorskip("zarr")
  from ome_zarr import format as ome_format
  from ome_zarr.writer import write_image
  fmt = ome_format.FormatV04() if version == "0.4" else ome_format.FormatV05()
  img = _image(shape=(3, 9, 11))  # odd: ome-zarr-py rounds level 1 down and records the size ratio
  group = zarr.open_group(str(tmp_path / "w.zarr"), mode="w", zarr_format=fmt.zarr_format)
  write_image(img, group, scale_factors=(2,), fmt=fmt, axes="zyx",
              scale={"z": 0.05, "y": 0.004, "x": 0.006}, axes_units={a: "micrometer" for a in "zyx"})
  vol = store.open_volume(str(tmp_path / "w.zarr"))
  assert vol.layout == f"ome-zarr {version}" and vol.resolution == RES and vol.levels == 2
  assert np.array_equal(vol.read(), img)
  multiscales = group.attrs["multiscales"] if version == "0.4" else group.attrs["ome"]["multiscales"]
  written = np.asarray(group[multiscales[0]["datasets"][1]["path"]][:])
  assert vol.shape(1) == written.shape == (3, 4, 5) and np.array_equal(vol.read(level=1), written)


def test_ome_zarr_05_czyx_hand_built(tmp_path):
  img = _image(dtype=np.uint8)
  url = tmp_path / "ome05.zarr"
  axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
  levels = [img, _mip(img)]
  scales = [[1, *RES], [1, RES[0], RES[1] * 2, RES[2] * 2]]
  for k, data in enumerate(levels):
    _ts_write(url / f"s{k}", data[None], "zarr3", dimension_names=["c", "z", "y", "x"])
  _write_json(url, "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {
      "ome": {"version": "0.5", "multiscales": _ome_multiscales(axes, scales, paths=("s0", "s1"))}}})
  vol = store.open_volume(str(url))
  assert vol.layout == "ome-zarr 0.5" and vol.format == "zarr3" and vol.dtype == np.uint8
  assert vol.levels == 2 and vol.resolution == RES
  for k, data in enumerate(levels):
    assert np.array_equal(vol.read(level=k), data)
  assert np.array_equal(vol.read(2, level=1, box=((1, 4), (2, 6))), levels[1][2, 1:4, 2:6])


def test_ome_zarr_without_units_needs_the_resolution(tmp_path):
  img = _image()
  url = tmp_path / "nounits.zarr"
  _ts_write(url / "0", img, "zarr3", dimension_names=["z", "y", "x"])
  axes = [{"name": n, "type": "space"} for n in "zyx"]
  _write_json(url, "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {
      "ome": {"version": "0.5", "multiscales": _ome_multiscales(axes, [[1, 1, 1]], paths=("0",))}}})
  with pytest.raises(InputError, match=r"unit.*--resolution"):
    store.open_volume(str(url))
  assert store.open_volume(str(url), resolution=RES).resolution == RES


def test_jaxalign_zarr_is_read_by_ome_zarr_py(tmp_path):
  pytest.importorskip("ome_zarr")
  from ome_zarr.io import parse_url
  from ome_zarr.reader import Reader
  img = _image(shape=(3, 20, 24), dtype=np.uint8)
  for fmt in ("zarr", "zarr3"):
    url = str(tmp_path / f"{fmt}.zarr")
    vol = store.create_volume(url, img.shape, np.uint8, RES, chunks=(1, 8, 8), format=fmt, levels=2)
    vol.write(img)
    vol = build_pyramid(vol, 2, progress=False)
    node = next(iter(Reader(parse_url(url))()))
    assert [a["unit"] for a in node.metadata["axes"]] == ["nanometer"] * 3
    for k in range(2):
      assert np.array_equal(np.asarray(node.data[k]), vol.read(level=k))
      scale = [t for t in node.metadata["coordinateTransformations"][k] if t["type"] == "scale"][0]["scale"]
      assert tuple(scale) == vol.resolution_at(k)
  assert np.array_equal(np.asarray(node.data[0]), img)


# ----------------------------------------------------------------------------------------------
# N5


@pytest.mark.parametrize("layout", ["n5-viewer", "bigdataviewer"])
def test_n5_multiscale(tmp_path, layout):
  img = _image()
  levels = [img, _mip(img)]
  url = tmp_path / "em.n5"
  xyz = [RES[2], RES[1], RES[0]]
  if layout == "n5-viewer":
    root, group = url, {"n5": "2.0.0", "scales": [[1, 1, 1], [2, 2, 1]],
                        "pixelResolution": {"unit": "um", "dimensions": [r / 1000 for r in xyz]}}
    _write_json(url, "attributes.json", group)
  else:  # setup0 holds the factors, timepoint0 Paintera's resolution (nm, no unit)
    root = url / "setup0" / "timepoint0"
    _write_json(url, "attributes.json", {"n5": "2.0.0"})
    _write_json(url / "setup0", "attributes.json",
                {"downsamplingFactors": [[1, 1, 1], [2, 2, 1]], "dataType": "uint16"})
    _write_json(root, "attributes.json", {"multiScale": True, "resolution": xyz})
  for k, data in enumerate(levels):
    _ts_write(root / f"s{k}", data.transpose(2, 1, 0), "n5")  # N5 lists dimensions x first
  vol = store.open_volume(str(url))
  assert vol.layout == layout and vol.format == "n5" and vol.levels == 2
  assert vol.resolution == RES and vol.shape() == SHAPE
  for k, data in enumerate(levels):
    assert np.array_equal(vol.read(level=k), data)
  # one dataset on its own, with tensorstore's `resolution` / `units`
  ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(tmp_path / "one.n5")}, "create": True,
           "dtype": "uint16", "schema": {"domain": {"shape": [SHAPE[2], SHAPE[1], SHAPE[0]]},
                                         "dimension_units": [f"{r}nm" for r in xyz]}}
          ).result().write(img.transpose(2, 1, 0)).result()
  one = store.open_volume(str(tmp_path / "one.n5"))
  assert one.layout == "array" and one.resolution == RES and np.array_equal(one.read(), img)


# ----------------------------------------------------------------------------------------------
# Missing resolution; command line


def test_missing_resolution_names_the_flag_and_the_environment_fills_in(tmp_path, monkeypatch):
  img = _image()
  _ts_write(tmp_path / "plain.zarr", img, "zarr3")
  with pytest.raises(InputError, match=r"no resolution.*--resolution=z,y,x"):
    store.open_volume(str(tmp_path / "plain.zarr"))
  with pytest.raises(InputError, match="resolution"):
    store.open_volume(str(tmp_path / "plain.zarr"), resolution=(50, 4))  # z, y, x: three values
  monkeypatch.setenv(store.RESOLUTION_ENV, "50,4,6")
  assert store.open_volume(str(tmp_path / "plain.zarr")).resolution == RES
  # a recorded resolution is never replaced by the environment's
  vol = store.create_volume(str(tmp_path / "own.zarr"), SHAPE, np.uint16, (40, 8, 8))
  assert store.open_volume(vol.url).resolution == (40.0, 8.0, 8.0)
  # jaxalign adds no levels to another tool's volume
  with pytest.raises(InputError, match="another tool"):
    build_pyramid(str(tmp_path / "plain.zarr"), 2, progress=False)


def _jaxalign(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "jaxalign", *args], capture_output=True, text=True, cwd=REPO,
                        timeout=TIMEOUT_S, env={**os.environ, store.RESOLUTION_ENV: ""})


def test_cli_commands_open_foreign_volumes(tmp_path):
  img = _image(dtype=np.uint8)
  _ts_write(tmp_path / "plain.zarr", img, "zarr")  # zarr v2, no attributes
  url = tmp_path / "ome05.zarr"
  axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
  for k, data in enumerate([img, _mip(img)]):
    _ts_write(url / str(k), data, "zarr3", dimension_names=["z", "y", "x"])
  multiscales = _ome_multiscales(axes, [list(RES), [RES[0], RES[1] * 2, RES[2] * 2]])
  _write_json(url, "zarr.json", {"zarr_format": 3, "node_type": "group",
                                 "attributes": {"ome": {"version": "0.5", "multiscales": multiscales}}})
  runs = {
      "no_res": ["export", str(tmp_path / "plain.zarr"), str(tmp_path / "out_no_res")],
      "res": ["export", str(tmp_path / "plain.zarr"), str(tmp_path / "out"), "--resolution=50,4,6", "--noprogress"],
      "ome": ["pyramid", str(url), "--levels=2", "--noprogress"],
  }
  with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
    results = dict(zip(runs, pool.map(lambda a: _jaxalign(*a), runs.values())))
  r = results["no_res"]
  assert r.returncode == 2 and "Traceback" not in r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxalign export: error:") and "--resolution" in lines[0]
  assert not (tmp_path / "out_no_res").exists()
  r = results["res"]
  assert r.returncode == 0, r.stderr
  got = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{z:04d}.png")) for z in range(SHAPE[0])])
  assert np.array_equal(got, img)
  r = results["ome"]  # resolution and levels from OME-Zarr 0.5 metadata; level 1 recomputed in place
  assert r.returncode == 0, r.stderr
  assert "level 0: 10x12 px x 3 sections, 6x4x50 nm" in r.stdout
  assert "level 1: 5x6 px x 3 sections, 12x8x50 nm" in r.stdout
  mean = np.rint(img.reshape(3, 5, 2, 6, 2).astype(np.float64).mean(axis=(2, 4)))
  assert np.array_equal(ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(url / "1")}}
                                ).result().read().result(), mean)
