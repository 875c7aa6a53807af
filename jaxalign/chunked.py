"""Sections of any size: block alignment and rendering on overlapping chunks, with per-chunk
translation re-centring (DESIGN.md §3 "Large sections are processed as overlapping chunks").

A chunk only ever holds `chunk x chunk` pixels (plus a margin), so memory is bounded by the chunk
size, not the section size. Large displacements do not need huge pads: each chunk is first
re-centred by an integer translation, the mean displacement of its window, and only the residual
(small) displacement is handled inside the chunk:

- Rendering: output window W needs source pixels `r + f(r)`, r in W. With `o = round(mean_W f)` the
  chunk reads the source box `W + o` grown by a margin `m >= max_W |f - o|` and warps it by `f - o`.
  The result equals the whole-section warp exactly (bilinear, fill outside the section), whatever
  the size of `o`. The margin is bucketed to powers of two so chunks compile for few shapes.
- Block alignment: a coarse block alignment on sections downsampled `2^coarse_levels` times gives,
  per section z and chunk window W, an offset `o_z = round(mean_W upsample(coarse_z))`. The chunk
  stack is read with section z shifted by `o_z` (so all chunks of a column sit within a few pixels of
  each other), aligned with `align_block_task`, and `o_z` is added back to the chunk's fields
  (reading at offset o means chunk'(r) = S(r + o), so warp(chunk', f')(r) = S(r + f'(r) + o)).

Chunk windows come from `jaxalign.chunking.split`; reassembly "crop" keeps each chunk's core (at
least `overlap` px from interior window edges), "blend" cross-fades the overlaps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from jaxalign import chunking
from jaxalign.errors import InputError
from jaxalign.fields import downsample_image, upsample_field, warp


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """Chunked processing of large sections.

  Attributes:
    chunk: chunk window edge, px (memory per chunk ~ chunk^2).
    overlap: context margin, px: chunk cores lie at least this far from interior window edges.
      Needs to cover the aligner's receptive field (finetuner smoothing, voting blur).
    coarse_levels: the re-centring estimate is computed `2^coarse_levels` times coarser.
    render_margin: smallest margin (px) a render chunk reads around its re-centred window; grown to
      the next power of two when the residual displacement inside a chunk is larger.
    batch: render chunks per jitted (and device-sharded) call; the last batch is padded.
    mode: "crop" or "blend" reassembly of field chunks.
  """
  chunk: int = 1024
  overlap: int = 64
  coarse_levels: int = 3
  render_margin: int = 16
  batch: int = 4
  mode: str = "crop"

  def __post_init__(self):
    if self.chunk <= 2 * self.overlap:
      raise InputError(f"chunk ({self.chunk}) must exceed twice the overlap ({self.overlap})")
    if self.coarse_levels < 0 or self.render_margin < 1 or self.batch < 1:
      raise InputError(f"bad ChunkConfig {self}")
    if self.mode not in chunking.MODES:
      raise InputError(f"ChunkConfig.mode must be one of {chunking.MODES}, got {self.mode!r}")


class Source(Protocol):
  """A section readable by windows: `shape` (H, W) and `window(y0, y1, x0, x1)` -> `[y1-y0, x1-x0]`
  float32 (or `[..., 2]` for fields), zeros outside the section. Bounds may lie outside."""
  shape: tuple[int, int]

  def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray: ...


def _clipped_read(shape, read, y0, y1, x0, x1, trailing=()):
  h, w = shape
  out = np.zeros((y1 - y0, x1 - x0) + trailing, np.float32)
  sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
  if sy0 < sy1 and sx0 < sx1:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = read(sy0, sy1, sx0, sx1)
  return out


@dataclasses.dataclass
class ArraySource:
  """An in-memory section `[H, W]` (or field `[H, W, 2]`)."""
  array: np.ndarray

  @property
  def shape(self):
    return tuple(self.array.shape[:2])

  def window(self, y0, y1, x0, x1):
    return _clipped_read(self.shape, lambda a, b, c, d: self.array[a:b, c:d], y0, y1, x0, x1,
                         tuple(self.array.shape[2:]))


@dataclasses.dataclass
class VolumeSource:
  """Section `z` of a `jaxalign.io.Volume` at `level`, read window by window through tensorstore."""
  volume: object
  z: int
  level: int = 0

  @property
  def shape(self):
    return tuple(self.volume.shape(self.level)[1:3])

  def coarse(self, levels: int) -> np.ndarray:
    """The section `2^levels` coarser: read from the volume's pyramid when it has that level
    (bounded memory), else downsampled from the whole section."""
    if self.level + levels < self.volume.levels:
      return self.volume.read(self.z, self.level + levels).astype(np.float32)
    h, w = self.shape
    return _downsample_to(self.window(0, h, 0, w)[None], levels)[0]

  def window(self, y0, y1, x0, x1):
    trailing = (2,) if self.volume.is_field else ()
    return _clipped_read(self.shape, lambda a, b, c, d: self.volume.read(
        self.z, self.level, ((a, b), (c, d))).astype(np.float32), y0, y1, x0, x1, trailing)


def as_source(x) -> Source:
  return x if hasattr(x, "window") else ArraySource(np.asarray(x, np.float32))


# --------------------------------------------------------------------------- rendering


def _render_one(box: jax.Array, resid: jax.Array) -> jax.Array:
  """Warps a margin-grown source box `[h+2m, w+2m]` by a residual field `[h, w, 2]` -> `[h, w]`."""
  h, w = resid.shape[:2]
  m = (box.shape[0] - h) // 2
  fbox = jnp.pad(resid, ((m, m), (m, m), (0, 0)))
  return warp(box, fbox)[m:m + h, m:m + w]


def _margin_for(resid_max: float, base: int) -> int:
  """Smallest power-of-two multiple of `base` covering `resid_max` (+1 px for bilinear support)."""
  need = math.ceil(resid_max) + 1
  return base * 2 ** max(0, math.ceil(math.log2(max(need / base, 1.0))))


def render_chunked(image, field, *, config: ChunkConfig = ChunkConfig(),
                   sink: Callable[[tuple[slice, slice], np.ndarray], None] | None = None,
                   progress: bool = False):
  """`warp(image, field)` computed chunk by chunk with translation re-centring.

  Args:
    image: `[H, W]` array or a `Source` (e.g. `VolumeSource`), 0 = no data.
    field: `[H, W, 2]` float32 pixels (dy, dx) array or a field `Source`.
    config: `ChunkConfig` (chunk size, base margin, batch).
    sink: optional `sink(core_slices, data [h, w])`: receives each chunk's core (cores tile the
      section) instead of assembling the section in memory (bounded memory for huge sections).
    progress: tqdm bar over chunks.
  Returns:
    `[H, W]` float32 (None with a sink). Equal to the whole-section `warp` up to float rounding.
  """
  from jaxalign import sharding
  img, fld = as_source(image), as_source(field)
  if img.shape != fld.shape:
    raise InputError(f"image shape {img.shape} does not match field shape {fld.shape}")
  h, w = img.shape
  specs = chunking.split((h, w), config.chunk, 0)  # rendering is pointwise: cores need no context
  out = None if sink is not None else np.zeros((h, w), np.float32)
  bar = tqdm(total=len(specs), desc="render chunks", unit="chunk", disable=not progress, leave=False)
  pending: dict[int, list] = {}  # margin -> [(spec, box, resid)]

  def flush(m):
    group = pending.pop(m)
    boxes = np.stack([g[1] for g in group])
    resids = np.stack([g[2] for g in group])
    res = sharding.sharded_map(_render_one, boxes, resids, batch_size=config.batch)
    for (spec, _, _), r in zip(group, res):
      core = r[spec.crop]
      if sink is not None:
        sink(spec.core, core)
      else:
        out[spec.core] = core
    bar.update(len(group))

  for spec in specs:
    (y0, x0), (ch, cw) = spec.origin, spec.size
    f = fld.window(y0, y0 + ch, x0, x0 + cw)
    o = np.rint(f.reshape(-1, 2).mean(axis=0)).astype(int)
    resid = (f - o).astype(np.float32)
    m = _margin_for(float(np.abs(resid).max(initial=0.0)), config.render_margin)
    box = img.window(y0 + o[0] - m, y0 + o[0] + ch + m, x0 + o[1] - m, x0 + o[1] + cw + m)
    pending.setdefault(m, []).append((spec, box, resid))
    if len(pending[m]) == config.batch:
      flush(m)
  for m in list(pending):
    flush(m)
  bar.close()
  return out


# --------------------------------------------------------------------------- block alignment


def _downsample_to(x: np.ndarray, levels: int) -> np.ndarray:
  """`[Z, H, W]` -> `[Z, ceil(H/2^k), ceil(W/2^k)]` by 2x2 means, odd edges replicated (as io)."""
  a = jnp.asarray(x, jnp.float32)
  for _ in range(levels):
    ph, pw = a.shape[-2] % 2, a.shape[-1] % 2
    if ph or pw:
      a = jnp.pad(a, ((0, 0), (0, ph), (0, pw)), mode="edge")
    a = downsample_image(a)
  return np.asarray(a)


def coarse_offsets(coarse_fields: np.ndarray, specs: Sequence[chunking.ChunkSpec], levels: int) -> np.ndarray:
  """Per section and chunk, the integer re-centring offset at full resolution.

  Args:
    coarse_fields: `[Z, h, w, 2]` fields at `2^levels` coarser resolution (pixels of that level).
    specs: chunk windows at full resolution.
    levels: coarse level.
  Returns:
    `[Z, len(specs), 2]` int: round(mean of the upsampled field over each window).
  """
  f = jnp.asarray(coarse_fields, jnp.float32)
  for _ in range(levels):
    f = upsample_field(f)
  f = np.asarray(f)
  out = np.zeros((f.shape[0], len(specs), 2), np.int64)
  for i, s in enumerate(specs):
    (y0, x0), (ch, cw) = s.origin, s.size
    win = f[:, y0:min(y0 + ch, f.shape[1]), x0:min(x0 + cw, f.shape[2])]
    out[:, i] = np.rint(win.reshape(f.shape[0], -1, 2).mean(axis=1))
  return out


def align_block_chunked(sections, block=None, *, voting_distance: int = 3, config: ChunkConfig = ChunkConfig(),
                        block_config=None, coarse_fields: np.ndarray | None = None,
                        sink: Callable[[int, tuple[slice, slice], np.ndarray], None] | None = None,
                        progress: bool = False):
  """Block alignment of arbitrarily large sections on overlapping, re-centred chunks.

  Args:
    sections: `[Z, H, W]` array, or a sequence of Z `Source`s (e.g. `VolumeSource` per section).
    block: `jaxalign.stack.BlockPlan` (default: the whole stack, starter 0).
    voting_distance, block_config: as `align_block` (`BlockConfig`: aligner, voting).
    config: `ChunkConfig`.
    coarse_fields: optional `[Z, H/2^c, W/2^c, 2]` coarse block fields (c = config.coarse_levels);
      computed when None from each source's `coarse(c)` (a `VolumeSource` reads its pyramid level
      when present, so only coarse sections are ever whole in memory).
    sink: optional `sink(z, core_slices, fields [h, w, 2])` receiving each chunk's core per section;
      forces "crop" reassembly and bounded memory.
    progress: tqdm bar over chunks.
  Returns:
    `[Z, H, W, 2]` float32 fields into the starter's frame (None with a sink).
  """
  from jaxalign.stack import BlockPlan, align_block_task
  srcs = [as_source(s) for s in sections] if not isinstance(sections, np.ndarray) else \
      [ArraySource(np.asarray(s, np.float32)) for s in sections]
  z_count = len(srcs)
  h, w = srcs[0].shape
  if any(s.shape != (h, w) for s in srcs):
    raise InputError("sections of a block must share one shape")
  block = block or BlockPlan(0, 0, z_count, 0, 0, z_count)
  c = config.coarse_levels
  if coarse_fields is None:
    coarse = np.stack([s.coarse(c) if hasattr(s, "coarse") else _downsample_to(s.window(0, h, 0, w)[None], c)[0]
                       for s in srcs])
    coarse_fields = np.asarray(align_block_task(coarse, block, voting_distance=voting_distance,
                                                config=block_config))
  specs = chunking.split((h, w), config.chunk, config.overlap)
  offsets = coarse_offsets(coarse_fields, specs, c)
  mode = "crop" if sink is not None else config.mode
  acc = [chunking.Assembler((h, w, 2), mode) for _ in range(z_count)] if sink is None else None
  for i, spec in enumerate(tqdm(specs, desc="block chunks", unit="chunk", disable=not progress, leave=False)):
    (y0, x0), (ch, cw) = spec.origin, spec.size
    o = offsets[:, i]
    stack = np.stack([srcs[z].window(y0 + o[z, 0], y0 + o[z, 0] + ch, x0 + o[z, 1], x0 + o[z, 1] + cw)
                      for z in range(z_count)])
    if not np.any(stack):
      fields = np.broadcast_to(o[:, None, None, :].astype(np.float32), (z_count, ch, cw, 2))
    else:
      fields = np.asarray(align_block_task(stack, block, voting_distance=voting_distance,
                                           config=block_config)) + o[:, None, None, :].astype(np.float32)
    for z in range(z_count):
      if sink is not None:
        sink(z, spec.core, fields[z][spec.crop])
      else:
        acc[z].add(fields[z], spec)
  logging.info("align_block_chunked: %d sections of %dx%d in %d chunks", z_count, h, w, len(specs))
  if sink is not None:
    return None
  return np.stack([a.result() for a in acc])
