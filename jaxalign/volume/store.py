"""Volumes on tensorstore: zarr v3 (default), neuroglancer_precomputed and N5, with MIP levels.

A volume is a stack of sections `[Z, H, W]` (images and masks) or of displacement fields
`[Z, H, W, 2]` float32 (pixels of their own level, (dy, dx)). It knows its resolution in nm
(z, y, x) at level 0, and level k is 2^k coarser in y and x (z unchanged).

On-disk layout (see docs/io.md); every piece is standard metadata, so plain tensorstore / zarr /
neuroglancer / N5 tools read the pixels without jaxalign:

- zarr3: `URL/zarr.json` is a zarr v3 group whose `attributes.jaxalign` holds
  `{kind, resolution, levels, axes}` (and `attributes.ome` OME-Zarr 0.5 multiscales for
  images/masks); level k is the array `URL/k` (`[Z, H, W]` or `[Z, H, W, 2]`, C order,
  `dimension_names` z, y, x[, c], zstd), with its own resolution in `attributes`.
- n5: `URL/attributes.json` holds `jaxalign` plus the n5-viewer keys `scales`/`resolution`/`units`;
  level k is the dataset `URL/s{k}` in N5's native axis order `[x, y, z]` (`[x, y, z, c]` for fields).
- neuroglancer_precomputed: `URL/info` with one scale per level (native `[x, y, z, channel]`,
  per-scale `resolution`), and the `jaxalign` key in `info`.

`open_volume` also opens what other tools write, without conversion (see `_read_foreign`): plain
zarr v2 / v3 arrays `[Z, Y, X]` (or fields `[Z, Y, X, 2]`), OME-Zarr 0.4 (zarr v2) and 0.5 (zarr v3)
multiscale images, N5 datasets and n5-viewer / BigDataViewer multiscale groups, and precomputed volumes
without the `jaxalign` key. Their levels are the datasets that follow the MIP rule below; their
resolution comes from the metadata (units converted to nm) or, where there is none, from the caller
(`open_volume(url, resolution=...)`, the `--resolution` flag, the `JAXALIGN_RESOLUTION` variable).

Level k has shape `ceil(H / 2^k) x ceil(W / 2^k)`: an odd last row/column is downsampled with
itself (edge replication), so no data is dropped and zeros (no data) never leak in at the border.

Writes go through tensorstore, which writes every chunk atomically; `write`, `import_stack` and
`build_pyramid` issue chunk-aligned writes (sections, or tiles that are multiples of the chunk), so a
run that fails part-way leaves the chunks already written valid and can simply be repeated. All
checks on user input happen before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np
import tensorstore as ts
from absl import logging

from jaxalign.errors import InputError, check_resolution

FORMATS = ("zarr3", "neuroglancer_precomputed", "n5")
FORMAT_ALIASES = {"zarr": "zarr3", "zarr3": "zarr3", "precomputed": "neuroglancer_precomputed",
                  "neuroglancer_precomputed": "neuroglancer_precomputed", "n5": "n5"}
KINDS = ("image", "field", "mask", "defect", "tissue")
# kind -> how a level is reduced to the next (DESIGN.md §1); "mask" needs an explicit choice.
PYRAMID_REDUCE = {"image": "mean", "defect": "max", "tissue": "min", "field": "field"}
DTYPES = ("uint8", "uint16", "uint32", "float32")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
METADATA_VERSION = 1
# nm per pixel "z,y,x" for volumes whose metadata records none (the commands' --resolution flag sets
# it, so worker processes, which inherit the environment, see it too).
RESOLUTION_ENV = "JAXALIGN_RESOLUTION"
# Length units -> nm: OME-Zarr's UDUNITS names and the abbreviations N5, tensorstore and zarr tools use.
NM_PER_UNIT = {"nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3,
               "micrometer": 1e3, "micrometre": 1e3, "micron": 1e3, "mm": 1e6, "millimeter": 1e6,
               "millimetre": 1e6, "cm": 1e7, "centimeter": 1e7, "m": 1e9, "meter": 1e9, "metre": 1e9,
               "angstrom": 0.1, "ångström": 0.1, "Å": 0.1, "pm": 1e-3, "picometer": 1e-3}
# how far a foreign level's scale may be from 2^k x the level-0 scale (metadata written as decimals)
LEVEL_SCALE_RTOL = 1e-3
MAX_FOREIGN_LEVELS = 32


@dataclasses.dataclass(frozen=True)
class IOConfig:
  """Defaults for volume layout and I/O concurrency.

  Attributes:
    chunk_yx: chunk edge in y and x (pixels); one section per chunk in z so section writes align.
    zstd_level: zstd compression level for zarr3 / N5 chunks.
    pyramid_tile: tile edge (pixels of the finer level) processed at once by `build_pyramid`;
      a multiple of 2 * chunk_yx keeps the coarser level's writes chunk-aligned.
    pyramid_batch: tiles per jitted downsampling call (the last batch is padded, not recompiled).
    inflight: how many section reads/writes `import_stack` / `export_stack` keep in flight.
    file_sync: fsync every local chunk file before it is renamed into place (tensorstore's default).
      Durable across power loss; turning it off makes local writes several times faster and still
      never exposes a torn chunk after a process crash (writes go to a temp file + rename).
  """
  chunk_yx: int = 512
  zstd_level: int = 3
  pyramid_tile: int = 2048
  pyramid_batch: int = 4
  inflight: int = 8
  file_sync: bool = True


DEFAULT_CONFIG = IOConfig()
_CONTEXTS: dict[bool, ts.Context] = {}


def _context(config: IOConfig) -> ts.Context:
  """One shared tensorstore context (cache pools, thread pools) per sync setting."""
  if config.file_sync not in _CONTEXTS:
    _CONTEXTS[config.file_sync] = ts.Context({"file_io_sync": bool(config.file_sync)})
  return _CONTEXTS[config.file_sync]


# ----------------------------------------------------------------------------------------------
# URLs and small metadata files


def _is_remote(url: str) -> bool:
  return "://" in url and not url.startswith("file://")


def _local_path(url: str) -> str:
  return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def _kvstore(url: str, sub: str = "") -> Any:
  """Tensorstore kvstore spec for `url/sub`; gs:// and s3:// URLs go to tensorstore unchanged."""
  if _is_remote(url):
    base = url.rstrip("/") + "/"
    return base + (sub.strip("/") + "/" if sub else "")
  path = _local_path(url)
  return {"driver": "file", "path": os.path.join(path, sub) + "/" if sub else path + "/"}


def _read_json(url: str, key: str) -> dict | None:
  kv = ts.KvStore.open(_kvstore(url), context=_context(DEFAULT_CONFIG)).result()
  r = kv.read(key).result()
  if r.state != "value":
    return None
  return json.loads(bytes(r.value))


def _write_json(url: str, key: str, obj: dict) -> None:
  kv = ts.KvStore.open(_kvstore(url), context=_context(DEFAULT_CONFIG)).result()
  kv.write(key, json.dumps(obj, indent=1).encode()).result()


def _normalize_format(fmt: str) -> str:
  f = FORMAT_ALIASES.get(str(fmt).lower())
  if f is None:
    raise InputError(f"unknown volume format {fmt!r}; expected one of {', '.join(FORMATS)}")
  return f


def _detect_format(url: str) -> str | None:
  """"zarr3", "zarr2", "n5" or "neuroglancer_precomputed" from the metadata file at `url`; None if none."""
  if _read_json(url, "zarr.json") is not None:
    return "zarr3"
  if _read_json(url, ".zarray") is not None or _read_json(url, ".zgroup") is not None:
    return "zarr2"
  if _read_json(url, "attributes.json") is not None:
    return "n5"
  if _read_json(url, "info") is not None:
    return "neuroglancer_precomputed"
  if _read_json(url, "s0/attributes.json") is not None:  # an N5 pyramid group need not have attributes
    return "n5"
  return None


# ----------------------------------------------------------------------------------------------
# Validation helpers


# neuroglancer coordinate spaces are in metres; volumes carry nm.
NM_PER_M = 1e9


def neuroglancer_dimensions(resolution_nm) -> dict[str, list]:
  """neuroglancer's `dimensions` (x, y, z in metres per voxel) of a volume with `resolution_nm`
  (z, y, x) nm per pixel: the coordinate space of `jaxalign view` states and eval's annotations."""
  z, y, x = (float(r) for r in resolution_nm)
  return {"x": [x / NM_PER_M, "m"], "y": [y / NM_PER_M, "m"], "z": [z / NM_PER_M, "m"]}


def parse_resolution(text: str) -> tuple[float, float, float]:
  """Parses 'z,y,x' (nm) as used on the command line."""
  parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
  return check_resolution(parts, "resolution", volume=True)


def level_shape(shape: Sequence[int], level: int) -> tuple[int, ...]:
  """Shape of MIP `level` for a level-0 `shape` `[Z, H, W(, 2)]`: H and W divided by 2^level, rounded up."""
  f = 2 ** level
  out = list(shape)
  out[1] = -(-shape[1] // f)
  out[2] = -(-shape[2] // f)
  return tuple(int(s) for s in out)


def level_resolution(resolution: Sequence[float], level: int) -> tuple[float, float, float]:
  """nm per pixel (z, y, x) at MIP `level` given level-0 `resolution`."""
  rz, ry, rx = resolution
  return (float(rz), float(ry) * 2 ** level, float(rx) * 2 ** level)


def _infer_kind(shape, kind: str | None) -> str:
  if kind is None:
    return "field" if len(shape) == 4 else "image"
  if kind not in KINDS:
    raise InputError(f"unknown volume kind {kind!r}; expected one of {', '.join(KINDS)}")
  return kind


def _check_layout(shape, dtype, kind: str) -> tuple[tuple[int, ...], np.dtype]:
  try:
    shape = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    raise InputError(f"shape must be integers [Z, H, W] or [Z, H, W, 2], got {shape!r}") from None
  dt = np.dtype(dtype)
  if dt == np.bool_:
    dt = np.dtype(np.uint8)  # masks are stored as 0/1 uint8 (precomputed has no bool)
  if dt.name not in DTYPES:
    raise InputError(f"volume dtype {dt} not supported; expected one of {', '.join(DTYPES)}")
  if kind == "field":
    if len(shape) != 4 or shape[3] != 2:
      raise InputError(f"a field volume has shape [Z, H, W, 2], got {shape}")
    if dt != np.float32:
      raise InputError(f"a field volume has dtype float32, got {dt}")
  elif len(shape) != 3:
    raise InputError(f"a {kind} volume has shape [Z, H, W], got {shape}")
  if min(shape) <= 0:
    raise InputError(f"volume shape {shape} has an empty dimension")
  return shape, dt


def _default_chunks(shape, config: IOConfig) -> tuple[int, int, int]:
  return (1, min(config.chunk_yx, shape[1]), min(config.chunk_yx, shape[2]))


def _check_chunks(chunks, shape) -> tuple[int, int, int]:
  try:
    c = tuple(int(v) for v in chunks)
  except (TypeError, ValueError):
    raise InputError(f"chunks must be three integers (z, y, x), got {chunks!r}") from None
  if len(c) != 3 or min(c) <= 0:
    raise InputError(f"chunks must be three positive integers (z, y, x), got {chunks!r}")
  return c


# ----------------------------------------------------------------------------------------------
# Per-format array specs


def _level_key(fmt: str, level: int) -> str:
  return f"s{level}" if fmt == "n5" else str(level)


def _units(res: Sequence[float]) -> list[str]:
  return [f"{r:g}nm" for r in res]


def _array_spec(url: str, fmt: str, level: int, meta: dict | None = None) -> dict:
  """Tensorstore spec of one level; `meta` (shape/dtype/chunks/resolution/kind) when creating."""
  if fmt == "neuroglancer_precomputed":
    spec: dict = {"driver": fmt, "kvstore": _kvstore(url), "scale_index": level}
    if meta is not None:
      shape, res, ch = meta["shape"], meta["resolution"], meta["chunks"]
      spec.pop("scale_index")
      spec["multiscale_metadata"] = {"type": "image", "data_type": meta["dtype"],
                                     "num_channels": 2 if meta["kind"] == "field" else 1}
      spec["scale_metadata"] = {"size": [shape[2], shape[1], shape[0]], "resolution": [res[2], res[1], res[0]],
                                "chunk_size": [ch[2], ch[1], ch[0]], "encoding": "raw",
                                "key": _level_key(fmt, level)}
    return spec
  spec = {"driver": fmt, "kvstore": _kvstore(url, _level_key(fmt, level))}
  if meta is None:
    return spec
  shape, res, ch, field = meta["shape"], meta["resolution"], meta["chunks"], meta["kind"] == "field"
  extra = {"jaxalign": {"kind": meta["kind"], "level": level, "resolution": list(res)}}
  if fmt == "zarr3":
    names = ["z", "y", "x"] + (["c"] if field else [])
    spec["metadata"] = {
        "shape": list(shape), "data_type": meta["dtype"],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(ch) + ([2] if field else [])}},
        "dimension_names": names,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                   {"name": "zstd", "configuration": {"level": meta["zstd_level"]}}],
        "attributes": extra, "fill_value": 0}
    spec["schema"] = {"dimension_units": _units(res) + ([None] if field else [])}
  else:  # n5, native axis order [x, y, z(, c)]
    dims = [shape[2], shape[1], shape[0]] + ([2] if field else [])
    block = [ch[2], ch[1], ch[0]] + ([2] if field else [])
    spec["metadata"] = {"dimensions": dims, "blockSize": block, "dataType": meta["dtype"],
                        "compression": {"type": "zstd", "level": meta["zstd_level"]}}
    spec["schema"] = {"dimension_units": _units(res[::-1]) + ([None] if field else [])}
  return spec


