"""Stack alignment: blocks, stitching, composition with decay (ABCD; Popovych et al. 2024,
"Distributed alignment of blocks", "Composition with decay"; DESIGN.md §3 steps 4-5).

The stack is cut into blocks of contiguous sections. Block N starts at its *starter* section s_N
(frame of the block = raw frame of the starter) and runs to s_{N+1} + overlap, so the first
`overlap` sections of block N+1 are also the last ones of block N. Each block is aligned
independently (`align_block`). A *stitch field* t_{N+1} maps block N+1's frame into block N's: the
overlap sections as aligned in block N+1 are aligned (pair aligner) to the same sections as aligned
in block N, and the `overlap` candidates are voted.

Section z is owned by the block N with s_N + overlap <= z < s_{N+1} + overlap (block 0 from 0). Its
final field is its block field composed with the decayed stitch fields of all earlier interfaces,
nearest first:

    G_z = compose(...compose(compose(F^N_z, D(t_N, d_N)), D(t_{N-1}, d_{N-1}))..., D(t_1, d_1)),

with d_k = z - (s_k + overlap) sections from interface k and D = `jaxalign.ops.decay.decay_field`
(gain 1 - d/decay_distance, blur growing with d). At d = 0 this is the exact (plain) composition
so neighbouring sections on both sides of an interface agree; beyond decay_distance a stitch field
is gone, so rigid drift cannot accumulate and no global solve is needed.

The building blocks run as independent tasks: `choose_starters` / `plan_blocks` (cheap, global),
`align_block_task` (one per block), `stitch_field` (one per interface, needs two neighbouring block
results on the overlap), `compose_with_decay` (one per section, needs its block field and the
stitch fields within decay_distance).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from jaxalign import errors
from jaxalign.stack.block import (DEFAULT_VOTING_DISTANCE, BlockConfig, aligned_data,
                                  align_block, batch_rows, check_stack, default_aligner, for_defects)
from jaxalign.stack.block import with_resolution as block_with_resolution
from jaxalign.ops.decay import DEFAULT_BLUR_RATE, DEFAULT_DECAY_DISTANCE, decay_field
from jaxalign.stack.drift import DriftConfig, remove_drift
from jaxalign.ops.fields import compose, invert, warp
from jaxalign.stack.refine import RefineConfig, refine_to_neighbours
from jaxalign.ops.voting import vector_vote

# Paper (FAFB): 25-section blocks overlapping by 3 sections.
DEFAULT_BLOCK_SIZE = 25
DEFAULT_OVERLAP = 3


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """ABCD settings beyond the `align_stack` arguments (hashable).

  Attributes:
    blur_rate: decay blur growth, px per section (paper: c = 0.2).
    starter_search: how many sections before its nominal position (or after section 0 for the
      first block) an automatic starter may move to find a good section.
    starter_min_data: a good starter has at least this fraction of the stack's median tissue
      coverage (tissue = non-zero and not a defect).
    starter_max_defect: a good starter has at most this fraction of its pixels marked as defects.
    block: `BlockConfig` for the blocks and the stitch alignment (aligner, voting temperature).
    stitch_refine: align the overlap renderings with the pair aligner to get the stitch field
      (paper). False votes the algebraic estimates `compose(invert(F^{N+1}_i), F^N_i)` alone: both
      blocks already aligned each overlap section, so no extra pair alignment (and none of its
      bias, which otherwise adds once per interface under plain composition) is needed.
    drift: optional `jaxalign.stack.drift.DriftConfig`: after composition, take the part of the fields
      that varies slowly along z out of every section (`jaxalign.stack.drift.remove_drift`; the drift of
      content-following chains, which blocks restart and a single block accumulates: the tissue's
      own section-to-section change, which bends the tissue when it accumulates). None = off
      (the paper's ABCD).
    neighbour_refine: optional `jaxalign.stack.refine.RefineConfig`: last, re-align every section to the
      mean of its aligned neighbours on both sides (`jaxalign.stack.refine.refine_to_neighbours`), which
      re-registers neighbours that drift removal left slightly apart. None = off.
    Both are on by default (issue 18): on the real ISBI stack (30 x 512², 4 nm) with fields at
    32 nm, ABCD alone bends the tissue (area change p1-p99 0.84-1.13) and drift removal alone costs
    low CPC (22 -> 25 %); together they give 0.91-1.08 and 18.5 % (SOFIMA's stack recipe: 24.6 %).
  """
  blur_rate: float = DEFAULT_BLUR_RATE
  starter_search: int = 3
  starter_min_data: float = 0.95
  starter_max_defect: float = 0.01
  block: BlockConfig = BlockConfig()
  stitch_refine: bool = True
  drift: DriftConfig | None = DriftConfig()
  neighbour_refine: RefineConfig | None = RefineConfig()

  def __post_init__(self):
    if self.starter_search < 0:
      raise errors.InputError(f"StackConfig.starter_search must be >= 0, got {self.starter_search}")
    if self.blur_rate < 0:
      raise errors.InputError(f"StackConfig.blur_rate must be >= 0, got {self.blur_rate}")


class StarterChoice(NamedTuple):
  """An automatically chosen starter: its index, where the regular grid put it, and why."""
  index: int
  nominal: int
  reason: str


class BlockPlan(NamedTuple):
  """One block. Sections `[start, stop)`; `starter` has the identity field (frame of the block);
  sections before the starter (only possible in block 0) are aligned backwards from it. The block
  owns (gives the final field of) sections `[own_start, own_stop)`; `overlap` = sections shared with
  the previous block, `[start, start + overlap)` (empty for block 0)."""
  index: int
  start: int
  stop: int
  starter: int
  own_start: int
  own_stop: int

  @property
  def overlap_sections(self) -> range:
    return range(self.start, self.own_start) if self.index > 0 else range(0)


@dataclasses.dataclass(frozen=True)
class StackPlan:
  """The block partition of a stack (inspectable; logged by `align_stack`).

  Attributes:
    num_sections: Z.
    overlap: sections shared by neighbouring blocks.
    blocks: the blocks in order.
    starters: starter section of each block.
    choices: per block, why its starter was chosen (automatic choice) or "given".
  """
  num_sections: int
  overlap: int
  blocks: tuple[BlockPlan, ...]
  starters: tuple[int, ...]
  choices: tuple[StarterChoice, ...]

  def owner(self, z: int) -> BlockPlan:
    """The block whose field is final for section z."""
    for b in self.blocks:
      if b.own_start <= z < b.own_stop:
        return b
    raise errors.InputError(f"section {z} outside the plan's {self.num_sections} sections")

  def interface(self, k: int) -> int:
    """First section owned by block k (where stitch field k applies undecayed); k >= 1."""
    return self.blocks[k].own_start

  def describe(self) -> str:
    lines = [f"{len(self.blocks)} block(s) over {self.num_sections} sections, overlap {self.overlap}"]
    for b, c in zip(self.blocks, self.choices):
      lines.append(f"  block {b.index}: sections [{b.start}, {b.stop}), starter {b.starter} ({c.reason}), "
                   f"owns [{b.own_start}, {b.own_stop})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- planning


def section_quality(sections, defects=None) -> tuple[np.ndarray, np.ndarray]:
  """Per-section tissue and defect fractions.

  Args:
    sections: `[Z, H, W]` images (0 = no data).
    defects: optional `[Z, H, W]` bool.
  Returns:
    (`[Z]` fraction of pixels with tissue (non-zero, not a defect), `[Z]` fraction marked defect).
  """
  sec, d = check_stack(sections, defects)
  tissue = ((sec != 0) & ~d).reshape(sec.shape[0], -1).mean(axis=1)
  return tissue.astype(np.float64), d.reshape(sec.shape[0], -1).mean(axis=1).astype(np.float64)


def _check_sizes(num_sections: int, block_size: int, overlap: int) -> None:
  if num_sections < 1:
    raise errors.InputError(f"need at least one section, got {num_sections}")
  if overlap < 1:
    raise errors.InputError(f"overlap must be >= 1 (stitching needs shared sections), got {overlap}")
  if block_size <= overlap:
    raise errors.InputError(f"block_size ({block_size}) must exceed overlap ({overlap})")


def choose_starters(tissue: Sequence[float], defect: Sequence[float] | None = None, *,
                    block_size: int = DEFAULT_BLOCK_SIZE, overlap: int = DEFAULT_OVERLAP,
                    config: StackConfig | None = None) -> list[StarterChoice]:
  """Picks one starter section per block, avoiding sections with missing data or large defects.

  Blocks are laid out on a regular grid of stride `block_size - overlap`; each starter may move up
  to `config.starter_search` sections earlier (so no block exceeds `block_size`; block 0's starter
  may move later instead, and block 0's leading sections are then aligned backwards). A section is
  good if its tissue fraction is >= `starter_min_data` x the stack median and its defect fraction
  <= `starter_max_defect`; the good section nearest the nominal position wins, otherwise the one
  with the most tissue (logged as a warning).

  Args:
    tissue: `[Z]` tissue fraction per section (`section_quality`).
    defect: `[Z]` defect fraction per section (None = no defects).
    block_size, overlap: block layout (sections).
    config: `StackConfig`.
  Returns:
    One `StarterChoice` per block, in order.
  """
  config = config or StackConfig()
  tissue = np.asarray(tissue, np.float64)
  z_count = tissue.shape[0]
  defect = np.zeros(z_count) if defect is None else np.asarray(defect, np.float64)
  _check_sizes(z_count, block_size, overlap)
  stride = block_size - overlap
  ref = float(np.median(tissue[tissue > 0])) if np.any(tissue > 0) else 0.0
  good = (tissue > 0) & (tissue >= config.starter_min_data * ref) & (defect <= config.starter_max_defect)

  def pick(nominal: int, window: list[int]) -> StarterChoice:
    ok = [i for i in window if good[i]]
    if ok:
      i = min(ok, key=lambda j: (abs(j - nominal), -j))
      why = "nominal position" if i == nominal else (
          f"nominal {nominal} has tissue {tissue[nominal]:.3f}, defects {defect[nominal]:.3f}")
      return StarterChoice(i, nominal, why)
    i = max(window, key=lambda j: (tissue[j] - defect[j], -abs(j - nominal)))
    why = (f"no good section in [{min(window)}, {max(window)}] (tissue >= {config.starter_min_data:.2f} x "
           f"median {ref:.3f}, defects <= {config.starter_max_defect:.3f}); most tissue {tissue[i]:.3f}")
    logging.warning("choose_starters: %s -> section %d", why, i)
    return StarterChoice(i, nominal, why)

  choices = [pick(0, list(range(0, min(z_count, config.starter_search + 1))))]
  start = 0  # block 0 spans from section 0 whatever its starter
  while start + block_size < z_count:
    nominal = start + stride
    lo = max(choices[-1].index + 1, start + 1, nominal - config.starter_search)
    choices.append(pick(nominal, list(range(lo, nominal + 1))))
    start = choices[-1].index
  return choices


def plan_blocks(num_sections: int, starters: Sequence[int], *, overlap: int = DEFAULT_OVERLAP,
                choices: Sequence[StarterChoice] | None = None) -> StackPlan:
  """The block partition for given starter sections.

  Args:
    num_sections: Z.
    starters: strictly increasing section indices, one per block; block N runs from starter N
      (block 0 from section 0) to starter N+1 + overlap (the last block to Z).
    overlap: sections shared by neighbouring blocks (>= 1).
    choices: optional reasons (from `choose_starters`); default "given".
  Returns:
    `StackPlan`.
  Raises:
    InputError: starters out of range, not increasing, or too close to the end for the overlap.
  """
  starters = [int(s) for s in starters]
  if not starters:
    raise errors.InputError("starters: need at least one starter section")
  if overlap < 1:
    raise errors.InputError(f"overlap must be >= 1 (stitching needs shared sections), got {overlap}")
  if any(b <= a for a, b in zip(starters, starters[1:])):
    raise errors.InputError(f"starters must be strictly increasing, got {starters}")
  if starters[0] < 0 or starters[-1] >= num_sections:
    raise errors.InputError(f"starters must lie in [0, {num_sections}), got {starters}")
  if len(starters) > 1 and starters[-1] + overlap > num_sections:
    raise errors.InputError(f"starter {starters[-1]} + overlap {overlap} runs past the {num_sections} sections")
  blocks = []
  for i, s in enumerate(starters):
    start = 0 if i == 0 else s
    stop = num_sections if i == len(starters) - 1 else starters[i + 1] + overlap
    own_start = 0 if i == 0 else s + overlap
    own_stop = stop
    blocks.append(BlockPlan(i, start, stop, s, own_start, own_stop))
  if choices is None:
    choices = [StarterChoice(s, s, "given") for s in starters]
  return StackPlan(num_sections, overlap, tuple(blocks), tuple(starters), tuple(choices))


# --------------------------------------------------------------------------- per-block / per-interface tasks


def align_block_task(block_sections, block: BlockPlan, *, voting_distance: int = DEFAULT_VOTING_DISTANCE,
                     model=None, block_defects=None, config: BlockConfig | None = None,
                     progress: bool = False, on_section=None) -> jax.Array:
  """Aligns one planned block (an independent task).

  Args:
    block_sections: `[stop - start, H, W]` the block's sections (`sections[block.start:block.stop]`).
    block: its `BlockPlan`.
    voting_distance, model, config: as `align_block`.
    block_defects: optional `[stop - start, H, W]` bool.
    on_section: optional `on_section(done, total)` called after each section is aligned (`total` =
      stop - start; the starter counts once), e.g. for progress inside a pipeline block task.
  Returns:
    `[stop - start, H, W, 2]` float32 fields (pixels, (dy, dx)) into the starter's frame.
  """
  sec = np.asarray(block_sections)
  if sec.shape[0] != block.stop - block.start:
    raise errors.InputError(f"block {block.index}: got {sec.shape[0]} sections, plan has "
                            f"{block.stop - block.start}")
  d = None if block_defects is None else np.asarray(block_defects)
  k = block.starter - block.start
  kw = dict(voting_distance=voting_distance, model=model, config=config, progress=progress)
  done = [0]

  def report(z: int) -> None:
    if on_section is not None and not (z == 0 and done[0]):  # the starter opens both passes
      done[0] += 1
      on_section(done[0], sec.shape[0])

  fwd = align_block(sec[k:], defects=None if d is None else d[k:], on_section=report, **kw)
  if k == 0:
    return fwd
  # Leading sections before a moved starter: align backwards from the starter (same frame).
  bwd = align_block(sec[k::-1], defects=None if d is None else d[k::-1], on_section=report, **kw)
  return jnp.concatenate([bwd[:0:-1], fwd])


def stitch_field(overlap_sections, prev_fields, next_fields, *, overlap_defects=None, model=None,
                 config: BlockConfig | None = None, refine: bool = True, next_inside=None) -> jax.Array:
  """The stitch field mapping block N+1's frame into block N's, voted over the overlap.

  For each overlap section i, `next_fields[i]` puts it in block N+1's frame and `prev_fields[i]` in
  block N's; the pair aligner aligns the former rendering to the latter (starting from the algebraic
  estimate `compose(invert(next), prev)`), and the candidates are vector-voted (a candidate is a
  valid voter where its block-N rendering has data).

  Args:
    overlap_sections: `[O, H, W]` the shared sections (0 = no data).
    prev_fields: `[O, H, W, 2]` their fields in block N (pixels, (dy, dx)).
    next_fields: `[O, H, W, 2]` their fields in block N+1.
    overlap_defects: optional `[O, H, W]` bool.
    model, config: pair model and `BlockConfig` (aligner, voting temperature).
    refine: align the renderings (paper); False votes the algebraic estimates alone (no pair
      alignment, see `StackConfig.stitch_refine`).
    next_inside: optional `[H, W]` bool: where the block N+1 renderings exist (a chunk of a larger
      section, `jaxalign.volume.chunked`); elsewhere they are no data and not valid voters.
  Returns:
    `[H, W, 2]` float32 t with `warp(warp(S, next_fields[i]), t) ≈ warp(S, prev_fields[i])`.
  """
  config = config or BlockConfig()
  sec, dfx = check_stack(overlap_sections, overlap_defects, "overlap_sections")
  o, h, w = sec.shape
  prev = errors.check_field(prev_fields, "prev_fields", shape=(h, w))
  nxt = errors.check_field(next_fields, "next_fields", shape=(h, w))
  if prev.shape[0] != o or nxt.shape[0] != o:
    raise errors.InputError(f"stitch_field: {o} overlap sections but fields {prev.shape}, {nxt.shape}")
  data = (sec != 0) & ~dfx
  keep = [i for i in range(o) if data[i].any()]
  if not keep:
    logging.warning("stitch_field: no overlap section has data; stitch field is the identity")
    return jnp.zeros((h, w, 2), jnp.float32)
  inits = _algebraic_stitch(jnp.asarray(nxt), jnp.asarray(prev))
  inside = np.ones((h, w), bool) if next_inside is None else np.asarray(next_inside, bool)
  src_valid = (np.asarray(aligned_data_batch(jnp.asarray(data), jnp.asarray(nxt))) > config.valid_threshold) & inside
  tgt_valid = np.asarray(aligned_data_batch(jnp.asarray(data), jnp.asarray(prev))) > config.valid_threshold
  if refine:
    aligner = config.aligner or default_aligner(model, config.pair)
    src = np.asarray(warp(jnp.asarray(sec), jnp.asarray(nxt))) * inside
    tgt = np.asarray(warp(jnp.asarray(sec), jnp.asarray(prev)))
    # All overlap pairs in one batch (padded to O on accelerators: one compile per overlap size).
    idx = np.asarray(keep)[batch_rows(0, len(keep), o)]
    src_def = np.asarray(aligned_data_batch(jnp.asarray(dfx), jnp.asarray(nxt))) > config.valid_threshold
    tgt_def = np.asarray(aligned_data_batch(jnp.asarray(dfx), jnp.asarray(prev))) > config.valid_threshold
    cands = aligner(src[idx], tgt[idx], src_defects=src_def[idx], tgt_defects=tgt_def[idx],
                    init_fields=np.asarray(inits)[idx])
    cands = jnp.asarray(np.asarray(cands, np.float32)[: len(keep)])
  else:
    cands = inits[np.array(keep)]
  if len(keep) == 1:
    return cands[0]
  return vector_vote(cands, temperature=config.temperature, blur_sigma=config.blur_sigma,
               valid=jnp.asarray(tgt_valid[keep] & src_valid[keep]))


@jax.jit
def _algebraic_stitch(next_fields: jax.Array, prev_fields: jax.Array) -> jax.Array:
  """`[O, H, W, 2]`: t_i = compose(invert(next_i), prev_i), so compose(next_i, t_i) ≈ prev_i."""
  return jax.vmap(lambda n, p: compose(invert(n), p))(next_fields, prev_fields)


aligned_data_batch = jax.jit(jax.vmap(aligned_data))


@jax.jit
def compose_with_decay(field: jax.Array, stitches: jax.Array, distances: jax.Array, *,
                       decay_distance: float | jax.Array = DEFAULT_DECAY_DISTANCE,
                       blur_rate: float | jax.Array = DEFAULT_BLUR_RATE) -> jax.Array:
  """Final field of one section: its block field composed with decayed stitch fields.

  Args:
    field: `[H, W, 2]` float32 block field (pixels, (dy, dx)) of the section.
    stitches: `[K, H, W, 2]` stitch fields of the interfaces before it, nearest first (t_N, t_{N-1},
      ...); zero fields pad the chain (they are neutral), so one compile serves every section.
    distances: `[K]` sections from each interface (z - first owned section of that block).
    decay_distance, blur_rate: see `jaxalign.ops.decay.decay_field`.
  Returns:
    `[H, W, 2]` float32 `compose(...compose(field, D(t_N, d_N))..., D(t_1, d_1))`; vmap for sections.
  """
  def step(acc, sd):
    s, d = sd
    return compose(acc, decay_field(s, d, decay_distance=decay_distance, blur_rate=blur_rate)), None

  out, _ = jax.lax.scan(step, field.astype(jnp.float32), (stitches.astype(jnp.float32),
                                                           jnp.asarray(distances, jnp.float32)))
  return out


_compose_with_decay_batch = jax.jit(jax.vmap(
    lambda f, s, d, dd, br: compose_with_decay(f, s, d, decay_distance=dd, blur_rate=br),
    in_axes=(0, None, 0, None, None)))


def stitch_chain(plan: StackPlan, z: int, decay_distance: float) -> tuple[list[int], list[float]]:
  """Interfaces that affect section z (nearest first) and their distances; those at or beyond
  `decay_distance` are dropped (their decayed field is zero)."""
  owner = plan.owner(z)
  ks, ds = [], []
  for k in range(owner.index, 0, -1):
    d = z - plan.interface(k)
    if d < decay_distance:
      ks.append(k)
      ds.append(float(d))
  return ks, ds


# --------------------------------------------------------------------------- whole stack in memory


def align_stack(sections, *, block_size: int = DEFAULT_BLOCK_SIZE, overlap: int = DEFAULT_OVERLAP,
                voting_distance: int = DEFAULT_VOTING_DISTANCE,
                decay_distance: float = DEFAULT_DECAY_DISTANCE, starters: Sequence[int] | None = None,
                model=None, defects=None, resolution_nm=None, config: StackConfig | None = None,
                progress: bool = True, return_plan: bool = False):
  """Aligns a stack with blocks, stitch fields and composition with decay (no global solve).

  Args:
    sections: `[Z, H, W]` images (0 = no data).
    block_size: sections per block (paper: 25); blocks overlap by `overlap` (paper: 3).
    voting_distance: n for `align_block`.
    decay_distance: sections over which a stitch field decays to zero (paper: 100).
    starters: optional starter section per block (strictly increasing); None = `choose_starters`.
    model: optional pair model.
    defects: optional `[Z, H, W]` bool defect masks.
    resolution_nm: nm per pixel (z, y, x) or one y/x value: every pair alignment (blocks, stitches,
      refinement) computes its field at physical working levels (32 nm by default) and upsamples
      it; None = the pair config's (pixels when that has none either).
    config: `StackConfig` (blur rate, starter rules, `BlockConfig`).
    progress: tqdm bars.
    return_plan: also return the `StackPlan`.
  Returns:
    `[Z, H, W, 2]` float32 fields (pixels, (dy, dx)) into the common frame; with `return_plan`,
    `(fields, plan)`.
  Raises:
    InputError: bad stack, sizes or starters, bad or mismatched resolution.
  """
  config = config or StackConfig()
  config = dataclasses.replace(config, block=block_with_resolution(config.block, resolution_nm))
  sec, dfx = check_stack(sections, defects)
  # Blocks, stitches and the neighbour refinement share one pair program.
  config = dataclasses.replace(config, block=for_defects(config.block, dfx))
  z_count, h, w = sec.shape
  if config.drift is not None and not config.drift.applies_to(z_count):
    logging.info("align_stack: %d sections are too few for drift removal (window %d); skipped", z_count,
                 2 * config.drift.radius + 1)
    config = dataclasses.replace(config, drift=None)
  if config.neighbour_refine is not None and not config.neighbour_refine.applies_to(z_count):
    logging.info("align_stack: %d sections are too few for neighbour refinement; skipped", z_count)
    config = dataclasses.replace(config, neighbour_refine=None)
  if decay_distance <= 0:
    raise errors.InputError(f"decay_distance must be > 0, got {decay_distance}")
  _check_sizes(z_count, block_size, overlap)
  if starters is None or config.drift is not None or config.neighbour_refine is not None:
    tissue, defect = section_quality(sec, dfx)
  if starters is None:
    choices = choose_starters(tissue, defect, block_size=block_size, overlap=overlap, config=config)
    plan = plan_blocks(z_count, [c.index for c in choices], overlap=overlap, choices=choices)
  else:
    plan = plan_blocks(z_count, starters, overlap=overlap)
  logging.info("align_stack plan: %s", plan.describe())

  block_fields = []
  for b in tqdm(plan.blocks, desc="blocks", unit="block", disable=not progress):
    block_fields.append(np.asarray(align_block_task(
        sec[b.start:b.stop], b, voting_distance=voting_distance, model=model,
        block_defects=dfx[b.start:b.stop], config=config.block, progress=progress)))

  stitches: list[jax.Array | None] = [None]
  for k in range(1, len(plan.blocks)):
    prev_b, b = plan.blocks[k - 1], plan.blocks[k]
    ov = np.arange(b.start, b.own_start)
    stitches.append(stitch_field(sec[ov], block_fields[k - 1][ov - prev_b.start],
                                 block_fields[k][ov - b.start], overlap_defects=dfx[ov], model=model,
                                 config=config.block, refine=config.stitch_refine))

  out = np.zeros((z_count, h, w, 2), np.float32)
  # One chain length for the whole stack (zero stitches pad it) so composition compiles once.
  k_stack = max(len(stitch_chain(plan, z, decay_distance)[0]) for z in range(z_count))
  own_max = max(b.own_stop - b.own_start for b in plan.blocks)
  for b in tqdm(plan.blocks, desc="compose", unit="block", disable=not progress):
    own = np.arange(b.own_start, b.own_stop)
    bf = block_fields[b.index][own - b.start]
    if b.index == 0:
      out[own] = bf
      continue
    chains = [stitch_chain(plan, int(z), decay_distance) for z in own]
    if max(len(ks) for ks, _ in chains) == 0:
      out[own] = bf
      continue
    order = list(range(b.index, max(0, b.index - k_stack), -1))
    zero = jnp.zeros((h, w, 2), jnp.float32)
    st = jnp.stack([stitches[k] for k in order] + [zero] * (k_stack - len(order)))
    dist = np.full((len(own), k_stack), float(decay_distance), np.float32)
    for i, (ks, ds) in enumerate(chains):
      dist[i, :len(ds)] = ds
    # Sections padded to the largest block's count: one compile per stack.
    rows = np.arange(own_max).clip(max=len(own) - 1)
    res = _compose_with_decay_batch(jnp.asarray(bf[rows]), st, jnp.asarray(dist[rows]),
                                    float(decay_distance), float(config.blur_rate))
    out[own] = np.asarray(res)[: len(own)]
  if config.drift is not None:
    # Blank sections (no tissue) carry a copy of a neighbour's field: left out of every drift estimate.
    out = np.asarray(remove_drift(out, config=config.drift, section_weights=(tissue > 0).astype(np.float64),
                                  progress=progress))
  if config.neighbour_refine is not None:
    out = np.asarray(refine_to_neighbours(sec, out, config=config.neighbour_refine, defects=dfx,
                                          section_weights=(tissue > 0).astype(np.float64),
                                          aligner=config.block.aligner, model=model,
                                          pair_config=config.block.pair, progress=progress))
  fields = jnp.asarray(out)
  return (fields, plan) if return_plan else fields
