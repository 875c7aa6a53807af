"""The volume pipeline as jobs: align a `jaxalign.volume.store` volume into a field volume and an aligned image
volume (with its MIP pyramid), resumable per section, on any executor (DESIGN.md §3, issue 6 §3).

`align_volume(SRC, DST)` runs the job `align_job`, four barriers of idempotent tasks:

1. `quality/<z>`  per section: tissue and defect fractions (only when starters are chosen
   automatically); the driver then plans the blocks (`jaxalign.stack.chain.choose_starters`, `plan_blocks`).
2. `block/<k>`    per block: `align_block_task` on the block's sections -> `DST/work/block_<k>`.
3. `stitch/<k>`   per interface: `stitch_field` on the overlap -> `DST/work/stitches[k]`.
4. `section/<z>`  per section: `compose_with_decay` of its block field and the stitch fields within
   `decay_distance` -> `DST/fields[z]`; render -> `DST/aligned[z]` and its pyramid levels.
5. `drift/<z>`    only with `StackConfig.drift`: step 4 writes `DST/work/composed[z]` instead, and this
   stage takes the drift out (`jaxalign.stack.drift`, from the composed fields of the sections around z)
   -> `DST/fields[z]`, then renders. Quality (step 1) then always runs: blank sections are left out
   of the drift estimates.
6. `refine/<i>/<z>` only with `StackConfig.neighbour_refine`, one barrier per sweep i: section z is
   re-aligned to the mean of its neighbours (`jaxalign.stack.refine`), from the previous stage's fields
   (`DST/work/composed`, or `DST/work/drifted` when the drift stage runs) -> `DST/work/refined_<i>`,
   the last sweep -> `DST/fields`, then renders.

Layout of DST (all volumes zarr v3 unless `format` says otherwise; one section per chunk in z, so
every task's writes are chunk-aligned and no two tasks write the same chunk)::

  DST/fields       [Z, H, W, 2] float32 fields (pixels of the aligned level, (dy, dx))
  DST/aligned      [Z, H, W] the rendered stack, same dtype as SRC, `pyramid_levels` MIP levels
  DST/work/...     block fields and stitch fields (intermediate)
  DST/_done/...    completion records (task key -> small result), written after the task's data

A task's record is written only after its data, so a crash at any point loses no finished work and
the re-run skips every recorded task (per section for the output). The run's parameters are recorded
too; re-running into DST with different parameters is refused rather than mixing two alignments.
Every task reads its inputs from volumes, so results do not depend on which worker or executor ran
it: inline, processes and Dask give identical output.

Sections larger than `VolumeConfig.chunk` run every stage chunk by chunk (`jaxalign.volume.chunked`:
`align_block_chunked`, `stitch_field_chunked`, `compose_with_decay_chunked`, `render_chunked`), reading
windows from and writing chunk cores to the volumes, so memory per worker does not grow with the
section size.

`render_volume(SRC, FIELDS, DST)` is the same per-section render job for given fields.

Progress: besides the bar per batch of tasks (`jaxalign.volume.distributed.run_batch`), each block task
reports per section (per section of each chunk for chunked sections), with an ETA (`SectionProgress`):

- inline executor: a tqdm bar in this process, nested under the batch bar, named after the block;
- processes / Dask: the task runs in a worker process, whose tqdm bars would overwrite each other
  (and go to a cluster node's log), so the worker logs one absl INFO line per section instead (at
  most one per `PROGRESS_LOG_INTERVAL_S`, plus the first and the last): local workers (processes,
  Dask LocalCluster) share this terminal's stderr, remote Dask workers write to their own logs.

Unreadable input (`on_read_error`): before anything is written, every section of SRC is read at each
MIP level the tasks read (`source_levels`). A chunk that cannot be read (corrupt, truncated) stops the
run with a `jaxalign.errors.ReadError` naming the volume, section and chunk (`on_read_error="stop"`,
the default), or (`"missing"`) is listed as an `UnreadableChunk` in `VolumeConfig.unreadable`: every
task then reads SRC through `MissingData`, where that chunk's region (mapped to every level) is zeros,
no data, exactly like a blank part of a section (a wholly unreadable section is a blank section).
The list is part of the run's parameters (a re-run after the chunk was repaired is refused, not
mixed) and `read_errors(DST)` returns it for the run's summary.
"""

from __future__ import annotations

import dataclasses
import functools
import logging as std_logging
import math
import multiprocessing
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxalign.volume import distributed as jd, store
from jaxalign.volume.chunked import ChunkConfig, VolumeSource, align_block_chunked, compose_with_decay_chunked, refine_section_chunked, remove_drift_chunked, render_chunked, stitch_field_chunked
from jaxalign.stack.drift import drift_weights, remove_one, section_translations, window_indices
from jaxalign.errors import InputError, ReadError
from jaxalign.stack.refine import neighbour_weights, refine_aligner, refine_section
from jaxalign.stack.chain import DEFAULT_BLOCK_SIZE, DEFAULT_OVERLAP, BlockPlan, StackConfig, StackPlan, align_block_task, choose_starters, compose_with_decay, plan_blocks, stitch_chain, stitch_field
from jaxalign.stack.block import DEFAULT_VOTING_DISTANCE
from jaxalign.ops.decay import DEFAULT_DECAY_DISTANCE

FIELDS, ALIGNED, WORK = "fields", "aligned", "work"


