"""Block alignment with vector voting (Popovych et al. 2024, Methods "Sequential alignment",
"Vector voting", "Block alignment"; DESIGN.md §3 step 3).

A block is a run of contiguous sections aligned into the frame of its first section (field 0 is the
identity). Section z is aligned *transitively*: to each of the previous `n` (voting distance)
sections as already aligned, i.e. to `target_k = warp(section_k, field_k)`; each such pair alignment
is directly a candidate for `field_z` (no composition needed), and the `n` candidates are merged by
`jaxalign.ops.voting.vector_vote`. A target without data at a pixel (blank section, masked defect, or
outside its warped footprint) is not a valid voter there: each pixel votes over the nearest `n`
previous sections that have data at that pixel (within `BlockConfig.max_lookback`). The first
sections of a block vote over what exists. `n = 1` is plain sequential alignment.

Per section, the targets needed are decided *before* aligning (a target's validity only depends on
its own aligned data mask), so only targets that some pixel actually votes with are aligned, in
batches of `n` pairs (padded on accelerators, so the vmapped aligner compiles once per block shape;
see `batch_rows`).

The pair aligner is injectable (`BlockConfig.aligner`), a `jaxalign.align.protocols.BatchedPairAligner`
`aligner(srcs[B,H,W], tgts[B,H,W], *, src_defects[B,H,W] bool, tgt_defects[B,H,W] bool,
init_fields[B,H,W,2]) -> [B,H,W,2]` (warp(srcs[b], out[b]) ≈ tgts[b]); by default it is
`jaxalign.align.pair.align_pairs` with `model` (a `PairAligner`) and `BlockConfig.pair`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from jaxalign import errors
from jaxalign.ops.fields import warp
from jaxalign.ops.voting import DEFAULT_BLUR_SIGMA, DEFAULT_TEMPERATURE, vector_vote
from jaxalign.align.protocols import BatchedPairAligner, PairAligner

# Paper (FAFB v15): each section votes over the 3 previous ones.
DEFAULT_VOTING_DISTANCE = 3


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Block alignment settings (hashable).

  Attributes:
    temperature: vector-voting softmin temperature, px (paper: 5.7 with n = 3).
    blur_sigma: vector-voting distance blur, px.
    max_lookback: farthest previous section (in sections) a pixel may vote with when nearer targets
      have no data there; bounds the extra pair alignments caused by blank or masked sections.
    valid_threshold: an aligned target counts as having data at a pixel where its warped data mask
      (bilinear, 0..1) exceeds this.
    min_voter_fraction: a farther target is only aligned when it would be a voter on at least this
      fraction of the section's pixels where the section has data (skips alignments that serve a
      thin strip; those pixels vote over fewer voters).
    init_from_target: start each pair alignment from the target's own field (both raw sections are
      roughly pre-aligned, so the answer is close to it); False starts from the identity.
    aligner: batched pair aligner (`BatchedPairAligner`); None = `align_pairs`.
    pair: `jaxalign.align.pair.PairConfig` for the default aligner (None = its defaults).
  """
  temperature: float = DEFAULT_TEMPERATURE
  blur_sigma: float = DEFAULT_BLUR_SIGMA
  max_lookback: int = 8
  valid_threshold: float = 0.5
  min_voter_fraction: float = 0.05
  init_from_target: bool = True
  aligner: BatchedPairAligner | None = None
  pair: Any = None

  def __post_init__(self):
    if self.max_lookback < 1:
      raise errors.InputError(f"BlockConfig.max_lookback must be >= 1, got {self.max_lookback}")
    if not 0.0 <= self.valid_threshold < 1.0:
      raise errors.InputError(f"BlockConfig.valid_threshold must be in [0, 1), got {self.valid_threshold}")
    if self.temperature <= 0:
      raise errors.InputError(f"BlockConfig.temperature must be > 0, got {self.temperature}")


