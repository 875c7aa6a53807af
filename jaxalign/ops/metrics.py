"""Alignment quality: chunked Pearson correlation (CPC), the low-CPC fraction, and how much fields
deform the tissue (local area change of their non-affine part, `deformation`)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Paper threshold: a chunk with CPC below this is counted as misaligned.
LOW_CPC_THRESHOLD = 0.25
# A chunk needs at least this fraction of pixels with data in both images to be scored.
MIN_TISSUE_FRACTION = 0.5


@functools.partial(jax.jit, static_argnames=("chunk",))
def cpc(a: jax.Array, b: jax.Array, *, chunk: int = 64, mask: jax.Array | None = None,
        min_tissue: float | jax.Array = MIN_TISSUE_FRACTION) -> jax.Array:
  """Chunked Pearson correlation between two images.

  Pixels count when non-zero in both images (0 = no data) and inside `mask`.

  Args:
    a, b: `[H, W]` float32 (trailing rows/columns beyond a whole chunk are ignored).
    chunk: chunk side in pixels (static).
    mask: optional `[H, W]` bool, True = tissue to evaluate.
    min_tissue: minimum fraction of valid pixels in a chunk; below it the chunk is NaN.
  Returns:
    `[H // chunk, W // chunk]` float32 correlation, NaN where too little tissue or zero variance.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  h, w = a.shape[-2] // chunk * chunk, a.shape[-1] // chunk * chunk
  valid = (a != 0) & (b != 0)
  if mask is not None:
    valid = valid & jnp.asarray(mask, bool)

  def blocks(x):
    x = x[..., :h, :w]
    return x.reshape(x.shape[:-2] + (h // chunk, chunk, w // chunk, chunk))

  va, vb, vm = blocks(a), blocks(b), blocks(valid.astype(jnp.float32))
  n = vm.sum(axis=(-3, -1))
  safe_n = jnp.maximum(n, 1.0)
  ma = (va * vm).sum(axis=(-3, -1)) / safe_n
  mb = (vb * vm).sum(axis=(-3, -1)) / safe_n
  da = (va - ma[..., :, None, :, None]) * vm
  db = (vb - mb[..., :, None, :, None]) * vm
  cov = (da * db).sum(axis=(-3, -1))
  var_a = (da * da).sum(axis=(-3, -1))
  var_b = (db * db).sum(axis=(-3, -1))
  denom = jnp.sqrt(var_a * var_b)
  enough = (n >= min_tissue * chunk * chunk) & (denom > 0)
  return jnp.where(enough, cov / jnp.where(denom > 0, denom, 1.0), jnp.nan)


def low_cpc_counts(cpc_maps, *, threshold: float = LOW_CPC_THRESHOLD, axis=None):
  """(chunks with CPC < `threshold`, scored chunks); NaN chunks (too little tissue) are unscored.

  With `axis` None, pooled over one CPC map or a sequence of maps of any shapes (two ints: sum counts
  over runs, then divide); with `axis`, per remaining axis of one array (two int arrays).
  """
  if axis is None:
    maps = [cpc_maps] if hasattr(cpc_maps, "shape") else list(cpc_maps)
    c = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps]) if maps else np.zeros(0)
  else:
    c = np.asarray(cpc_maps, np.float64)
  scored = ~np.isnan(c)
  low = np.sum(scored & (np.nan_to_num(c, nan=np.inf) < threshold), axis=axis)
  n = np.sum(scored, axis=axis)
  return (int(low), int(n)) if axis is None else (low, n)


def low_cpc_fraction(cpc_maps, *, threshold: float = LOW_CPC_THRESHOLD, axis=None):
  """Fraction of scored chunks with CPC < `threshold` (the paper's criterion), NaN where none is scored.

  Args:
    cpc_maps: a CPC map (e.g. `[..., H/chunk, W/chunk]` from `cpc`, one value per chunk of `chunk` px)
      or a sequence of maps, pooled.
    threshold: CPC below which a chunk counts as misaligned.
    axis: with one array, the axes to reduce (e.g. `(1, 2)` for one fraction per section of a
      `[Z, h, w]` stack of maps); None pools everything into one float.
  Returns:
    float (axis None) or an array over the remaining axes.
  """
  low, n = low_cpc_counts(cpc_maps, threshold=threshold, axis=axis)
  if axis is None:
    return low / n if n else float("nan")
  return np.where(n > 0, low / np.maximum(n, 1), np.nan)


