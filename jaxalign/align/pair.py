"""Pair alignment, coarse to fine: `align_pair(src, tgt) -> field` with `warp(src, field) ≈ tgt`.

Pipeline (paper: Popovych et al. 2024, "Online field finetuner"; DESIGN.md §3 step 2):

1. Validate (`jaxalign.errors`), zero src/tgt defects, remove periodic stripes (knife chatter), normalise
   over non-zero pixels.
2. Optional initial field: given by the caller, from block matching (`config.init="blockmatch"`), or
   from a pluggable aligner `model(src, tgt, *, init_field, src_defects, tgt_defects) -> field`.
3. MIP pyramids (images by mean, tissue masks by min, defect masks by max). At the coarsest level the
   Online Field Finetuner (`jaxalign.align.finetuner`) refines the (downsampled) initial field; the result is
   upsampled (`upsample_field`) and refined again at each finer level. Large displacements are caught
   at the coarse levels, where they are a few pixels.
4. After each level, where the field's change from the caller's initial field departs from its
   running median by more than a fraction of a pixel it takes the median (neurites crossing thick
   sections obliquely drag the field; see `DEFAULT_MEDIAN_SIZES`); after the finest level, the tear
   line next to src defects is refined.

Since the finetuner optimises the whole field (not a residual network output), "upsample the coarse
residual and compose" reduces to: init_k = init_field_k + upsample(f_{k+1} - init_field_{k+1}), which
keeps the fine detail of a given initial field and adds the coarse correction.

The whole coarse-to-fine optimisation of a pair is one jitted function (static config), compiled once
per (shape, config); `align_pairs` is the same function vmapped over a batch of pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from absl import logging

from jaxalign import errors
from jaxalign.ops import fields as _fields
from jaxalign.ops import losses as _losses
from jaxalign.ops import preprocess as _preprocess
from jaxalign.ops import tears as _tears
from jaxalign.align.finetuner import FinetuneConfig, FinetuneStats, finetune_core
from jaxalign.align.protocols import PairAligner

# Per-level defaults, level 0 (full resolution) first. Coarse levels are cheap, so they get many
# steps and a strong elastic prior (paper: gamma 5-25, larger at coarser levels); full resolution gets
# few steps and a small learning rate, only to polish sub-pixel detail.
DEFAULT_ITERATIONS = (100, 150, 200, 250, 300, 300)
DEFAULT_LEARNING_RATES = (0.05, 0.1, 0.15, 0.2, 0.2, 0.2)
# A defect is "resolved" at a coarse level where it covers at least this fraction of a pixel.
RESOLVED_DEFECT_FRACTION = 0.5
DEFAULT_GAMMAS = (1.0, 2.0, 4.0, 8.0, 10.0, 10.0)
# Elastic weights when the finest field is computed at a coarser level than the images' pixels (the
# physical default, ~32 nm): the paper's strong prior (gamma 5-25, larger at coarser levels).
COARSE_GAMMAS = (5.0, 10.0, 20.0, 25.0)
# Iterations per working level at coarse working levels: the finest one is fitted on 2x finer images
# (loss_nm) and dominates the cost; halving it changed the final loss by 1 % (FIB-SEM 10 nm pairs:
# 0.290 -> 0.293) for 40 % less time per pair.
COARSE_ITERATIONS = (50, 100, 150, 200)
# Pyramid levels when the images' resolution is unknown (pixels, not nm).
LEGACY_LEVELS = 5
# Per-level median window (pixels of the level; 45, 62, 60, 56 full-resolution px; 1 = off). Between
# neighbouring sections, neurites that run obliquely through the cut move the image locally by 2-5 px
# over 30-80 px patches; the finetuner follows them, but they are tissue, not distortion. Where the
# field departs from its running median by more than PairConfig.median_replace it takes the median
# (which keeps affine trends and tears but not such compact excursions; cf. Sun, Roth & Black,
# "Secrets of optical flow estimation", CVPR 2010, and the median test of PIV). Measured on
# 30 FIB-SEM 40-nm neighbour pairs: median EPE 1.71 -> 1.44 px, p95 4.45 -> 3.61 px (BENCHMARKS.md).
DEFAULT_MEDIAN_SIZES = (45, 31, 15, 7, 1)
# Taps every 2 px at full resolution: the same accuracy (to 0.01 px on the pair benchmark) at a third
# of the cost of all 45 taps.
DEFAULT_MEDIAN_STRIDES = (2, 1)
# The median stage targets neurites that shift by several pixels from one section to the next, which
# needs sections at least this many pixels thick (FIB-SEM every 4th slice: 4; ssTEM at 4-5 nm/px and
# 50 nm: 10-12). With thinner sections (e.g. 50 nm sections at 50 nm/px, as the DOLW7 pair) a 45-px
# window spans microns, where raw sections deform for real: there it cost the DOLW7 fold pair its
# alignment (median CPC 0.51 -> 0.18), so it is off.
MEDIAN_MIN_THICKNESS_PX = 2.0
# Coarsest-level pixels: a global phase-correlation translation is only applied from this size on.
MIN_GLOBAL_SHIFT = 2.0
# ...and only if it removes at least this fraction of the coarsest level's MSE. Unrelated coarse images
# give a phase-correlation peak anywhere and MSEs near 2 (uncorrelated unit-variance images) either
# way: on a 160² FIB-SEM crop, section 28 against section 25 of the distorted stack took a 33-px
# shift for a 4 % lower MSE (2.03 -> 1.94), and two such candidates outvoted the right one; pairs of
# unrelated 40² textures reach up to 30 % (the peak is the best of all shifts). A real 52-px shift
# removes 98 % (2.07 -> 0.05).
MIN_GLOBAL_SHIFT_GAIN = 0.5
# Physical working levels (issue 18; paper: FAFB v15 fine alignment at 512, 128, 64 and 32 nm on 4 nm
# data, the finest field upsampled to the data's pixels). The finest field is computed at the level
# whose pixel is nearest `DEFAULT_FINEST_NM`; computing it finer follows sub-cellular texture that
# changes from one section to the next (tissue, not distortion) and costs the square of the factor.
DEFAULT_FINEST_NM = 32.0
# ...but fitted on the images at the level nearest this (PairConfig.loss_nm).
DEFAULT_LOSS_NM = 16.0
# The coarsest level is the one whose pixel is nearest max_displacement_nm / CAPTURE_RANGE_PX: gradient
# descent captures about this many pixels at the coarsest level (the global phase-correlation
# translation extends it to a quarter of the section for rigid shifts).
CAPTURE_RANGE_PX = 4.0
DEFAULT_MAX_DISPLACEMENT_NM = 2048.0


def _at_level(per_level: Sequence, level: int):
  """The entry of a per-level setting (level 0 first) for MIP `level`; the last entry repeats."""
  return per_level[min(level, len(per_level) - 1)]


@dataclasses.dataclass(frozen=True)
class PairConfig:
  """Coarse-to-fine pair alignment settings (hashable; a static jit argument).

  Attributes:
    levels: number of MIP levels in the pyramid (level 0 = the images' own pixels); the coarsest
      one is where the finetuner starts. None = from `resolution_nm` (`max_displacement_nm`), or
      `LEGACY_LEVELS` when the resolution is unknown. Reduced automatically so that the coarsest
      level keeps at least `min_level_size` pixels per side.
    min_level_size: smallest side (pixels) allowed at the coarsest level.
    finest_level: last level refined; finer levels only get the upsampled field. None = from
      `resolution_nm` (`finest_nm`), or 0 (the images' pixels) when the resolution is unknown.
    finest_nm: pixel size (nm) of the finest computed field: the level whose pixel is nearest to it
      is the last one refined, and its field is upsampled to the images' pixels (paper: 32 nm).
      0 = refine down to the images' own pixels (the precise setting). Used when `resolution_nm`
      is known and `finest_level` is None.
    loss_nm: pixel size (nm) of the images the finest refined field is fitted on: the MSE of its
      finetuner is taken at the level nearest this (never coarser than the field's own), with the
      field upsampled to it; 0 = the field's own level. Matching at the field's own coarse grid
      biases sub-pixel shifts (bilinear resampling of a fractional shift blurs one image only).
    max_displacement_nm: largest displacement expected between a pair (nm): the coarsest level's
      pixel is about this / `CAPTURE_RANGE_PX`. Used when `resolution_nm` is known and `levels` is
      None.
    iterations, learning_rates, gammas: per *working* level, the finest refined level first (the
      last entry repeats for coarser levels). `iterations` None = `COARSE_ITERATIONS` with the
      physical defaults (`physical`: resolution known, `finest_nm` > 0), else `DEFAULT_ITERATIONS`. Learning rate is in pixels of that level per Adam
      step; gamma is the elastic weight (strain is scale free, so a value means the same at any
      level). `gammas` None = `COARSE_GAMMAS` (the paper's strong prior) with the physical defaults, else
      `DEFAULT_GAMMAS` (the precise setting and unknown resolutions: a light prior for pixel-scale
      polish).
    gamma_scale: factor on every level's elastic weight (`jaxalign.stack.refine` stiffens its residual
      aligner with it); passed to the compiled program as a value, so it costs no recompilation.
    median_sizes, median_strides: per working level (same layout): odd window (pixels of that level) of the
      separable running median (`fields.median_filter_field`) the field's change from the initial
      field is compared with after the level's finetuner (1 = off; see `DEFAULT_MEDIAN_SIZES` for
      why), and its tap spacing. The caller's `init_field` (in a stack: the target's own field) is
      kept whole; an initial estimate made here (`init="blockmatch"`, a model) is filtered.
      `median_sizes` None = off with the physical defaults, else `DEFAULT_MEDIAN_SIZES`: at ~32 nm the neurite excursions it removes are sub-pixel and the strong elastic prior
      keeps them out, while a 45-px window there spans microns and flattens real distortions
      (measured on a same-section ISBI case, 512², smooth 11-px field: median EPE 2.06 px with it,
      0.89 px without; ISBI stack of 30: low CPC 28.9 % with, 24.6 % without).
    resolution_nm: (z, y, x) nm per pixel of the images as given (z = section thickness), or None
      (unknown: treated as thick sections). The median stage runs only when z is at least
      `MEDIAN_MIN_THICKNESS_PX` pixels (`median_active`); the volume pipeline fills it in.
    median_keep, median_replace: px of the finest refined level (scaled to each coarser level): where the field departs
      from that median by more than `median_replace` it takes the median's value, below
      `median_keep` it is left alone, linear in between. 0.15 / 0.6 px, measured against taking the
      median everywhere: neighbour median EPE 1.43 -> 1.44 px, same-section p95 0.39 -> 0.31 px,
      clean curved pair p95 0.41 -> 0.29 px.
    finetune: template for everything else of the per-level `FinetuneConfig` (schedule, optimiser,
      plateau early stop, defect dilation).
    mask_elastic_at_defects: release the elastic term at defects (paper). False = ablation.
    tear_refine_iterations: propagation steps of `tears.refine_tears` after the finest level (0 = off):
      moves the tear line next to src defects to where the images put it (about the widest band, px,
      of pixels a crack leaves on the wrong side: up to half the widest crack).
    tear_refine_radius: full-resolution px: pixels whose sample lies this close to a src defect may
      be changed by the refinement.
    tear_refine_window: window radius (px) of the refinement's image cost.
    tears_always: where pairs run one by one (CPU, `pairs_one_by_one`), trace the tear code for every
      pair, not only for pairs whose source has defects. A pair without them skips it at run time (a
      `lax.cond`), so a stack in which some sections have defects compiles one pair program instead
      of two (`block.for_defects` sets it). Ignored under vmap, where a cond computes both branches.
    presmooth_sigma, presmooth_levels: Gaussian blur (px of the level) of both images before the
      finetuner's MSE, at the `presmooth_levels` finest working levels (coarser ones are averaged by the
      pyramid already). Bilinear
      resampling averages noise, so on noisy images the raw MSE prefers fractional shifts (measured:
      +0.17 px in y and x between two noisy copies of one FIB-SEM crop, which builds up along a stack);
      smoothing first removes that bias.
    global_translation: before the coarsest level, try the translation found by phase correlation of the
      coarsest images and keep it if it is at least `MIN_GLOBAL_SHIFT` coarsest-level pixels and lowers
      their masked MSE. This extends the capture range from
      ~2 coarsest-level pixels (gradient descent) to about a quarter of the section.
    destripe: remove periodic stripes (knife chatter) from both images first
      (`preprocess.destripe`). Measured on FIB-SEM 192² crops with 6-px stripes of relative amplitude
      1.0 / 0.3: median EPE 0.4-4.2 / 0.26-0.47 px without, 0.26-0.46 / 0.09-0.24 px with (0.07-0.16
      on the clean images, which it leaves unchanged).
    init: "identity" or "blockmatch" (use `jaxalign.align.blockmatch.block_match` as the initial field when
      no `init_field` and no `model` is given).
    refine_model: when a `model` is given, also run the finetuner coarse to fine from its field.
  """
  levels: int | None = None
  min_level_size: int = 32
  finest_level: int | None = None
  finest_nm: float = DEFAULT_FINEST_NM
  loss_nm: float = DEFAULT_LOSS_NM
  max_displacement_nm: float = DEFAULT_MAX_DISPLACEMENT_NM
  iterations: tuple[int, ...] | None = None
  learning_rates: tuple[float, ...] = DEFAULT_LEARNING_RATES
  gammas: tuple[float, ...] | None = None
  gamma_scale: float = 1.0
  median_sizes: tuple[int, ...] | None = None
  median_strides: tuple[int, ...] = DEFAULT_MEDIAN_STRIDES
  resolution_nm: tuple[float, float, float] | None = None
  median_keep: float = 0.15
  median_replace: float = 0.6
  finetune: FinetuneConfig = FinetuneConfig()
  mask_elastic_at_defects: bool = True
  tear_refine_iterations: int = 8
  tear_refine_radius: int = 8
  tear_refine_window: int = 2
  tears_always: bool = False
  presmooth_sigma: float = 0.7
  presmooth_levels: int = 2
  global_translation: bool = True
  destripe: bool = True
  init: str = "identity"
  refine_model: bool = False

  def __post_init__(self):
    if self.levels is not None and self.levels < 1:
      raise errors.InputError(f"PairConfig.levels must be >= 1, got {self.levels}")
    if self.finest_level is not None and not 0 <= self.finest_level < (self.levels or LEGACY_LEVELS):
      raise errors.InputError(f"PairConfig.finest_level must be in [0, levels), got {self.finest_level}")
    if not (math.isfinite(self.finest_nm) and self.finest_nm >= 0):
      raise errors.InputError(f"PairConfig.finest_nm must be >= 0 nm (0 = the images' pixels), got "
                              f"{self.finest_nm}")
    if not (math.isfinite(self.gamma_scale) and self.gamma_scale > 0):
      raise errors.InputError(f"PairConfig.gamma_scale must be > 0, got {self.gamma_scale}")
    if not (math.isfinite(self.loss_nm) and self.loss_nm >= 0):
      raise errors.InputError(f"PairConfig.loss_nm must be >= 0 nm (0 = the field's own level), got "
                              f"{self.loss_nm}")
    if not (math.isfinite(self.max_displacement_nm) and self.max_displacement_nm > 0):
      raise errors.InputError(f"PairConfig.max_displacement_nm must be > 0 nm, got {self.max_displacement_nm}")
    for name in ("iterations", "learning_rates", "gammas", "median_sizes", "median_strides"):
      if getattr(self, name) is not None and len(getattr(self, name)) < 1:
        raise errors.InputError(f"PairConfig.{name} must have at least one entry")
    # A tuple of floats whatever was passed: the config is a static (hashed) jit argument.
    object.__setattr__(self, "resolution_nm", errors.check_resolution(self.resolution_nm,
                                                                      "PairConfig.resolution_nm"))
    if not 0 <= self.median_keep < self.median_replace:
      raise errors.InputError(f"PairConfig: need 0 <= median_keep < median_replace, got {self.median_keep}, "
                              f"{self.median_replace}")
    for level in range(max(len(self.median_sizes or DEFAULT_MEDIAN_SIZES), len(self.median_strides))):
      size, stride = self._median_setting(level, 0)
      if int(size) != size or size < 1 or size % 2 == 0 or int(stride) != stride or stride < 1 or \
          (size // 2) % stride:
        raise errors.InputError(f"PairConfig: level {level} median window {size} with stride {stride}: the "
                                "window must be odd and its radius a multiple of the stride")
    if self.init not in ("identity", "blockmatch"):
      raise errors.InputError(f"PairConfig.init must be 'identity' or 'blockmatch', got {self.init!r}")

  def level_config(self, level: int, finest: int = 0) -> FinetuneConfig:
    """The finetuner settings of MIP `level` when `finest` is the finest refined level (per-level
    settings are indexed by `level - finest`)."""
    k = level - finest
    gammas = self.gammas if self.gammas is not None else (COARSE_GAMMAS if self.physical else DEFAULT_GAMMAS)
    iterations = self.iterations or (COARSE_ITERATIONS if self.physical else DEFAULT_ITERATIONS)
    return dataclasses.replace(self.finetune, iterations=int(_at_level(iterations, k)),
                               learning_rate=float(_at_level(self.learning_rates, k)),
                               gamma=float(_at_level(gammas, k)),
                               mask_elastic_at_defects=self.mask_elastic_at_defects)

  def _median_setting(self, k: int, finest: int) -> tuple[int, int]:
    """(window, stride) at working level k (0 = the finest refined level, which is MIP `finest`)."""
    sizes = self.median_sizes
    if sizes is None:
      sizes = (1,) if self.physical else DEFAULT_MEDIAN_SIZES
    return _at_level(sizes, k), _at_level(self.median_strides, k)

  def median_window(self, level: int, finest: int = 0) -> tuple[int, int]:
    """(window, tap stride) in pixels of MIP `level` of the median stage after that level's
    finetuner (indexed by `level - finest`); (1, 1) (off) when the sections are too thin for it
    (`median_active`)."""
    return self._median_setting(level - finest, finest) if self.median_active else (1, 1)

  @property
  def median_active(self) -> bool:
    """Whether the median stage runs: sections at least `MEDIAN_MIN_THICKNESS_PX` pixels thick, or
    `resolution_nm` unknown (see `DEFAULT_MEDIAN_SIZES`)."""
    if self.resolution_nm is None:
      return True
    z, y, x = self.resolution_nm
    return z >= MEDIAN_MIN_THICKNESS_PX * 0.5 * (y + x)

  def plan(self, shape: Sequence[int]) -> tuple[int, int]:
    """(levels, finest): pyramid levels and the finest refined level for images of spatial `shape`
    (H, W), from `resolution_nm` (`finest_nm`, `max_displacement_nm`) where levels / finest_level
    are not given explicitly."""
    smallest = min(shape[-2:])
    fit = int(math.floor(math.log2(max(smallest / self.min_level_size, 1)))) + 1
    if self.resolution_nm is None:
      levels = self.levels or LEGACY_LEVELS
      finest = self.finest_level or 0
    else:
      pixel = 0.5 * (self.resolution_nm[1] + self.resolution_nm[2])
      finest = (self.finest_level if self.finest_level is not None
                else _fields.level_nearest(pixel, self.finest_nm))
      levels = self.levels or _fields.level_nearest(pixel, self.max_displacement_nm / CAPTURE_RANGE_PX) + 1
      # An image too small for the physical finest level is refined at its coarsest fitting level.
      if self.finest_level is None:
        finest = min(finest, fit - 1)
    return max(finest + 1, min(levels, fit)), finest

  @property
  def physical(self) -> bool:
    """Whether the physical defaults apply: the resolution is known and the finest field is computed
    at about `finest_nm` (not refined down to the pixel: `finest_nm=0`, the precise setting). They
    hold for data coarser than `finest_nm` too (computed at its own pixel, e.g. 50 nm), where the
    pixel-scale prior (γ 1) folds the tissue."""
    return self.resolution_nm is not None and self.finest_nm > 0

  def loss_level(self, finest: int) -> int:
    """MIP level whose images the finest refined level (`finest`) is fitted on (`loss_nm`)."""
    if self.resolution_nm is None or self.loss_nm <= 0:
      return finest
    pixel = 0.5 * (self.resolution_nm[1] + self.resolution_nm[2])
    return min(finest, _fields.level_nearest(pixel, self.loss_nm))

  def levels_for(self, shape: Sequence[int]) -> int:
    """Levels actually used for an image of spatial `shape` (H, W) (`plan`)."""
    return self.plan(shape)[0]


class PairStats(NamedTuple):
  """Per refined level (the finest refined level first, `[levels - finest]` arrays): finetuner
  steps, initial and final loss."""
  steps: jax.Array
  initial_loss: jax.Array
  final_loss: jax.Array


# --------------------------------------------------------------------------- traced core


def _phase_correlation_shift(src, tgt):
  """Integer translation `d` (px, (dy, dx)) with `tgt(r) ≈ src(r + d)`, by phase correlation.

  Args:
    src, tgt: `[h, w]` float32 normalised images (0 = no data); a Hann window hides the borders.
  Returns:
    `[2]` float32, pixels of this image, within (-h/2, h/2] x (-w/2, w/2].
  """
  h, w = src.shape
  window = jnp.outer(jnp.hanning(h), jnp.hanning(w)).astype(jnp.float32)
  cross = jnp.fft.fft2(src * window) * jnp.conj(jnp.fft.fft2(tgt * window))
  corr = jnp.real(jnp.fft.ifft2(cross / jnp.maximum(jnp.abs(cross), 1e-12)))
  peak = jnp.argmax(corr)
  d = jnp.stack([peak // w, peak % w]).astype(jnp.float32)
  size = jnp.array([h, w], jnp.float32)
  return jnp.where(d > size / 2, d - size, d)


def _with_global_translation(field, src, tgt, src_valid, tgt_valid):
  """`field [h, w, 2]` plus the phase-correlation translation of `warp(src, field)` onto `tgt`, if that
  is large and removes a good part of the masked MSE (coarsest level; `src`, `tgt` normalised, valid
  masks float {0, 1})."""
  warped = _fields.warp(src, field)
  shift = _phase_correlation_shift(warped, tgt)
  moved = field + shift

  def cost(f):
    mask = (_fields.warp(src_valid, f) > _fields.FULL_SUPPORT).astype(jnp.float32) * tgt_valid
    # Few overlapping pixels make any MSE look good: require a quarter of the target's tissue.
    enough = jnp.sum(mask) >= 0.25 * jnp.sum(tgt_valid)
    return jnp.where(enough, _losses.masked_mse(_fields.warp(src, f), tgt, mask), jnp.inf)

  # Shifts within gradient descent's capture range are left to the finetuner: an integer shift of one
  # coarsest-level pixel is a coarse guess (measured on FIB-SEM neighbours, applying it anyway raised
  # the median EPE from 1.69 to 1.78 px).
  large = jnp.max(jnp.abs(shift)) >= MIN_GLOBAL_SHIFT
  explains = cost(moved) < (1.0 - MIN_GLOBAL_SHIFT_GAIN) * cost(field)
  return jnp.where(large & explains, moved, field)


def _smoothed(image, valid, sigma: float):
  """Normalised `image [h, w]` over `valid`, blurred by `sigma` px with the no-data pixels filled by
  their neighbours' blur (normalised convolution), so tissue borders do not darken; 0 off `valid`."""
  x = _preprocess.normalize(image * valid, valid > 0)
  if sigma > 0:
    num = _fields.gaussian_blur(x * valid, sigma)
    den = _fields.gaussian_blur(valid, sigma)
    x = _preprocess.normalize(jnp.where(valid > 0, num / jnp.maximum(den, 1e-6), 0.0), valid > 0)
  return x