@dataclasses.dataclass(frozen=True)
class VolumeConfig:
  """Settings of the volume pipeline (paper defaults where the paper has one).

  Attributes:
    block_size, overlap: blocks of sections and their overlap (paper FAFB: 25 / 3).
    voting_distance: sections each section votes over (paper v15: 3).
    decay_distance: sections over which a stitch field decays (paper: 100).
    starters: starter section per block, or None to choose them from section quality.
    level: MIP level of SRC that is aligned and rendered (fields are in pixels of that level).
    pyramid_levels: MIP levels of the aligned volume; None = down to >= `pyramid_min_size` px.
    pyramid_min_size: smallest side of the coarsest automatic pyramid level, px.
    chunk: `ChunkConfig` for sections larger than `chunk.chunk` px: block fields, stitch fields,
      composition with decay, rendering and the aligned pyramid all run on (re-centred, overlapping)
      chunks, so a worker's memory is bounded by the chunk size; None = whole sections always.
    stack: `StackConfig` (blur rate, starter rules, `BlockConfig` with the pair aligner).
    unreadable: chunks of SRC read as zeros (no data) by every task; filled by `align_volume` from
      its scan of SRC with `on_read_error="missing"` (see the module docstring); () = none.
  """
  block_size: int = DEFAULT_BLOCK_SIZE
  overlap: int = DEFAULT_OVERLAP
  voting_distance: int = DEFAULT_VOTING_DISTANCE
  decay_distance: float = DEFAULT_DECAY_DISTANCE
  starters: tuple[int, ...] | None = None
  level: int = 0
  pyramid_levels: int | None = None
  pyramid_min_size: int = 64
  chunk: ChunkConfig | None = None
  stack: StackConfig = StackConfig()
  # Out of the repr (the run's parameters compare reprs): `_params` adds it only when there is one.
  unreadable: tuple["UnreadableChunk", ...] = dataclasses.field(default=(), repr=False)

  def __post_init__(self):
    if self.decay_distance <= 0:
      raise InputError(f"decay_distance must be > 0, got {self.decay_distance}")
    if self.level < 0:
      raise InputError(f"level must be >= 0, got {self.level}")
    if self.pyramid_levels is not None and self.pyramid_levels < 1:
      raise InputError(f"pyramid_levels must be >= 1, got {self.pyramid_levels}")


def output_url(dst: str, *parts: str) -> str:
  return "/".join([dst.rstrip("/"), *parts])


@functools.lru_cache(maxsize=32)
def _open(url: str) -> store.Volume:
  """Volume handles cached per worker process (opening reads metadata; tasks reuse it)."""
  return store.open_volume(url)


# --------------------------------------------------------------------------- unreadable input


READ_ERROR_POLICIES = ("stop", "missing")