# --------------------------------------------------------------------------- tissue deformation

# Issue 18: the area change is reported after smoothing at about this scale (nm), so that sub-cell
# noise of a field does not dominate, and pixels this close (px) to a defect are left out (a field
# must tear there).
DEFORMATION_SMOOTH_NM = 100.0
DEFORMATION_DEFECT_MARGIN_PX = 20
# Percentiles of the area change that summarise a section (p1 - p99).
DEFORMATION_PERCENTILES = (1.0, 99.0)
# Area changes inside this band count as "tissue kept intact" (+-10 %): plots draw it.
DEFORMATION_BAND = (0.9, 1.1)


class Deformation(NamedTuple):
  """How much a stack's fields deform the tissue (local area change of their non-affine part).

  Attributes:
    det: `[Z, H, W]` float32 Jacobian determinant of `r -> r + u_na(r)` (1 = area kept), NaN where
      excluded (outside the tissue mask, within the defect margin).
    low, high: `[Z]` float32 per-section percentiles (`DEFORMATION_PERCENTILES`, p1 and p99); NaN for
      a section with no pixel scored.
    low_all, high_all: the same percentiles over every scored pixel of the stack (floats).
    sigma_px: Gaussian smoothing applied to the non-affine field, px.
  """
  det: np.ndarray
  low: np.ndarray
  high: np.ndarray
  low_all: float
  high_all: float
  sigma_px: float

  @property
  def worst(self) -> int | None:
    """Section index whose p1 or p99 is farthest from 1 (None when no section was scored)."""
    dev = np.fmax(1.0 - np.asarray(self.low, np.float64), np.asarray(self.high, np.float64) - 1.0)
    return None if np.all(np.isnan(dev)) else int(np.nanargmax(dev))

  def summary(self) -> dict:
    """JSON-able summary: stack p1/p99, per-section p1/p99 (None = not scored), sigma (px), worst z."""
    per = lambda a: [None if np.isnan(v) else float(v) for v in np.asarray(a, np.float64)]  # noqa: E731
    fin = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    return dict(p1=fin(self.low_all), p99=fin(self.high_all), per_section_p1=per(self.low),
                per_section_p99=per(self.high), sigma_px=float(self.sigma_px), worst_section=self.worst)