def _replace_excursions(field, size: int, stride: int, keep: float, replace: float):
  """Replaces where `field [h, w, 2]` departs from its running median (`fields.median_filter_field`)
  by more than `replace` px with that median, keeps departures below `keep` px, and blends linearly
  in between (the median test for outlier vectors of PIV, softened so that no new edge appears).

  A neurite that drags the field 2-5 px off its neighbourhood is replaced; the median's own small
  errors on a smooth but curved field (it flattens extrema: up to ~1 px at a 15-px, 160-px-wavelength
  peak with a 45-px window) stay out, since there it departs by less than `keep` almost everywhere.
  """
  if size <= 1:
    return field
  median = _fields.median_filter_field(field, size, stride=stride)
  departure = jnp.linalg.norm(field - median, axis=-1, keepdims=True)
  weight = jnp.clip((departure - keep) / (replace - keep), 0.0, 1.0)
  return field + weight * (median - field)


def _coarse_to_fine(src, tgt, src_valid, tgt_valid, src_defects, tgt_defects, init_field,
                    median_reference, src_nearest, gamma_scale, *, config: PairConfig, levels: int, finest: int,
                    tears: bool = True):
  """One pair, traceable. Inputs already padded to a multiple of 2**(levels-1); levels
  `levels - 1 .. finest` are refined (`PairConfig.plan`), finer ones get the upsampled field.
  `tears` False (static) promises that src has no defects: the tear code (spring cuts, tear
  refinement) is not traced and `src_nearest` is None. Under vmap a `lax.cond` computes both branches, so batches
  without src defects would otherwise pay the full-resolution tear refinement for every pair.

  Args:
    src, tgt: `[H, W]` float32, zero where no data / defect.
    src_valid, tgt_valid: `[H, W]` float32 {0,1} tissue masks (data present, not a defect).
    src_defects, tgt_defects: `[H, W]` float32 {0,1}.
    init_field: `[H, W, 2]` float32 pixels (dy, dx).
    median_reference: `[H, W, 2]` float32 pixels: the median stage filters the field's change from
      it (the caller's initial field, or zeros; not an estimate such as block matching's).
    src_nearest: with `tears`, `[H, W, 2]` float32 `tears.nearest_tissue(src_defects)` (computed by the
      caller, once per source however many targets it is aligned to; `source_nearest`); else None.
    gamma_scale: scalar float32 factor on every level's elastic weight (`PairConfig.gamma_scale`,
      traced so that a stiffer aligner reuses the compiled program; the static config has 1).
  Returns:
    (`[H, W, 2]` field, PairStats).
  """
  src_p = _fields.pyramid(src * src_valid, levels, reduce="mean")
  tgt_p = _fields.pyramid(tgt * tgt_valid, levels, reduce="mean")
  sv_p = _fields.pyramid(src_valid, levels, reduce="min")
  tv_p = _fields.pyramid(tgt_valid, levels, reduce="min")
  # Tissue masks (min) already exclude any coarse pixel touched by a defect, which keeps defects out of
  # the MSE. Springs across src defects are cut at every level from the full-resolution mask
  # (`jaxalign.ops.tears`), so the field can tear at coarse levels where a crack is sub-pixel; tgt defects
  # cut the springs of the coarse pixels they mostly cover.
  has_src_defects = jnp.any(src_defects > 0) if tears else False
  sd_p = [m >= RESOLVED_DEFECT_FRACTION for m in _fields.pyramid(src_defects, levels, reduce="mean")]
  td_p = [m >= RESOLVED_DEFECT_FRACTION for m in _fields.pyramid(tgt_defects, levels, reduce="mean")]
  init_p, ref_p = [init_field], [median_reference]
  for _ in range(levels - 1):
    init_p.append(_fields.downsample_field(init_p[-1]))
    ref_p.append(_fields.downsample_field(ref_p[-1]))

  field = init_p[-1]
  stats = []
  for k in range(levels - 1, finest - 1, -1):
    if k < levels - 1:
      field = init_p[k] + _fields.upsample_field(field - init_p[k + 1])
    # Re-normalise per level: 2x2 means shrink the variance, and the gamma balance assumes unit variance.
    sigma = config.presmooth_sigma if k - finest < config.presmooth_levels else 0.0
    s = _smoothed(src_p[k], sv_p[k], sigma)
    t = _smoothed(tgt_p[k], tv_p[k], sigma)
    if k == levels - 1 and config.global_translation:
      field = _with_global_translation(field, s, t, sv_p[k], tv_p[k])
    # The finest level is fitted on finer images when `loss_nm` asks for it (field upsampled inside).
    m = config.loss_level(finest) if k == finest else k
    if m < k:
      s = _smoothed(src_p[m], sv_p[m], sigma)
      t = _smoothed(tgt_p[m], tv_p[m], sigma)
    field, st = finetune_core(s, t, field, sv_p[m], tv_p[m], sd_p[k].astype(jnp.float32),
                               td_p[k].astype(jnp.float32), config.level_config(k, finest),
                               src_nearest=src_nearest, has_src_defects=has_src_defects, scale=2 ** k,
                               upsample=k - m, gamma_scale=gamma_scale)
    # On the motion this pair adds to the caller's initial field, not on the total: in a stack that
    # is the target's own field, whose compact features the source must follow to match it. An
    # initial estimate made here (block matching, a model) is filtered with the rest.
    field = ref_p[k] + _replace_excursions(field - ref_p[k], *config.median_window(k, finest),
                                           config.median_keep / 2 ** (k - finest),
                                           config.median_replace / 2 ** (k - finest))
    stats.append(st)
  for k in range(finest - 1, -1, -1):
    field = init_p[k] + _fields.upsample_field(field - init_p[k + 1])
  if tears and config.mask_elastic_at_defects and config.tear_refine_iterations > 0:
    def refine(f):
      near_defect = _preprocess.dilate(src_defects > 0, config.tear_refine_radius).astype(jnp.float32)
      zone = (_fields.warp(near_defect, f) > 0) & (tgt_valid > 0)
      s = _preprocess.normalize(src * src_valid, src_valid > 0)
      t = _preprocess.normalize(tgt * tgt_valid, tgt_valid > 0)
      return _tears.refine_tears(f, s, t, src_valid, tgt_valid, zone, iterations=config.tear_refine_iterations,
                                 radius=config.tear_refine_window)
    # Skipped at run time for pairs without src defects (most pairs of a stack).
    field = lax.cond(has_src_defects, refine, lambda f: f, field)
  stats = stats[::-1]
  return field, PairStats(*(jnp.stack([getattr(s, n) for s in stats]) for n in FinetuneStats._fields))


