"""Input validation shared by every public entry point.

Kernels stay pure and trace-friendly: they only check *static* properties (shapes, ndim) at trace
time. Value checks (NaN, empty sections) run on concrete host arrays at the API boundary
(`align_pair`, `align_block`, CLI commands) through the helpers below.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np


class InputError(ValueError):
  """Bad user input. The CLI turns it into exit status 2 and one line naming the problem."""


# Parts of a storage error message that say nothing to a user ("; at byte 0", tensorstore's status
# code prefix) are trimmed from a ReadError's one line.
_STATUS_PREFIX = re.compile(r"^[A-Z_]+: ")
_CHUNK_KEY = re.compile(r'"([^"]+)"')


class ReadError(InputError):
  """Stored data that cannot be read (a corrupt or truncated chunk, a failing storage read).

  The message is one line naming the volume, the section, the region and (where the storage layer
  says) the chunk key that failed, e.g.
  `vol.zarr: cannot read section z=2 at level 0 (y 0:64, x 0:64): chunk /data/vol.zarr/0/c/2/1/0:
  ZSTD_decompressStream() failed: Unknown frame descriptor`.

  Attributes:
    url: the volume.
    z: the section (int), or (z0, z1) when the failing section of a multi-section read is unknown.
    level: MIP level read.
    box: ((y0, y1), (x0, x1)) pixels of `level` that were read.
    chunk: the storage key of the failing chunk (a file path or URL), or None when not reported.
    detail: the storage layer's reason.
  """

  def __init__(self, url: str, z, level: int, box, chunk: str | None, detail: str):
    self.url, self.z, self.level, self.box, self.chunk, self.detail = url, z, level, box, chunk, detail
    where = f"section z={z}" if isinstance(z, (int, np.integer)) else f"sections z={z[0]}..{z[1] - 1}"
    (y0, y1), (x0, x1) = box
    what = f"chunk {chunk}: " if chunk else ""
    super().__init__(f"{url}: cannot read {where} at level {level} (y {y0}:{y1}, x {x0}:{x1}): {what}{detail}")

  def __reduce__(self):  # picklable across worker processes (Dask, process pools)
    return (type(self), (self.url, self.z, self.level, self.box, self.chunk, self.detail))

  @classmethod
  def from_storage_error(cls, url: str, z, level: int, box, error: BaseException) -> "ReadError":
    """A ReadError from the storage layer's exception (e.g. tensorstore's ValueError
    `FAILED_PRECONDITION: Error reading local file "<key>": <reason>; at byte 0`): the quoted key
    becomes `chunk`, the rest (on one line, status code dropped) `detail`."""
    text = " ".join(str(error).split())
    m = _CHUNK_KEY.search(text)
    chunk = m.group(1) if m else None
    detail = text[m.end():].lstrip(": ") if m else text
    detail = _STATUS_PREFIX.sub("", detail.split("; at ")[0]).strip() or type(error).__name__
    return cls(url, z, level, box, chunk, detail)


def check_image(x, name: str = "image", *, ndim: int | Sequence[int] = 2,
                allow_empty: bool = False) -> np.ndarray:
  """Checks a concrete image array and returns it as float32 NumPy.

  Args:
    x: array-like `[H, W]` (or `ndim` dims), any real dtype (uint8/uint16/float).
    name: how the error message names this input.
    ndim: accepted number(s) of dimensions.
    allow_empty: if False, an all-zero image (no data at all) is rejected.
  Returns:
    float32 ndarray of the same shape.
  """
  ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  try:
    arr = np.asarray(x)
  except Exception as e:  # noqa: BLE001 - anything unconvertible is a user error
    raise InputError(f"{name}: cannot convert to an array ({e})") from None
  if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
    raise InputError(f"{name}: dtype {arr.dtype} is not a real numeric type (expected uint8/uint16/float32)")
  if arr.ndim not in ndims:
    raise InputError(f"{name}: expected {' or '.join(map(str, ndims))} dimensions, got shape {arr.shape}")
  if arr.size == 0 or min(arr.shape) == 0:
    raise InputError(f"{name}: empty array of shape {arr.shape}")
  arr = arr.astype(np.float32, copy=False)
  if not np.all(np.isfinite(arr)):
    raise InputError(f"{name}: contains NaN or Inf values")
  if not allow_empty and not np.any(arr):
    raise InputError(f"{name}: all pixels are zero (no data)")
  return arr


def check_field(f, name: str = "field", *, shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Checks a concrete displacement field `[..., H, W, 2]` (pixels, (dy, dx)); returns float32."""
  arr = np.asarray(f)
  if not np.issubdtype(arr.dtype, np.floating):
    raise InputError(f"{name}: dtype {arr.dtype} is not floating point (expected float32 pixels)")
  if arr.ndim < 3 or arr.shape[-1] != 2:
    raise InputError(f"{name}: expected shape [..., H, W, 2], got {arr.shape}")
  if shape is not None and tuple(arr.shape[-3:-1]) != tuple(shape):
    raise InputError(f"{name}: spatial shape {arr.shape[-3:-1]} does not match {tuple(shape)}")
  if not np.all(np.isfinite(arr)):
    raise InputError(f"{name}: contains NaN or Inf values")
  return arr.astype(np.float32, copy=False)