@dataclasses.dataclass(frozen=True)
class UnreadableChunk:
  """A storage chunk of SRC that cannot be read: section `z` at MIP `level`, pixels `y` x `x` of
  that level (`(start, stop)`, the chunk clipped to the section). `chunk` (the storage key) and
  `detail` (the reason) are for messages; they are not part of the run's parameters."""
  z: int
  level: int
  y: tuple[int, int]
  x: tuple[int, int]
  chunk: str | None = dataclasses.field(default=None, compare=False, repr=False)
  detail: str = dataclasses.field(default="", compare=False, repr=False)

  def describe(self) -> str:
    """One line: section, level, region and chunk."""
    key = f", chunk {self.chunk}" if self.chunk else ""
    return (f"section {self.z} (level {self.level}, y {self.y[0]}:{self.y[1]}, x {self.x[0]}:{self.x[1]}{key}): "
            f"{self.detail}")

  def box_at(self, level: int, shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The region at MIP `level` (sections `shape` `[Z, H, W]` there) covering this chunk's pixels:
    coarser levels round outwards, finer levels scale up; clipped to the section."""
    d = level - self.level
    if d >= 0:
      f = 2 ** d
      y, x = (self.y[0] // f, -(-self.y[1] // f)), (self.x[0] // f, -(-self.x[1] // f))
    else:
      f = 2 ** -d
      y, x = (self.y[0] * f, self.y[1] * f), (self.x[0] * f, self.x[1] * f)
    return (min(y[0], shape[1]), min(y[1], shape[1])), (min(x[0], shape[2]), min(x[1], shape[2]))


def locate_unreadable(vol: store.Volume, z: int, level: int, box=None) -> list[UnreadableChunk]:
  """The storage chunks of section `z` at `level` within `box` ((y0, y1), (x0, x1) px of the level;
  None = the section) that cannot be read, found by reading chunk by chunk (`vol.chunks(level)`)."""
  h, w = vol.shape(level)[1:3]
  (y0, y1), (x0, x1) = box or ((0, h), (0, w))
  _, cy, cx = vol.chunks(level)
  out = []
  for ya in range(y0 // cy * cy, y1, cy):
    for xa in range(x0 // cx * cx, x1, cx):
      b = ((ya, min(ya + cy, h)), (xa, min(xa + cx, w)))
      try:
        vol.read(z, level, b)
      except ReadError as e:
        out.append(UnreadableChunk(int(z), int(level), b[0], b[1], e.chunk, e.detail))
  return out


def _z_range(z, n: int) -> tuple[range, bool]:
  """Sections a `Volume.read` z argument (int, slice, range, (z0, z1), None) selects, and whether it
  is a single int."""
  if z is None:
    return range(n), False
  if isinstance(z, (int, np.integer)):
    return range(int(z), int(z) + 1), True
  if isinstance(z, (tuple, list)):
    z = slice(*z)
  return range(z.start or 0, n if z.stop is None else z.stop), False


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
  lo, hi = max(a[0], b[0]), min(a[1], b[1])
  return (lo, hi) if lo < hi else None


class MissingData:
  """A `jaxalign.volume.store.Volume` (read-only use) whose `unreadable` chunks read as zeros, no data, at every
  MIP level (`UnreadableChunk.box_at`); the chunks themselves are never read. Everything else is the
  volume's own (shape, levels, resolution, ...).

  Args:
    volume: the open volume.
    unreadable: `UnreadableChunk`s of it.
  """

  def __init__(self, volume: store.Volume, unreadable: Sequence[UnreadableChunk]):
    self.volume = volume
    self.by_z: dict[int, list[UnreadableChunk]] = {}
    for u in unreadable:
      self.by_z.setdefault(u.z, []).append(u)

  def __getattr__(self, name):
    return getattr(self.volume, name)

  def read(self, z=None, level: int = 0, box=None) -> np.ndarray:
    """`Volume.read` with the unreadable chunks' regions zeroed (z: int, contiguous slice / range /
    (z0, z1) or None; box: ((y0, y1), (x0, x1)) px of `level` or None). Returns the volume's dtype."""
    shape = self.volume.shape(level)
    zs, single = _z_range(z, shape[0])
    (y0, y1), (x0, x1) = [(b.start, b.stop) if isinstance(b, slice) else tuple(b) for b in box] if box is not None \
        else ((0, shape[1]), (0, shape[2]))
    hits = {}
    for zz in zs:
      for u in self.by_z.get(zz, ()):
        by, bx = u.box_at(level, shape)
        oy, ox = _overlap(by, (y0, y1)), _overlap(bx, (x0, x1))
        if oy and ox:
          hits.setdefault(zz, []).append((oy, ox, u.level == level))
    if not hits:
      return self.volume.read(z, level, box)
    out = np.zeros((len(zs), y1 - y0, x1 - x0) + ((2,) if self.volume.is_field else ()), self.volume.dtype)
    for i, zz in enumerate(zs):
      if zz not in hits:
        out[i] = self.volume.read(zz, level, ((y0, y1), (x0, x1)))
        continue
      own = [(oy, ox) for oy, ox, same in hits[zz] if same]
      if not own:
        out[i] = self.volume.read(zz, level, ((y0, y1), (x0, x1)))
      else:  # read the box chunk by chunk, leaving out the unreadable chunks of this level
        _, cy, cx = self.volume.chunks(level)
        for ya in range(y0 // cy * cy, y1, cy):
          for xa in range(x0 // cx * cx, x1, cx):
            ry, rx = (max(ya, y0), min(ya + cy, y1)), (max(xa, x0), min(xa + cx, x1))
            if any(_overlap(ry, oy) and _overlap(rx, ox) for oy, ox in own):
              continue
            out[i, ry[0] - y0:ry[1] - y0, rx[0] - x0:rx[1] - x0] = self.volume.read(zz, level, (ry, rx))
      for (a, b), (c, d), _ in hits[zz]:
        out[i, a - y0:b - y0, c - x0:d - x0] = 0
    return out[0] if single else out


def _source(src_url: str, config: "VolumeConfig"):
  """SRC as the tasks read it: the volume, through `MissingData` when the scan found unreadable chunks."""
  vol = _open(src_url)
  return MissingData(vol, config.unreadable) if config.unreadable else vol


def source_levels(src: store.Volume, config: "VolumeConfig") -> list[int]:
  """MIP levels of SRC the align tasks read: the aligned level, the quality level and (chunked) the
  re-centring level, where SRC has them."""
  from jaxalign.volume.chunked import coarse_levels_for
  levels = {config.level, min(src.levels - 1, config.level + QUALITY_LEVELS)}
  h, w = src.shape(config.level)[1:3]
  if _chunked(config, h, w):
    c = config.level + coarse_levels_for(config.chunk, h, w)
    if c < src.levels:
      levels.add(c)
  return sorted(levels)


def read_errors(dst: str) -> list[UnreadableChunk]:
  """The unreadable chunks of SRC the last `align_volume` into `dst` treated as missing data."""
  return [UnreadableChunk(**d) for d in jd.CompletionRecords(dst).get(READ_ERRORS_RECORD, [])]


READ_ERRORS_RECORD = "read_errors"


# --------------------------------------------------------------------------- progress inside a task


PROGRESS_MODES = ("off", "bar", "log")
# A worker's per-section progress lines come at most this often (plus the first and the last).
PROGRESS_LOG_INTERVAL_S = 10.0


def progress_mode(executor: jd.Executor | None, progress: bool) -> str:
  """How tasks on `executor` show progress inside a task: "bar" (a tqdm bar; inline executor, this
  process), "log" (absl INFO lines from worker processes: processes, Dask), or "off"."""
  if not progress:
    return "off"
  return "bar" if executor is None or isinstance(executor, jd.InlineExecutor) else "log"


class SectionProgress:
  """Per-section progress of one long task, with an ETA.

  Args:
    desc: what runs, e.g. "block 3 (z 75-99)".
    mode: "bar" (tqdm bar, `unit="section"`), "log" (absl INFO lines: done/total, s per section,
      ETA; at most one per `interval_s` besides the first and the last) or "off".
    interval_s: seconds between log lines.
  Call `update(done, total)` after each section; a context manager (closes the bar).
  """

  def __init__(self, desc: str, mode: str = "bar", interval_s: float = PROGRESS_LOG_INTERVAL_S):
    if mode not in PROGRESS_MODES:
      raise InputError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")
    self.desc, self.mode, self.interval_s = desc, mode, interval_s
    self.bar = None
    self.t0 = time.perf_counter()
    self.last_log = -math.inf
    if mode == "log" and multiprocessing.parent_process() is not None and logging.get_verbosity() < logging.INFO:
      # A spawned worker (process pool, Dask) never parsed absl flags: its absl logger drops INFO and
      # has no handler. The driver's own logging (threads of this process) is left as its user set it.
      logging.use_absl_handler()
      logging.set_verbosity(logging.INFO)
      # As the command line does in the driver: JAX's INFO notes on absent TPU/GPU plugins are noise.
      std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)

  def update(self, done: int, total: int) -> None:
    """`done` of `total` sections finished."""
    if self.mode == "bar":
      if self.bar is None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=self.desc, unit="section", leave=False)
      self.bar.total = total
      self.bar.update(done - self.bar.n)
    elif self.mode == "log":
      now = time.perf_counter()
      if done in (1, total) or now - self.last_log >= self.interval_s:
        self.last_log = now
        rate = (now - self.t0) / max(done, 1)
        logging.info("%s: section %d/%d, %.1f s/section, ETA %.0f s", self.desc, done, total, rate,
                     rate * (total - done))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def pyramid_levels_for(shape: Sequence[int], config: VolumeConfig) -> int:
  if config.pyramid_levels is not None:
    return config.pyramid_levels
  smallest = min(shape[-2:])
  return max(1, int(math.floor(math.log2(max(smallest / config.pyramid_min_size, 1)))) + 1)