class SectionInfo(NamedTuple):
  """What happened to one section of a block.

  Attributes:
    targets: block-relative indices of the sections it was aligned to (nearest first); empty for the
      block's first section, a blank section, or a section with no earlier data (new reference).
    status: "reference", "aligned", "blank" (no data: field copied from the previous section) or
      "no_target" (no earlier section had data: identity, the section becomes a reference).
  """
  targets: tuple[int, ...]
  status: str


# --------------------------------------------------------------------------- traced pieces


@functools.partial(jax.jit, static_argnames=("n",))
def nearest_valid_voters(valid: jax.Array, n: int) -> jax.Array:
  """Per pixel, the first `n` valid candidates in candidate order (nearest section first).

  Args:
    valid: `[M, H, W]` bool, candidate m has data at the pixel.
    n: voting distance (static).
  Returns:
    `[M, H, W]` bool: candidate m is one of the pixel's (at most) n voters.
  """
  rank = jnp.cumsum(valid.astype(jnp.int32), axis=0)  # valid candidates up to and including m
  return valid & (rank <= n)


@jax.jit
def aligned_data(data: jax.Array, field: jax.Array) -> jax.Array:
  """`[H, W]` float in [0, 1]: the data mask of a section carried into the block frame."""
  return warp(data.astype(jnp.float32), field)


# --------------------------------------------------------------------------- host side


def default_aligner(model: PairAligner | None = None, pair_config=None) -> BatchedPairAligner:
  """`jaxalign.align.pair.align_pairs` bound to `model` and `pair_config`, in the batched protocol."""
  from jaxalign.align.pair import align_pairs  # deferred: pair pulls in the finetuner and optax

  def aligner(srcs, tgts, *, src_defects=None, tgt_defects=None, init_fields=None):
    return align_pairs(srcs, tgts, model=model, src_defects=src_defects, tgt_defects=tgt_defects,
                       config=pair_config, init_fields=init_fields)
  return aligner


def with_resolution(config: BlockConfig | None, resolution_nm) -> BlockConfig:
  """`config` (default `BlockConfig()`) with its default pair aligner told the sections' resolution
  ((z, y, x) nm per pixel or one y/x value; `jaxalign.align.pair.with_resolution`), so that fields are
  computed at physical working levels. None, or a custom `aligner`, leaves the config unchanged."""
  from jaxalign.align import pair as _pair  # deferred: pair pulls in the finetuner and optax
  config = config or BlockConfig()
  if errors.check_resolution(resolution_nm) is None or config.aligner is not None:
    return config
  return dataclasses.replace(config, pair=_pair.with_resolution(config.pair, resolution_nm))


def for_defects(config: BlockConfig | None, defects) -> BlockConfig:
  """`config` (default `BlockConfig()`) with its default pair aligner told to trace the tear code for
  every pair (`PairConfig.tears_always`) when any section of `defects [Z, H, W]` (bool) has one: on a CPU
  that is one compiled pair program for the stack instead of two (2.5-5 s at 512² on 2 cores). A custom
  `aligner` is left unchanged."""
  from jaxalign.align import pair as _pair  # deferred: pair pulls in the finetuner and optax
  config = config or BlockConfig()
  if config.aligner is not None or defects is None or not np.any(defects):
    return config
  return dataclasses.replace(config, pair=dataclasses.replace(config.pair or _pair.PairConfig(), tears_always=True))


def check_stack(sections, defects, name: str = "sections") -> tuple[np.ndarray, np.ndarray]:
  """Validates a stack; returns float32 `[Z, H, W]` with defects zeroed and bool defects `[Z, H, W]`."""
  sec = errors.check_image(sections, name, ndim=3, allow_empty=True)
  d = errors.check_mask(defects, "defects", sec.shape)
  d = np.zeros(sec.shape, bool) if d is None else d
  return np.where(d, np.float32(0), sec), d


