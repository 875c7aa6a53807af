"""Drift removal: take the part of a stack's fields that varies slowly along z out of every section.

Why. Sequential alignment of real sections follows the tissue itself: neurites that run obliquely
through 30-50 nm sections move from one section to the next, and each pair alignment follows part of
that motion. Along a chain it adds up (on 40-nm FIB-SEM at 320², 15-20 px after 40-100 sections,
docs/benchmarks/stack.md §1), while the distortions alignment must undo (each section's own
compression, warping, cracks, pre-alignment error) are independent from one section to the next.
So the drift is the low-z-frequency part of the fields and the distortions are the rest. Composition
with decay (`jaxalign.ops.decay`) only forgets the stitch fields between blocks; the drift inside a block
stays. Removing the low-z-frequency part everywhere also makes the result independent of where the
chains started, so blocks and a single block agree (issue 6 §4).

How. Per section z, the drift `L_z = sum_k W[z, k] F_k` is a local polynomial fit along z (Gaussian
weights of `sigma` sections, degree 0, 1 or 2; a local-linear fit keeps a linear trend at the stack's
ends, where a plain weighted mean would be one-sided), and the section's field becomes
`compose(F_z, invert(L_z))`: the aligned section is moved back by the drift. All sections near z get
nearly the same correction, so neighbours stay aligned to each other (a plain `F_z - L_z` would not:
it is off by about `grad(F) * L`, 0.5-1 px for a 15-px drift).

Cost. The local fit also contains the average of the neighbours' own distortions, which the output
loses: about `|distortion| * sqrt(sum_k W[z, k]**2)`, i.e. less for larger `sigma`; a smaller `sigma`
removes faster-varying drift. Measured trade-offs are in docs/benchmarks/stack.md. Neighbour refinement
(`jaxalign.stack.refine`, `StackConfig.neighbour_refine`) afterwards re-registers the neighbours that this
leaves slightly apart (§6 there).

Limits. The fit is not robust: a section whose alignment failed leaks its error into its neighbours'
drift estimates with their weights (sigma 2: 18 % into each adjacent section). Blank sections are
left out through `section_weights`. Section 0 is no longer the identity.

This is the "path smoothing" of video stabilisation turned around (there the smooth path is kept and
the jitter removed).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign import errors
from jaxalign.ops.fields import compose, invert

# Weights beyond this many sigmas are dropped (exp(-4.5) ~ 1 % of the peak).
WINDOW_SIGMAS = 3.0
# Sections. Measured on 100 FIB-SEM 40-nm sections at 320² (docs/benchmarks/stack.md §5): sigma 2
# puts blocks within 0.5 px of a single block in 91-93 % of sections (3: 72-84 %, 4: 35-58 %), and a
# larger sigma buys back only part of the low-CPC cost (9.2-9.6 % at 2, 8.8-9.0 % at 4).
DEFAULT_DRIFT_SIGMA = 2.0


@dataclasses.dataclass(frozen=True)
class DriftConfig:
  """Drift removal settings (hashable).

  Attributes:
    sigma: Gaussian width along z, sections. The drift is what varies over more than about this many
      sections.
    degree: degree of the local polynomial fit (0 = weighted mean, 1 = local linear, 2 = local
      quadratic: less bias on curved drift, more of the neighbours' distortions leaks in).
    keep_translation: the fit leaves out each section's mean translation (`section_translations`),
      so sections keep theirs. A translation bends nothing, and a step in it is real: a section
      moved during acquisition (ISBI 2012, section 10: 24 px at 4 nm) is aligned by the blocks,
      but a local fit smears the step over its neighbours and misregisters them (the pair 9-10
      fell to CPC 0.22 at 32 nm; 0.32 keeping translations, and the area change stays within
      0.93-1.07; docs/benchmarks/real_stacks_summary.md).
  """
  sigma: float = DEFAULT_DRIFT_SIGMA
  degree: int = 1
  keep_translation: bool = True

  def __post_init__(self):
    if not (self.sigma > 0 and math.isfinite(self.sigma)):
      raise errors.InputError(f"DriftConfig.sigma must be a positive number of sections, got {self.sigma}")
    if self.degree not in (0, 1, 2):
      raise errors.InputError(f"DriftConfig.degree must be 0, 1 or 2, got {self.degree}")

  @property
  def radius(self) -> int:
    """Sections on each side that enter a section's drift estimate."""
    return max(1, int(math.ceil(WINDOW_SIGMAS * self.sigma)))

  def applies_to(self, num_sections: int) -> bool:
    """Whether a stack of `num_sections` is long enough for drift removal: its fit window
    (2 radius + 1 sections) must fit. In a shorter stack the local fit spans the whole stack and
    takes out the alignment itself (two sections: all of it), not a drift."""
    return num_sections >= 2 * self.radius + 1


def drift_weights(num_sections: int, config: DriftConfig, section_weights=None) -> np.ndarray:
  """`[Z, 2r + 1]` float64 weights: the drift of section z is `sum_j W[z, j] F[z - r + j]`.

  Entries that fall outside the stack or on a section with weight 0 (blank: its field is only a copy
  of a neighbour's) are 0. Each row reproduces polynomials of the config's degree exactly (its
  moments are 1, 0, 0 ...), falling back to a lower degree where too few sections carry weight.

  Args:
    num_sections: Z.
    config: `DriftConfig`.
    section_weights: optional `[Z]` non-negative weights (0 = leave the section out of every fit).
  Returns:
    `[Z, 2 r + 1]` float64, r = `config.radius`.
  """
  r = config.radius
  offsets = np.arange(-r, r + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (offsets / config.sigma) ** 2)
  sw = errors.check_section_weights(section_weights, num_sections)
  out = np.zeros((num_sections, 2 * r + 1))
  for z in range(num_sections):
    k = z + offsets.astype(int)
    inside = (k >= 0) & (k < num_sections)
    w = np.where(inside, kernel * sw[np.clip(k, 0, num_sections - 1)], 0.0)
    if not np.any(w > 0):
      continue  # no section with data in reach: no drift estimate, the field is left as it is
    for degree in range(config.degree, -1, -1):
      basis = np.stack([offsets ** p for p in range(degree + 1)], axis=1)  # [2r+1, degree+1]
      moments = basis.T @ (w[:, None] * basis)
      # Too few distinct sections for this degree: drop to a lower one.
      if np.linalg.matrix_rank(moments, tol=1e-9 * np.abs(moments).max()) == degree + 1:
        out[z] = np.linalg.solve(moments, basis.T * w)[0]
        break
  return out


def section_translations(fields) -> np.ndarray:
  """`[Z, 2]` float64: each field's mean displacement (px, (dy, dx)) over the section; `fields` is
  `[Z, H, W, 2]` (or one `[H, W, 2]` -> `[2]`). What `DriftConfig.keep_translation` leaves out."""
  f = np.asarray(fields, np.float64)
  return f.mean(axis=(-3, -2))


@jax.jit
def remove_one(field: jax.Array, window: jax.Array, weights: jax.Array, translations: jax.Array) -> jax.Array:
  """`compose(field, invert(sum_j weights[j] (window[j] - translations[j])))` for one section.

  Args:
    field: `[H, W, 2]` float32, pixels, (dy, dx).
    window: `[K, H, W, 2]` float32: the fields of the sections around it (or windows of them).
    weights: `[K]` float32.
    translations: `[K, 2]` float32 px: what to leave out of each window field (its whole section's
      `section_translations` with `keep_translation`, else zeros).
  Returns:
    `[H, W, 2]` float32.
  """
  drift = jnp.tensordot(weights, window - translations[:, None, None, :], axes=1)
  return compose(field, invert(drift))


def window_indices(z: int, num_sections: int, radius: int) -> np.ndarray:
  """`[2 r + 1]` section indices around z, clipped into the stack (their weights are 0 there)."""
  return np.clip(np.arange(z - radius, z + radius + 1), 0, num_sections - 1)


def remove_drift(fields, *, config: DriftConfig | None = None, section_weights=None,
                 progress: bool = False) -> jax.Array:
  """Removes the slowly varying (along z) part of a stack's fields (module docstring).

  Args:
    fields: `[Z, H, W, 2]` float32, pixels, (dy, dx): `warp(sections[z], fields[z])` is section z
      aligned (from `align_stack` or `align_block`).
    config: `DriftConfig` (sigma in sections, fit degree).
    section_weights: optional `[Z]` weights; 0 leaves a section out of every drift estimate (blank
      sections: their field is a copy of a neighbour's).
    progress: tqdm bar over sections.
  Returns:
    `[Z, H, W, 2]` float32: `compose(fields[z], invert(drift[z]))` (the drift without the window
    sections' mean translations with `config.keep_translation`).
  Raises:
    InputError: wrong shape, NaN/Inf, bad config or weights.
  """
  config = config or DriftConfig()
  f = errors.check_field(fields, "fields")
  if f.ndim != 4:
    raise errors.InputError(f"fields: expected [Z, H, W, 2], got shape {f.shape}")
  z_count = f.shape[0]
  weights = drift_weights(z_count, config, section_weights).astype(np.float32)
  shifts = (section_translations(f) if config.keep_translation else np.zeros((z_count, 2))).astype(np.float32)
  out = np.empty_like(f)
  for z in tqdm(range(z_count), desc="remove_drift", unit="section", disable=not progress, leave=False):
    idx = window_indices(z, z_count, config.radius)
    out[z] = np.asarray(remove_one(jnp.asarray(f[z]), jnp.asarray(f[idx]), jnp.asarray(weights[z]),
                                   jnp.asarray(shifts[idx])))
  return jnp.asarray(out)