_align_jit = jax.jit(_coarse_to_fine, static_argnames=("config", "levels", "finest", "tears"))
def _coarse_to_fine_batch(*arrays, gamma_scale, config: PairConfig, levels: int, finest: int, tears: bool):
  """`_coarse_to_fine` vmapped over a leading batch axis (accelerators)."""
  one = functools.partial(_coarse_to_fine, gamma_scale=gamma_scale, config=config, levels=levels,
                          finest=finest, tears=tears)
  return jax.vmap(one)(*arrays)


_align_batch_jit = jax.jit(_coarse_to_fine_batch, static_argnames=("config", "levels", "finest", "tears"))


def source_nearest(src_defects) -> jax.Array:
  """`[H, W, 2]` float32 `tears.nearest_tissue` of a source's defect mask `[H, W]` (float {0, 1} or
  bool), the identity coordinates without defects (skips the jump flooding: 0.35 s at 1000²)."""
  d = np.asarray(src_defects)
  return _tears.nearest_tissue(jnp.asarray(d)) if d.any() else _tears.identity_coordinates(d.shape)


def _static_config(config: PairConfig) -> tuple[PairConfig, jax.Array]:
  """(the config the program is compiled for, with gamma_scale 1; the gamma_scale value)."""
  return dataclasses.replace(config, gamma_scale=1.0), jnp.float32(config.gamma_scale)