def _to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if np.issubdtype(dtype, np.integer):
    return np.clip(np.rint(x), 0, np.iinfo(dtype).max).astype(dtype)
  return x.astype(dtype)


def _chunked(config: VolumeConfig, h: int, w: int) -> bool:
  """Whether sections of h x w px run chunk by chunk (memory ~ chunk size) under `config`."""
  return config.chunk is not None and max(h, w) > config.chunk.chunk


def _tiles(h: int, w: int, tile: int):
  """((y0, y1), (x0, x1)) boxes of at most tile x tile px covering an h x w section."""
  for y0 in range(0, h, tile):
    for x0 in range(0, w, tile):
      yield (y0, min(y0 + tile, h)), (x0, min(x0 + tile, w))


def _stream_pyramid(vol: store.Volume, z: int, tile: int) -> None:
  """MIP levels 1.. of section z from the level below, tile by tile (2x2 mean, odd edges
  replicated like `jaxalign.volume.pyramid.build_pyramid`): memory ~ (2 tile)^2 px whatever the section size."""
  from jaxalign.volume.chunked import downsample_to
  for k in range(1, vol.levels):
    hk, wk = vol.shape(k)[1:3]
    hb, wb = vol.shape(k - 1)[1:3]
    for (y0, y1), (x0, x1) in _tiles(hk, wk, tile):
      a = vol.read(z, k - 1, ((2 * y0, min(2 * y1, hb)), (2 * x0, min(2 * x1, wb)))).astype(np.float32)
      vol.write(_to_dtype(downsample_to(a[None], 1)[0], vol.dtype), z, k, ((y0, y1), (x0, x1)))


def _write_pyramid(vol: store.Volume, z: int, image: np.ndarray, levels: int) -> None:
  """Writes section z at level 0 and its MIP levels 1.. (2x2 mean, odd edges replicated like
  `jaxalign.volume.pyramid.build_pyramid`), all chunk-aligned (one section per chunk in z)."""
  from jaxalign.volume.chunked import downsample_to
  a = image.astype(np.float32)
  vol.write(_to_dtype(a, vol.dtype), z, 0)
  for k in range(1, levels):
    a = downsample_to(a[None], 1)[0]
    vol.write(_to_dtype(a, vol.dtype), z, k)


# --------------------------------------------------------------------------- tasks (module level)


QUALITY_LEVELS = 3  # tissue fractions are read this many MIP levels coarser when SRC has them


def quality_task(src_url: str, z: int, level: int, config_tile: int | None = None,
                 unreadable: Sequence[UnreadableChunk] = ()) -> tuple[float, float]:
  """(tissue fraction, defect fraction) of section z (no defect volume: defects 0), from a coarser
  MIP level when SRC has one (a fraction does not need full resolution); counted tile by tile
  (`config_tile` px) when the section is larger than that; `unreadable` chunks count as no tissue."""
  src = MissingData(_open(src_url), unreadable) if unreadable else _open(src_url)
  lvl = min(src.levels - 1, level + QUALITY_LEVELS)
  h, w = src.shape(lvl)[1:3]
  if config_tile is None or max(h, w) <= config_tile:
    return float(np.mean(src.read(z, lvl) != 0)), 0.0
  count = sum(int(np.count_nonzero(src.read(z, lvl, box))) for box in _tiles(h, w, config_tile))
  return count / float(h * w), 0.0


def _block_config(config: VolumeConfig, src: store.Volume):
  """`config.stack.block` with the default pair aligner told the volume's resolution at the aligned
  level (its median stage depends on the section thickness in pixels) unless set explicitly."""
  from jaxalign.stack.block import with_resolution
  block = config.stack.block
  if block.aligner is not None or (block.pair is not None and block.pair.resolution_nm is not None):
    return block
  return with_resolution(block, tuple(src.resolution_at(config.level)))


def block_task(src_url: str, dst: str, block: BlockPlan, config: VolumeConfig, progress: str = "off") -> dict:
  """Aligns one block and writes its fields `[stop - start, H, W, 2]` to DST/work/block_<k>.
  `progress`: a `PROGRESS_MODES` mode for per-section progress (`SectionProgress`).
  Returns {"sections": n, "seconds": wall time of the task} (kept in its completion record)."""
  t0 = time.perf_counter()
  src = _source(src_url, config)
  out = _open(output_url(dst, WORK, f"block_{block.index:05d}"))
  h, w = src.shape(config.level)[1:3]
  desc = f"block {block.index} (z {block.start}-{block.stop - 1})"
  with SectionProgress(desc, progress) as bar:
    kw = dict(voting_distance=config.voting_distance, on_section=bar.update)
    if _chunked(config, h, w):
      sources = [VolumeSource(src, z, config.level) for z in range(block.start, block.stop)]
      align_block_chunked(sources, block, config=config.chunk, block_config=_block_config(config, src),
                          sink=lambda i, core, f: out.write(f, i, 0, core), **kw)
    else:
      sections = src.read(slice(block.start, block.stop), config.level).astype(np.float32)
      fields = np.asarray(align_block_task(sections, block, config=_block_config(config, src), **kw))
      out.write(fields, slice(0, block.stop - block.start))
  return {"sections": block.stop - block.start, "seconds": time.perf_counter() - t0}