def _axes_view(arr: ts.TensorStore, axes: Sequence[str], field: bool) -> ts.TensorStore:
  """Presents an array with on-disk axes `axes` (names among t, c, z, y, x) as `[Z, H, W]`, or as
  `[Z, H, W, 2]` for a field: t (and an image's c) are singletons read at index 0, the rest transposed."""
  keep = [a for a in axes if a in ("z", "y", "x") or (field and a == "c")]
  view = arr[tuple(slice(None) if a in keep else 0 for a in axes)]
  want = ["z", "y", "x"] + (["c"] if field else [])
  return view[ts.d[:].transpose[[want.index(a) for a in keep]]]


def _zyx_view(arr: ts.TensorStore, fmt: str, field: bool) -> ts.TensorStore:
  """Presents a level as `[Z, H, W]` / `[Z, H, W, 2]` whatever the on-disk axis order."""
  if fmt == "zarr3":
    return arr
  if fmt == "neuroglancer_precomputed":
    view = arr[ts.d[0, 1, 2].transpose[2, 1, 0]]  # [z, y, x, channel]
    return view if field else view[..., 0]
  return arr[ts.d[0, 1, 2].transpose[2, 1, 0]]  # n5: [x, y, z(, c)] -> [z, y, x(, c)]


# ----------------------------------------------------------------------------------------------
# Volume


