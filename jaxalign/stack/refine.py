"""Neighbour refinement: re-align every section to the mean of its aligned neighbours on both sides.

Why. Drift removal (`jaxalign.stack.drift`) takes the slowly varying part out of each section's field, but
its estimate of that part also contains the neighbours' own distortions, which differ from one
section to the next: neighbours end up misregistered to each other by a fraction of a pixel (on
40-nm FIB-SEM at 320², the low-CPC fraction rises from 8.5 % to 9.6 %; docs/benchmarks/stack.md).
Aligning each section to a template made of its already aligned neighbours re-registers neighbours
without bringing the drift back: the template sits on both sides of the section, so the tissue's own
motion through it, which a one-sided chain follows, cancels to first order, and every section is
aligned independently, so nothing accumulates along z.

How. One Jacobi sweep per iteration: every section's template is built from the fields given to the
sweep (not from sections already refined in it), so the result does not depend on the order of the
sections, on how a stack is cut into tasks, or on which worker ran them. The template of section z is
the Gaussian-weighted (along z) mean of its neighbours `z - radius .. z + radius` (not z itself),
each rendered with its field and normalised (zero mean, unit variance over its data), over the pixels
where they have data (not blank, not a defect). The pair aligner then aligns section z, rendered with
its field, to the template from the identity, and that residual goes after the field; so its elastic
prior penalises only the correction, and a chunk of a large section needs nothing but windows of the
renderings (`jaxalign.volume.chunked.refine_section_chunked`).

What it does to errors: each section takes on about the weighted mean of its neighbours' errors
(plus the aligner's own). That smooths errors along z, which is what re-registers neighbours; it does
not remove an error common to the window, and a section whose alignment failed (a large error of its
own) is pulled back but spreads a share of its error to its neighbours (up to about 44 % each with
the default weights, for an aligner that averages) unless the aligner ignores that neighbour's part of
the template.

Cost: one pair alignment per section and iteration (the blocks need `voting_distance` per section).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign import errors
from jaxalign.stack.drift import window_indices
from jaxalign.ops.fields import compose, warp
from jaxalign.ops.preprocess import normalize
from jaxalign.align.protocols import BatchedPairAligner, PairAligner

# A template pixel needs data from neighbours carrying at least this fraction of the window's weight;
# elsewhere the template has no data (with radius 2 and sigma 1, one second neighbour alone is 6 %).
MIN_TEMPLATE_COVERAGE = 0.05
# Template pixels with data whose normalised value is exactly 0 are nudged off 0, which means "no
# data" to the aligner.
NONZERO_EPSILON = 1e-6
# Pairs per aligner call (on accelerators the last batch is padded by repeats: one compile).
DEFAULT_REFINE_BATCH = 8
# Elastic weights of the residual alignment, relative to `PairConfig.gammas`. The residual is a small
# correction, and a softer one follows the tissue's own change between neighbours: measured on
# 40-nm FIB-SEM at 320² (docs/benchmarks/stack.md §6), x1 / x4 / x16 give low CPC 6.5-6.6 / 6.8-7.0 /
# 8.3-8.5 % (original 7.47 %) and EPE 1.45-1.48 / 1.40-1.45 / 1.50-1.52 px; on 50-nm ssTEM (ISBI, 4-nm
# pixels: 3x thicker sections in pixels) x1 and x4 raise the EPE by 0.7 and 0.5 px, x16 leaves it.
DEFAULT_REFINE_STIFFNESS = 4.0
# Fewest sections for which a template has neighbours on both sides of some section.
MIN_REFINE_SECTIONS = 3


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Neighbour refinement settings (hashable).

  Attributes:
    radius: neighbours on each side that make a section's template (sections).
    sigma: Gaussian width of their weights along z (sections).
    iterations: Jacobi sweeps. Each further sweep averages the neighbours' errors once more but
      also pulls each section's content a little further towards its neighbours'.
    valid_threshold: a neighbour's rendered data mask (bilinear, 0..1) above this counts as data.
    batch: pairs per aligner call.
    stiffness: the default pair aligner's elastic weights (`PairConfig.gammas`) are multiplied by
      this for the residual alignment (not applied to a custom aligner). Higher follows less of the
      tissue's own change between sections; thick sections (in pixels) need more.
  """
  radius: int = 2
  sigma: float = 1.0
  iterations: int = 1
  valid_threshold: float = 0.5
  batch: int = DEFAULT_REFINE_BATCH
  stiffness: float = DEFAULT_REFINE_STIFFNESS

  def __post_init__(self):
    if self.radius < 1:
      raise errors.InputError(f"RefineConfig.radius must be >= 1 section, got {self.radius}")
    if not (self.sigma > 0 and math.isfinite(self.sigma)):
      raise errors.InputError(f"RefineConfig.sigma must be a positive number of sections, got {self.sigma}")
    if self.iterations < 1:
      raise errors.InputError(f"RefineConfig.iterations must be >= 1, got {self.iterations}")
    if not 0.0 <= self.valid_threshold < 1.0:
      raise errors.InputError(f"RefineConfig.valid_threshold must be in [0, 1), got {self.valid_threshold}")
    if self.batch < 1:
      raise errors.InputError(f"RefineConfig.batch must be >= 1, got {self.batch}")
    if not (self.stiffness > 0 and math.isfinite(self.stiffness)):
      raise errors.InputError(f"RefineConfig.stiffness must be a positive factor, got {self.stiffness}")

  def applies_to(self, num_sections: int) -> bool:
    """Whether a stack of `num_sections` is long enough for neighbour refinement. With two sections
    each one's template is the other: the Jacobi sweep moves each onto the other's place, which only
    swaps their misregistration (and bends both), at the cost of two pair alignments."""
    return num_sections >= MIN_REFINE_SECTIONS