# --------------------------------------------------------------------------- host-side helpers


def _validate(src, tgt, src_defects, tgt_defects, init_field, *, batched: bool):
  """Concrete checks; returns float32 NumPy arrays (defect masks as bool, zeros when None)."""
  nd = 3 if batched else 2
  what = "srcs" if batched else "src"
  src = errors.check_image(src, what, ndim=nd, allow_empty=True)
  tgt = errors.check_image(tgt, what.replace("src", "tgt"), ndim=nd, allow_empty=True)
  errors.check_same_shape(src, tgt, what, what.replace("src", "tgt"))
  sd = errors.check_mask(src_defects, "src_defects", src.shape)
  td = errors.check_mask(tgt_defects, "tgt_defects", tgt.shape)
  sd = np.zeros(src.shape, bool) if sd is None else sd
  td = np.zeros(tgt.shape, bool) if td is None else td
  # An image whose every pixel is zero or a defect has no data to align.
  for name, img, d in ((what, src, sd), (what.replace("src", "tgt"), tgt, td)):
    data = (img != 0) & ~d
    per_pair = data.reshape(data.shape[0], -1).any(axis=1) if batched else np.array([data.any()])
    if not per_pair.all():
      bad = "" if not batched else f" (pair {int(np.argmin(per_pair))})"
      raise errors.InputError(f"{name}: all pixels are zero or defects (no data){bad}")
  if init_field is not None:
    init_field = errors.check_field(init_field, "init_field", shape=src.shape[-2:])
    if init_field.shape[:-1] != src.shape:
      raise errors.InputError(f"init_field: shape {init_field.shape} does not match {src.shape + (2,)}")
  return src, tgt, sd, td, init_field