def stitch_task(src_url: str, dst: str, plan: StackPlan, k: int, config: VolumeConfig) -> None:
  """Stitch field of interface k (block k's frame -> block k-1's) -> DST/work/stitches[k]."""
  src = _source(src_url, config)
  prev_b, b = plan.blocks[k - 1], plan.blocks[k]
  ov = np.arange(b.start, b.own_start)
  h, w = src.shape(config.level)[1:3]
  if _chunked(config, h, w):
    prev_vol = _open(output_url(dst, WORK, f"block_{prev_b.index:05d}"))
    next_vol = _open(output_url(dst, WORK, f"block_{b.index:05d}"))
    stitches = _open(output_url(dst, WORK, "stitches"))
    stitch_field_chunked([VolumeSource(src, int(z), config.level) for z in ov],
                         [VolumeSource(prev_vol, int(z - prev_b.start)) for z in ov],
                         [VolumeSource(next_vol, int(z - b.start)) for z in ov], config=config.chunk,
                         block_config=_block_config(config, src), refine=config.stack.stitch_refine,
                         sink=lambda core, t: stitches.write(t, k, 0, core))
    return
  sections = src.read(slice(int(ov[0]), int(ov[-1]) + 1), config.level).astype(np.float32)
  prev = _open(output_url(dst, WORK, f"block_{prev_b.index:05d}")).read(
    slice(int(ov[0] - prev_b.start), int(ov[-1] - prev_b.start) + 1))
  nxt = _open(output_url(dst, WORK, f"block_{b.index:05d}")).read(slice(int(ov[0] - b.start), int(ov[-1] - b.start) + 1))
  t = stitch_field(sections, prev, nxt, config=_block_config(config, src), refine=config.stack.stitch_refine)
  _open(output_url(dst, WORK, "stitches")).write(np.asarray(t, np.float32), k)


def _max_chain(plan: StackPlan, decay_distance: float) -> int:
  return max([len(stitch_chain(plan, z, decay_distance)[0]) for z in range(plan.num_sections)] + [0])


def section_task(src_url: str, dst: str, plan: StackPlan, z: int, config: VolumeConfig) -> dict:
  """Final field of section z (composition with decay), written with its rendering and pyramid.
  Returns {"seconds": wall time of the task}."""
  t0 = time.perf_counter()
  src = _source(src_url, config)
  b = plan.owner(z)
  ks, ds = stitch_chain(plan, z, config.decay_distance)
  h, w = src.shape(config.level)[1:3]
  # With drift removal or refinement the composed field is an intermediate: a later stage writes DST/fields.
  later = config.stack.drift is not None or config.stack.neighbour_refine is not None
  target = output_url(dst, WORK, "composed") if later else output_url(dst, FIELDS)
  if _chunked(config, h, w):
    fields = _open(target)
    stitches = _open(output_url(dst, WORK, "stitches"))
    total = np.zeros(2, np.float64)

    def sink(core, f):
      fields.write(f, z, 0, core)
      total[:] += np.asarray(f, np.float64).sum(axis=(0, 1))

    compose_with_decay_chunked(VolumeSource(_open(output_url(dst, WORK, f"block_{b.index:05d}")), z - b.start),
                               [VolumeSource(stitches, k) for k in ks], ds,
                               decay_distance=float(config.decay_distance), blur_rate=float(config.stack.blur_rate),
                               config=config.chunk, sink=sink)
    if not later:
      _render_section(src, fields, _open(output_url(dst, ALIGNED)), z, config)
    return {"seconds": time.perf_counter() - t0, "translation": (total / (h * w)).tolist()}
  field = _open(output_url(dst, WORK, f"block_{b.index:05d}")).read(z - b.start)
  k_max = _max_chain(plan, config.decay_distance)
  if k_max:
    # Neutral padding (zero stitches at decay_distance) keeps one compiled shape for all sections.
    st = np.zeros((k_max,) + field.shape, np.float32)
    dist = np.full(k_max, float(config.decay_distance), np.float32)
    stitches = _open(output_url(dst, WORK, "stitches"))
    for i, (k, d) in enumerate(zip(ks, ds)):
      st[i], dist[i] = stitches.read(k), d
    field = np.asarray(compose_with_decay(jnp.asarray(field), jnp.asarray(st), jnp.asarray(dist),
                                          decay_distance=float(config.decay_distance),
                                          blur_rate=float(config.stack.blur_rate)))
  _open(target).write(field, z)
  if not later:
    _render_section(src, _open(output_url(dst, FIELDS)), _open(output_url(dst, ALIGNED)), z, config, field)
  # The drift stage leaves each section's mean translation out of its fit (`DriftConfig.keep_translation`).
  return {"seconds": time.perf_counter() - t0, "translation": section_translations(field).tolist()}