def refine_aligner(config: RefineConfig, aligner: BatchedPairAligner | None = None, model: PairAligner | None = None,
                   pair_config=None) -> BatchedPairAligner:
  """The residual aligner: `aligner` as given, else `align_pairs` with `model` and `pair_config`
  (default `PairConfig()`) whose elastic weights are multiplied by `config.stiffness`."""
  if aligner is not None:
    return aligner
  from jaxalign.stack.block import default_aligner  # deferred: block imports the voting kernels
  from jaxalign.align.pair import PairConfig  # deferred: pair pulls in the finetuner and optax
  pair = pair_config or PairConfig()
  pair = dataclasses.replace(pair, gamma_scale=pair.gamma_scale * config.stiffness)
  return default_aligner(model, pair)


def neighbour_weights(num_sections: int, config: RefineConfig, section_weights=None) -> np.ndarray:
  """`[Z, 2r + 1]` float64 template weights: section z's template is made of sections
  `z - r + j` with weight `W[z, j]`; 0 for z itself, for indices outside the stack and for sections
  with section weight 0 (blank). Rows are not normalised (the template divides by the weight that
  has data at each pixel).

  Args:
    num_sections: Z.
    config: `RefineConfig`.
    section_weights: optional `[Z]` non-negative weights (0 = not a neighbour anywhere).
  """
  r = config.radius
  offsets = np.arange(-r, r + 1)
  kernel = np.exp(-0.5 * (offsets / config.sigma) ** 2)
  kernel[r] = 0.0
  sw = errors.check_section_weights(section_weights, num_sections)
  k = np.arange(num_sections)[:, None] + offsets[None, :]
  inside = (k >= 0) & (k < num_sections)
  return np.where(inside, kernel[None, :] * sw[np.clip(k, 0, num_sections - 1)], 0.0)