class Volume:
  """An open volume: sections `[Z, H, W]` (fields `[Z, H, W, 2]` float32) with MIP levels.

  Attributes:
    url: where it lives (local path, file://, gs://, s3://).
    format: "zarr3", "neuroglancer_precomputed" or "n5"; "zarr2" for zarr v2 volumes of other tools.
    layout: whose metadata describes it: "jaxalign", or for volumes of other tools "ome-zarr 0.4",
      "ome-zarr 0.5", "n5-viewer", "bigdataviewer", "precomputed" or "array" (one plain array).
    kind: "image", "field", "mask", "defect" or "tissue".
    dtype: NumPy dtype of the stored values.
    resolution: nm per pixel (z, y, x) at level 0.
    levels: number of MIP levels present (level 0 = full resolution).
  """

  def __init__(self, url: str, fmt: str, meta: dict, config: IOConfig = DEFAULT_CONFIG):
    self.url = url
    self.config = config
    self.format = fmt
    self.layout = meta.get("layout", "jaxalign")
    self.kind = meta["kind"]
    self.dtype = np.dtype(meta["dtype"])
    self.resolution = tuple(float(r) for r in meta["resolution"])
    self.levels = int(meta["levels"])
    self._shape0 = tuple(int(s) for s in meta["shape"])
    # Volumes of other tools: where each level lives, its on-disk axis names, its exact shape.
    self._source = meta.get("source")
    shapes = meta.get("level_shapes")
    self._level_shapes = None if shapes is None else [tuple(int(v) for v in s) for s in shapes]
    self._arrays: dict[int, ts.TensorStore] = {}

  def __repr__(self) -> str:
    layout = "" if self.layout == "jaxalign" else f", layout={self.layout}"
    return (f"Volume({self.url!r}, format={self.format}{layout}, kind={self.kind}, shape={self.shape()}, "
            f"dtype={self.dtype}, resolution={self.resolution} nm, levels={self.levels})")

  @property
  def is_field(self) -> bool:
    return self.kind == "field"

  def shape(self, level: int = 0) -> tuple[int, ...]:
    """`[Z, H, W]` (or `[Z, H, W, 2]`) at `level`."""
    self._check_level(level)
    if self._level_shapes is not None:  # another tool's pyramid may round H / 2^k down
      return self._level_shapes[level]
    return level_shape(self._shape0, level)

  def resolution_at(self, level: int) -> tuple[float, float, float]:
    """nm per pixel (z, y, x) at `level`."""
    self._check_level(level)
    return level_resolution(self.resolution, level)

  def chunks(self, level: int = 0) -> tuple[int, int, int]:
    """Chunk shape (z, y, x) of `level`."""
    shape = self.array(level).chunk_layout.write_chunk.shape
    return tuple(int(s) for s in shape[:3])

  def array(self, level: int = 0) -> ts.TensorStore:
    """The tensorstore of `level`, presented as `[Z, H, W(, 2)]` (for direct async use)."""
    self._check_level(level)
    if level not in self._arrays:
      if self._source is not None:
        src = self._source
        spec = {"driver": src["driver"], "kvstore": _kvstore(self.url, src["paths"][level])}
        arr = ts.open(spec, open=True, context=_context(self.config)).result()
        self._arrays[level] = _axes_view(arr, src["axes"], self.is_field)
      else:
        arr = ts.open(_array_spec(self.url, self.format, level), open=True, context=_context(self.config)).result()
        self._arrays[level] = _zyx_view(arr, self.format, self.is_field)
    return self._arrays[level]

  def _check_level(self, level: int) -> None:
    if not isinstance(level, (int, np.integer)) or not 0 <= level < self.levels:
      raise InputError(f"{self.url}: level {level!r} not present (volume has {self.levels} level(s))")

  def _index(self, z, level: int, box) -> tuple[tuple, bool]:
    """Index tuple for (z, box) at `level`; also whether z was a single section."""
    shape = self.shape(level)
    single = isinstance(z, (int, np.integer))
    if z is None:
      zs = slice(0, shape[0])
    elif single:
      if not 0 <= z < shape[0]:
        raise InputError(f"{self.url}: section z={z} out of range [0, {shape[0]})")
      zs = slice(int(z), int(z) + 1)
    else:
      if isinstance(z, range):
        if z.step != 1:
          raise InputError(f"{self.url}: z range must be contiguous, got {z}")
        z = slice(z.start, z.stop)
      if isinstance(z, (tuple, list)):
        z = slice(*z)
      if not isinstance(z, slice) or z.step not in (None, 1):
        raise InputError(f"{self.url}: z must be an int, a contiguous slice/range or (z0, z1), got {z!r}")
      z0, z1 = z.start or 0, shape[0] if z.stop is None else z.stop
      if not 0 <= z0 < z1 <= shape[0]:
        raise InputError(f"{self.url}: z range [{z0}, {z1}) out of range [0, {shape[0]})")
      zs = slice(int(z0), int(z1))
    if box is None:
      ys, xs = slice(0, shape[1]), slice(0, shape[2])
    else:
      try:
        (y0, y1), (x0, x1) = [(b.start, b.stop) if isinstance(b, slice) else tuple(b) for b in box]
      except (TypeError, ValueError):
        raise InputError(f"box must be ((y0, y1), (x0, x1)) in pixels of the level, got {box!r}") from None
      if not (0 <= y0 < y1 <= shape[1] and 0 <= x0 < x1 <= shape[2]):
        raise InputError(f"{self.url}: box {box!r} outside the level-{level} section of size {shape[1:3]}")
      ys, xs = slice(int(y0), int(y1)), slice(int(x0), int(x1))
    return (zs, ys, xs), single

  def read(self, z=None, level: int = 0, box=None) -> np.ndarray:
    """Reads sections.

    Args:
      z: a section index (returns `[H, W]`), a contiguous slice / range / (z0, z1) (returns
        `[n, H, W]`), or None for all sections.
      level: MIP level.
      box: optional ((y0, y1), (x0, x1)) sub-box in pixels of `level`.
    Returns:
      ndarray of the volume's dtype, with a trailing (dy, dx) axis for fields.
    Raises:
      ReadError (an InputError): stored data that cannot be read (corrupt or truncated chunk),
        naming this volume, the failing section and the chunk.
    """
    fut = self.read_async(z, level, box)
    try:
      return fut.result()
    except (ValueError, RuntimeError, OSError) as e:
      if isinstance(e, InputError):
        raise
      from jaxalign.errors import ReadError
      (zs, ys, xs), _ = self._index(z, level, box)
      for zz in range(zs.start, zs.stop) if zs.stop - zs.start > 1 else ():
        self.read(zz, level, ((ys.start, ys.stop), (xs.start, xs.stop)))  # raises naming the failing section
      where = zs.start if zs.stop - zs.start == 1 else (zs.start, zs.stop)
      raise ReadError.from_storage_error(self.url, where, level, ((ys.start, ys.stop), (xs.start, xs.stop)),
                                         e) from None

  def read_async(self, z=None, level: int = 0, box=None):
    """Like `read` but returns a future (`.result()` gives the array) so reads overlap."""
    idx, single = self._index(z, level, box)
    view = self.array(level)[(idx[0].start,) + idx[1:] if single else idx]
    return view.read()

  def write(self, data, z=None, level: int = 0, box=None, *, wait: bool = True):
    """Writes sections (validated first: nothing is written on bad input).

    Args:
      data: `[H, W(, 2)]` for a single z, or `[n, H, W(, 2)]`; dtype castable to the volume's
        (integer data must fit the integer range; float data into an integer volume is refused);
        fields must be finite.
      z, level, box: as in `read`.
      wait: if False, returns the tensorstore write future instead of waiting for it.
    """
    idx, single = self._index(z, level, box)
    arr = self._check_data(data, idx, single)
    target = self.array(level)[idx]
    fut = target.write(arr[None] if single else arr)
    if wait:
      fut.result()
      return None
    return fut

  def _check_data(self, data, idx, single: bool) -> np.ndarray:
    try:
      arr = np.asarray(data)
    except Exception as e:  # noqa: BLE001 - anything unconvertible is a user error
      raise InputError(f"{self.url}: data cannot be converted to an array ({e})") from None
    want = tuple(s.stop - s.start for s in idx) + ((2,) if self.is_field else ())
    if single:
      want = want[1:]
    if arr.shape != want:
      raise InputError(f"{self.url}: data shape {arr.shape} does not match the target region shape {want}")
    if arr.dtype == np.bool_ and np.issubdtype(self.dtype, np.integer):
      return arr.astype(self.dtype)
    if np.issubdtype(self.dtype, np.integer):
      if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{self.url}: data dtype {arr.dtype} does not match volume dtype {self.dtype}")
      info = np.iinfo(self.dtype)
      if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise InputError(f"{self.url}: data values [{arr.min()}, {arr.max()}] do not fit volume dtype {self.dtype}")
      return arr.astype(self.dtype, copy=False)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
      raise InputError(f"{self.url}: data dtype {arr.dtype} does not match volume dtype {self.dtype}")
    arr = arr.astype(self.dtype, copy=False)
    if not np.all(np.isfinite(arr)):
      what = "field" if self.is_field else "float"
      raise InputError(f"{self.url}: NaN or Inf written into a {what} volume")
    return arr


