"""Sections of any size: block alignment, stitch fields, composition with decay and rendering on
overlapping chunks, with per-chunk translation re-centring (DESIGN.md §3 "Large sections are
processed as overlapping chunks").

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

- Stitch fields (`stitch_field_chunked`): a coarse stitch field gives each chunk an offset o; the
  chunk aligns block N+1's rendering read at W + o to block N's at W and adds o back.
- Composition with decay (`compose_with_decay_chunked`): nested windows, each shifted by the rounded
  mean of the decayed stitch sampled through it; equal to the whole-section composition to float
  rounding (the margins are checked per chunk).

Chunk windows come from `jaxalign.volume.chunking.split`; reassembly "crop" keeps each chunk's core (at
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

from jaxalign.volume import chunking
from jaxalign.stack.drift import remove_one
from jaxalign.errors import InputError
from jaxalign.ops.fields import compose, downsample_image, upsample_field, warp
from jaxalign.align.protocols import BatchedPairAligner


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
  """Chunked processing of large sections.

  Attributes:
    chunk: chunk window edge, px (memory per chunk ~ chunk^2).
    overlap: context margin, px: chunk cores lie at least this far from interior window edges.
      Needs to cover the aligner's receptive field (finetuner smoothing, voting blur).
    coarse_levels: the re-centring estimate is computed up to `2^coarse_levels` times coarser ...
    min_coarse_size: ... but never on sections smaller than this many px per side (the pair
      aligner needs context: on 512^2 ISBI sections a 64^2 estimate re-centred worse than a 128^2
      one, docs/benchmarks/scale.md "seams"). See `coarse_levels_for`.
    render_margin: smallest margin (px) a render chunk reads around its re-centred window; grown to
      the next power of two when the residual displacement inside a chunk is larger.
    batch: render chunks per jitted (and device-sharded) call; the last batch is padded.
    mode: "crop" or "blend" reassembly of field chunks.
  """
  chunk: int = 1024
  overlap: int = 64
  coarse_levels: int = 3
  min_coarse_size: int = 128
  render_margin: int = 16
  batch: int = 4
  mode: str = "crop"

  def __post_init__(self):
    if self.chunk <= 2 * self.overlap:
      raise InputError(f"chunk ({self.chunk}) must exceed twice the overlap ({self.overlap})")
    if self.coarse_levels < 0 or self.min_coarse_size < 1 or self.render_margin < 1 or self.batch < 1:
      raise InputError(f"bad ChunkConfig {self}")
    if self.mode not in chunking.MODES:
      raise InputError(f"ChunkConfig.mode must be one of {chunking.MODES}, got {self.mode!r}")


def coarse_levels_for(config: ChunkConfig, h: int, w: int) -> int:
  """MIP levels down to the re-centring estimate of an h x w section: `config.coarse_levels`, fewer
  where that would leave less than `config.min_coarse_size` px on the short side."""
  room = int(math.floor(math.log2(max(min(h, w) / config.min_coarse_size, 1.0))))
  return min(config.coarse_levels, room)


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
  """Section `z` of a `jaxalign.volume.store.Volume` at `level`, read window by window through tensorstore."""
  volume: object
  z: int
  level: int = 0

  @property
  def shape(self):
    return tuple(self.volume.shape(self.level)[1:3])

  def coarse(self, levels: int, tile: int = 1024) -> np.ndarray:
    """The section `2^levels` coarser: read from the volume's pyramid when it has that level,
    else downsampled tile by tile (`coarse_of`); either way memory stays ~ tile^2 + the result."""
    if self.level + levels < self.volume.levels and not self.volume.is_field:
      return self.volume.read(self.z, self.level + levels).astype(np.float32)
    return coarse_of(self, levels, tile)

  def window(self, y0, y1, x0, x1):
    trailing = (2,) if self.volume.is_field else ()
    return _clipped_read(self.shape, lambda a, b, c, d: self.volume.read(
        self.z, self.level, ((a, b), (c, d))).astype(np.float32), y0, y1, x0, x1, trailing)


def as_source(x) -> Source:
  return x if hasattr(x, "window") else ArraySource(np.asarray(x, np.float32))


def edge_window(src: Source, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
  """`src.window` with edge replication instead of zeros outside the section (fields: the value at
  the nearest section pixel, as the clamped sampling of `compose` and the edge padding of
  `decay_field` see it). Returns `[y1-y0, x1-x0(, 2)]` float32."""
  h, w = src.shape
  ys = np.clip(np.arange(y0, y1), 0, h - 1)
  xs = np.clip(np.arange(x0, x1), 0, w - 1)
  a = src.window(int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
  return a[np.ix_(ys - ys[0], xs - xs[0])]


def coarse_of(src: Source, levels: int, tile: int = 1024) -> np.ndarray:
  """A section (image `[H, W]` or field `[H, W, 2]`) `2^levels` times coarser, computed tile by tile
  so only one `tile x tile` window is in memory besides the coarse result.

  Images go down by 2x2 means, fields by `downsample_field` (values in pixels of the coarse level);
  the last tile is edge-padded to a multiple of `2^levels`. Returns
  `[ceil(H/2^levels), ceil(W/2^levels)(, 2)]` float32.
  """
  from jaxalign.ops.fields import downsample_field
  f = 2 ** levels
  h, w = src.shape
  ch, cw = -(-h // f), -(-w // f)
  t = max(f, tile // f * f)
  out = None
  for y0 in range(0, ch * f, t):
    for x0 in range(0, cw * f, t):
      a = jnp.asarray(edge_window(src, y0, min(y0 + t, ch * f), x0, min(x0 + t, cw * f)))
      for _ in range(levels):
        a = downsample_field(a) if a.ndim == 3 else downsample_image(a)
      a = np.asarray(a)
      if out is None:
        out = np.zeros((ch, cw) + a.shape[2:], np.float32)
      out[y0 // f:y0 // f + a.shape[0], x0 // f:x0 // f + a.shape[1]] = a
  return out


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


def _recentred_box(image: Source, field: Source, y0: int, y1: int, x0: int, x1: int,
                   base_margin: int) -> tuple[np.ndarray, np.ndarray]:
  """The source box a rendering of window `[y0:y1, x0:x1]` needs, and the residual field to warp it
  by: the window is re-centred by its rounded mean displacement o, and the box is `W + o` grown by a
  margin covering the residual `f - o` (bucketed to powers of two of `base_margin`). Returns
  (box `[h + 2m, w + 2m]`, residual `[h, w, 2]` float32), for `_render_one`."""
  f = field.window(y0, y1, x0, x1)
  o = np.rint(f.reshape(-1, 2).mean(axis=0)).astype(int)
  resid = (f - o).astype(np.float32)
  m = _margin_for(float(np.abs(resid).max(initial=0.0)), base_margin)
  return image.window(y0 + o[0] - m, y1 + o[0] + m, x0 + o[1] - m, x1 + o[1] + m), resid


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
  from jaxalign.volume import sharding
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
    box, resid = _recentred_box(img, fld, y0, y0 + ch, x0, x0 + cw, config.render_margin)
    m = (box.shape[0] - ch) // 2
    pending.setdefault(m, []).append((spec, box, resid))
    if len(pending[m]) == config.batch:
      flush(m)
  for m in list(pending):
    flush(m)
  bar.close()
  return out


# --------------------------------------------------------------------------- block alignment


def downsample_to(x: np.ndarray, levels: int) -> np.ndarray:
  """`[Z, H, W]` -> `[Z, ceil(H/2^k), ceil(W/2^k)]` by 2x2 means, odd edges replicated (as io)."""
  a = jnp.asarray(x, jnp.float32)
  for _ in range(levels):
    ph, pw = a.shape[-2] % 2, a.shape[-1] % 2
    if ph or pw:
      a = jnp.pad(a, ((0, 0), (0, ph), (0, pw)), mode="edge")
    a = downsample_image(a)
  return np.asarray(a)


COARSE_PAD = 2  # coarse cells around a window whose upsampling reaches into it (1 per level, bounded)


def coarse_offsets(coarse_fields: np.ndarray, specs: Sequence[chunking.ChunkSpec], levels: int) -> np.ndarray:
  """Per section and chunk, the integer re-centring offset at full resolution.

  Args:
    coarse_fields: `[Z, h, w, 2]` fields at `2^levels` coarser resolution (pixels of that level).
    specs: chunk windows at full resolution.
    levels: coarse level.
  Returns:
    `[Z, len(specs), 2]` int: round(mean of the upsampled field over each window).
  """
  f = np.asarray(coarse_fields, np.float32)
  z_count, hc, wc = f.shape[:3]
  scale = 2 ** levels
  out = np.zeros((z_count, len(specs), 2), np.int64)
  for i, s in enumerate(specs):
    (y0, x0), (ch, cw) = s.origin, s.size
    # Only the coarse cells under the window (plus COARSE_PAD for the bilinear support of every
    # upsampling step) are upsampled: memory ~ chunk size, values equal to upsampling the whole field.
    cy0, cx0 = max(y0 // scale - COARSE_PAD, 0), max(x0 // scale - COARSE_PAD, 0)
    cy1, cx1 = min(-(-(y0 + ch) // scale) + COARSE_PAD, hc), min(-(-(x0 + cw) // scale) + COARSE_PAD, wc)
    for z in range(z_count):
      piece = jnp.asarray(f[z, cy0:cy1, cx0:cx1])
      for _ in range(levels):
        piece = upsample_field(piece)
      win = np.asarray(piece)[y0 - cy0 * scale:y0 - cy0 * scale + ch, x0 - cx0 * scale:x0 - cx0 * scale + cw]
      out[z, i] = np.rint(win.reshape(-1, 2).mean(axis=0))
  return out


def align_block_chunked(sections, block=None, *, voting_distance: int = 3, config: ChunkConfig = ChunkConfig(),
                        block_config=None, coarse_fields: np.ndarray | None = None,
                        sink: Callable[[int, tuple[slice, slice], np.ndarray], None] | None = None,
                        progress: bool = False, on_section: Callable[[int, int], None] | None = None):
  """Block alignment of arbitrarily large sections on overlapping, re-centred chunks.

  Args:
    sections: `[Z, H, W]` array, or a sequence of Z `Source`s (e.g. `VolumeSource` per section).
    block: `jaxalign.stack.chain.BlockPlan` (default: the whole stack, starter 0).
    voting_distance, block_config: as `align_block` (`BlockConfig`: aligner, voting).
    config: `ChunkConfig`.
    coarse_fields: optional `[Z, H/2^c, W/2^c, 2]` coarse block fields (c = `coarse_levels_for`);
      computed when None from each source's `coarse(c)` (a `VolumeSource` reads its pyramid level
      when present, so only coarse sections are ever whole in memory).
    sink: optional `sink(z, core_slices, fields [h, w, 2])` receiving each chunk's core per section;
      forces "crop" reassembly and bounded memory.
    progress: tqdm bar over chunks.
    on_section: optional `on_section(done, total)` after each section of each chunk is aligned (and
      of the coarse pass when it runs): `total` = Z x (chunks + 1 with the coarse pass), so a
      caller can show progress with an ETA inside one block.
  Returns:
    `[Z, H, W, 2]` float32 fields into the starter's frame (None with a sink).
  """
  from jaxalign.stack.chain import BlockPlan, align_block_task
  srcs = [as_source(s) for s in sections] if not isinstance(sections, np.ndarray) else \
      [ArraySource(np.asarray(s, np.float32)) for s in sections]
  z_count = len(srcs)
  h, w = srcs[0].shape
  if any(s.shape != (h, w) for s in srcs):
    raise InputError("sections of a block must share one shape")
  block = block or BlockPlan(0, 0, z_count, 0, 0, z_count)
  c = coarse_levels_for(config, h, w)
  specs = chunking.split((h, w), config.chunk, config.overlap)
  total = z_count * (len(specs) + (coarse_fields is None))
  steps = [0]  # sections of chunks (and of the coarse pass) finished so far

  def report(done: int, _n: int) -> None:
    if on_section is not None:
      on_section(steps[0] + done, total)

  def chunk_done() -> None:
    steps[0] += z_count
    report(0, z_count)

  if coarse_fields is None:
    coarse = np.stack([s.coarse(c) if hasattr(s, "coarse") else coarse_of(s, c, config.chunk) for s in srcs])
    coarse_fields = np.asarray(align_block_task(coarse, block, voting_distance=voting_distance,
                                                config=block_config, on_section=report))
    steps[0] += z_count
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
      chunk_done()  # nothing to align: all its sections are done at once
    else:
      fields = np.asarray(align_block_task(stack, block, voting_distance=voting_distance, config=block_config,
                                           on_section=report)) + o[:, None, None, :].astype(np.float32)
      steps[0] += z_count
    for z in range(z_count):
      if sink is not None:
        sink(z, spec.core, fields[z][spec.crop])
      else:
        acc[z].add(fields[z], spec)
  logging.info("align_block_chunked: %d sections of %dx%d in %d chunks", z_count, h, w, len(specs))
  if sink is not None:
    return None
  return np.stack([a.result() for a in acc])


# --------------------------------------------------------------------------- composition with decay


# Attempts at doubling a decay chunk's margin before a chunk is accepted as it is (logged): each
# attempt doubles the context, so 6 covers residual displacements of 64x the configured overlap.
MAX_MARGIN_DOUBLINGS = 6


def _decay_reach(level: int) -> int:
  """Pixels of the field that level `level` of the decay hierarchy (2^l-px box means, bilinear back
  up level by level) depends on around a pixel: ~1.5 cells of every level below, plus the cell."""
  return 3 * 2 ** level


def _decay_window_size(n: int, max_levels: int) -> int:
  """Smallest window edge >= n that `decay_field` processes without padding it internally: a power
  of two up to 2^max_levels, a multiple of 2^max_levels beyond."""
  b = 2 ** max_levels
  if n <= b:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))
  return -(-n // b) * b


@jax.jit
def _decay_step(prev: jax.Array, e: jax.Array, shift: jax.Array, bounds: jax.Array) -> jax.Array:
  """One composition step on re-centred windows.

  Args:
    prev: `[S, S', 2]` the composed field so far on its window, whose origin is this window's + shift.
    e: `[S, S', 2]` the decayed stitch field on this window (pixels, (dy, dx)).
    shift: `[2]` float32 integer offset between the two windows.
    bounds: `[4]` int32 (y_lo, y_hi, x_lo, x_hi): window rows/columns inside the section.
  Returns:
    `[S, S', 2]` compose(prev, e) in this window's frame, with positions outside the section set to
    the nearest section pixel (so later steps sample it clamped at the section border, as the
    whole-section `compose` does).
  """
  g = compose(prev, e - shift) + shift
  iy = jnp.clip(jnp.arange(g.shape[0]), bounds[0], bounds[1])
  ix = jnp.clip(jnp.arange(g.shape[1]), bounds[2], bounds[3])
  return g[iy][:, ix]


def compose_with_decay_chunked(field, stitches: Sequence, distances: Sequence[float], *,
                               decay_distance: float = 100.0, blur_rate: float = 0.2,
                               config: ChunkConfig = ChunkConfig(),
                               sink: Callable[[tuple[slice, slice], np.ndarray], None] | None = None,
                               progress: bool = False):
  """`jaxalign.stack.chain.compose_with_decay` of one section, computed chunk by chunk.

  Output chunk W needs the last (farthest) decayed stitch E_K on W, the previous one on W shifted by
  E_K, and so on down to the block field: `G_j(r) = E_j(r) + G_{j-1}(r + E_j(r))`. Each step's window
  is the next one's shifted by the rounded mean of its decayed stitch (translation re-centring: a
  stitch of hundreds of px costs no margin), and the margin only covers the residual displacement
  (doubled until it does; exactness is checked per chunk). Decayed stitches are computed on windows
  aligned to the coarsest hierarchy level the chain uses, with a margin covering that level's
  reach, and clipped to the section's padded extent exactly as `decay_field` pads the whole
  section; fields outside the section are edge-replicated as `compose` clamps. So the result equals
  the whole-section composition to float rounding, with memory ~ (chunk + margins)^2.

  Args:
    field: `[H, W, 2]` float32 block field of the section (pixels, (dy, dx)), array or `Source`.
    stitches: K stitch fields `[H, W, 2]` (arrays or `Source`s), nearest interface first.
    distances: `[K]` sections from each interface; entries >= decay_distance are dropped (zero).
    decay_distance, blur_rate: see `jaxalign.ops.decay.decay_field`.
    config: `ChunkConfig` (`chunk`: core window edge; `overlap`: initial margin, px).
    sink: optional `sink(core_slices, field_core [h, w, 2])` instead of assembling in memory.
    progress: tqdm bar over chunks.
  Returns:
    `[H, W, 2]` float32 (None with a sink).
  """
  from jaxalign.ops.decay import MAX_DECAY_LEVELS, decay_field, num_levels
  fld = as_source(field)
  h, w = fld.shape
  if len(stitches) != len(distances):
    raise InputError(f"{len(stitches)} stitch fields but {len(distances)} distances")
  chain = [(as_source(t), float(d)) for t, d in zip(stitches, distances) if float(d) < decay_distance]
  for t, _ in chain:
    if t.shape != (h, w):
      raise InputError(f"stitch field shape {t.shape} does not match the block field's {(h, w)}")
  specs = chunking.split((h, w), config.chunk, 0)
  out = None if sink is not None else np.zeros((h, w, 2), np.float32)

  def emit(spec, core):
    if sink is not None:
      sink(spec.core, core)
    else:
      out[spec.core] = core

  levels = num_levels(h, w)
  top = math.log2(1.0 + blur_rate * max([max(d, 0.0) for _, d in chain] + [0.0]))
  hi = min(levels, math.floor(top) + 1)
  a, mb = 2 ** hi, _decay_reach(hi)
  pad_h, pad_w = -(-h // 2 ** levels) * 2 ** levels, -(-w // 2 ** levels) * 2 ** levels
  if not chain:
    for spec in specs:  # compose with a zero field is the identity
      (y0, x0), (ch, cw) = spec.origin, spec.size
      emit(spec, fld.window(y0, y0 + ch, x0, x0 + cw)[spec.crop])
    return out
  if top >= levels:
    # The blur reaches the top of the whole section's hierarchy (a section-wide mean): no window
    # smaller than the section reproduces it.
    logging.warning("compose_with_decay_chunked: blur of %.1f px reaches the whole %dx%d section; "
                    "composing the whole section at once", blur_rate * max(d for _, d in chain), h, w)
    from jaxalign.stack.chain import compose_with_decay
    res = np.asarray(compose_with_decay(
        jnp.asarray(fld.window(0, h, 0, w)), jnp.asarray(np.stack([t.window(0, h, 0, w) for t, _ in chain])),
        jnp.asarray([d for _, d in chain], jnp.float32), decay_distance=decay_distance, blur_rate=blur_rate))
    for spec in specs:
      emit(spec, res[spec.core])
    return out

  def decayed(src, d, origin, size):
    """Decayed stitch on window [origin, origin + size) (edge-clamped outside the section)."""
    sd = _decay_window_size(max(size) + 2 * mb + a, MAX_DECAY_LEVELS)
    sdy, sdx = min(sd, pad_h), min(sd, pad_w)
    y0 = int(np.clip((origin[0] - mb) // a * a, 0, pad_h - sdy))
    x0 = int(np.clip((origin[1] - mb) // a * a, 0, pad_w - sdx))
    t = edge_window(src, y0, y0 + sdy, x0, x0 + sdx)
    dec = np.asarray(decay_field(jnp.asarray(t), d, decay_distance=decay_distance, blur_rate=blur_rate))
    iy = np.clip(origin[0] + np.arange(size[0]) - y0, 0, sdy - 1)
    ix = np.clip(origin[1] + np.arange(size[1]) - x0, 0, sdx - 1)
    return dec[np.ix_(iy, ix)]

  def interval(lo, hi_, n):
    """Correct range [lo, hi_] along an axis of length n, extended past a section border it holds
    (positions beyond the border take the border's value, as the clamped sampling does)."""
    if lo > hi_:
      return lo, hi_
    return (-math.inf if lo <= 0 else lo), (math.inf if hi_ >= n - 1 else hi_)

  def attempt(spec, m):
    (y0, x0), (ch, cw) = spec.origin, spec.size
    size = (ch + 2 * m, cw + 2 * m)
    k = len(chain)
    origins, es, shifts, reach = [None] * k, [None] * k, [None] * k, [None] * k
    o = np.array([y0 - m, x0 - m])
    for j in reversed(range(k)):  # from the output window inwards: the last stitch is sampled at r
      origins[j] = o
      e = decayed(chain[j][0], chain[j][1], o, size)
      s = np.rint(e.reshape(-1, 2).mean(axis=0)).astype(np.int64)
      es[j], shifts[j], reach[j] = e, s, math.ceil(float(np.abs(e - s).max())) + 1
      o = o + s
    g = jnp.asarray(edge_window(fld, int(o[0]), int(o[0]) + size[0], int(o[1]), int(o[1]) + size[1]))
    # Exactness bookkeeping per axis, in section coordinates: where is each step's window correct?
    ok = [interval(o[ax], o[ax] + size[ax] - 1, (h, w)[ax]) for ax in range(2)]
    for j in range(k):
      oj = origins[j]
      bounds = np.array([np.clip(-oj[0], 0, size[0] - 1), np.clip(h - 1 - oj[0], 0, size[0] - 1),
                         np.clip(-oj[1], 0, size[1] - 1), np.clip(w - 1 - oj[1], 0, size[1] - 1)], np.int32)
      g = _decay_step(g, jnp.asarray(es[j]), jnp.asarray(shifts[j], jnp.float32), jnp.asarray(bounds))
      new = []
      for ax, n in enumerate((h, w)):
        lo = max(ok[ax][0] - shifts[j][ax] + reach[j], oj[ax], 0)
        hi_ = min(ok[ax][1] - shifts[j][ax] - reach[j], oj[ax] + size[ax] - 1, n - 1)
        new.append(interval(lo, hi_, n))
      ok = new
    exact = all(ok[ax][0] <= (y0, x0)[ax] + spec.crop[ax].start and
                ok[ax][1] >= (y0, x0)[ax] + spec.crop[ax].stop - 1 for ax in range(2))
    core = np.asarray(g)[m + spec.crop[0].start:m + spec.crop[0].stop, m + spec.crop[1].start:m + spec.crop[1].stop]
    return core, exact

  for spec in tqdm(specs, desc="decay chunks", unit="chunk", disable=not progress, leave=False):
    m = max(1, config.overlap)
    for attempt_no in range(MAX_MARGIN_DOUBLINGS + 1):
      core, exact = attempt(spec, m)
      if exact:
        break
      if attempt_no < MAX_MARGIN_DOUBLINGS:
        m *= 2
    if not exact:
      logging.warning("compose_with_decay_chunked: chunk %s still not exact with a %d px margin "
                      "(folding stitch fields?); kept", spec.index, m)
    emit(spec, core)
  return out


# --------------------------------------------------------------------------- stitch fields


def stitch_field_chunked(overlap_sections, prev_fields, next_fields, *, config: ChunkConfig = ChunkConfig(),
                         block_config=None, refine: bool = True, coarse_field: np.ndarray | None = None,
                         sink: Callable[[tuple[slice, slice], np.ndarray], None] | None = None,
                         progress: bool = False):
  """`jaxalign.stack.chain.stitch_field` on overlapping, re-centred chunks (memory ~ O x chunk^2).

  A coarse stitch field (the overlap sections and block fields `2^coarse_levels` coarser, through
  `stitch_field`) gives each chunk window W an integer offset o ~ t on W. Writing `src = warp(S,
  next)`, `tgt = warp(S, prev)`, the chunk solves the shifted problem `src(r + o + t') ~ tgt(r)`:
  `stitch_field` on the section read at W + b (b = rounded mean of prev on W), with
  `prev' = prev|W - b` and `next' = next|W+o + o - b`, so both renderings sit inside one chunk-sized
  box however large the fields are; then t = t' + o. Cores are cropped `overlap` px from interior
  window edges.

  Args:
    overlap_sections: O sections `[H, W]` (arrays or `Source`s; 0 = no data).
    prev_fields, next_fields: O fields `[H, W, 2]` each (arrays or field `Source`s): the overlap
      sections' fields in block N and in block N+1 (pixels, (dy, dx)).
    config: `ChunkConfig` (chunk, overlap, coarse_levels, mode).
    block_config: `BlockConfig` (pair aligner, voting), as `stitch_field`.
    refine: align the overlap renderings (paper); False votes the algebraic estimates (as `stitch_field`).
    coarse_field: optional `[H/2^c, W/2^c, 2]` coarse stitch field (pixels of that level,
      c = `coarse_levels_for`).
    sink: optional `sink(core_slices, t_core [h, w, 2])`; forces "crop" reassembly.
    progress: tqdm bar over chunks.
  Returns:
    `[H, W, 2]` float32 stitch field (None with a sink).
  """
  from jaxalign.stack.chain import stitch_field
  secs = [as_source(s) for s in overlap_sections]
  prevs, nxts = [as_source(f) for f in prev_fields], [as_source(f) for f in next_fields]
  if not secs or len(prevs) != len(secs) or len(nxts) != len(secs):
    raise InputError(f"stitch_field_chunked: {len(secs)} sections, {len(prevs)} prev and {len(nxts)} next fields")
  h, w = secs[0].shape
  if any(s.shape != (h, w) for s in secs + prevs + nxts):
    raise InputError("stitch_field_chunked: sections and fields must share one (H, W)")
  c = coarse_levels_for(config, h, w)
  if coarse_field is None:
    coarse_field = stitch_field(np.stack([s.coarse(c) if hasattr(s, "coarse") else coarse_of(s, c, config.chunk)
                                          for s in secs]),
                                np.stack([coarse_of(f, c, config.chunk) for f in prevs]),
                                np.stack([coarse_of(f, c, config.chunk) for f in nxts]), config=block_config,
                                refine=refine)
  specs = chunking.split((h, w), config.chunk, config.overlap)
  offsets = coarse_offsets(np.asarray(coarse_field)[None], specs, c)[0]
  mode = "crop" if sink is not None else config.mode
  acc = chunking.Assembler((h, w, 2), mode) if sink is None else None
  for i, spec in enumerate(tqdm(specs, desc="stitch chunks", unit="chunk", disable=not progress, leave=False)):
    (y0, x0), (ch, cw) = spec.origin, spec.size
    o = offsets[i]
    sec_w, prev_w, next_w = [], [], []
    for s, p, n in zip(secs, prevs, nxts):
      pw = p.window(y0, y0 + ch, x0, x0 + cw)
      b = np.rint(pw.reshape(-1, 2).mean(axis=0)).astype(np.int64)
      prev_w.append(pw - b)
      next_w.append(edge_window(n, y0 + o[0], y0 + o[0] + ch, x0 + o[1], x0 + o[1] + cw) + (o - b))
      sec_w.append(s.window(y0 + b[0], y0 + b[0] + ch, x0 + b[1], x0 + b[1] + cw))
    inside = np.zeros((ch, cw), bool)  # where src = warp(S, next) exists: r + o inside the section
    inside[max(0, -y0 - o[0]):max(0, h - y0 - o[0]), max(0, -x0 - o[1]):max(0, w - x0 - o[1])] = True
    t = _stitch_chunk(np.stack(sec_w), np.stack(prev_w).astype(np.float32), np.stack(next_w).astype(np.float32),
                      inside, block_config, refine) + o.astype(np.float32)
    if sink is not None:
      sink(spec.core, t[spec.crop])
    else:
      acc.add(t, spec)
  logging.info("stitch_field_chunked: %d overlap sections of %dx%d in %d chunks", len(secs), h, w, len(specs))
  return None if sink is not None else acc.result()


def _stitch_chunk(sec: np.ndarray, prev: np.ndarray, nxt: np.ndarray, inside: np.ndarray, config,
                  refine: bool) -> np.ndarray:
  """`jaxalign.stack.chain.stitch_field` on one re-centred chunk, where the block N+1 rendering only
  exists at `inside`: beyond the section it is no data (zero, not a valid voter), as in the
  whole-section stitch, instead of a rendering through edge-extrapolated block fields.

  Args:
    sec: `[O, h, w]` overlap sections read at the chunk's box.
    prev, nxt: `[O, h, w, 2]` their block N / block N+1 fields in the box's coordinates.
    inside: `[h, w]` bool.
    config: `BlockConfig` (None = defaults).
    refine: as `stitch_field`.
  Returns:
    `[h, w, 2]` float32 stitch field of the chunk's shifted problem.
  """
  from jaxalign.stack.chain import stitch_field
  if not (sec != 0).any() or not inside.any():
    return np.zeros(sec.shape[1:] + (2,), np.float32)
  return np.asarray(stitch_field(sec, prev, nxt, config=config, refine=refine, next_inside=inside), np.float32)


# --------------------------------------------------------------------------- drift removal


def remove_drift_chunked(field, window_fields: Sequence, weights, *, translations=None,
                         config: ChunkConfig = ChunkConfig(),
                         sink: Callable[[tuple[slice, slice], np.ndarray], None] | None = None,
                         progress: bool = False):
  """`jaxalign.stack.drift` for one section, chunk by chunk: `compose(field, invert(sum_k w_k (F_k - t_k)))`.

  Each chunk reads its core grown by a margin covering the drift there (the inverse samples the
  drift, and the composition the field, at most |drift| + 1 px away), with edge replication (the
  clamped sampling of `compose` and `invert`), so cores equal the whole-section result to float
  rounding. The margin starts at `config.render_margin` and doubles until it covers the drift in
  the chunk's window.

  Args:
    field: the section's field `[H, W, 2]` (array or `Source`).
    window_fields: the K fields `F_k` of the drift estimate (arrays or `Source`s).
    weights: `[K]` float weights (`jaxalign.stack.drift.drift_weights` row).
    translations: optional `[K, 2]` (dy, dx) px `t_k` left out of each window field: its whole
      section's mean translation (`jaxalign.stack.drift.section_translations`); None = zeros.
    config: `ChunkConfig` (chunk size, base margin).
    sink: optional `sink(core_slices, field [h, w, 2])` instead of assembling the section.
    progress: tqdm bar over chunks.
  Returns:
    `[H, W, 2]` float32 (None with a sink).
  """
  fld = as_source(field)
  sources = [as_source(f) for f in window_fields]
  weights = np.asarray(weights, np.float32)
  if len(sources) != len(weights):
    raise InputError(f"{len(sources)} window fields but {len(weights)} weights")
  if any(s.shape != fld.shape for s in sources):
    raise InputError("drift window fields must all have the section's shape")
  shifts = np.zeros((len(sources), 2), np.float32) if translations is None else \
      np.asarray(translations, np.float32).reshape(len(sources), 2)
  h, w = fld.shape
  specs = chunking.split((h, w), config.chunk, 0)
  out = None if sink is not None else np.zeros((h, w, 2), np.float32)
  for spec in tqdm(specs, desc="drift chunks", unit="chunk", disable=not progress, leave=False):
    (y0, x0), (ch, cw) = spec.origin, spec.size
    m = config.render_margin
    while True:
      box = (y0 - m, y0 + ch + m, x0 - m, x0 + cw + m)
      # Sources without weight (clipped repeats at the stack's ends, blank sections) are not read.
      zero = np.zeros((box[1] - box[0], box[3] - box[2], 2), np.float32)
      stack = np.stack([edge_window(s, *box) if wt != 0 else zero for s, wt in zip(sources, weights)])
      drift = np.tensordot(weights, stack - shifts[:, None, None, :], axes=1)
      need = _margin_for(float(np.linalg.norm(drift, axis=-1).max(initial=0.0)), config.render_margin)
      if need <= m:
        break
      m = need
    res = np.asarray(remove_one(jnp.asarray(edge_window(fld, *box)), jnp.asarray(stack), jnp.asarray(weights),
                                jnp.asarray(shifts)))
    core = res[m:m + ch, m:m + cw][spec.crop]
    if sink is not None:
      sink(spec.core, core)
    else:
      out[spec.core] = core
  return out


# --------------------------------------------------------------------------- neighbour refinement


@jax.jit
def _render_with_data(box: jax.Array, resid: jax.Array, valid_threshold: float) -> jax.Array:
  """`_render_one` of a source box, 0 where its rendered data mask is at most `valid_threshold`
  (as `jaxalign.stack.refine.render_window` on the whole section)."""
  data = _render_one((box != 0).astype(jnp.float32), resid)
  return jnp.where(data > valid_threshold, _render_one(box, resid), 0.0)


def _rendered_window(image: Source, field: Source, y0: int, y1: int, x0: int, x1: int, base_margin: int,
                     valid_threshold: float) -> np.ndarray:
  """`[y1-y0, x1-x0]` float32: the section rendered with its field over one window (re-centred by
  the window's rounded mean displacement, as `render_chunked`)."""
  box, resid = _recentred_box(image, field, y0, y1, x0, x1, base_margin)
  return np.asarray(_render_with_data(jnp.asarray(box), jnp.asarray(resid), valid_threshold))


def refine_section_chunked(sections: Sequence, fields: Sequence, weights, center: int, *, aligner: BatchedPairAligner,
                           valid_threshold: float = 0.5, config: ChunkConfig = ChunkConfig(),
                           sink: Callable[[tuple[slice, slice], np.ndarray], None] | None = None,
                           progress: bool = False):
  """`jaxalign.stack.refine` for one section, chunk by chunk.

  Every chunk window (with `config.overlap` px of context) renders the window's sections with their
  fields (re-centred as `render_chunked`), builds the template (`neighbour_template`), aligns the
  centre section's rendering to it and composes the residual after the section's field, read with a
  margin covering the residual (edge-replicated, the clamped sampling of `compose`). Chunk cores are
  kept. Renderings and templates equal the whole-section ones; the residual equals it where the
  aligner's answer does not depend on context beyond the overlap.

  Args:
    sections: the K window sections (arrays `[H, W]` or `Source`s), 0 = no data.
    fields: their K fields `[H, W, 2]` (arrays or `Source`s).
    weights: `[K]` template weights (`jaxalign.stack.refine.neighbour_weights` row, 0 at `center`).
    center: the section being refined.
    aligner: batched pair aligner (`jaxalign.align.protocols.BatchedPairAligner`).
    valid_threshold: see `jaxalign.stack.refine.RefineConfig`.
    config: `ChunkConfig` (chunk, overlap, render margin).
    sink: optional `sink(core_slices, field [h, w, 2])` instead of assembling the section.
    progress: tqdm bar over chunks.
  Returns:
    `[H, W, 2]` float32 (None with a sink).
  """
  from jaxalign.stack.refine import neighbour_template, residual  # deferred: refine imports block lazily
  imgs = [as_source(s) for s in sections]
  flds = [as_source(f) for f in fields]
  weights = np.asarray(weights, np.float32)
  if not (len(imgs) == len(flds) == len(weights)) or not 0 <= center < len(imgs):
    raise InputError(f"{len(imgs)} sections, {len(flds)} fields, {len(weights)} weights, centre {center}")
  h, w = imgs[center].shape
  if any(s.shape != (h, w) for s in imgs + flds):
    raise InputError("refinement window sections and fields must all have the section's shape")
  specs = chunking.split((h, w), config.chunk, config.overlap)
  out = None if sink is not None else np.zeros((h, w, 2), np.float32)
  for spec in tqdm(specs, desc="refine chunks", unit="chunk", disable=not progress, leave=False):
    (y0, x0), (ch, cw) = spec.origin, spec.size
    win = (y0, y0 + ch, x0, x0 + cw)
    zero = np.zeros((ch, cw), np.float32)
    # Sections without weight (clipped repeats at the stack's ends, blank sections) are not read.
    rendered = np.stack([_rendered_window(imgs[k], flds[k], *win, config.render_margin, valid_threshold)
                         if (weights[k] != 0 or k == center) else zero for k in range(len(imgs))])
    template = np.asarray(neighbour_template(jnp.asarray(rendered), jnp.asarray(weights)))
    resid = residual(aligner, rendered[center][None], template[None])[0]
    m = _margin_for(float(np.abs(resid).max(initial=0.0)), config.render_margin)
    field = edge_window(flds[center], y0 - m, y0 + ch + m, x0 - m, x0 + cw + m)
    padded = np.pad(resid, ((m, m), (m, m), (0, 0)))
    core = np.asarray(compose(jnp.asarray(field), jnp.asarray(padded)))[m:m + ch, m:m + cw][spec.crop]
    if sink is not None:
      sink(spec.core, core)
    else:
      out[spec.core] = core
  return out