def drift_task(src_url: str, dst: str, z: int, sections: Sequence[int], weights: Sequence[float],
               translations: Sequence[Sequence[float]], config: VolumeConfig) -> dict:
  """Final field of section z with the drift taken out (`jaxalign.stack.drift`): `weights` over the
  composed fields of `sections`, each without its `translations` entry ((dy, dx) px: the section's
  mean translation, or zeros); written with its rendering and pyramid. Returns {"seconds"}."""
  t0 = time.perf_counter()
  src = _source(src_url, config)
  composed = _open(output_url(dst, WORK, "composed"))
  final = config.stack.neighbour_refine is None
  fields = _open(output_url(dst, FIELDS) if final else output_url(dst, WORK, "drifted"))
  h, w = src.shape(config.level)[1:3]
  if _chunked(config, h, w):
    remove_drift_chunked(VolumeSource(composed, z), [VolumeSource(composed, k) for k in sections], weights,
                         translations=translations, config=config.chunk,
                         sink=lambda core, f: fields.write(f, z, 0, core))
    if final:
      _render_section(src, fields, _open(output_url(dst, ALIGNED)), z, config)
    return {"seconds": time.perf_counter() - t0}
  # Each section once, and none that carries no weight (clipped repeats at the stack's ends, blanks);
  # the window keeps its K slots so the removal compiles once.
  read = {k: composed.read(k) for k in {z} | {k for k, wt in zip(sections, weights) if wt != 0}}
  zero = np.zeros_like(read[z])
  window = np.stack([read[k] if wt != 0 else zero for k, wt in zip(sections, weights)])
  field = np.asarray(remove_one(jnp.asarray(read[z]), jnp.asarray(window),
                                jnp.asarray(np.asarray(weights, np.float32)),
                                jnp.asarray(np.asarray(translations, np.float32))))
  fields.write(field, z)
  if final:
    _render_section(src, fields, _open(output_url(dst, ALIGNED)), z, config, field)
  return {"seconds": time.perf_counter() - t0}


def _refine_volumes(dst: str, config: VolumeConfig) -> list[str]:
  """URLs of the fields each stage reads and writes: [input of sweep 1, output of sweep 1, ...];
  the last is DST/fields."""
  refine = config.stack.neighbour_refine
  first = "drifted" if config.stack.drift is not None else "composed"
  return ([output_url(dst, WORK, first)] + [output_url(dst, WORK, f"refined_{i}") for i in range(1, refine.iterations)]
          + [output_url(dst, FIELDS)])


def refine_task(src_url: str, dst: str, sweep: int, z: int, sections: Sequence[int], weights: Sequence[float],
                config: VolumeConfig) -> dict:
  """Section z re-aligned to the mean of its neighbours `sections` (`jaxalign.stack.refine`, sweep `sweep`
  from 1) from the previous stage's fields; the last sweep writes DST/fields and renders.
  Returns {"seconds"}."""
  t0 = time.perf_counter()
  refine = config.stack.neighbour_refine
  src = _source(src_url, config)
  urls = _refine_volumes(dst, config)
  before, after = _open(urls[sweep - 1]), _open(urls[sweep])
  final = sweep == refine.iterations
  center = list(sections).index(z)
  block = _block_config(config, src)
  aligner = refine_aligner(refine, block.aligner, None, block.pair)
  h, w = src.shape(config.level)[1:3]
  if _chunked(config, h, w):
    refine_section_chunked([VolumeSource(src, k, config.level) for k in sections],
                           [VolumeSource(before, k) for k in sections], weights, center, aligner=aligner,
                           valid_threshold=refine.valid_threshold, config=config.chunk,
                           sink=lambda core, f: after.write(f, z, 0, core))
    if final:
      _render_section(src, after, _open(output_url(dst, ALIGNED)), z, config)
    return {"seconds": time.perf_counter() - t0}
  # Sections without weight (clipped repeats at the stack's ends, blanks) are not read.
  used = {z} | {k for k, wt in zip(sections, weights) if wt != 0}
  read = {k: (src.read(k, config.level).astype(np.float32), before.read(k)) for k in used}
  zero_image, zero_field = np.zeros((h, w), np.float32), np.zeros((h, w, 2), np.float32)
  images = np.stack([read[k][0] if k in used else zero_image for k in sections])
  fields = np.stack([read[k][1] if k in used else zero_field for k in sections])
  field = refine_section(images, fields, (images != 0).astype(np.float32), weights, center, aligner,
                         refine.valid_threshold)
  after.write(field, z)
  if final:
    _render_section(src, after, _open(output_url(dst, ALIGNED)), z, config, field)
  return {"seconds": time.perf_counter() - t0}


def _render_section(src: store.Volume, fields: store.Volume, out: store.Volume, z: int, config: VolumeConfig,
                    field: np.ndarray | None = None) -> None:
  h, w = src.shape(config.level)[1:3]
  if _chunked(config, h, w):
    # Streaming: chunk cores go straight to the volume, then each MIP level is built tile by tile
    # from the one below; memory stays ~ chunk size.
    render_chunked(VolumeSource(src, z, config.level), VolumeSource(fields, z, 0), config=config.chunk,
                   sink=lambda core, a: out.write(_to_dtype(a, out.dtype), z, 0, core))
    _stream_pyramid(out, z, config.chunk.chunk)
    return
  field = fields.read(z) if field is None else field
  image = src.read(z, config.level).astype(np.float32)
  from jaxalign.stack.render import render
  aligned = np.asarray(render(image[None], field[None], batch_size=1))[0]
  _write_pyramid(out, z, aligned, out.levels)


def render_task(src_url: str, fields_url: str, dst_url: str, z: int, config: VolumeConfig) -> None:
  _render_section(_open(src_url), _open(fields_url), _open(dst_url), z, config)


# --------------------------------------------------------------------------- jobs


def _check_params(records: jd.CompletionRecords, params: dict, dst: str) -> None:
  old = records.get("params")
  if old is None:
    records.put("params", params)
  elif old != params:
    diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
    raise InputError(f"{dst} holds a run with different parameters ({', '.join(diff)}); "
                     "use another DST or --restart to discard it")


def _stable_repr(config) -> str:
  """repr without object addresses (a function in the config reprs differently in every process)."""
  import re
  return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(config))


def _params(src_url: str, config: VolumeConfig) -> dict:
  params = {"src": src_url, "config": _stable_repr(config)}
  if config.unreadable:  # SRC data treated as missing is part of what the output was computed from
    params["unreadable"] = [repr(u) for u in config.unreadable]
  return params