def _pad_to(x: np.ndarray, multiple: int, spatial_axes: tuple[int, int]) -> np.ndarray:
  """Zero-pads the two spatial axes at the end to a multiple of `multiple` (zeros = no data)."""
  pad = [(0, 0)] * x.ndim
  for ax in spatial_axes:
    pad[ax] = (0, (-x.shape[ax]) % multiple)
  return np.pad(x, pad)


def _block_match(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None):
  try:
    bm = importlib.import_module("jaxalign.align.blockmatch")
  except ImportError as e:
    raise errors.InputError(f"config.init='blockmatch' needs jaxalign.align.blockmatch ({e})") from None
  return bm.block_match(src, tgt, init_field=init_field, src_defects=src_defects, tgt_defects=tgt_defects)


@functools.partial(jax.jit, static_argnames=("destripe",))
def _prepare_images(src, tgt, sd, td, *, destripe: bool):
  """Zeroes defects, optionally removes stripes, and normalises over the remaining non-zero pixels."""
  def one(image, defects):
    image = _preprocess.apply_mask(jnp.asarray(image), jnp.asarray(defects))
    return _preprocess.normalize(_preprocess.destripe(image) if destripe else image)
  return one(src, sd), one(tgt, td)


@functools.partial(jax.jit, static_argnames=("destripe",))
def _prepare_batch(srcs, tgts, sd, td, *, destripe: bool):
  return jax.vmap(functools.partial(_prepare_images, destripe=destripe))(srcs, tgts, sd, td)