def batch_rows(start: int, count: int, batch: int) -> np.ndarray:
  """`[B]` int row indices of one batched-aligner call over items `start, start + 1, ...` of `count`.

  Where the default aligner is one vmapped program (accelerators), every call gets exactly `batch`
  rows, the last batch padded by repeating the last item, so it compiles once per batch size. Where
  it runs pairs one by one (CPU, `jaxalign.align.pair.pairs_one_by_one`) the padding would be aligned for
  nothing (a 2-section stack refined in batches of 8 aligned 8 pairs), so only real items are given.
  """
  from jaxalign.align.pair import pairs_one_by_one  # deferred: pair pulls in the finetuner and optax
  stop = start + batch if not pairs_one_by_one() else min(start + batch, count)
  return np.arange(start, stop).clip(max=count - 1)


def _run_aligner(aligner, src, src_def, tgts, tgt_defs, inits, batch: int) -> np.ndarray:
  """Aligns one source to several targets in batches of `batch` pairs (`batch_rows`)."""
  m = tgts.shape[0]
  out = []
  for b0 in range(0, m, batch):
    idx = batch_rows(b0, m, batch)
    res = aligner(np.broadcast_to(src, (len(idx),) + src.shape), tgts[idx],
                  src_defects=np.broadcast_to(src_def, (len(idx),) + src.shape), tgt_defects=tgt_defs[idx],
                  init_fields=inits[idx])
    out.append(np.asarray(res, np.float32)[: min(batch, m - b0)])
  return np.concatenate(out)