def _check_sections(vol: store.Volume, url: str, level: int, *, need_data: bool, tile: int | None = None,
                    also_levels: Sequence[int] = (), on_read_error: str = "stop") -> list[UnreadableChunk]:
  """Reads every section of `vol` at `level` once (tile by tile with `tile`, so the driver never
  holds a whole large section), before anything is written: NaN/Inf anywhere, or (with
  `need_data`) a volume whose sections are all zero, is an InputError naming it. `also_levels` are
  read too (only for readability).

  A chunk that cannot be read raises the `ReadError` (`on_read_error="stop"`) or, with "missing", is
  located (`locate_unreadable`) and returned; the checks then see it as zeros. Returns the
  unreadable chunks, level by level, in z order.
  """
  any_data = False
  unreadable: list[UnreadableChunk] = []
  for lvl in [level] + [k for k in also_levels if k != level]:
    z_count, h, w = vol.shape(lvl)[:3]
    boxes = [None] if tile is None or max(h, w) <= tile else list(_tiles(h, w, tile))
    for z in range(z_count):
      for box in boxes:
        try:
          section = np.asarray(vol.read(z=z, level=lvl, box=box))
        except ReadError:
          if on_read_error == "stop":
            raise
          found = locate_unreadable(vol, z, lvl, box)
          if not found:  # the failure did not repeat chunk by chunk: not a damaged chunk
            raise
          for u in found:
            logging.warning("%s: unreadable, treated as missing data: %s", url, u.describe())
          unreadable += [u for u in found if u not in unreadable]
          section = MissingData(vol, found).read(z, lvl, box)
        if lvl != level:
          continue
        if np.issubdtype(section.dtype, np.floating) and not np.all(np.isfinite(section)):
          raise InputError(f"{url}: section {z} contains NaN or Inf values")
        any_data = any_data or bool(np.any(section))
  if need_data and not any_data:
    raise InputError(f"{url}: the volume has no data (every section is all zeros)")
  return unreadable


def prepare_output(src_url: str, dst: str, config: VolumeConfig, records: jd.CompletionRecords) -> store.Volume:
  """Checks the inputs and creates DST's volumes (idempotent). Raises InputError on bad input."""
  src = store.open_volume(src_url)
  if src.is_field:
    raise InputError(f"{src_url} is a field volume; align needs an image volume")
  if config.level >= src.levels:
    raise InputError(f"{src_url} has {src.levels} level(s); --level={config.level} is not present")
  shape = src.shape(config.level)
  if shape[0] < 2:
    raise InputError(f"{src_url}: need at least 2 sections to align, got {shape[0]}")
  _check_params(records, _params(src_url, config), dst)
  res = src.resolution_at(config.level)
  store.create_volume(output_url(dst, FIELDS), shape + (2,), "float32", res, kind="field")
  store.create_volume(output_url(dst, ALIGNED), shape, src.dtype.name, res, levels=pyramid_levels_for(shape, config),
                   kind="image")
  return src


def align_job(src_url: str, dst: str, config: VolumeConfig, *, progress: str = "off"):
  """The alignment job (see the module docstring); returns the `StackPlan`. `progress`: per-section
  progress inside block tasks (`progress_mode`)."""
  src = _source(src_url, config)
  z_count, h, w = src.shape(config.level)
  drift = config.stack.drift
  refine = config.stack.neighbour_refine
  tissue = None
  if config.starters is None or drift is not None or refine is not None:
    tile = config.chunk.chunk if config.chunk is not None else None
    q = yield jd.Batch([jd.Task(f"quality/{z:06d}", quality_task,
                                (src_url, z, config.level, tile, config.unreadable)) for z in range(z_count)],
                       "quality")
    tissue, defect = np.array([a for a, _ in q]), np.array([b for _, b in q])
  if config.starters is None:
    choices = choose_starters(tissue, defect, block_size=config.block_size, overlap=config.overlap,
                              config=config.stack)
    plan = plan_blocks(z_count, [c.index for c in choices], overlap=config.overlap, choices=choices)
  else:
    plan = plan_blocks(z_count, config.starters, overlap=config.overlap)
  logging.info("align_volume plan: %s", plan.describe())
  res = src.resolution_at(config.level)
  for b in plan.blocks:
    store.create_volume(output_url(dst, WORK, f"block_{b.index:05d}"), (b.stop - b.start, h, w, 2), "float32", res,
                     kind="field")
  store.create_volume(output_url(dst, WORK, "stitches"), (len(plan.blocks), h, w, 2), "float32", res, kind="field")
  if drift is not None or refine is not None:
    store.create_volume(output_url(dst, WORK, "composed"), (z_count, h, w, 2), "float32", res, kind="field")
  if refine is not None:
    for url in _refine_volumes(dst, config)[:-1]:
      if not url.endswith("composed"):
        store.create_volume(url, (z_count, h, w, 2), "float32", res, kind="field")
  yield jd.Batch([jd.Task(f"block/{b.index:05d}", block_task, (src_url, dst, b, config), (("progress", progress),))
                  for b in plan.blocks], "blocks")
  if len(plan.blocks) > 1:
    yield jd.Batch([jd.Task(f"stitch/{k:05d}", stitch_task, (src_url, dst, plan, k, config))
                    for k in range(1, len(plan.blocks))], "stitch")
  composed = yield jd.Batch([jd.Task(f"section/{z:06d}", section_task, (src_url, dst, plan, z, config))
                  for z in range(z_count)], "sections")
  if drift is not None:
    # Blank sections (no tissue) carry a neighbour's field: left out of every drift estimate.
    weights = drift_weights(z_count, drift, (tissue > 0).astype(np.float64))
    shifts = (np.array([r["translation"] for r in composed], np.float64) if drift.keep_translation
              else np.zeros((z_count, 2)))
    windows = [window_indices(z, z_count, drift.radius) for z in range(z_count)]
    yield jd.Batch([jd.Task(f"drift/{z:06d}", drift_task,
                            (src_url, dst, z, windows[z].tolist(), weights[z].tolist(),
                             shifts[windows[z]].tolist(), config)) for z in range(z_count)], "drift")
  if refine is not None:
    # Jacobi sweeps: each reads only the previous stage's fields, so tasks are independent.
    weights = neighbour_weights(z_count, refine, (tissue > 0).astype(np.float64))
    for sweep in range(1, refine.iterations + 1):
      # A blank section's residual is 0 (nothing to align), so its field passes through unchanged.
      yield jd.Batch([jd.Task(f"refine/{sweep:02d}/{z:06d}", refine_task,
                              (src_url, dst, sweep, z, window_indices(z, z_count, refine.radius).tolist(),
                               weights[z].tolist(), config)) for z in range(z_count)], f"refine {sweep}")
  return plan


