"""Overlapping chunks of a section: split, run a function on each (vmapped batches), reassemble.

A section `[H, W, ...]` (an image `[H, W]`, a field `[H, W, 2]`, an encoding `[H, W, C]`, or
several of them for a pair) is covered by windows of `chunk` pixels whose cores tile it.
Neighbouring windows overlap by at least `2 * overlap` pixels (more for the last window of a row or
column, which is shifted inside the section rather than padded, so a window never reaches outside
the section unless the section is smaller than the chunk).

Reassembly:
- "crop": each chunk contributes only its core, which lies at least `overlap` pixels from every
  window edge that is inside the section. An operation whose output at a pixel depends only on
  inputs within `overlap` pixels (e.g. a Gaussian blur truncated at radius <= overlap) is therefore
  reproduced exactly, border handling included.
- "blend": every chunk contributes its whole window with a weight that ramps (raised cosine) across
  each overlap with a neighbour and is 1 elsewhere; weights are normalised to sum to 1 at every
  pixel, so a function that agrees on the overlaps is reproduced and disagreements fade smoothly
  instead of stepping at a seam.

Re-centring for large displacements: `read_chunk` and `map_chunks(offsets=...)` read a chunk's window
shifted by an integer `(dy, dx)` (filling outside the section), e.g. to bring the source chunk near
its target before a local aligner runs; the caller adds the shift back to the chunk's field.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable, Sequence

import jax
import numpy as np
import tensorstore as ts

from jaxalign.errors import InputError

MODES = ("crop", "blend")
DEFAULT_BATCH = 8


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
  """One chunk of a section.

  Attributes:
    index: (row, col) in the chunk grid.
    window: (y-slice, x-slice) of the section this chunk reads; its size is the chunk size.
    core: (y-slice, x-slice) of the section this chunk owns in "crop" mode (cores tile the section).
    crop: `core` relative to the window (slices into the chunk).
    overlaps: pixels shared with the previous / next window along y and x:
      (top, bottom, left, right); 0 at the section border.
  """
  index: tuple[int, int]
  window: tuple[slice, slice]
  core: tuple[slice, slice]
  crop: tuple[slice, slice]
  overlaps: tuple[int, int, int, int]

  @property
  def origin(self) -> tuple[int, int]:
    """Top-left pixel (y, x) of the window in the section."""
    return self.window[0].start, self.window[1].start

  @property
  def size(self) -> tuple[int, int]:
    return self.window[0].stop - self.window[0].start, self.window[1].stop - self.window[1].start


def _pair(v, name: str) -> tuple[int, int]:
  try:
    t = (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(a) for a in v)
  except (TypeError, ValueError):
    raise InputError(f"{name} must be an int or a pair of ints, got {v!r}") from None
  if len(t) != 2:
    raise InputError(f"{name} must be an int or a pair of ints, got {v!r}")
  return t


def _split_axis(n: int, c: int, ov: int) -> list[tuple[int, int, int, int]]:
  """Windows along one axis: list of (window_start, core_start, core_stop, ...) for length n."""
  c = min(c, n)
  if c == n:
    return [(0, 0, n)]
  stride = c - 2 * ov
  count = math.ceil((n - c) / stride) + 1
  starts = [min(i * stride, n - c) for i in range(count)]
  # core boundary between windows i and i+1: the middle of their overlap, which is >= 2*overlap wide
  bounds = [0] + [(starts[i + 1] + starts[i] + c) // 2 for i in range(count - 1)] + [n]
  return [(starts[i], bounds[i], bounds[i + 1]) for i in range(count)]


def split(shape: Sequence[int], chunk, overlap) -> list[ChunkSpec]:
  """Splits a section into overlapping chunks.

  Args:
    shape: `(H, W, ...)` of the section (only H and W are used).
    chunk: window size in pixels, int or (h, w); clipped to the section size.
    overlap: margin in pixels, int or (y, x); each core lies >= overlap from interior window edges.
      Needs chunk > 2 * overlap.
  Returns:
    ChunkSpecs in row-major order; all windows have the same size.
  """
  if len(shape) < 2:
    raise InputError(f"split needs a shape (H, W, ...), got {tuple(shape)}")
  h, w = int(shape[0]), int(shape[1])
  ch, cw = _pair(chunk, "chunk")
  oy, ox = _pair(overlap, "overlap")
  if min(h, w) <= 0:
    raise InputError(f"cannot split an empty section of shape {tuple(shape)}")
  if min(oy, ox) < 0:
    raise InputError(f"overlap must be >= 0, got {overlap!r}")
  for c, o, n, ax in ((ch, oy, h, "y"), (cw, ox, w, "x")):
    if min(c, n) <= 2 * o and c < n:
      raise InputError(f"chunk {c} along {ax} must exceed twice the overlap {o}")
  rows, cols = _split_axis(h, ch, oy), _split_axis(w, cw, ox)
  sy, sx = min(ch, h), min(cw, w)

  def overlaps(axis, i, size):
    prev = axis[i - 1][0] + size - axis[i][0] if i > 0 else 0
    nxt = axis[i][0] + size - axis[i + 1][0] if i + 1 < len(axis) else 0
    return prev, nxt

  specs = []
  for i, (wy, cy0, cy1) in enumerate(rows):
    for j, (wx, cx0, cx1) in enumerate(cols):
      specs.append(ChunkSpec(
          index=(i, j),
          window=(slice(wy, wy + sy), slice(wx, wx + sx)),
          core=(slice(cy0, cy1), slice(cx0, cx1)),
          crop=(slice(cy0 - wy, cy1 - wy), slice(cx0 - wx, cx1 - wx)),
          overlaps=overlaps(rows, i, sy) + overlaps(cols, j, sx)))
  return specs


def _as_source(array):
  """NumPy-like arrays pass through; a tensorstore view is kept lazy (origin moved to 0) so only
  the windows are ever read from storage."""
  if isinstance(array, ts.TensorStore):
    return array[ts.d[:].translate_to[0]]
  return np.asarray(array)


def _take(a, ys: slice, xs: slice) -> np.ndarray:
  part = a[ys, xs]
  if isinstance(part, ts.TensorStore):
    return part.read().result()
  return part


def read_chunk(array, spec: ChunkSpec, offset: Sequence[int] = (0, 0), fill: float = 0.0) -> np.ndarray:
  """The chunk's window of `array` `[H, W, ...]`, shifted by an integer `offset` (dy, dx).

  `array` is a NumPy/JAX array or a tensorstore view (e.g. `Volume.array(level)[z]`), of which only
  the window is read. Pixels outside the section are `fill`. Returns `[h, w, ...]` (the window size).
  """
  a = _as_source(array)
  dy, dx = (int(round(o)) for o in offset)
  (y0, y1), (x0, x1) = [(s.start, s.stop) for s in spec.window]
  y0, y1, x0, x1 = y0 + dy, y1 + dy, x0 + dx, x1 + dx
  h, w = a.shape[:2]
  if 0 <= y0 and y1 <= h and 0 <= x0 and x1 <= w:
    return _take(a, slice(y0, y1), slice(x0, x1))
  dtype = a.dtype.numpy_dtype if isinstance(a, ts.TensorStore) else a.dtype
  out = np.full((y1 - y0, x1 - x0) + tuple(a.shape[2:]), fill, dtype=dtype)
  sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
  if sy0 < sy1 and sx0 < sx1:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = _take(a, slice(sy0, sy1), slice(sx0, sx1))
  return out


def _ramp(n: int, before: int, after: int) -> np.ndarray:
  """1-d weight: raised-cosine rise over the first `before` px, fall over the last `after`, else 1.

  sin^2 ramps of the same length on the two sides of an overlap sum to exactly 1.
  """
  t = np.arange(n, dtype=np.float64) + 0.5
  w = np.ones(n)
  if before:
    w = np.where(t < before, np.sin(0.5 * np.pi * t / before) ** 2, w)
  if after:
    u = n - t
    w = np.minimum(w, np.where(u < after, np.sin(0.5 * np.pi * u / after) ** 2, 1.0))
  return w


def blend_weights(spec: ChunkSpec) -> np.ndarray:
  """Blend weight `[h, w]` float64 of a chunk (before normalisation across chunks)."""
  h, w = spec.size
  top, bottom, left, right = spec.overlaps
  return np.outer(_ramp(h, top, bottom), _ramp(w, left, right))


def assemble(outputs: Sequence, specs: Sequence[ChunkSpec], shape: Sequence[int], mode: str = "crop",
             dtype=np.float32) -> np.ndarray:
  """Reassembles chunk outputs `[h, w, ...]` (one per spec) into a section `[H, W, ...]`."""
  if mode not in MODES:
    raise InputError(f"mode must be one of {MODES}, got {mode!r}")
  acc = Assembler(shape, mode, dtype)
  for out, spec in zip(outputs, specs, strict=True):
    acc.add(out, spec)
  return acc.result()


class Assembler:
  """Incremental reassembly, so chunk outputs need not all be held at once."""

  def __init__(self, shape: Sequence[int], mode: str, dtype=np.float32):
    if mode not in MODES:
      raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    self.shape, self.mode, self.dtype = tuple(shape), mode, np.dtype(dtype)
    self.out = None
    self.wsum = np.zeros(self.shape[:2], np.float64) if mode == "blend" else None

  def add(self, out, spec: ChunkSpec) -> None:
    out = np.asarray(out)
    if out.shape[:2] != spec.size:
      raise InputError(f"chunk output of shape {out.shape} does not match the chunk size {spec.size}")
    if self.out is None:
      acc_dtype = np.float64 if self.mode == "blend" else self.dtype
      self.out = np.zeros(self.shape[:2] + out.shape[2:], acc_dtype)
    if self.mode == "crop":
      self.out[spec.core] = out[spec.crop]
    else:
      wgt = blend_weights(spec)
      self.out[spec.window] += out * wgt.reshape(wgt.shape + (1,) * (out.ndim - 2))
      self.wsum[spec.window] += wgt

  def result(self) -> np.ndarray:
    if self.mode == "crop":
      return self.out
    w = self.wsum.reshape(self.wsum.shape + (1,) * (self.out.ndim - 2))
    return (self.out / w).astype(self.dtype)


_BATCHED: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def _batched(fn: Callable) -> Callable:
  """jit(vmap(fn)), cached per function so repeated calls do not recompile."""
  try:
    return _BATCHED[fn]
  except (KeyError, TypeError):
    pass
  f = jax.jit(jax.vmap(fn))
  try:
    _BATCHED[fn] = f
  except TypeError:  # not weak-referenceable: just don't cache
    pass
  return f


def map_chunks(fn: Callable, arrays, chunk, overlap, mode: str = "crop", batch: int | None = DEFAULT_BATCH,
               offsets: Callable[[ChunkSpec], Sequence] | None = None, fill: float = 0.0,
               dtype=np.float32, progress: bool = False) -> np.ndarray:
  """Runs `fn` on overlapping chunks of a section (or a pair / several arrays) and reassembles.

  Args:
    fn: `fn(*chunks) -> [h, w, ...]`, one chunk `[h, w, ...]` per input array. With `batch`, fn
      must be a JAX function: it runs as jit(vmap(fn)) on `batch` chunks at a time, the last batch
      padded by repeating a chunk so there is one compilation. With `batch=None` fn is called on
      one chunk at a time (any NumPy/JAX function).
    arrays: one array `[H, W, ...]` or a sequence of arrays sharing H and W (e.g. (src, tgt));
      tensorstore views (e.g. `Volume.array(level)[z]`) are read window by window.
    chunk, overlap: as in `split`.
    mode: "crop" (exact for operations local within `overlap`) or "blend" (seamless).
    batch: chunks per vmapped call, or None.
    offsets: optional `offsets(spec) -> [(dy, dx) or None per array]`: read that array's window
      shifted by an integer offset (outside the section = `fill`), for re-centring.
    fill: value outside the section for shifted reads.
    dtype: output dtype.
    progress: show a tqdm bar.
  Returns:
    `[H, W, ...]` reassembled output (NumPy).
  """
  single = not isinstance(arrays, (tuple, list))
  arrs = [_as_source(arrays)] if single else [_as_source(a) for a in arrays]
  if not arrs:
    raise InputError("map_chunks needs at least one array")
  hw = tuple(arrs[0].shape[:2])
  for i, a in enumerate(arrs):
    if len(a.shape) < 2 or tuple(a.shape[:2]) != hw:
      raise InputError(f"array {i} of shape {tuple(a.shape)} does not share (H, W) = {hw} with array 0")
  if mode not in MODES:
    raise InputError(f"mode must be one of {MODES}, got {mode!r}")
  if batch is not None and (not isinstance(batch, (int, np.integer)) or batch < 1):
    raise InputError(f"batch must be a positive integer or None, got {batch!r}")
  specs = split(hw, chunk, overlap)

  def chunks_of(spec):
    offs = offsets(spec) if offsets is not None else [None] * len(arrs)
    if len(offs) != len(arrs):
      raise InputError(f"offsets returned {len(offs)} entries for {len(arrs)} arrays")
    return [read_chunk(a, spec, o, fill) if o is not None else read_chunk(a, spec) for a, o in zip(arrs, offs)]

  acc = Assembler(hw, mode, dtype)
  from tqdm import tqdm
  bar = tqdm(total=len(specs), desc="chunks", disable=not progress, unit="chunk")
  if batch is None:
    for spec in specs:
      acc.add(np.asarray(fn(*chunks_of(spec))), spec)
      bar.update(1)
  else:
    run = _batched(fn)
    for b0 in range(0, len(specs), batch):
      group = specs[b0:b0 + batch]
      pieces = [chunks_of(s) for s in group]
      pieces += [pieces[-1]] * (batch - len(group))  # pad: one compiled shape for every batch
      stacked = [np.stack([p[k] for p in pieces]) for k in range(len(arrs))]
      outs = np.asarray(run(*stacked))
      for spec, out in zip(group, outs):
        acc.add(out, spec)
      bar.update(len(group))
  bar.close()
  return acc.result()