@jax.jit
def affine_fit(field: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  """Least-squares affine fit of a field: `u(y, x) ≈ A @ (y, x, 1)`.

  Args:
    field: `[H, W, 2]` float32, pixels, (dy, dx).
    weight: optional `[H, W]` float/bool weights (pixels that count); all pixels when None.
  Returns:
    `[2, 3]` float32 matrix A (rows dy, dx; columns y, x, 1), coordinates in pixels of the field.
  """
  h, w = field.shape[:2]
  wt = jnp.ones((h, w), jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
  # Centred coordinates keep the 3x3 normal equations well conditioned in float32.
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx,
                        indexing="ij")
  basis = jnp.stack([yy, xx, jnp.ones_like(yy)], axis=-1)  # [H, W, 3]
  gram = jnp.einsum("hwi,hwj,hw->ij", basis, basis, wt) + 1e-6 * jnp.eye(3)
  u = field.astype(jnp.float32)
  solve = lambda v: jnp.linalg.solve(gram, jnp.einsum("hwi,hwc,hw->ic", basis, v, wt)).T  # noqa: E731
  coef = solve(u)  # [2, 3] in centred coordinates
  # One step of iterative refinement: the float32 sums over H*W pixels lose ~1e-5 relative, which
  # the fit of the (small) residual recovers.
  coef = coef + solve(u - jnp.einsum("hwi,ci->hwc", basis, coef))
  # Back to uncentred pixel coordinates: offset absorbs -A_lin @ centre.
  offset = coef[:, 2] - coef[:, 0] * cy - coef[:, 1] * cx
  return jnp.concatenate([coef[:, :2], offset[:, None]], axis=1)


def _affine_part(matrix: jax.Array, h: int, w: int) -> jax.Array:
  """`[H, W, 2]` field `A @ (y, x, 1)` of a `[2, 3]` affine matrix, pixels."""
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  return jnp.stack([matrix[0, 0] * yy + matrix[0, 1] * xx + matrix[0, 2],
                    matrix[1, 0] * yy + matrix[1, 1] * xx + matrix[1, 2]], axis=-1)


# Regularises the weight-normalised fill of `area_change` where almost no weight is near.
_FILL_EPS = 1e-3


@functools.partial(jax.jit, static_argnames=("sigma", "remove_affine"))
def area_change(field: jax.Array, *, sigma: float = 0.0, remove_affine: bool = True,
                weight: jax.Array | None = None) -> jax.Array:
  """Local area change (Jacobian determinant) of the map `r -> r + u(r)` of a field.

  Args:
    field: `[H, W, 2]` float32, pixels, (dy, dx), pull semantics.
    sigma: Gaussian smoothing of the (non-affine) field before differentiation, px (static; the
      border is odd-reflect padded so affine fields stay exact).
    remove_affine: subtract the least-squares affine fit (`affine_fit`, over `weight`) first, so
      only the non-affine part is scored (a rigid motion, scale or shear of the whole section
      then gives exactly 1).
    weight: optional `[H, W]` weights (bool or >= 0) of the affine fit; with `sigma`, the field where
      the weight is 0 is replaced by a weight-normalised blur of the rest before smoothing.
  Returns:
    `[H, W]` float32 determinant of `I + grad u` (central differences, one-sided at the border):
    1 = area kept; rigid motion and shear give 1, a uniform scale s gives s². With pull semantics
    it is the source area drawn into one output pixel: > 1 compresses the tissue, < 1 stretches it.
  """
  u = field.astype(jnp.float32)
  h, w = u.shape[:2]
  if remove_affine:
    u = u - _affine_part(affine_fit(u, weight), h, w)
  if sigma > 0:
    from jaxalign.ops.fields import blur_field  # deferred: metrics stays importable on its own
    if weight is not None:
      # Outside the weighted pixels (resin, defects, where the truth maps off the image) a field can
      # be anything; smoothing would spread it into the tissue. Replace it by the normalised
      # (weight-averaged) blur of the weighted field, which tends to 0 (= the removed affine part)
      # far from any weight.
      from jaxalign.ops.fields import gaussian_blur  # deferred: metrics stays importable alone
      wt = jnp.asarray(weight, jnp.float32)
      fill = blur_field(u * wt[..., None], sigma) / (gaussian_blur(wt, sigma)[..., None] + _FILL_EPS)
      u = jnp.where(wt[..., None] > 0, u, fill)
    # Odd reflection continues the field's slope at the border (even reflection would force a zero
    # normal derivative and pull the border's area change towards 1): affine fields stay exact.
    u = blur_field(u, sigma, border="odd")
  dy_dy, dy_dx = jnp.gradient(u[..., 0])
  dx_dy, dx_dx = jnp.gradient(u[..., 1])
  return (1.0 + dy_dy) * (1.0 + dx_dx) - dy_dx * dx_dy


def deformation_sigma_px(resolution_nm, smooth_nm: float = DEFORMATION_SMOOTH_NM) -> float:
  """Smoothing (px) for `deformation` at `smooth_nm` for pixels of `resolution_nm` ((z, y, x) nm or a
  single y/x value); 0 when the pixel is already that coarse."""
  from jaxalign.errors import InputError, check_resolution
  if resolution_nm is None:
    raise InputError("deformation: resolution_nm (nm per pixel) is needed to smooth at a physical scale")
  if not (np.isfinite(smooth_nm) and smooth_nm >= 0):
    raise InputError(f"deformation: smooth_nm must be a finite number of nm >= 0, got {smooth_nm}")
  res = check_resolution(resolution_nm)
  px = 0.5 * (res[1] + res[2])
  return float(smooth_nm / px) if smooth_nm > px else 0.0


def deformation(fields, *, resolution_nm=None, smooth_nm: float = DEFORMATION_SMOOTH_NM,
                sigma_px: float | None = None, tissue=None, defects=None,
                margin_px: int = DEFORMATION_DEFECT_MARGIN_PX) -> Deformation:
  """Tissue deformation of a stack's fields: area change of each section's non-affine part.

  Per section z: fit and remove the affine part of `fields[z]` (over its scored pixels), smooth
  the rest by `sigma_px` (default: `smooth_nm` at `resolution_nm`), take the Jacobian determinant,
  and summarise it by its p1 and p99 over the scored pixels: inside `tissue[z]` (default: all) and
  more than `margin_px` px from `defects[z]`.

  Args:
    fields: `[Z, H, W, 2]` (or `[H, W, 2]`) float32, pixels, (dy, dx).
    resolution_nm: (z, y, x) nm per pixel of the fields (or one y/x value); needed unless
      `sigma_px` is given.
    smooth_nm: smoothing scale, nm (issue 18: about 100 nm).
    sigma_px: smoothing in px (overrides `smooth_nm`; 0 = none).
    tissue: optional `[Z, H, W]` bool, pixels that count (e.g. where the aligned section has data).
    defects: optional `[Z, H, W]` bool defect masks in the fields' frame (excluded with a margin).
    margin_px: pixels around defects left out.
  Returns:
    `Deformation` (determinant maps and per-section / whole-stack p1 - p99).
  Raises:
    InputError: bad field shape, NaN, no resolution and no sigma, bad masks.
  """
  from jaxalign import errors  # deferred: keeps the module's import light
  f = errors.check_field(fields, "deformation: fields")
  if f.ndim not in (3, 4):
    raise errors.InputError(f"deformation: fields must be [Z, H, W, 2] or [H, W, 2], got shape {f.shape}")
  if f.ndim == 3:
    f = f[None]
  z, h, w = f.shape[:3]
  errors.check_resolution(resolution_nm, "deformation: resolution_nm")
  if sigma_px is None:
    if resolution_nm is None:
      raise errors.InputError("deformation: give resolution_nm (nm per pixel) or sigma_px")
    sigma_px = deformation_sigma_px(resolution_nm, smooth_nm)
  if not (np.isfinite(sigma_px) and sigma_px >= 0):
    raise errors.InputError(f"deformation: sigma_px must be a finite number of px >= 0, got {sigma_px}")
  if int(margin_px) != margin_px or margin_px < 0:
    raise errors.InputError(f"deformation: margin_px must be a whole number >= 0, got {margin_px}")

  def mask(m, name):
    m = np.asarray(m)
    return errors.check_mask(m[None] if m.ndim == 2 and z == 1 else m, name, (z, h, w))

  keep = np.ones((z, h, w), bool)
  if tissue is not None:
    keep &= mask(tissue, "tissue")
  if defects is not None:
    from jaxalign.ops.preprocess import dilate
    keep &= ~np.asarray(dilate(jnp.asarray(mask(defects, "defects")), int(margin_px)))
  sigma = round(float(sigma_px), 3)
  det = np.stack([np.asarray(area_change(jnp.asarray(f[i]), sigma=sigma, weight=jnp.asarray(keep[i])))
                  for i in range(z)])
  det = np.where(keep, det, np.nan).astype(np.float32)
  lo_q, hi_q = DEFORMATION_PERCENTILES
  low = np.full(z, np.nan, np.float32)
  high = np.full(z, np.nan, np.float32)
  for i in range(z):
    vals = det[i][keep[i]]
    if vals.size:
      low[i], high[i] = np.percentile(vals, [lo_q, hi_q])
  scored = det[keep]
  low_all, high_all = (np.percentile(scored, [lo_q, hi_q]) if scored.size else (np.nan, np.nan))
  return Deformation(det, low, high, float(low_all), float(high_all), float(sigma_px))


@jax.jit
def residual_field(fields: jax.Array, truth: jax.Array) -> jax.Array:
  """The field that maps the aligned image onto the truth: `compose(invert(fields), truth)`.

  With `warp(src, truth)` the true result and `warp(src, fields)` the aligned one,
  `warp(warp(src, fields), e) ≈ warp(src, truth)`; as coordinate maps `E = F⁻¹ ∘ G`. It lives on the
  truth's (target) grid, where the endpoint error `|fields - truth|` is measured, and its area change
  is `det(grad G) / det(grad F)`: how much more (or less) the fields deform the tissue than the true
  distortion does. (`fields - truth` is not a field of this kind: its Jacobian mixes the two frames.)

  Args:
    fields, truth: `[..., H, W, 2]` float32, pixels, (dy, dx), pull semantics, same shape.
  Returns:
    `[..., H, W, 2]` float32 residual field, pixels (identity where `fields == truth`). Approximate
    where `fields` is not invertible (tears at cracks and folds: `deformation` leaves those out).
  """
  from jaxalign.ops.fields import compose, invert  # deferred: metrics stays importable on its own
  return compose(invert(fields), truth)


# The residual's area change is scored this many px inside the region where the truth samples
# inside the image (and inside the image border): its central differences and the bilinear taps of
# the fields' inverse reach that far.
RESIDUAL_EDGE_PX = 2


def residual_deformation(fields, truth, *, tissue=None, **kwargs) -> Deformation:
  """`deformation` of `residual_field(fields, truth)`: how far the fields' deformation is from the truth's.

  Scored over `tissue` where the truth samples inside the image, `RESIDUAL_EDGE_PX` px in (the
  fields' inverse is unknown beyond), and away from `defects` as in `deformation`.

  Args:
    fields, truth: `[Z, H, W, 2]` (or `[H, W, 2]`) float32, pixels, (dy, dx), pull semantics: the
      estimated alignment fields and the ground truth on the same (target) grid.
    tissue: optional `[Z, H, W]` bool in the target frame (e.g. the case's valid pixels).
    **kwargs: `resolution_nm`, `smooth_nm`, `sigma_px`, `defects`, `margin_px` of `deformation`.
  Returns:
    `Deformation` of the residual field (1 everywhere when `fields == truth`, up to the bilinear
    interpolation of the inverse: about +-1 % unsmoothed).
  Raises:
    InputError: bad or mismatched fields, and as `deformation`.
  """
  from jaxalign import errors  # deferred: keeps the module's import light
  from jaxalign.ops.preprocess import erode
  f = errors.check_field(fields, "deformation: fields")
  g = errors.check_field(truth, "deformation: truth")
  errors.check_same_shape(f, g, "deformation: fields", "truth")
  if f.ndim not in (3, 4):
    raise errors.InputError(f"deformation: fields must be [Z, H, W, 2] or [H, W, 2], got shape {f.shape}")
  f, g = (f[None], g[None]) if f.ndim == 3 else (f, g)
  h, w = g.shape[1:3]
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  sy, sx = yy + g[..., 0], xx + g[..., 1]
  inside = (sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1)
  e = RESIDUAL_EDGE_PX
  inside = np.asarray(erode(jnp.asarray(inside), e)).copy()
  inside[:, :e] = inside[:, h - e:] = False
  inside[:, :, :e] = inside[:, :, w - e:] = False
  if tissue is not None:
    t = np.asarray(tissue)
    inside &= errors.check_mask(t[None] if t.ndim == 2 and g.shape[0] == 1 else t, "tissue", inside.shape)
  residual = np.stack([np.asarray(residual_field(jnp.asarray(a), jnp.asarray(b))) for a, b in zip(f, g)])
  return deformation(residual, tissue=inside, **kwargs)
