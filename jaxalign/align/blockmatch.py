"""Classical block-matching aligner: masked normalised cross-correlation of patches on a grid.

What conventional (pre-deep-learning) EM pipelines do, as a baseline and an initialiser:

1. coarse to fine over MIP levels: `src` is warped by the current estimate, both images are
   downsampled (images by mean, data masks by min), and a residual is measured;
2. on a regular grid of nodes, a template patch of `tgt` is correlated with a larger search window
   of the warped `src` by *masked* NCC (Padfield, IEEE TIP 2012), computed with FFTs and batched over
   nodes with `vmap`; pixels without data (0, defects) do not count;
3. the integer peak is refined to subpixel by a separable parabola fit;
4. outliers are rejected by peak quality (minimum NCC, ratio to the second peak outside an exclusion
   zone, peak not on the search border) and by neighbour consistency (deviation from the median of the
   valid 3x3 neighbours);
5. rejected nodes are filled by iterative normalised averaging of their neighbours, the grid is
   bilinearly upsampled to a dense field and Gaussian-smoothed, then composed with the estimate.

`block_match` follows the team's pluggable-aligner protocol (`jaxalign.align.protocols.PairAligner`)
`(src, tgt, *, init_field, src_defects, tgt_defects) -> field` so it can be passed as `model=` to
`align_pair`. The field is smooth: it does not tear at cracks (that is the finetuner's job).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxalign.errors import InputError, check_pair
from jaxalign.ops.fields import blur_field, compose, downsample_image, gaussian_blur, upsample_field, warp

# Below this variance (intensity^2 x pixels) a patch is treated as featureless.
MIN_VARIANCE = 1e-6
# A warped data mask counts as data only where all bilinear taps had data.
MASK_THRESHOLD = 0.999
# NCC value given to offsets that cannot be scored.
INVALID_NCC = -2.0


@dataclasses.dataclass(frozen=True)
class BlockMatchConfig:
  """Block-matching parameters. Sizes are in pixels *of the level being matched*.

  Attributes:
    levels: MIP levels visited coarse to fine (a level may repeat to iterate at that scale);
      levels whose image is smaller than `min_patches` patches across are skipped.
    min_patches: a level is used only if its section spans at least this many patches (fewer nodes
      give no redundancy for outlier rejection: a lone wrong peak would move the whole section).
    min_valid_nodes: a level whose valid nodes are fewer than this leaves the estimate unchanged.
    patch: template side (even).
    search: search radius: offsets in [-search, search] are tested at each level.
    stride: grid spacing between nodes.
    highpass_sigma: images minus their masked Gaussian blur of this sigma before matching (removes
      illumination gradients; 0 disables).
    min_overlap: minimum fraction of template pixels with data in both images at the peak.
    min_peak: minimum NCC at the peak.
    min_peak_ratio: minimum ratio peak / second peak (outside `exclusion` px of the peak).
    exclusion: radius around the peak excluded when looking for the second peak.
    max_deviation: a node deviating more than this from its neighbours' median is an outlier.
    smooth: Gaussian smoothing of the dense field, sigma in units of `stride`.
  """
  levels: tuple[int, ...] = (3, 2, 1, 0, 0)
  min_patches: int = 2
  min_valid_nodes: int = 3
  patch: int = 32
  search: int = 8
  stride: int = 16
  highpass_sigma: float = 8.0
  min_overlap: float = 0.5
  min_peak: float = 0.1
  min_peak_ratio: float = 1.05
  exclusion: int = 2
  max_deviation: float = 2.0
  smooth: float = 0.5

  def __post_init__(self):
    if self.patch < 4 or self.patch % 2:
      raise InputError(f"BlockMatchConfig.patch={self.patch} must be an even number >= 4")
    if self.search < 1 or self.stride < 1:
      raise InputError("BlockMatchConfig: search and stride must be >= 1")
    if not self.levels or min(self.levels) < 0:
      raise InputError(f"BlockMatchConfig.levels={self.levels} must be a non-empty tuple of levels >= 0")


def _xcorr(a_hat, b_hat, size):
  """Circular cross-correlation `sum_x a(x) b(x + u)` from rfft2s; `[size, size]`."""
  return jnp.fft.irfft2(jnp.conj(a_hat) * b_hat, s=(size, size))


def masked_ncc(template, tmask, window, wmask, min_overlap: float):
  """Masked NCC of a template against every offset inside a search window.

  Args:
    template: `[P, P]` float32; tmask: `[P, P]` float32 0/1 (1 = data).
    window: `[S, S]` float32 with S = P + 2R; wmask: `[S, S]` 0/1.
    min_overlap: minimum fraction of P*P pixels with data in both for an offset to be scored.
  Returns:
    `[2R+1, 2R+1]` float32 NCC; entry (i, j) compares template pixel x with window pixel x + (i, j);
    `INVALID_NCC` where unscorable.
  """
  p = template.shape[0]
  s = window.shape[0]
  r2 = s - p + 1
  pad = ((0, s - p), (0, s - p))
  t = jnp.pad(template * tmask, pad)
  tm = jnp.pad(tmask, pad)
  w = window * wmask
  f = jnp.fft.rfft2
  t_hat, tm_hat, t2_hat = f(t), f(tm), f(t * t)
  w_hat, wm_hat, w2_hat = f(w), f(wmask), f(w * w)
  crop = lambda x: x[:r2, :r2]  # offsets 0..2R never wrap around
  n = crop(_xcorr(tm_hat, wm_hat, s))
  st = crop(_xcorr(t_hat, wm_hat, s))
  sw = crop(_xcorr(tm_hat, w_hat, s))
  st2 = crop(_xcorr(t2_hat, wm_hat, s))
  sw2 = crop(_xcorr(tm_hat, w2_hat, s))
  stw = crop(_xcorr(t_hat, w_hat, s))
  n_safe = jnp.maximum(n, 1.0)
  num = stw - st * sw / n_safe
  vt = st2 - st * st / n_safe
  vw = sw2 - sw * sw / n_safe
  ok = (n >= min_overlap * p * p - 0.5) & (vt > MIN_VARIANCE) & (vw > MIN_VARIANCE)
  ncc = num / jnp.sqrt(jnp.where(ok, vt * vw, 1.0))
  return jnp.where(ok, jnp.clip(ncc, -1.0, 1.0), INVALID_NCC)


def _peak(ncc, config: BlockMatchConfig):
  """Subpixel peak of one NCC map `[2R+1, 2R+1]` -> (offset (dy, dx) px, valid bool)."""
  k = ncc.shape[0]
  r = config.search
  idx = jnp.argmax(ncc)
  iy, ix = idx // k, idx % k
  peak = ncc[iy, ix]
  yy, xx = jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="ij")
  far = (jnp.abs(yy - iy) > config.exclusion) | (jnp.abs(xx - ix) > config.exclusion)
  second = jnp.max(jnp.where(far, ncc, INVALID_NCC))
  interior = (iy > 0) & (iy < k - 1) & (ix > 0) & (ix < k - 1)

  def parabola(m, c, p):
    # vertex of the parabola through (-1, m), (0, c), (1, p)
    den = m - 2 * c + p
    return jnp.where(den < 0, jnp.clip(0.5 * (m - p) / jnp.where(den < 0, den, -1.0), -0.5, 0.5), 0.0)

  cy = jnp.clip(iy, 1, k - 2)
  cx = jnp.clip(ix, 1, k - 2)
  dy = parabola(ncc[cy - 1, ix], peak, ncc[cy + 1, ix])
  dx = parabola(ncc[iy, cx - 1], peak, ncc[iy, cx + 1])
  offset = jnp.stack([iy + dy - r, ix + dx - r]).astype(jnp.float32)
  ratio_ok = (second <= 0) | (peak >= config.min_peak_ratio * second)
  valid = interior & (peak >= config.min_peak) & ratio_ok
  return offset, valid


def _neighbour_median(grid, valid):
  """Median of the valid 3x3 neighbours (self excluded) of every node: `[Ny, Nx, 2]`, NaN if none."""
  g = jnp.where(valid[..., None], grid, jnp.nan)
  ny, nx = valid.shape
  padded = jnp.pad(g, ((1, 1), (1, 1), (0, 0)), constant_values=jnp.nan)
  shifts = [padded[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if (dy, dx) != (0, 0)]
  return jnp.nanmedian(jnp.stack(shifts, 0), axis=0)


def _fill(grid, valid):
  """Fills invalid nodes by iterative normalised 3x3 averaging of filled neighbours."""
  ny, nx = valid.shape

  def box(x):
    # 3x3 box sum by shifted slices: a convolution inside a loop segfaults intermittently on
    # jaxlib 0.10 CPU (conv_general_dilated kernel in a WhileThunk), and slices are as fast here
    p = jnp.pad(x, 1)
    return sum(p[1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))

  def body(_, state):
    g, m = state
    wsum = box(m)
    avg = jnp.stack([box(g[..., c] * m) for c in range(2)], -1) / jnp.maximum(wsum, 1e-6)[..., None]
    newly = (m == 0) & (wsum > 0)
    g = jnp.where(newly[..., None], avg, g)
    return g, jnp.where(newly, 1.0, m)

  m0 = valid.astype(jnp.float32)
  g, m = jax.lax.fori_loop(0, ny + nx, body, (jnp.where(valid[..., None], grid, 0.0), m0))
  return jnp.where(m[..., None] > 0, g, 0.0)


def _highpass(image, mask, sigma: float):
  """`image - masked blur(image)` on data pixels, 0 elsewhere."""
  if sigma <= 0:
    return image * mask
  num = gaussian_blur(image * mask, sigma)
  den = gaussian_blur(mask, sigma)
  return jnp.where(mask > 0, image - num / jnp.maximum(den, 1e-6), 0.0)


def _downsample(x, level: int, reduce: str):
  for _ in range(level):
    x = downsample_image(x, reduce=reduce)
  return x


@functools.partial(jax.jit, static_argnames=("level", "config"))
def _match_level(src, tgt, src_valid, tgt_valid, field, *, level: int, config: BlockMatchConfig):
  """One coarse-to-fine step at `level`; returns the refined level-0 field `[H, W, 2]`.

  src, tgt: `[H, W]` float32 (H, W divisible by 2**level); src_valid, tgt_valid: `[H, W]` float32 0/1;
  field: `[H, W, 2]` current estimate (level-0 px).
  """
  sw = warp(src, field)
  sm = (warp(src_valid, field) >= MASK_THRESHOLD).astype(jnp.float32)
  s = _downsample(sw, level, "mean")
  smk = _downsample(sm, level, "min")
  t = _downsample(tgt, level, "mean")
  tmk = _downsample(tgt_valid, level, "min")
  s = _highpass(s, smk, config.highpass_sigma)
  t = _highpass(t, tmk, config.highpass_sigma)
  hk, wk = s.shape
  p, r, st = config.patch, config.search, config.stride
  ny, nx = -(-hk // st), -(-wk // st)
  pad = p // 2 + r
  pad_w = ((pad, pad + ny * st), (pad, pad + nx * st))
  sp, smp = jnp.pad(s, pad_w), jnp.pad(smk, pad_w)
  tp, tmp = jnp.pad(t, pad_w), jnp.pad(tmk, pad_w)
  cy = jnp.arange(ny) * st + st // 2
  cx = jnp.arange(nx) * st + st // 2
  cyy, cxx = jnp.meshgrid(cy, cx, indexing="ij")
  centres = jnp.stack([cyy.ravel(), cxx.ravel()], -1)

  def node(c):
    # template [c - p/2, c + p/2) sits at c + r in padded coords; the window starts r earlier
    tpl = jax.lax.dynamic_slice(tp, (c[0] + r, c[1] + r), (p, p))
    tpm = jax.lax.dynamic_slice(tmp, (c[0] + r, c[1] + r), (p, p))
    win = jax.lax.dynamic_slice(sp, (c[0], c[1]), (p + 2 * r, p + 2 * r))
    wm = jax.lax.dynamic_slice(smp, (c[0], c[1]), (p + 2 * r, p + 2 * r))
    return _peak(masked_ncc(tpl, tpm, win, wm, config.min_overlap), config)

  offsets, valid = jax.vmap(node)(centres)
  grid = offsets.reshape(ny, nx, 2)
  valid = valid.reshape(ny, nx)
  med = _neighbour_median(grid, valid)
  dev = jnp.linalg.norm(grid - med, axis=-1)
  valid = valid & (jnp.isnan(dev) | (dev <= config.max_deviation))
  grid = jnp.where(valid.sum() >= config.min_valid_nodes, _fill(grid, valid), 0.0)
  # nodes sit at (i + 0.5) * stride - 0.5: the half-pixel-centre convention of jax.image.resize
  dense = jax.image.resize(grid, (ny * st, nx * st, 2), "linear")[:hk, :wk]
  dense = blur_field(dense, config.smooth * st)
  for _ in range(level):
    dense = upsample_field(dense)
  return compose(field, dense)


def block_match(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None,
                config: BlockMatchConfig | None = None):
  """Aligns `src` to `tgt` by block matching: returns `f` with `warp(src, f) ≈ tgt`.

  Args:
    src, tgt: `[H, W]` images, any real dtype, same shape (0 = no data).
    init_field: optional `[H, W, 2]` float32 px (dy, dx) initial estimate.
    src_defects, tgt_defects: optional `[H, W]` bool masks (True = crack/fold: no data).
    config: `BlockMatchConfig`.
  Returns:
    `[H, W, 2]` float32 field on tgt's grid, pixels, (dy, dx), pull semantics.
  Raises:
    InputError: shape mismatch, NaN/Inf, an image without data, bad mask or field shapes.
  """
  config = config or BlockMatchConfig()
  src, tgt, sd, td, field = check_pair(src, tgt, src_defects, tgt_defects, init_field)
  h, w = src.shape
  if field is None:
    field = np.zeros((h, w, 2), np.float32)
  levels = [lv for lv in config.levels if min(h, w) >> lv >= config.min_patches * config.patch]
  skipped = sorted(set(config.levels) - set(levels))
  if skipped:
    logging.info("block_match: skipping levels %s (section %dx%d spans < %d patches of %d px there)",
                 skipped, h, w, config.min_patches, config.patch)
  if not levels:
    raise InputError(f"block_match: section {h}x{w} is smaller than {config.min_patches} patches of "
                     f"{config.patch} px at every level")
  # pad to a multiple of the coarsest level's factor; padding is no-data
  mult = 2 ** max(levels)
  hp, wp = -(-h // mult) * mult, -(-w // mult) * mult
  pad = ((0, hp - h), (0, wp - w))
  sv = (src != 0) & (True if sd is None else ~sd)
  tv = (tgt != 0) & (True if td is None else ~td)
  s = jnp.asarray(np.pad(np.where(sv, src, 0.0), pad))
  t = jnp.asarray(np.pad(np.where(tv, tgt, 0.0), pad))
  svf = jnp.asarray(np.pad(sv, pad).astype(np.float32))
  tvf = jnp.asarray(np.pad(tv, pad).astype(np.float32))
  f = jnp.asarray(np.pad(field, pad + ((0, 0),), mode="edge"))
  for lv in levels:
    f = _match_level(s, t, svf, tvf, f, level=lv, config=config)
  return f[:h, :w]