def align_volume(src_url: str, dst: str, config: VolumeConfig | None = None, *,
                 executor: jd.Executor | None = None, progress: bool = True,
                 stats: jd.RunStats | None = None, restart: bool = False,
                 on_read_error: str = "stop") -> StackPlan:
  """Aligns the volume at `src_url` into `dst` (layout in the module docstring).

  Args:
    src_url: image volume (`jaxalign.volume.store`), `[Z, H, W]`.
    dst: output folder / URL.
    config: `VolumeConfig`.
    executor: where tasks run (default inline); the output does not depend on it.
    progress: tqdm bars per batch, and per section inside block tasks (`progress_mode`).
    stats: filled with executed / skipped task counts.
    restart: discard earlier completion records in dst (recompute everything).
    on_read_error: "stop" (a chunk of SRC that cannot be read raises `ReadError` before anything is
      written) or "missing" (such chunks are no data, like blank sections; `read_errors(dst)` lists
      them). See the module docstring.
  Returns:
    the `StackPlan` (blocks and starters).
  Raises:
    InputError: bad input; `ReadError` (one) for unreadable SRC data with on_read_error="stop".
  """
  config = config or VolumeConfig()
  if on_read_error not in READ_ERROR_POLICIES:
    raise InputError(f"on_read_error must be one of {', '.join(READ_ERROR_POLICIES)}, got {on_read_error!r}")
  src = store.open_volume(src_url)
  unreadable: list[UnreadableChunk] = []
  if not src.is_field and config.level < src.levels:
    # Validate before CompletionRecords or any volume touches dst: bad input writes nothing.
    unreadable = _check_sections(src, src_url, config.level, need_data=True,
                                 tile=config.chunk.chunk if config.chunk is not None else None,
                                 also_levels=source_levels(src, config), on_read_error=on_read_error)
    config = dataclasses.replace(config, unreadable=tuple(unreadable))
    z_count = src.shape(config.level)[0]
    if config.stack.drift is not None and not config.stack.drift.applies_to(z_count):
      # Too short a stack: the drift fit would take out the alignment itself (as `align_stack`).
      logging.info("align_volume: %d sections are too few for drift removal; skipped", z_count)
      config = dataclasses.replace(config, stack=dataclasses.replace(config.stack, drift=None))
    refine = config.stack.neighbour_refine
    if refine is not None and not refine.applies_to(z_count):
      # Two sections would only swap their misregistration (as `align_stack`).
      logging.info("align_volume: %d sections are too few for neighbour refinement; skipped", z_count)
      config = dataclasses.replace(config, stack=dataclasses.replace(config.stack, neighbour_refine=None))
  records = jd.CompletionRecords(dst)
  if restart:
    records.clear()
  prepare_output(src_url, dst, config, records)
  if unreadable:  # (the run's parameters already refuse a DST that holds another list)
    records.put(READ_ERRORS_RECORD, [dataclasses.asdict(u) for u in unreadable])
  return jd.run_job(align_job(src_url, dst, config, progress=progress_mode(executor, progress)), executor,
                    records=records, progress=progress, stats=stats)


def render_volume(src_url: str, fields_url: str, dst: str, config: VolumeConfig | None = None, *,
                  executor: jd.Executor | None = None, progress: bool = True,
                  stats: jd.RunStats | None = None, restart: bool = False) -> store.Volume:
  """Renders `warp(SRC[z], FIELDS[z])` into a new image volume `dst` (with pyramid), per section;
  resumable like `align_volume` (`restart` discards dst's completion records)."""
  config = config or VolumeConfig()
  src, fields = store.open_volume(src_url), store.open_volume(fields_url)
  if not fields.is_field:
    raise InputError(f"{fields_url} is not a field volume")
  shape = src.shape(config.level)
  if fields.shape(0)[:3] != shape:
    raise InputError(f"fields {fields.shape(0)[:3]} do not match {src_url} level {config.level} {shape}")
  src_res = tuple(float(r) for r in src.resolution_at(config.level))
  field_res = tuple(float(r) for r in fields.resolution_at(0))
  if not np.allclose(src_res, field_res):
    raise InputError(f"fields resolution {field_res} nm does not match {src_url} level {config.level} "
                     f"resolution {src_res} nm")
  _check_sections(fields, fields_url, 0, need_data=False, tile=config.chunk.chunk if config.chunk is not None else None)
  records = jd.CompletionRecords(dst)
  if restart:
    records.clear()
  _check_params(records, {"src": src_url, "fields": fields_url, "config": _stable_repr(config)}, dst)
  out = store.create_volume(dst, shape, src.dtype.name, src.resolution_at(config.level),
                         levels=pyramid_levels_for(shape, config), kind="image")
  tasks = [jd.Task(f"render/{z:06d}", render_task, (src_url, fields_url, dst, z, config)) for z in range(shape[0])]

  def job():
    yield jd.Batch(tasks, "render")

  jd.run_job(job(), executor, records=records, progress=progress, stats=stats)
  return out
