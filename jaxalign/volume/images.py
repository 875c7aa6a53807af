"""PNG/TIFF stacks in and out of volumes: `import_stack` (a folder of sections or a multi-page TIFF
into a volume) and `export_stack` (a volume's sections to PNG/TIFF files). The volume store is
`jaxalign.volume.store`."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
from typing import Sequence

import numpy as np
from absl import logging

from jaxalign.errors import InputError, check_resolution
from jaxalign.volume.pyramid import build_pyramid
from jaxalign.volume.store import DEFAULT_CONFIG, DTYPES, IMAGE_SUFFIXES, IOConfig, Volume, create_volume, open_volume

# ----------------------------------------------------------------------------------------------
# Import / export of image stacks


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _list_sections(src: str) -> list[pathlib.Path]:
  p = pathlib.Path(src)
  if not p.exists():
    raise InputError(f"missing path: {src}")
  if p.is_dir():
    files = sorted((f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda f: _natural_key(f.name))
    if not files:
      raise InputError(f"{src}: folder holds no PNG/TIFF sections ({', '.join(IMAGE_SUFFIXES)})")
    return files
  if p.suffix.lower() not in IMAGE_SUFFIXES:
    raise InputError(f"{src}: not a PNG/TIFF file or a folder of them")
  return [p]


_PIL_DTYPES = {"L": np.uint8, "I": np.uint16, "I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "F": np.float32,
               "1": np.uint8}


def _probe(path: pathlib.Path) -> list[tuple[tuple[int, int], np.dtype]]:
  """(shape, dtype) of each page, from headers only."""
  if path.suffix.lower() in (".tif", ".tiff"):
    import tifffile
    try:
      with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        if "S" in series.axes:
          raise InputError(f"{path}: TIFF holds colour samples (axes {series.axes}); expected grayscale sections")
        shape, dt = tuple(series.shape), np.dtype(series.dtype)
        if len(shape) == 3:
          pages = [(shape[1:], dt)] * shape[0]
        else:
          pages = [(shape, dt)]
    except InputError:
      raise
    except Exception as e:  # noqa: BLE001 - a broken file is bad input
      raise InputError(f"{path}: cannot read TIFF ({e})") from None
  else:
    from PIL import Image
    try:
      with Image.open(path) as im:
        if im.mode not in _PIL_DTYPES:
          raise InputError(f"{path}: image mode {im.mode} is not grayscale (expected L, I;16 or F)")
        pages = [((im.size[1], im.size[0]), np.dtype(_PIL_DTYPES[im.mode]))]
    except InputError:
      raise
    except Exception as e:  # noqa: BLE001
      raise InputError(f"{path}: cannot read image ({e})") from None
  for shape, dt in pages:
    if len(shape) != 2:
      raise InputError(f"{path}: section of shape {shape} is not a 2-d grayscale image")
  return pages


def _load(path: pathlib.Path, page: int | None) -> np.ndarray:
  if path.suffix.lower() in (".tif", ".tiff"):
    import tifffile
    with tifffile.TiffFile(path) as tf:
      if page is None or len(tf.series[0].shape) == 2:
        return tf.series[0].asarray()
      if len(tf.pages) > page and tuple(tf.pages[page].shape) == tuple(tf.series[0].shape[1:]):
        return tf.pages[page].asarray()  # one page per section: read only that one
      return tf.series[0].asarray()[page]
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im)


def import_stack(src: str, url: str, resolution: Sequence[float], *, format: str = "zarr3", chunks=None,
                 levels: int = 1, dtype=None, kind: str = "image", config: IOConfig = DEFAULT_CONFIG,
                 progress: bool = True) -> Volume:
  """Imports a folder of PNG/TIFF sections (natural name order) or a multi-page TIFF into a volume.

  Every file header is checked (same size, grayscale, one dtype) before anything is created, so bad
  input writes nothing; sections are then decoded in a thread pool and written one chunk-aligned
  section at a time with up to `config.inflight` writes in flight. Repeating an interrupted import
  re-opens the same volume and rewrites it.

  Args:
    src: folder of .png/.tif/.tiff sections, or one (multi-page) TIFF / PNG file.
    url: destination volume (see `create_volume`).
    resolution: nm per pixel (z, y, x).
    format, chunks, levels: as in `create_volume`; levels > 1 also builds the pyramid.
    dtype: stored dtype; default the files' dtype (uint8, uint16 or float32).
    kind: "image", or "defect" / "tissue" / "mask" for mask stacks (non-zero = set; stored as is).
  Returns:
    the Volume, `[Z, H, W]`.
  """
  from tqdm import tqdm

  res = check_resolution(resolution, "resolution", volume=True)
  files = _list_sections(src)
  entries: list[tuple[pathlib.Path, int | None]] = []
  shape = dt = None
  for f in files:
    pages = _probe(f)
    for i, (s, d) in enumerate(pages):
      if shape is None:
        shape, dt = s, d
      elif s != shape:
        raise InputError(f"{f}: section size {s} differs from the first section's {shape}")
      elif d != dt:
        raise InputError(f"{f}: dtype {d} differs from the first section's {dt}")
      entries.append((f, i))
  out_dt = np.dtype(dtype) if dtype is not None else dt
  if out_dt.name not in DTYPES:
    raise InputError(f"{src}: section dtype {out_dt} not supported; expected one of {', '.join(DTYPES)}")
  if not np.can_cast(dt, out_dt, "safe"):  # refuse up front rather than fail on a late section
    raise InputError(f"{src}: {dt} sections cannot be stored losslessly as {out_dt}")
  if kind == "field":
    raise InputError("fields cannot be imported from PNG/TIFF sections")
  vol = create_volume(url, (len(entries), *shape), out_dt, res, chunks, format=format, levels=1, kind=kind,
                      config=config)
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    decoded = pool.map(lambda e: _load(*e), entries)
    inflight: list = []
    for z, img in enumerate(tqdm(decoded, total=len(entries), desc="import", disable=not progress, unit="section")):
      if img.shape != tuple(shape):
        raise InputError(f"{entries[z][0]}: decoded size {img.shape} differs from its header {shape}")
      inflight.append(vol.write(img, z, wait=False))
      if len(inflight) >= config.inflight:
        inflight.pop(0).result()
    for f in inflight:
      f.result()
  logging.info("imported %d sections from %s into %s", len(entries), src, url)
  if levels > 1:
    vol = build_pyramid(vol, levels, config=config, progress=progress)
  return vol


EXPORT_FORMATS = ("png", "tif", "tiff")


def export_stack(volume: Volume | str, folder: str, fmt: str = "png", *, level: int = 0, z=None,
                 config: IOConfig = DEFAULT_CONFIG, progress: bool = True) -> list[str]:
  """Writes sections as `folder/0000.png` (or .tif), one file per section, in z order.

  PNG takes uint8 / uint16 (masks, images); float32 images and fields (`[H, W, 2]`) need TIFF.

  Args:
    volume: a Volume or its URL.
    folder: output folder (created).
    fmt: "png", "tif" or "tiff".
    level: MIP level to export.
    z: optional contiguous range of sections (as in `Volume.read`); default all.
  Returns:
    the written file paths.
  """
  from tqdm import tqdm

  vol = open_volume(volume, config) if isinstance(volume, str) else volume
  fmt = str(fmt).lower().lstrip(".")
  if fmt not in EXPORT_FORMATS:
    raise InputError(f"export format {fmt!r} not supported; expected one of {', '.join(EXPORT_FORMATS)}")
  if fmt == "png" and vol.dtype not in (np.uint8, np.uint16):
    raise InputError(f"PNG cannot hold {vol.dtype} {vol.kind} sections; export as tif")
  vol._check_level(level)
  nz = vol.shape(level)[0]
  if z is None:
    zs = range(nz)
  elif isinstance(z, (int, np.integer)):
    vol._index(z, level, None)
    zs = range(int(z), int(z) + 1)
  else:
    (zsl, _, _), _ = vol._index(z, level, None)
    zs = range(zsl.start, zsl.stop)
  if os.path.isfile(folder):
    raise InputError(f"export destination {folder} is an existing file, not a folder")
  os.makedirs(folder, exist_ok=True)
  width = max(4, len(str(nz - 1)))
  paths = []

  def save(zz: int, img: np.ndarray) -> str:
    path = os.path.join(folder, f"{zz:0{width}d}.{fmt}")
    tmp = path + ".part"  # rename so an interrupted export never leaves a truncated section
    if fmt == "png":
      from PIL import Image
      Image.fromarray(img).save(tmp, format="PNG")
    else:
      import tifffile
      tifffile.imwrite(tmp, img, photometric="minisblack")
    os.replace(tmp, path)
    return path

  with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
    reads = {}
    zs = list(zs)
    for i in range(min(config.inflight, len(zs))):
      reads[zs[i]] = vol.read_async(zs[i], level)
    saves = []
    for i, zz in enumerate(tqdm(zs, desc="export", disable=not progress, unit="section")):
      img = reads.pop(zz).result()
      if i + config.inflight < len(zs):
        nz_ = zs[i + config.inflight]
        reads[nz_] = vol.read_async(nz_, level)
      saves.append(pool.submit(save, zz, img))
    paths = [s.result() for s in saves]
  logging.info("exported %d sections of %s to %s", len(paths), vol.url, folder)
  return paths