def align_block(sections, *, voting_distance: int = DEFAULT_VOTING_DISTANCE, model: PairAligner | None = None,
                defects=None,
                resolution_nm=None, config: BlockConfig | None = None, progress: bool = True,
                return_info: bool = False, on_section: Callable[[int], None] | None = None):
  """Aligns a block of sections into the frame of its first section.

  Args:
    sections: `[Z, H, W]` images (any real dtype; 0 = no data).
    voting_distance: n, the number of previous aligned sections each section votes over (1 = plain
      sequential alignment).
    model: optional pair model for the default aligner (team protocol, see `jaxalign.align.pair`).
    defects: optional `[Z, H, W]` bool defect masks (True = crack/fold: no data, zeroed).
    resolution_nm: nm per pixel (z, y, x) or one y/x value: fields are computed at physical working
      levels (`jaxalign.align.pair.PairConfig.finest_nm`, 32 nm) and upsampled; None = the pair config's.
    config: `BlockConfig`.
    progress: show a tqdm bar over sections.
    return_info: also return a list of `SectionInfo` (targets used and status per section).
    on_section: optional `on_section(z)`, called after section z is done (blank ones included), e.g.
      to report progress from a pipeline task.
  Returns:
    `[Z, H, W, 2]` float32 fields, pixels, (dy, dx): `warp(sections[z], fields[z])` is section z in
    the frame of section 0 (field 0 is the identity); with `return_info`, `(fields, infos)`.
  Raises:
    InputError: bad shapes/dtypes, NaN/Inf, voting_distance < 1, bad or mismatched resolution.
  """
  config = with_resolution(config, resolution_nm)
  if int(voting_distance) != voting_distance or voting_distance < 1:
    raise errors.InputError(f"voting_distance must be an integer >= 1, got {voting_distance}")
  n = int(voting_distance)
  sec, dfx = check_stack(sections, defects)
  config = for_defects(config, dfx)
  z_count, h, w = sec.shape
  aligner = config.aligner or default_aligner(model, config.pair)
  lookback = max(config.max_lookback, n)

  data = (sec != 0) & ~dfx  # [Z, H, W]: the section has tissue there
  fields = np.zeros((z_count, h, w, 2), np.float32)
  aligned_valid = np.zeros((z_count, h, w), bool)  # data of each section in the block frame
  aligned_defects = np.zeros((z_count, h, w), bool)  # its defect masks in the block frame
  has_data = np.zeros(z_count, bool)
  infos: list[SectionInfo] = []
  min_pixels = config.min_voter_fraction * h * w

  for z in tqdm(range(z_count), desc="align_block", unit="section", disable=not progress,
                leave=False):
    if not data[z].any():
      # Nothing to align; keep the field continuous so a later interpolation of this section is sane.
      if z > 0:
        fields[z] = fields[z - 1]
      infos.append(SectionInfo((), "blank" if z > 0 else "reference"))
      logging.warning("align_block: section %d has no data; not aligned, not used as a target", z)
      if on_section is not None:
        on_section(z)
      continue
    cands = [k for k in range(z - 1, max(-1, z - 1 - lookback), -1) if has_data[k]]
    if not cands:
      status = "reference" if z == 0 else "no_target"
      if z > 0:
        logging.warning("align_block: section %d has no earlier section with data within %d; it becomes "
                        "a reference (identity field)", z, lookback)
      infos.append(SectionInfo((), status))
    else:
      # Padded to `lookback` candidates (never valid) so this compiles once.
      cand_valid = np.zeros((lookback, h, w), bool)
      cand_valid[: len(cands)] = aligned_valid[cands]
      voter = np.asarray(nearest_valid_voters(jnp.asarray(cand_valid), n))[: len(cands)]
      # Align only to candidates that are voters somewhere the source has data (estimated with the
      # nearest target's field), so thin border strips outside the source do not cost alignments.
      relevant = np.asarray(aligned_data(jnp.asarray(data[z]), jnp.asarray(fields[cands[0]]))) > \
          config.valid_threshold
      counts = (voter & relevant[None]).reshape(len(cands), -1).sum(axis=1)
      use = [m for m in range(len(cands)) if m == 0 or counts[m] >= min_pixels]
      tgt_idx = [cands[m] for m in use]
      tgts = np.stack([np.asarray(warp(sec[k], fields[k])) for k in tgt_idx])
      # Only real defects: zeros outside a target's footprint are 'no data' already, and calling them
      # defects would also release the aligner's elastic prior there.
      tgt_defs = aligned_defects[tgt_idx]
      inits = fields[tgt_idx] if config.init_from_target else np.zeros((len(tgt_idx), h, w, 2), np.float32)
      cand_fields = _run_aligner(aligner, sec[z], dfx[z], tgts, tgt_defs, inits, n)
      if len(use) == 1:
        fields[z] = cand_fields[0]
      else:
        # Voters keep fixed slots (one per target) so the vote's distance blur never mixes two
        # targets' fields across the edge of a target's data; pixels whose voter was skipped vote
        # over fewer (all invalid: vector_vote falls back to every candidate).
        # At least n slots (extra ones repeat the nearest field, never valid) so the vote compiles
        # once per block shape in the usual case.
        slots = max(n, len(use))
        pad = np.arange(slots).clip(max=len(use) - 1) * (np.arange(slots) < len(use))
        valid = voter[use][pad] & (np.arange(slots) < len(use))[:, None, None]
        fields[z] = np.asarray(vector_vote(jnp.asarray(cand_fields[pad]), temperature=config.temperature,
                                     blur_sigma=config.blur_sigma, valid=jnp.asarray(valid)))
      infos.append(SectionInfo(tuple(tgt_idx), "aligned"))
    has_data[z] = True
    aligned_valid[z] = np.asarray(aligned_data(jnp.asarray(data[z]), jnp.asarray(fields[z]))) > \
        config.valid_threshold
    if dfx[z].any():
      aligned_defects[z] = np.asarray(aligned_data(jnp.asarray(dfx[z]), jnp.asarray(fields[z]))) > \
          config.valid_threshold
    if on_section is not None:
      on_section(z)
  out = jnp.asarray(fields)
  return (out, infos) if return_info else out