@jax.jit
def render_window(images: jax.Array, fields: jax.Array, data: jax.Array, valid_threshold: float) -> jax.Array:
  """Sections rendered with their fields, 0 where they have no data.

  Args:
    images: `[K, H, W]` float32 sections (0 = no data).
    fields: `[K, H, W, 2]` float32, pixels, (dy, dx).
    data: `[K, H, W]` float32, 1 where a section has data (tissue, not a defect).
    valid_threshold: the rendered data mask (bilinear, 0..1) above this counts as data.
  Returns:
    `[K, H, W]` float32.
  """
  rendered = jax.vmap(warp)(images, fields)
  return jnp.where(jax.vmap(warp)(data, fields) > valid_threshold, rendered, 0.0)


@jax.jit
def neighbour_template(rendered: jax.Array, weights: jax.Array) -> jax.Array:
  """One section's template: the weighted mean of its rendered neighbours, each normalised.

  Args:
    rendered: `[K, H, W]` float32 aligned neighbours (0 = no data), e.g. from `render_window`.
    weights: `[K]` float32 (0 = not used; the section itself has weight 0).
  Returns:
    `[H, W]` float32: per pixel, `sum_k w_k n_k / sum_k w_k [k has data]` with `n_k` the neighbour
    normalised to zero mean and unit variance over its data; 0 (no data) where the neighbours with
    data there carry less than `MIN_TEMPLATE_COVERAGE` of the weight.
  """
  has = (rendered != 0).astype(jnp.float32)
  normed = jax.vmap(normalize)(rendered)
  num = jnp.tensordot(weights, normed * has, axes=1)
  den = jnp.tensordot(weights, has, axes=1)
  covered = den > MIN_TEMPLATE_COVERAGE * jnp.sum(weights)
  template = num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)
  template = jnp.where(template == 0, NONZERO_EPSILON, template)
  return jnp.where(covered, template, 0.0)


_compose_batch = jax.jit(jax.vmap(compose))


def residual(aligner: BatchedPairAligner, srcs: np.ndarray, templates: np.ndarray) -> np.ndarray:
  """`[B, H, W, 2]` float32: the aligner's field taking each rendered section `srcs[b]` onto its
  template `templates[b]` from the identity (0 where either has no data at all)."""
  b, h, w = srcs.shape
  out = np.zeros((b, h, w, 2), np.float32)
  usable = srcs.reshape(b, -1).any(axis=1) & templates.reshape(b, -1).any(axis=1)
  if usable.any():
    # Pairs without data are replaced by a usable one (result dropped): the batch keeps its size,
    # so the aligner compiles once.
    rows = np.where(usable, np.arange(b), np.flatnonzero(usable)[0])
    no_defects = np.zeros((b, h, w), bool)
    res = aligner(srcs[rows], templates[rows], src_defects=no_defects, tgt_defects=no_defects,
                  init_fields=np.zeros((b, h, w, 2), np.float32))
    res = errors.check_field(np.asarray(res, np.float32), "aligner output", shape=(h, w))
    out[usable] = res[usable]
  return out