# ----------------------------------------------------------------------------------------------
# Group metadata per format


def _group_meta(shape, dtype, resolution, kind, levels) -> dict:
  return {"version": METADATA_VERSION, "kind": kind, "shape": list(shape), "dtype": np.dtype(dtype).name,
          "resolution": list(resolution), "levels": int(levels),
          "axes": ["z", "y", "x"] + (["c"] if kind == "field" else [])}


def _ome_multiscales(resolution, levels: int) -> dict:
  datasets = []
  for k in range(levels):
    rz, ry, rx = level_resolution(resolution, k)
    # pixel centres of level k sit at the centre of their 2^k x 2^k level-0 block
    shift = (2 ** k - 1) / 2
    datasets.append({"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [rz, ry, rx]},
        {"type": "translation", "translation": [0.0, shift * resolution[1], shift * resolution[2]]}]})
  axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in ("z", "y", "x")]
  return {"version": "0.5", "multiscales": [{"name": "jaxalign", "axes": axes, "datasets": datasets}]}


def _write_group(url: str, fmt: str, meta: dict) -> None:
  """Writes the volume-level metadata (last, so it marks a complete volume)."""
  if fmt == "zarr3":
    attrs: dict = {"jaxalign": meta}
    if meta["kind"] != "field":  # OME-Zarr wants channels before space axes; fields are channels-last
      attrs["ome"] = _ome_multiscales(meta["resolution"], meta["levels"])
    _write_json(url, "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
  elif fmt == "n5":
    rz, ry, rx = meta["resolution"]
    attrs = _read_json(url, "attributes.json") or {}
    attrs.update({"n5": "4.0.0", "jaxalign": meta, "resolution": [rx, ry, rz], "units": ["nm"] * 3,
                  "axes": ["x", "y", "z"],
                  "scales": [[2 ** k, 2 ** k, 1] for k in range(meta["levels"])]})
    _write_json(url, "attributes.json", attrs)
  else:
    info = _read_json(url, "info")
    info["jaxalign"] = meta
    _write_json(url, "info", info)


def _own_meta(meta) -> dict | None:
  """`meta` if it is jaxalign's volume metadata (a level's own `jaxalign` attributes are not)."""
  keys = ("kind", "shape", "dtype", "resolution", "levels")
  return meta if isinstance(meta, dict) and all(k in meta for k in keys) else None


def _read_group(url: str, fmt: str) -> dict | None:
  """jaxalign's metadata of the volume at `url` (None where it has none; precomputed is derived)."""
  if fmt == "zarr3":
    g = _read_json(url, "zarr.json")
    if g is None or g.get("node_type") != "group":
      return None
    return _own_meta((g.get("attributes") or {}).get("jaxalign"))
  if fmt == "n5":
    g = _read_json(url, "attributes.json")
    return None if g is None else _own_meta(g.get("jaxalign"))
  if fmt != "neuroglancer_precomputed":
    return None
  g = _read_json(url, "info")
  if g is None:
    return None
  meta = g.get("jaxalign")
  layout = "jaxalign"
  if meta is None:  # a precomputed volume written by another tool: derive what we need
    s0 = g["scales"][0]
    kind = "field" if g.get("num_channels", 1) == 2 and g["data_type"] == "float32" else "image"
    shape = [s0["size"][2], s0["size"][1], s0["size"][0]] + ([2] if kind == "field" else [])
    res = [s0["resolution"][2], s0["resolution"][1], s0["resolution"][0]]
    meta = _group_meta(shape, g["data_type"], res, kind, len(g["scales"]))
    layout = "precomputed"
  meta = dict(meta)
  meta["levels"] = len(g["scales"])
  meta["layout"] = layout
  return meta


# ----------------------------------------------------------------------------------------------
# Volumes written by other tools (opened in place, never converted)


def _axis_name(name, axis_type=None) -> str:
  """Canonical axis name: "t", "c", "z", "y", "x" (others are returned lower-cased)."""
  n = str(name).strip().lower()
  t = str(axis_type or "").strip().lower()
  if t == "time" or n in ("t", "time"):
    return "t"
  if t == "channel" or n in ("c", "ch", "channel", "channels"):
    return "c"
  return n


def _named_axes(url: str, names) -> list[str] | None:
  """Canonical on-disk axis names from metadata, or None where they say nothing about z, y, x
  (missing, or generic names such as xarray's "dim_0")."""
  if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
    return None
  axes = [_axis_name(n) for n in names]
  if not set(axes) & {"z", "y", "x"}:
    return None
  if len(set(axes)) != len(axes) or not {"z", "y", "x"} <= set(axes) or not set(axes) <= {"t", "c", "z", "y", "x"}:
    raise InputError(f"{url}: axes {list(names)} are not z, y, x (plus an optional t of size 1 and c: "
                     "1 for an image, 2 for a field)")
  return axes


def _default_axes(url: str, shape: Sequence[int], n5: bool) -> list[str]:
  """Axis names of an array whose metadata names none: zarr `[z, y, x]`, N5 `[x, y, z]` (its native
  order), and for 4-d arrays a field's (dy, dx) axis where it is obvious (2 at one end only)."""
  space = ["x", "y", "z"] if n5 else ["z", "y", "x"]
  if len(shape) == 3:
    return space
  if len(shape) == 4 and (shape[0] == 2) != (shape[-1] == 2):
    return space + ["c"] if shape[-1] == 2 else ["c"] + space
  order = "[X, Y, Z]" if n5 else "[Z, Y, X]"
  raise InputError(f"{url}: cannot tell the axes of a {len(shape)}-d array of shape {list(shape)} whose metadata "
                   f"names none; expected {order}, or a field with one more axis of 2 at either end")


def _length_nm(value, unit) -> float | None:
  """`value` times `unit` in nm; `unit` is a name ("micrometer", "nm") or tensorstore's "4 nm".
  None where the unit is missing or not a length, or the length is not finite and > 0."""
  if unit is None:
    return None
  m = re.fullmatch(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)?\s*(\S+)\s*", str(unit))
  if m is None:
    return None
  per = NM_PER_UNIT.get(m.group(2), NM_PER_UNIT.get(m.group(2).lower()))
  if per is None:
    return None
  try:
    nm = float(value) * (float(m.group(1)) if m.group(1) else 1.0) * per
  except (TypeError, ValueError):
    return None
  if not np.isfinite(nm) or nm <= 0:
    return None
  return float(f"{nm:.12g}")  # 0.004 um is 4 nm, not 4.000000000000001


def _zyx_nm(by_axis: dict) -> tuple[float, float, float] | None:
  """(z, y, x) nm from {axis name: nm}; None unless all three are known."""
  return tuple(by_axis[a] for a in ("z", "y", "x")) if all(a in by_axis for a in ("z", "y", "x")) else None


def _attrs_resolution(attrs: dict, axes: Sequence[str]) -> tuple[float, float, float] | None:
  """nm per pixel (z, y, x) from an array's (or N5 group's) attributes, else None. Reads tensorstore's
  `dimension_units` ("4 nm"), N5 / neuroglancer / funlib `resolution` with optional `units`, n5-viewer
  `pixelResolution` ({unit, dimensions} or a list), COSEM's `transform` {axes, scale, units} and
  jaxalign's `jaxalign.resolution` (z, y, x). Lists follow `axes` (all of them, or the z, y, x ones);
  lengths without a unit are nm (neuroglancer's N5 convention)."""
  def by_axes(values, units) -> dict:
    if not isinstance(values, (list, tuple)):
      return {}
    names = list(axes) if len(values) == len(axes) else [a for a in axes if a in ("z", "y", "x")]
    if isinstance(units, str):
      units = [units] * len(values)
    if len(values) != len(names) or not isinstance(units, (list, tuple)) or len(units) != len(values):
      return {}
    out = {n: _length_nm(v, u) for n, v, u in zip(names, values, units)}
    return {n: v for n, v in out.items() if v is not None}

  candidates = []
  if isinstance(attrs.get("dimension_units"), list):
    candidates.append(by_axes([1.0] * len(attrs["dimension_units"]), attrs["dimension_units"]))
  if "resolution" in attrs:
    candidates.append(by_axes(attrs["resolution"], attrs.get("units", "nm")))
  pr = attrs.get("pixelResolution")
  if isinstance(pr, dict):
    candidates.append(by_axes(pr.get("dimensions"), pr.get("unit", "nm")))
  elif pr is not None:
    candidates.append(by_axes(pr, "nm"))
  tf = attrs.get("transform")
  if isinstance(tf, dict) and isinstance(tf.get("axes"), list) and isinstance(tf.get("scale"), list):
    units = tf.get("units") or "nm"
    units = [units] * len(tf["axes"]) if isinstance(units, str) else units
    candidates.append({_axis_name(a): _length_nm(v, u) for a, v, u in zip(tf["axes"], tf["scale"], units)
                       if _length_nm(v, u) is not None})
  own = attrs.get("jaxalign")
  if isinstance(own, dict) and isinstance(own.get("resolution"), list) and len(own["resolution"]) == 3:
    candidates.append({a: _length_nm(v, "nm") for a, v in zip(("z", "y", "x"), own["resolution"])})
  for c in candidates:
    res = _zyx_nm({k: v for k, v in c.items() if v is not None})
    if res is not None:
      return res
  return None


def _scale_of(transforms) -> list[float] | None:
  """The product of the `scale` entries of OME-Zarr coordinateTransformations (None if there is none)."""
  scale = None
  for t in transforms if isinstance(transforms, list) else []:
    if isinstance(t, dict) and t.get("type") == "scale":
      if not isinstance(t.get("scale"), list):  # a scale stored in a separate array: not supported
        return None
      v = [float(x) for x in t["scale"]]
      scale = v if scale is None else [a * b for a, b in zip(scale, v)]
  return scale


def _find_ome_multiscales(attrs: dict) -> tuple[list, str] | None:
  """(multiscales, version) of OME-Zarr group attributes: 0.5 `ome.multiscales`, <= 0.4 `multiscales`."""
  ome = attrs.get("ome")
  if isinstance(ome, dict) and isinstance(ome.get("multiscales"), list) and ome["multiscales"]:
    return ome["multiscales"], str(ome.get("version", "0.5"))
  ms = attrs.get("multiscales")
  if isinstance(ms, list) and ms and isinstance(ms[0], dict):
    return ms, str(ms[0].get("version", "0.4"))
  return None


def _ome_axes(ms: dict) -> tuple[list[str] | None, list]:
  """(canonical axis names, units) of one OME-Zarr multiscale; names None where it has no `axes`
  (0.1 / 0.2 images are 5-d t, c, z, y, x)."""
  axes = ms.get("axes")
  if not isinstance(axes, list) or not axes:
    return (["t", "c", "z", "y", "x"] if str(ms.get("version", "")) in ("0.1", "0.2") else None), []
  names = [_axis_name(a.get("name", ""), a.get("type")) if isinstance(a, dict) else _axis_name(a) for a in axes]
  units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
  return names, units


def _ome_resolution(names, units, scale) -> tuple[tuple[float, float, float] | None, str]:
  """(nm per pixel (z, y, x) or None, why not) of an OME-Zarr dataset's scale and its axes' units."""
  if scale is None or names is None or len(scale) != len(names):
    return None, "its OME-Zarr metadata gives no scale for its first dataset"
  by_axis = {n: _length_nm(v, u) for n, v, u in zip(names, scale, units or [None] * len(names))}
  res = _zyx_nm({n: v for n, v in by_axis.items() if v is not None})
  if res is None:
    return None, "its OME-Zarr axes z, y, x name no length unit (e.g. \"nanometer\")"
  return res, ""


def _open_levels(url: str, driver: str, datasets: Sequence[tuple[str, list | None]], names, layout: str) -> dict:
  """Levels of another tool's datasets `[(path under url, scale per on-disk axis or None)]`, level 0 first.

  Dataset k is level k while it follows jaxalign's MIP rule: same dtype and z size, y and x 2^k smaller
  (rounded up or down) and, where scales are known, a scale 2^k x level 0's in y and x and equal in z;
  the first dataset that does not ends the levels (logged). Raises InputError where level 0 cannot be
  read as an image `[Z, H, W]` or a float32 field `[Z, H, W, 2]` (axes, dtype, t / c sizes).
  Returns metadata as `_read_group` does, plus `source` {driver, paths, axes}, `level_shapes`, `layout`.
  """
  n5 = driver == "n5"
  shapes: list[tuple[int, ...]] = []
  axes: list[str] = []
  kind = dtype = disk_dtype = None
  scale0 = None
  for k, (path, scale) in enumerate(datasets):
    where = f"{url}/{path}" if path else url
    try:
      arr = ts.open({"driver": driver, "kvstore": _kvstore(url, path)}, open=True,
                    context=_context(DEFAULT_CONFIG)).result()
    except ValueError as e:
      if k == 0:
        raise InputError(f"{where}: cannot open as a {driver} array ({e})") from None
      logging.info("%s: cannot open dataset %s (%s); using %d level(s)", url, path, e, k)
      break
    disk = tuple(int(v) for v in arr.shape)
    if k == 0:
      axes = names if names is not None else _default_axes(where, disk, n5)
      if len(axes) != len(disk):
        raise InputError(f"{where}: axes {axes} do not match the array's {len(disk)} dimensions {list(disk)}")
      size = dict(zip(axes, disk))
      if size.get("t", 1) != 1:
        raise InputError(f"{where}: {size['t']} time points; jaxalign reads one (a t axis of size 1)")
      if size.get("c", 1) not in (1, 2):
        raise InputError(f"{where}: {size['c']} channels; jaxalign reads one-channel images and (dy, dx) fields")
      kind = "field" if size.get("c", 1) == 2 else "image"
      try:
        zyx, dtype = _check_layout([size["z"], size["y"], size["x"]] + ([2] if kind == "field" else []),
                                   arr.dtype.numpy_dtype, kind)
      except InputError as e:
        raise InputError(f"{where}: {e}") from None
      shapes.append(zyx)
      scale0, disk_dtype = scale, arr.dtype
      continue
    size = dict(zip(axes, disk)) if len(disk) == len(axes) else {}
    f = 2 ** k
    h, w = shapes[0][1], shapes[0][2]
    ok = (bool(size) and arr.dtype == disk_dtype and size["z"] == shapes[0][0]
          and size.get("c", 1) == (2 if kind == "field" else 1) and size.get("t", 1) == 1
          and size["y"] in (-(-h // f), h // f) and size["x"] in (-(-w // f), w // f)
          and min(size["y"], size["x"]) > 0)
    if ok and scale is not None and scale0 is not None and len(scale) == len(axes) == len(scale0):
      # 2^k, or the size ratio that writers which fit the scale to a rounded size record (ome-zarr-py)
      rel = {a: s / s0 if s0 else float("nan") for a, s, s0 in zip(axes, scale, scale0)}
      ok = np.isclose(rel["z"], 1.0, rtol=LEVEL_SCALE_RTOL) and all(
          np.isclose(rel[a], f, rtol=LEVEL_SCALE_RTOL) or np.isclose(rel[a], n0 / size[a], rtol=LEVEL_SCALE_RTOL)
          for a, n0 in (("y", h), ("x", w)))
    if not ok:
      logging.info("%s: dataset %s %s is not MIP level %d of %s (y and x 2^%d smaller, z kept); using %d level(s)",
                   url, path, list(disk), k, list(shapes[0]), k, k)
      break
    shapes.append((size["z"], size["y"], size["x"]) + shapes[0][3:])
  return {"kind": kind, "dtype": dtype.name, "shape": list(shapes[0]), "levels": len(shapes),
          "level_shapes": [list(s) for s in shapes], "layout": layout,
          "source": {"driver": driver, "paths": [p for p, _ in datasets[:len(shapes)]], "axes": axes}}


def _parent_ome(url: str) -> tuple[list[str] | None, tuple | None]:
  """(axis names, nm per pixel (z, y, x)) of `url` as a dataset listed in its parent group's OME-Zarr
  multiscales (a URL that picks one level of an OME-Zarr image); (None, None) otherwise."""
  if _is_remote(url):
    parent, _, name = url.rstrip("/").rpartition("/")
    if "://" not in parent or parent.endswith(":/"):
      return None, None
  else:
    path = _local_path(url)
    parent, name = os.path.dirname(path), os.path.basename(path)
  g = _read_json(parent, "zarr.json")
  attrs = (g or {}).get("attributes") or _read_json(parent, ".zattrs") or {}
  found = _find_ome_multiscales(attrs)
  if found is None:
    return None, None
  for ms in found[0]:
    for d in ms.get("datasets", []) if isinstance(ms, dict) else []:
      if isinstance(d, dict) and str(d.get("path", "")).strip("/") == name:
        names, units = _ome_axes(ms)
        scale = _scale_of(d.get("coordinateTransformations"))
        outer = _scale_of(ms.get("coordinateTransformations"))
        if scale is not None and outer is not None:
          scale = [a * b for a, b in zip(scale, outer)]
        return names, _ome_resolution(names, units, scale)[0]
  return None, None


def _plain_array(url: str, driver: str, attrs: dict, names) -> dict:
  """One zarr / N5 array as a one-level volume; resolution from its attributes or its OME-Zarr parent."""
  parent_names, parent_res = (None, None) if driver == "n5" else _parent_ome(url)
  axes = _named_axes(url, names) or parent_names
  meta = _open_levels(url, driver, [("", None)], axes, "array")
  meta["resolution"] = _attrs_resolution(attrs, meta["source"]["axes"]) or parent_res
  meta["unresolved"] = "its metadata records no resolution"
  return meta


def _ome_volume(url: str, driver: str, multiscales: list, version: str, prefix: str = "") -> dict:
  """An OME-Zarr multiscale image (the first of `multiscales`): levels are its datasets, resolution and
  axis order from their scale transforms and `axes` (units converted to nm)."""
  ms = multiscales[0]
  if len(multiscales) > 1:
    logging.info("%s: %d multiscale images; reading the first (%s)", url, len(multiscales), ms.get("name", "0"))
  names, units = _ome_axes(ms)
  if names is not None:
    checked = _named_axes(url, names)
    if checked is None:
      raise InputError(f"{url}: OME-Zarr axes {names} name no z, y, x")
    names = checked
  datasets = [d for d in ms.get("datasets", []) if isinstance(d, dict) and "path" in d]
  if not datasets:
    raise InputError(f"{url}: OME-Zarr multiscales lists no datasets")
  outer = _scale_of(ms.get("coordinateTransformations"))
  levels = []
  for d in datasets:
    scale = _scale_of(d.get("coordinateTransformations"))
    if scale is not None and outer is not None:
      scale = [a * b for a, b in zip(scale, outer)]
    levels.append((prefix + str(d["path"]).strip("/"), scale))
  meta = _open_levels(url, driver, levels, names, f"ome-zarr {version}")
  res, why = _ome_resolution(meta["source"]["axes"], units, levels[0][1])
  meta["resolution"], meta["unresolved"] = res, why
  return meta


def _read_zarr_group(url: str, driver: str, attrs: dict) -> dict:
  """An OME-Zarr image in a zarr group (bioformats2raw's layout: the first series, group `0`)."""
  found = _find_ome_multiscales(attrs)
  if found is not None:
    return _ome_volume(url, driver, *found)
  if "bioformats2raw.layout" in attrs:
    sub = _read_json(url, "0/zarr.json")
    sub_attrs = (sub or {}).get("attributes") if sub is not None else _read_json(url, "0/.zattrs")
    found = _find_ome_multiscales(sub_attrs or {})
    if found is not None:
      return _ome_volume(url, driver, *found, prefix="0/")
  raise InputError(f"{url}: a zarr group without jaxalign or OME-Zarr multiscales metadata; open one of its arrays "
                   "(URL/<array>) instead")


def _n5_axes(attrs: dict) -> list | None:
  """N5 axis names in `dimensions` order: `axes`, or COSEM's `transform.axes` (listed in C order)."""
  if isinstance(attrs.get("axes"), list):
    return attrs["axes"]
  tf = attrs.get("transform")
  if isinstance(tf, dict) and isinstance(tf.get("axes"), list):
    return list(reversed(tf["axes"]))
  return None


def _is_factor_list(v) -> bool:
  return isinstance(v, list) and bool(v) and all(isinstance(f, list) for f in v)


def _read_n5(url: str) -> dict:
  """An N5 dataset, or an n5-viewer (`s0`, `s1`, ...) / BigDataViewer (`setup0/timepoint0/s0`, ...) multiscale
  group. N5 lists dimensions x first; `axes` (or the default x, y, z) names them."""
  attrs = _read_json(url, "attributes.json") or {}
  if "dimensions" in attrs:
    return _plain_array(url, "n5", attrs, _n5_axes(attrs))
  prefix, layout, merged = "", "n5-viewer", dict(attrs)
  setup = _read_json(url, "setup0/attributes.json")
  if setup is not None and _is_factor_list(setup.get("downsamplingFactors")):
    prefix, layout = "setup0/timepoint0/", "bigdataviewer"
    merged.update(setup)
  elif _is_factor_list(attrs.get("downsamplingFactors")) and _read_json(url, "timepoint0/s0/attributes.json"):
    prefix, layout = "timepoint0/", "bigdataviewer"
  if prefix:
    merged.update(_read_json(url, prefix + "attributes.json") or {})
  per = []
  for k in range(MAX_FOREIGN_LEVELS):
    a = _read_json(url, f"{prefix}s{k}/attributes.json")
    if a is None or "dimensions" not in a:
      break
    per.append(a)
  if not per:
    raise InputError(f"{url}: an N5 group without a dataset s0 (n5-viewer) or setup0/timepoint0/s0 "
                     "(BigDataViewer); open one of its datasets (URL/<dataset>) instead")
  factors = merged.get("scales") if _is_factor_list(merged.get("scales")) else merged.get("downsamplingFactors")
  if _is_factor_list(factors):
    per = per[:len(factors)]
    scales = [[float(v) for v in f] for f in factors[:len(per)]]
  else:  # n5-viewer's per-dataset factors (s0 has none); unknown ones are checked by shape alone
    scales = [[float(v) for v in a["downsamplingFactors"]] if isinstance(a.get("downsamplingFactors"), list)
              else ([1.0] * len(a["dimensions"]) if k == 0 else None) for k, a in enumerate(per)]
  s0 = per[0]
  names = _n5_axes(s0) or _n5_axes(merged)
  meta = _open_levels(url, "n5", [(f"{prefix}s{k}", sc) for k, sc in enumerate(scales)],
                      _named_axes(url, names), layout)
  meta["resolution"] = _attrs_resolution({**merged, **s0}, meta["source"]["axes"])
  meta["unresolved"] = f"its {layout} metadata records no resolution"
  return meta


def _read_foreign(url: str, fmt: str) -> dict:
  """Metadata of a volume at `url` that another tool wrote (`fmt` from `_detect_format`), in the form
  `_read_group` gives for jaxalign's own plus `source`, `level_shapes` and `layout` (see `_open_levels`);
  `resolution` is None where the metadata records none, and `unresolved` then says so.

  - zarr v3 (`zarr.json`): an array (tensorstore's `attributes.dimension_units`, `dimension_names`),
    or a group with OME-Zarr 0.5 `attributes.ome.multiscales`;
  - zarr v2 (`.zarray` / `.zgroup`): an array (`.zattrs` `resolution`, xarray's `_ARRAY_DIMENSIONS`), or
    a group with OME-Zarr 0.4 (or older) `.zattrs` `multiscales`; an array that is one dataset of an
    OME-Zarr image takes its axes and resolution from the image;
  - N5: see `_read_n5`.
  """
  if fmt == "zarr3":
    node = _read_json(url, "zarr.json")
    attrs = node.get("attributes") or {}
    if node.get("node_type") == "array":
      return _plain_array(url, "zarr3", attrs, node.get("dimension_names"))
    return _read_zarr_group(url, "zarr3", attrs)
  if fmt == "zarr2":
    attrs = _read_json(url, ".zattrs") or {}
    if _read_json(url, ".zarray") is not None:
      return _plain_array(url, "zarr", attrs, attrs.get("_ARRAY_DIMENSIONS"))
    return _read_zarr_group(url, "zarr", attrs)
  if fmt == "n5":
    return _read_n5(url)
  raise InputError(f"{url}: unreadable {fmt} volume")


def _pick_resolution(url: str, meta: dict, given) -> tuple[float, float, float]:
  """Level-0 nm per pixel (z, y, x): `given` (the caller's, which wins over the metadata's, logged), else
  the recorded one, else `$JAXALIGN_RESOLUTION` (the commands' --resolution), else an InputError."""
  recorded = meta.get("resolution")
  if given is not None:
    res = check_resolution(given, "resolution", volume=True)
    if recorded is not None and not np.allclose(res, recorded, rtol=1e-6):
      logging.warning("%s: using the given resolution %s nm, not the recorded %s nm", url, res, tuple(recorded))
    return res
  if recorded is not None:
    return tuple(float(r) for r in recorded)
  env = os.environ.get(RESOLUTION_ENV, "").strip()
  if env:
    try:
      return parse_resolution(env)
    except InputError as e:
      raise InputError(f"--resolution / ${RESOLUTION_ENV}: {e}") from None
  why = meta.get("unresolved") or "its metadata records no resolution"
  raise InputError(f"{url}: {why}; give it as --resolution=z,y,x (nm per pixel, e.g. --resolution=40,4,4; "
                   "in Python open_volume(url, resolution=(z, y, x)))")


def _create_level(url: str, fmt: str, meta: dict, level: int, chunks, config: IOConfig) -> None:
  shape = level_shape(meta["shape"], level)
  ch = (min(chunks[0], shape[0]), min(chunks[1], shape[1]), min(chunks[2], shape[2]))
  spec = _array_spec(url, fmt, level, {
      "shape": shape, "dtype": meta["dtype"], "chunks": ch, "kind": meta["kind"],
      "resolution": level_resolution(meta["resolution"], level), "zstd_level": config.zstd_level})
  arr = ts.open(spec, create=True, open=True, context=_context(config)).result()
  if fmt == "n5":  # n5-viewer reads per-dataset downsamplingFactors (x, y, z)
    key = _level_key(fmt, level) + "/attributes.json"
    attrs = _read_json(url, key)
    attrs["downsamplingFactors"] = [2 ** level, 2 ** level, 1] + ([1] if meta["kind"] == "field" else [])
    attrs["jaxalign"] = {"kind": meta["kind"], "level": level,
                         "resolution": list(level_resolution(meta["resolution"], level))}
    _write_json(url, key, attrs)
  del arr


def create_volume(url: str, shape: Sequence[int], dtype, resolution: Sequence[float], chunks=None,
                  format: str = "zarr3", levels: int = 1, *, kind: str | None = None,
                  config: IOConfig = DEFAULT_CONFIG) -> Volume:
  """Creates (or re-opens an identical) volume.

  Args:
    url: local path (or file://), gs://bucket/path or s3://bucket/path.
    shape: `[Z, H, W]` for images/masks, `[Z, H, W, 2]` for fields (level 0).
    dtype: uint8, uint16, uint32 or float32 (fields: float32; bool masks are stored as uint8).
    resolution: nm per pixel (z, y, x) at level 0.
    chunks: chunk shape (z, y, x); default (1, 512, 512), clipped to each level's shape.
    format: "zarr3" (default), "neuroglancer_precomputed" ("precomputed") or "n5".
    levels: number of MIP levels to allocate (filled by `build_pyramid`).
    kind: "image", "field", "mask", "defect" or "tissue"; default "field" for 4-d shapes else "image".
  Returns:
    the open Volume. If a volume with the same shape, dtype, resolution and kind already exists at
    `url`, it is opened (so an interrupted import can be repeated); a different one is an InputError.
  """
  fmt = _normalize_format(format)
  kind = _infer_kind(shape, kind)
  shape, dt = _check_layout(shape, dtype, kind)
  res = check_resolution(resolution, "resolution", volume=True)
  chunks = _default_chunks(shape, config) if chunks is None else _check_chunks(chunks, shape)
  if not isinstance(levels, (int, np.integer)) or levels < 1:
    raise InputError(f"levels must be a positive integer, got {levels!r}")
  if not _is_remote(url) and os.path.isfile(_local_path(url)):
    raise InputError(f"volume path {url} is an existing file, not a folder")
  existing_fmt = _detect_format(url)
  if existing_fmt is not None:
    old = _read_group(url, existing_fmt)
    if old is None or existing_fmt != fmt or tuple(old["shape"]) != shape or old["dtype"] != dt.name \
        or tuple(map(float, old["resolution"])) != res or old["kind"] != kind:
      raise InputError(f"{url} already holds a different volume ({existing_fmt}, {old}); remove it or pick another path")
    levels = max(levels, int(old["levels"]))
  meta = _group_meta(shape, dt, res, kind, levels)
  for k in range(levels):
    _create_level(url, fmt, meta, k, chunks, config)
  _write_group(url, fmt, meta)
  logging.info("volume %s: %s %s %s, %s nm, %d level(s)", url, fmt, kind, shape, res, levels)
  return Volume(url, fmt, meta, config)


def open_volume(url: str, config: IOConfig = DEFAULT_CONFIG, *, resolution: Sequence[float] | None = None) -> Volume:
  """Opens a volume in place; its format and layout are detected.

  Reads jaxalign's own volumes and, without conversion, what other tools write (module docstring):
  zarr v2 / v3 arrays `[Z, Y, X]` (fields `[Z, Y, X, 2]`), OME-Zarr 0.4 / 0.5 images (levels = its
  datasets, axes such as `tczyx` with singleton t / c transposed to `[Z, Y, X]`), N5 datasets and
  n5-viewer / BigDataViewer pyramids (N5 lists x first), and neuroglancer precomputed volumes.

  Args:
    url: local path, file://, gs:// or s3:// URL of the volume (a group), or of one array.
    config: I/O settings.
    resolution: nm per pixel (z, y, x) at level 0. Needed where the metadata records none (a plain
      array, OME-Zarr without length units); where it records one, this one is used instead (logged).
      Without it, `$JAXALIGN_RESOLUTION` ("z,y,x", set by the commands' --resolution flag) fills in.
  Returns:
    the Volume (`Volume.layout` says whose metadata it has).
  Raises:
    InputError: missing path, no readable volume, an axis order or dtype jaxalign cannot read, or no
      resolution anywhere (the message names --resolution).
  """
  if not _is_remote(url) and not os.path.exists(_local_path(url)):
    raise InputError(f"missing path: {url}")
  fmt = _detect_format(url)
  if fmt is None:
    raise InputError(f"{url}: missing or not a volume (no zarr.json, .zarray / .zgroup, N5 attributes.json or "
                     "precomputed info)")
  meta = _read_group(url, fmt)
  if meta is None:
    meta = _read_foreign(url, fmt)
    fmt = "zarr2" if meta["source"]["driver"] == "zarr" else meta["source"]["driver"]
  meta = dict(meta)
  meta["resolution"] = _pick_resolution(url, meta, resolution)
  vol = Volume(url, fmt, meta, config)
  if vol.layout != "jaxalign":
    logging.info("opened %r", vol)
  return vol


def add_levels(volume: Volume, levels: int, config: IOConfig) -> Volume:
  """Allocates levels up to `levels` (total) and returns the re-opened volume."""
  if levels <= volume.levels:
    return volume
  if volume._source is not None:  # its metadata belongs to the tool that wrote it
    raise InputError(f"{volume.url} ({volume.layout}, written by another tool) has {volume.levels} level(s); "
                     f"jaxalign does not add levels to it: ask for at most {volume.levels}, or copy it into a "
                     "jaxalign volume first")
  meta = _group_meta(volume.shape(0), volume.dtype, volume.resolution, volume.kind, levels)
  chunks = volume.chunks(0)
  for k in range(volume.levels, levels):
    _create_level(volume.url, volume.format, meta, k, chunks, config)
  _write_group(volume.url, volume.format, meta)
  return open_volume(volume.url, volume.config)
