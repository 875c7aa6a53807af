"""Volumes: round trips per format, plain-tensorstore readability, pyramids vs NumPy, bad input, CLI."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from jaxalign.volume import images, store
from jaxalign.volume.pyramid import build_pyramid
from jaxalign.volume.images import export_stack, import_stack
from jaxalign.errors import InputError

from tests.conftest import load_sections

RES = (50.0, 4.0, 6.0)  # z, y, x nm; y != x so axis mix-ups show


def _plain_open(url: str, fmt: str, level: int = 0) -> np.ndarray:
  """Reads level `level` with tensorstore alone, returned as [z, y, x(, c)]."""
  if fmt == "zarr3":
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/{level}"}}).result()
    return arr, arr.read().result()
  if fmt == "n5":
    arr = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": f"{url}/s{level}"}}).result()
    a = arr.read().result()  # native [x, y, z(, c)]
    return arr, np.moveaxis(a, (0, 1, 2), (2, 1, 0))
  arr = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": url},
                 "scale_index": level}).result()
  a = np.moveaxis(arr.read().result(), (0, 1, 2), (2, 1, 0))  # [x, y, z, c] -> [z, y, x, c]
  return arr, a


@pytest.mark.parametrize("fmt", store.FORMATS)
def test_round_trip_image_and_field_readable_by_plain_tensorstore(tmp_path, fmt):
  rng = np.random.default_rng(0)
  img = rng.integers(1, 65535, size=(3, 37, 45)).astype(np.uint16)
  url = str(tmp_path / "img")
  vol = store.create_volume(url, img.shape, np.uint16, RES, chunks=(1, 16, 16), format=fmt)
  vol.write(img[:2], z=slice(0, 2))
  vol.write(img[2], z=2)
  again = store.open_volume(url)
  assert again.format == fmt and again.kind == "image" and again.dtype == np.uint16
  assert again.resolution == RES and again.shape() == img.shape
  got = again.read()
  assert got.dtype == np.uint16 and np.array_equal(got, img)
  assert np.array_equal(again.read(1, box=((3, 30), (7, 44))), img[1, 3:30, 7:44])
  arr, plain = _plain_open(url, fmt)
  plain = plain[..., 0] if fmt == "neuroglancer_precomputed" else plain
  assert np.array_equal(plain, img)
  # resolution is in the standard metadata (tensorstore dimension units), in the format's axis order
  units = [u for u in arr.schema.dimension_units if u is not None and u.base_unit == "nm"]
  want = [50.0, 4.0, 6.0] if fmt == "zarr3" else [6.0, 4.0, 50.0]
  assert [u.multiplier for u in units] == want

  field = rng.normal(scale=3.0, size=(2, 20, 30, 2)).astype(np.float32)
  furl = str(tmp_path / "field")
  fvol = store.create_volume(furl, field.shape, np.float32, RES, format=fmt)
  assert fvol.kind == "field"
  fvol.write(field)
  assert np.array_equal(store.open_volume(furl).read(), field)
  assert np.array_equal(_plain_open(furl, fmt)[1], field)


def test_url_passes_through_to_tensorstore():
  # memory:// is handled by tensorstore's own URL parser, exactly like gs:// and s3://
  x = np.arange(2 * 20 * 30).reshape(2, 20, 30).astype(np.float32)
  for fmt in store.FORMATS:
    url = f"memory://bucket/{fmt}"
    store.create_volume(url, x.shape, np.float32, RES, chunks=(1, 8, 8), format=fmt).write(x)
    vol = store.open_volume(url)
    assert vol.format == fmt and vol.resolution == RES and np.array_equal(vol.read(), x)
  with pytest.raises(InputError, match="missing"):
    store.open_volume("memory://bucket/absent")


def _np_down(x: np.ndarray, reduce: str) -> np.ndarray:
  """float64 reference: pad odd H/W by repeating the last row/column, then reduce 2x2 blocks."""
  x = np.asarray(x, np.float64)
  h, w = x.shape[1:3]
  x = np.pad(x, [(0, 0), (0, h % 2), (0, w % 2)] + [(0, 0)] * (x.ndim - 3), mode="edge")
  blocks = np.stack([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]])
  return {"mean": blocks.mean(0), "max": blocks.max(0), "min": blocks.min(0), "field": 0.5 * blocks.mean(0)}[reduce]


@pytest.mark.parametrize("fmt", ["zarr3", "neuroglancer_precomputed"])
def test_pyramid_matches_numpy(tmp_path, fmt):
  rng = np.random.default_rng(1)
  img = rng.uniform(0, 1, (2, 45, 38)).astype(np.float32)
  defects = (rng.uniform(size=(2, 45, 38)) > 0.8).astype(np.uint8)
  field = rng.normal(size=(2, 45, 38, 2)).astype(np.float32)
  cfg = store.IOConfig(chunk_yx=16, pyramid_tile=16, pyramid_batch=3)  # many tiles, a padded last batch
  for name, data, kind, reduce in (("img", img, "image", "mean"), ("def", defects, "defect", "max"),
                                   ("tis", 1 - defects, "tissue", "min"), ("fld", field, "field", "field")):
    vol = store.create_volume(str(tmp_path / name), data.shape, data.dtype, RES, format=fmt, kind=kind, config=cfg)
    vol.write(data)
    vol = build_pyramid(vol, 3, config=cfg, progress=False)
    assert vol.levels == 3 and store.open_volume(vol.url).levels == 3
    ref = data.astype(np.float64)
    for k in (1, 2):
      ref = _np_down(ref, reduce)
      assert vol.shape(k) == ref.shape
      assert vol.resolution_at(k) == (50.0, 4.0 * 2 ** k, 6.0 * 2 ** k)
      np.testing.assert_allclose(vol.read(level=k), ref, atol=1e-5, err_msg=f"{name} level {k}")
  # uint8 images round to nearest
  u8 = rng.integers(1, 256, (2, 8, 8)).astype(np.uint8)
  vol = store.create_volume(str(tmp_path / "u8"), u8.shape, np.uint8, RES, format=fmt)
  vol.write(u8)
  vol = build_pyramid(vol, 2, z=1, progress=False)  # one section only (a worker's share)
  assert np.array_equal(vol.read(1, level=1), np.rint(_np_down(u8, "mean")[1]).astype(np.uint8))
  assert not vol.read(0, level=1).any()


def test_bad_input_is_refused_and_writes_nothing(tmp_path):
  url = str(tmp_path / "v")
  with pytest.raises(InputError, match="missing path"):
    store.open_volume(str(tmp_path / "absent"))
  with pytest.raises(InputError, match="resolution"):
    store.create_volume(url, (2, 8, 8), np.uint8, (50, 4))
  with pytest.raises(InputError, match="dtype"):
    store.create_volume(url, (2, 8, 8), np.int64, RES)
  with pytest.raises(InputError, match="float32"):
    store.create_volume(url, (2, 8, 8, 2), np.uint8, RES)
  assert not os.path.exists(url)

  vol = store.create_volume(url, (2, 8, 8), np.uint8, RES)
  with pytest.raises(InputError, match="dtype float32"):
    vol.write(np.ones((8, 8), np.float32), z=0)
  with pytest.raises(InputError, match="shape"):
    vol.write(np.ones((8, 9), np.uint8), z=0)
  with pytest.raises(InputError, match="fit"):
    vol.write(np.full((8, 8), 300), z=0)
  with pytest.raises(InputError, match="out of range"):
    vol.write(np.ones((8, 8), np.uint8), z=2)
  assert not os.path.exists(os.path.join(url, "0", "c"))  # no chunk was written
  with pytest.raises(InputError, match="different volume"):
    store.create_volume(url, (2, 8, 8), np.uint8, (40.0, 4.0, 6.0))  # resolution mismatch with existing

  fvol = store.create_volume(str(tmp_path / "f"), (1, 8, 8, 2), np.float32, RES)
  good = np.ones((1, 8, 8, 2), np.float32)
  fvol.write(good)
  bad = good.copy()
  bad[0, 3, 3, 1] = np.nan
  with pytest.raises(InputError, match="NaN"):
    fvol.write(bad)
  assert np.array_equal(fvol.read(), good)

  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(InputError, match="no PNG/TIFF"):
    import_stack(str(empty), str(tmp_path / "e"), RES)
  with pytest.raises(InputError, match="missing path"):
    import_stack(str(tmp_path / "nope"), str(tmp_path / "e"), RES)
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  from PIL import Image
  Image.fromarray(np.ones((8, 8), np.uint8)).save(mixed / "0.png")
  Image.fromarray(np.ones((8, 9), np.uint8)).save(mixed / "1.png")
  with pytest.raises(InputError, match="differs"):
    import_stack(str(mixed), str(tmp_path / "e"), RES)
  assert not (tmp_path / "e").exists()


def _png_stack(folder: pathlib.Path, stack: np.ndarray) -> None:
  from PIL import Image
  folder.mkdir()
  for i, s in enumerate(stack):
    Image.fromarray(s).save(folder / f"s{i}.png")  # s10 after s9: natural order


def test_import_interrupted_then_repeated_and_export(tmp_path, monkeypatch):
  rng = np.random.default_rng(2)
  stack = rng.integers(1, 256, (11, 24, 20)).astype(np.uint8)
  _png_stack(tmp_path / "src", stack)
  url = str(tmp_path / "v")
  real_load = images._load
  calls = []

  def failing_load(path, page):
    calls.append(path)
    if path.name == "s7.png":
      raise OSError("disk went away")
    return real_load(path, page)

  monkeypatch.setattr(images, "_load", failing_load)
  cfg = store.IOConfig(inflight=1)
  with pytest.raises(OSError):
    import_stack(str(tmp_path / "src"), url, RES, config=cfg, progress=False)
  partial = store.open_volume(url).read()
  assert np.array_equal(partial[:7], stack[:7])  # sections written before the failure are valid
  monkeypatch.setattr(images, "_load", real_load)
  vol = import_stack(str(tmp_path / "src"), url, RES, levels=2, progress=False)  # simply repeated
  assert np.array_equal(vol.read(), stack) and vol.levels == 2

  paths = export_stack(vol, str(tmp_path / "png"), "png", progress=False)
  from PIL import Image
  assert len(paths) == 11
  assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in paths]), stack)
  with pytest.raises(InputError, match="PNG cannot hold"):
    fvol = store.create_volume(str(tmp_path / "f"), (1, 4, 4, 2), np.float32, RES)
    export_stack(fvol, str(tmp_path / "fpng"), "png")
  assert not (tmp_path / "fpng").exists()


def test_multipage_tiff_import_and_tiff_export(tmp_path):
  import tifffile
  rng = np.random.default_rng(3)
  stack = rng.uniform(0.1, 1.0, (4, 16, 12)).astype(np.float32)
  tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
  vol = import_stack(str(tmp_path / "stack.tif"), str(tmp_path / "v"), RES, format="n5", progress=False)
  assert vol.dtype == np.float32 and np.array_equal(vol.read(), stack)
  paths = export_stack(vol, str(tmp_path / "out"), "tif", z=(1, 3), progress=False)
  assert [os.path.basename(p) for p in paths] == ["0001.tif", "0002.tif"]
  assert np.array_equal(tifffile.imread(paths[1]), stack[2])


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "jaxalign", *args], capture_output=True, text=True, env=env,
                        cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)


def test_cli_import_pyramid_on_real_sections(tmp_path):
  sections = (load_sections("isbi2012_train", [0, 1, 2], crop=128) * 255).round().astype(np.uint8)
  _png_stack(tmp_path / "src", sections)
  url = str(tmp_path / "vol.zarr")
  r = _cli("import", str(tmp_path / "src"), url, "--resolution=50,4,4", "--noprogress")
  assert r.returncode == 0, r.stderr
  r = _cli("pyramid", url, "--levels=3", "--noprogress")
  assert r.returncode == 0, r.stderr
  vol = store.open_volume(url)
  assert vol.levels == 3 and vol.resolution == (50.0, 4.0, 4.0)
  assert np.array_equal(vol.read(), sections)
  ref = np.rint(_np_down(_np_down(sections, "mean"), "mean"))  # mean of means, rounded at the end
  lvl2 = vol.read(level=2).astype(np.float64)
  assert vol.shape(2) == (3, 32, 32) and np.abs(lvl2 - ref).max() <= 1.0  # level 1 was rounded to uint8

  r = _cli("import", str(tmp_path / "missing"), str(tmp_path / "v2"), "--resolution=50,4,4")
  assert r.returncode == 2
  err = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert len(err) == 1 and "missing path" in err[0]
  assert not (tmp_path / "v2").exists()