def check_section_weights(w, num_sections: int) -> np.ndarray:
  """Checks optional per-section weights (None = all 1); returns `[num_sections]` float64."""
  if w is None:
    return np.ones(num_sections)
  arr = np.asarray(w, np.float64)
  if arr.shape != (num_sections,) or np.any(~np.isfinite(arr)) or np.any(arr < 0):
    raise InputError(f"section_weights must be {num_sections} finite non-negative values")
  return arr


def check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
  """Raises InputError if the two arrays' shapes differ."""
  if tuple(np.shape(a)) != tuple(np.shape(b)):
    raise InputError(f"{name_a} shape {tuple(np.shape(a))} does not match {name_b} shape {tuple(np.shape(b))}")


def check_mask(m, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
  """Checks an optional mask (bool or 0/1 numbers) of the given shape; returns bool or None."""
  if m is None:
    return None
  arr = np.asarray(m)
  if tuple(arr.shape) != tuple(shape):
    raise InputError(f"{name}: shape {arr.shape} does not match image shape {tuple(shape)}")
  if arr.dtype != bool:
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
      raise InputError(f"{name}: dtype {arr.dtype} is not a mask dtype")
    if not np.all(np.isfinite(arr)):
      raise InputError(f"{name}: contains NaN or Inf values")
    arr = arr > 0.5 if np.issubdtype(arr.dtype, np.floating) else arr != 0
  return arr


def check_pair(src, tgt, src_defects=None, tgt_defects=None, init_field=None):
  """Checks the inputs of one pair-aligner call (`(src, tgt, *, init_field, src_defects, tgt_defects)`).

  Args:
    src, tgt: `[H, W]` images of equal shape, each with some non-zero data.
    src_defects, tgt_defects: optional `[H, W]` masks (True = defect).
    init_field: optional `[H, W, 2]` float field, pixels, (dy, dx).
  Returns:
    `(src, tgt, src_defects, tgt_defects, init_field)`: float32 images, bool masks or None, and a
    float32 field or None.
  """
  src = check_image(src, "src")
  tgt = check_image(tgt, "tgt")
  check_same_shape(src, tgt, "src", "tgt")
  shape = src.shape
  src_defects = check_mask(src_defects, "src_defects", shape)
  tgt_defects = check_mask(tgt_defects, "tgt_defects", shape)
  if init_field is not None:
    init_field = check_field(init_field, "init_field", shape=shape)
    if init_field.ndim != 3:
      raise InputError(f"init_field: expected [H, W, 2], got {init_field.shape}")
  return src, tgt, src_defects, tgt_defects, init_field


def check_resolution(res, name: str = "resolution_nm", *,
                     volume: bool = False) -> tuple[float, float, float] | None:
  """Checks a physical resolution: None, one nm/px value for y and x, or nm per pixel (z, y, x).

  Returns (z, y, x) floats (a single value gives (value, value, value)), or None. `volume` (a
  volume's own resolution) requires exactly three values: the section thickness is never implied.
  Raises InputError unless every value is a finite number > 0.
  """
  if res is None:
    if volume:
      raise InputError(f"{name}: expected nm per pixel as (z, y, x), got None")
    return None
  try:
    vals = np.asarray(res, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise InputError(f"{name}: expected nm per pixel as (z, y, x) numbers, got {res!r}") from None
  if vals.size == 1 and not volume:
    vals = np.repeat(vals, 3)
  if vals.size != 3:
    raise InputError(f"{name}: expected nm per pixel as (z, y, x), got {vals.size} values ({res!r})")
  if not np.all(np.isfinite(vals)) or np.any(vals <= 0):
    raise InputError(f"{name}: every value must be a finite number of nm > 0, got {tuple(vals.tolist())}")
  return tuple(float(v) for v in vals)