def _accepts(fn, name: str) -> bool:
  """Whether callable `fn` takes a keyword argument `name` (or **kwargs)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _initial_field(s, t, sd, td, init_field, model, config):
  """The field the finetuner starts from (or the final field for a model without refinement)."""
  if model is not None:
    extra = {}
    if config.resolution_nm is not None and _accepts(model, "resolution_nm"):
      # Models whose levels are set in nm (`jaxalign.models.seamless.Pyramid`) place them by the resolution.
      extra["resolution_nm"] = config.resolution_nm
    out = model(s, t, init_field=None if init_field is None else jnp.asarray(init_field),
                src_defects=jnp.asarray(sd), tgt_defects=jnp.asarray(td), **extra)
    return errors.check_field(np.asarray(out), "model output", shape=s.shape)
  if init_field is not None:
    return init_field
  if config.init == "blockmatch":
    out = _block_match(s, t, src_defects=jnp.asarray(sd), tgt_defects=jnp.asarray(td))
    return errors.check_field(np.asarray(out), "block_match output", shape=s.shape)
  return None


# --------------------------------------------------------------------------- public API


def with_resolution(config: PairConfig | None, resolution_nm) -> PairConfig:
  """`config` (default `PairConfig()`) told the images' resolution `resolution_nm` ((z, y, x) nm per
  pixel, or one y/x value; None leaves the config's own). Raises InputError if both are given and
  differ (mismatched resolutions)."""
  config = config or PairConfig()
  res = errors.check_resolution(resolution_nm)
  if res is None:
    return config
  if config.resolution_nm is not None and not np.allclose(config.resolution_nm, res):
    raise errors.InputError(f"resolution_nm {res} does not match the config's resolution_nm "
                            f"{config.resolution_nm}")
  return dataclasses.replace(config, resolution_nm=res)


def align_pair(src, tgt, *, model: PairAligner | None = None, src_defects=None, tgt_defects=None,
               resolution_nm=None, config: PairConfig | None = None, init_field=None,
               return_stats: bool = False):
  """Aligns `src` to `tgt`: returns `f` with `warp(src, f) ≈ tgt`.

  Args:
    src, tgt: `[H, W]` images (any real dtype; 0 = no data), same shape.
    model: optional aligner with the team protocol
      `model(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None) -> [H, W, 2]`; it gets the
      normalised, defect-zeroed images. Without a model the Online Field Finetuner runs coarse to fine.
    src_defects, tgt_defects: optional `[H, W]` bool masks of cracks/folds (no data; the field may tear).
    resolution_nm: nm per pixel of the images, (z, y, x) (z = section thickness) or one y/x value.
      With it the field is computed from a coarse level sized by `PairConfig.max_displacement_nm`
      down to the level nearest `PairConfig.finest_nm` (32 nm) and upsampled to the images' pixels;
      without it (and without `config.resolution_nm`) the finest level is the images' own pixel.
    config: `PairConfig` (defaults work on the shared stacks).
    init_field: optional `[H, W, 2]` float32 pixels (dy, dx) initial field.
    return_stats: also return per-level `PairStats` (None when a model ran without refinement).
  Returns:
    `[H, W, 2]` float32 field on tgt's grid, pixels, (dy, dx), pull semantics.
  Raises:
    InputError: shape mismatch, NaN/Inf, an image without data, bad mask/field shapes.
  """
  config = with_resolution(config, resolution_nm)
  src, tgt, sd, td, init_field = _validate(src, tgt, src_defects, tgt_defects, init_field, batched=False)
  s, t = _prepare_images(src, tgt, sd, td, destripe=config.destripe)
  init = _initial_field(s, t, sd, td, init_field, model, config)
  if model is not None and not config.refine_model:
    out = jnp.asarray(init)
    return (out, None) if return_stats else out
  h, w = src.shape
  levels, finest = config.plan((h, w))
  mult = 2 ** (levels - 1)
  zeros = np.zeros((h, w, 2), np.float32)
  reference = zeros if init_field is None else init_field
  init = zeros if init is None else np.asarray(init, np.float32)
  sv = (np.asarray(s) != 0).astype(np.float32)
  tv = (np.asarray(t) != 0).astype(np.float32)
  args = [_pad_to(np.asarray(a, np.float32), mult, (0, 1))
          for a in (s, t, sv, tv, sd, td, init, reference)]
  logging.log_first_n(logging.INFO, "align_pair: %dx%d, levels %d..%d refined (resolution %s nm)", 4, h, w,
                      levels - 1, finest, config.resolution_nm)
  static, scale = _static_config(config)
  tears = bool(sd.any()) or config.tears_always
  nearest = source_nearest(args[4]) if tears else None
  field, stats = _align_jit(*args, nearest, scale, config=static, levels=levels, finest=finest, tears=tears)
  field = field[:h, :w]
  return (field, stats) if return_stats else field


def pairs_one_by_one() -> bool:
  """Whether `align_pairs` runs a batch pair after pair through the single-pair program (CPU) rather
  than as one vmapped program (accelerators). Callers pad batches to a fixed size only in the
  vmapped case (`jaxalign.stack.block.batch_rows`): there it saves a compile per batch size, here it
  would only cost time."""
  return jax.default_backend() == "cpu"


def align_pairs(srcs, tgts, *, model: PairAligner | None = None, src_defects=None, tgt_defects=None,
                resolution_nm=None, config: PairConfig | None = None, init_fields=None,
                return_stats: bool = False):
  """`align_pair` for a batch of pairs in one jitted, vmapped call (compiled once per (B, H, W)).

  Args:
    srcs, tgts: `[B, H, W]` images (0 = no data).
    model: optional aligner (team protocol, called once per pair for the initial field).
    src_defects, tgt_defects: optional `[B, H, W]` bool.
    resolution_nm: nm per pixel (z, y, x) or one y/x value (see `align_pair`).
    config: `PairConfig`.
    init_fields: optional `[B, H, W, 2]` float32 pixels (dy, dx).
  Returns:
    `[B, H, W, 2]` float32 fields with `warp(srcs[b], f[b]) ≈ tgts[b]`.
  """
  config = with_resolution(config, resolution_nm)
  srcs, tgts, sd, td, init_fields = _validate(srcs, tgts, src_defects, tgt_defects, init_fields,
                                              batched=True)
  b, h, w = srcs.shape
  if pairs_one_by_one():
    # The single-pair program: compiled once per (H, W), not once per batch size (1-3 s each at 512²).
    prepared = [_prepare_images(srcs[i], tgts[i], sd[i], td[i], destripe=config.destripe) for i in range(b)]
    s, t = (np.stack([np.asarray(a) for a in x]) for x in zip(*prepared))
  else:
    s, t = _prepare_batch(jnp.asarray(srcs), jnp.asarray(tgts), jnp.asarray(sd), jnp.asarray(td),
                          destripe=config.destripe)
  references = np.zeros((b, h, w, 2), np.float32) if init_fields is None else init_fields
  if model is not None or (init_fields is None and config.init == "blockmatch"):
    inits = [_initial_field(s[i], t[i], sd[i], td[i], None if init_fields is None else init_fields[i],
                            model, config) for i in range(b)]
    init_fields = np.stack([np.asarray(f, np.float32) for f in inits])
    if model is not None and not config.refine_model:
      out = jnp.asarray(init_fields)
      return (out, None) if return_stats else out
  levels, finest = config.plan((h, w))
  mult = 2 ** (levels - 1)
  if init_fields is None:
    init_fields = np.zeros((b, h, w, 2), np.float32)
  sv = (np.asarray(s) != 0).astype(np.float32)
  tv = (np.asarray(t) != 0).astype(np.float32)
  args = [_pad_to(np.asarray(a, np.float32), mult, (1, 2))
          for a in (s, t, sv, tv, sd, td, init_fields, references)]
  static, scale = _static_config(config)
  one_by_one = pairs_one_by_one()
  kw = dict(config=static, levels=levels, finest=finest, tears=bool(sd.any()) or (config.tears_always and one_by_one))
  if one_by_one:
    # One pair after another through the single-pair program: on a CPU the vmapped finetuner loop
    # runs every pair until the slowest one stops and XLA:CPU does not parallelise the batch, and
    # the single-pair program compiles once per (H, W) whatever the batch size, so block alignment
    # (n pairs), stitching and the neighbour refinement (8 pairs) share one compile.
    outs, nearest = [], None
    for i in range(b):
      # Block alignment gives one source several targets: its nearest-tissue map is computed once.
      if kw["tears"] and (nearest is None or not np.array_equal(args[4][i], args[4][i - 1])):
        nearest = source_nearest(args[4][i])
      outs.append(_align_jit(*(a[i] for a in args), nearest, scale, **kw))
    # Stacked on the host: jnp.stack would compile once per batch size.
    field = jnp.asarray(np.stack([np.asarray(o[0]) for o in outs]))
    stats = jax.tree_util.tree_map(lambda *x: jnp.asarray(np.stack([np.asarray(v) for v in x])),
                                   *[o[1] for o in outs])
  else:
    nearest = jax.vmap(_tears.nearest_tissue)(jnp.asarray(args[4])) if kw["tears"] else None
    field, stats = _align_batch_jit(*args, nearest, gamma_scale=scale, **kw)
  field = field[:, :h, :w]
  return (field, stats) if return_stats else field