def section_and_template(images, fields, data, weights, center: int,
                         valid_threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """The section `center` of a window rendered with its field, and its template.

  Args:
    images: `[K, H, W]` float32 window of sections (0 = no data).
    fields: `[K, H, W, 2]` float32, pixels, (dy, dx): their current fields.
    data: `[K, H, W]` float32, 1 where a section has data.
    weights: `[K]` template weights (`neighbour_weights` row; 0 at `center`).
    center: index of the section being refined in the window.
    valid_threshold: see `RefineConfig`.
  Returns:
    (`[H, W]` float32 rendering, `[H, W]` float32 template), 0 = no data.
  """
  rendered = render_window(jnp.asarray(images), jnp.asarray(fields), jnp.asarray(data), valid_threshold)
  template = neighbour_template(rendered, jnp.asarray(np.asarray(weights, np.float32)))
  return np.asarray(rendered[center]), np.asarray(template)


def refine_section(images, fields, data, weights, center: int, aligner: BatchedPairAligner,
                   valid_threshold: float) -> np.ndarray:
  """One section's refined field from its window (the volume pipeline's task; chunks use
  `jaxalign.volume.chunked.refine_section_chunked`).

  Args:
    images, fields, data, weights, center, valid_threshold: as `section_and_template`.
    aligner: batched pair aligner (`jaxalign.align.protocols.BatchedPairAligner`).
  Returns:
    `[H, W, 2]` float32: `compose(fields[center], R)`.
  """
  src, template = section_and_template(images, fields, data, weights, center, valid_threshold)
  resid = residual(aligner, src[None], template[None])
  return np.asarray(_compose_batch(jnp.asarray(fields[center])[None], jnp.asarray(resid)))[0]


def refine_to_neighbours(sections, fields, *, config: RefineConfig | None = None, defects=None,
                         section_weights=None, aligner: BatchedPairAligner | None = None,
                         model: PairAligner | None = None, pair_config=None, progress: bool = False) -> jax.Array:
  """Re-aligns every section to the mean of its aligned neighbours on both sides (module docstring).

  Section z rendered with its field is aligned to its template (`neighbour_template`) from the
  identity, and the residual `R` goes after the field: `compose(fields[z], R)`.

  Args:
    sections: `[Z, H, W]` images (0 = no data).
    fields: `[Z, H, W, 2]` float32, pixels, (dy, dx): `warp(sections[z], fields[z])` is section z
      aligned (e.g. from `align_stack` with drift removal).
    config: `RefineConfig`.
    defects: optional `[Z, H, W]` bool defect masks (no data there, in templates and sources).
    section_weights: optional `[Z]` weights; a section with weight 0 is no one's neighbour and keeps
      its field (blank sections). Sections without data are treated so in any case.
    aligner: batched pair aligner `aligner(srcs, tgts, *, src_defects, tgt_defects, init_fields)`
      (`jaxalign.align.protocols.BatchedPairAligner`); None = `refine_aligner` (`align_pairs` with `model` and
      `pair_config`, elastic weights times `config.stiffness`).
    model, pair_config: for the default aligner.
    progress: tqdm bar over batches.
  Returns:
    `[Z, H, W, 2]` float32 refined fields.
  Raises:
    InputError: wrong shapes, NaN/Inf, bad config or weights.
  """
  from jaxalign.stack.block import batch_rows, check_stack  # deferred: block imports the voting kernels
  config = config or RefineConfig()
  sec, dfx = check_stack(sections, defects)
  f = errors.check_field(fields, "fields")
  z_count, h, w = sec.shape
  if f.shape != (z_count, h, w, 2):
    raise errors.InputError(f"fields: expected shape {(z_count, h, w, 2)} to match sections, got {f.shape}")
  data = ((sec != 0) & ~dfx).astype(np.float32)
  has_data = data.reshape(z_count, -1).any(axis=1)
  sw = errors.check_section_weights(section_weights, z_count)
  weights = neighbour_weights(z_count, config, np.where(has_data, 1.0, 0.0) * sw).astype(np.float32)
  aligner = refine_aligner(config, aligner, model, pair_config)
  r = config.radius
  todo = np.flatnonzero(has_data & (sw > 0))
  out = np.array(f, np.float32, copy=True)
  for it in range(config.iterations):
    current = out.copy()
    srcs = np.zeros((len(todo), h, w), np.float32)
    templates = np.zeros((len(todo), h, w), np.float32)
    for i, z in enumerate(todo):
      idx = window_indices(z, z_count, r)  # z sits at position r
      srcs[i], templates[i] = section_and_template(sec[idx], current[idx], data[idx], weights[z], r,
                                                   config.valid_threshold)
    for b0 in tqdm(range(0, len(todo), config.batch), desc=f"refine {it + 1}/{config.iterations}",
                   unit="batch", disable=not progress, leave=False):
      # On accelerators the last batch is padded by repeats: one aligner compile per stack.
      rows = batch_rows(b0, len(todo), config.batch)
      n = min(config.batch, len(todo) - b0)
      resid = residual(aligner, srcs[rows], templates[rows])
      out[todo[b0:b0 + n]] = np.asarray(_compose_batch(jnp.asarray(current[todo[rows]]), jnp.asarray(resid)))[:n]
  return jnp.asarray(out)
