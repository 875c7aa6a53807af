"""Procedural serial-section EM-like stacks: neurites, membranes, mitochondria, vesicles.

`make_stack(SyntheticConfig(...))` needs nothing downloaded. The tissue is a 3D object sliced into
sections, so neighbouring sections are similar but not identical, as in real ssTEM:

- Neurites are the cells of a power (weighted Voronoi) diagram on a jittered seed grid. The plane
  is domain-warped by a smooth random Fourier field whose phases advance with z, and every seed
  drifts slowly along its own sinusoid in z, so cell boundaries bend and move continuously
  through the stack (tubular processes at oblique angles); each neurite's calibre (its power
  weight) also swells and shrinks through z, independently of its neighbours, so sections change
  without a coherent shift that an aligner would mistake for a distortion.
- Membranes are a dark Gaussian profile of the exact distance to the power-diagram bisector.
- Mitochondria are 3D ellipsoids (several sections deep) with a dark rim and cristae stripes;
  vesicles are small spheres (1-2 sections deep) with a dark shell, clustered where a smooth
  "synapse density" field is high.
- Contrast: per-cell cytoplasm shade, Gaussian blur (`jaxalign.ops.fields.gaussian_blur`), additive
  noise, values clipped to `[floor, 1]` so the image never contains 0 (0 means *no data*).

Every object is found with the Worley-noise trick (each pixel only looks at the seeds of the
neighbouring grid cells), so a section costs O(H·W·K) with K ≤ 25 and no [H, W, n_objects]
arrays. One jitted function renders a section for a traced z, so a stack compiles once per shape.
All randomness comes from NumPy's seeded PCG64 (`config.seed`), sampled on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxalign.errors import InputError
from jaxalign.ops.fields import gaussian_blur


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Parameters of a synthetic EM stack. Lengths in pixels (think ~6 nm/px, 40 nm sections).

  Attributes:
    sections: number of sections Z.
    size: section height and width H = W, pixels.
    seed: seed of every random choice (same seed and config -> identical stack).
    cell_size: spacing of the neurite seed grid = typical neurite diameter, px.
    seed_jitter: random offset of each seed from its grid point, fraction of cell_size.
    size_variation: spread of the power-diagram weights (bigger -> more varied neurite calibres).
    seed_drift: amplitude of each seed's sinusoidal motion through z, fraction of cell_size.
    drift_period: mean period of that motion and of the calibre change, sections (±50 % per seed).
    calibre_change: amplitude of each neurite's sinusoidal change of calibre through z (added to
      its power weight, in units of cell_size²). Neurites swell and shrink independently, so
      neighbouring sections differ without a coherent shift that an aligner would follow.
    warp_amplitude: amplitude of the smooth domain warp that bends boundaries, fraction of cell_size.
    warp_wavelength: wavelength of the domain warp, in cell sizes.
    warp_components: number of random Fourier components of the domain warp per axis.
    warp_z_rate: phase advance of the domain warp per section, radians (drives boundary drift).
    membrane_width: sigma of the membrane's dark Gaussian profile, px.
    membrane_darkness: fraction of the cytoplasm shade that a membrane's centre removes.
    cytoplasm_mean, cytoplasm_spread: mean and spread of the per-neurite cytoplasm shade.
    mito_cell: grid spacing of mitochondria candidates, px (at most one per grid cell).
    mito_probability: fraction of grid cells that hold a mitochondrion.
    mito_length, mito_width: ranges of the in-plane semi-axes, px.
    mito_depth: range of the z half-extent, sections.
    mito_shade: mean intensity inside a mitochondrion.
    vesicle_cell: grid spacing of vesicle candidates, px.
    vesicle_radius: range of vesicle radii, px.
    vesicle_probability: probability of a vesicle in a grid cell where the cluster field is high.
    vesicle_cluster_fraction: fraction of the plane covered by vesicle clusters.
    blur_sigma: Gaussian blur (point-spread) sigma, px.
    noise_sigma: standard deviation of the additive Gaussian noise, intensity units.
    texture_sigma, texture_amplitude: grainy cytoplasm texture (blurred noise, new in every
      section because it is finer than a section's thickness): correlation length px, std.
    floor: smallest output value; keeps tissue non-zero because 0 means no data.
  """
  sections: int = 20
  size: int = 448
  seed: int = 0
  cell_size: float = 36.0
  seed_jitter: float = 0.35
  size_variation: float = 0.5
  seed_drift: float = 0.02
  drift_period: float = 16.0
  calibre_change: float = 0.04
  warp_amplitude: float = 0.3
  warp_wavelength: float = 3.5
  warp_components: int = 6
  warp_z_rate: float = 0.01
  membrane_width: float = 2.0
  membrane_darkness: float = 0.7
  cytoplasm_mean: float = 0.68
  cytoplasm_spread: float = 0.07
  mito_cell: float = 56.0
  mito_probability: float = 0.35
  mito_length: tuple[float, float] = (9.0, 20.0)
  mito_width: tuple[float, float] = (5.0, 8.0)
  mito_depth: tuple[float, float] = (2.0, 6.0)
  mito_shade: float = 0.38
  vesicle_cell: float = 9.0
  vesicle_radius: tuple[float, float] = (2.0, 3.2)
  vesicle_probability: float = 0.7
  vesicle_cluster_fraction: float = 0.2
  blur_sigma: float = 0.8
  noise_sigma: float = 0.04
  texture_sigma: float = 1.2
  texture_amplitude: float = 0.1
  floor: float = 0.02


class SyntheticStack(NamedTuple):
  """A synthetic stack and its ground-truth labels.

  Attributes:
    images: `[Z, H, W] float32` in `[floor, 1]` (never 0: every pixel is tissue).
    membranes: `[Z, H, W] bool`, pixels within 1.5 membrane sigmas of a neurite boundary.
    cells: `[Z, H, W] int32`, neurite id (the same id through z for the same neurite).
  """
  images: np.ndarray
  membranes: np.ndarray
  cells: np.ndarray


# Worley neighbourhoods: a pixel looks at the seeds of grid cells within this many cells.
_CELL_REACH = 2      # neurite seeds move up to jitter + drift + size weight: ±2 cells is enough
_OBJECT_REACH = 1    # organelles stay inside their own grid cell
# Pixels closer than this many membrane sigmas to a boundary count as membrane in the labels.
_MEMBRANE_LABEL_SIGMAS = 1.5
# Sharpness of organelle edges (logistic slope per unit of normalised radius).
_EDGE_SHARPNESS = 12.0
# Cristae: stripes across a mitochondrion with this period (px) and relative depth.
_CRISTAE_PERIOD = 4.0
_CRISTAE_DEPTH = 0.08
# Dark rim of mitochondria and vesicle shells: width in normalised radius and darkening.
_RIM_WIDTH = 0.12
_RIM_DARKNESS = 0.35
_VESICLE_SHELL_SIGMA = 0.7   # px
_VESICLE_DARKNESS = 0.35
_CLUSTER_SMOOTHING_PASSES = 6


def _check_config(c: SyntheticConfig) -> None:
  if c.sections < 1:
    raise InputError(f"synthetic stack: sections must be >= 1, got {c.sections}")
  if c.size < 16:
    raise InputError(f"synthetic stack: size must be >= 16 px, got {c.size}")
  if c.cell_size <= 4 * c.membrane_width:
    raise InputError(f"synthetic stack: cell_size {c.cell_size} px is too small for membranes of "
                     f"width {c.membrane_width} px")


def _grid(n_pixels: int, spacing: float, pad: int) -> int:
  return int(math.ceil(n_pixels / spacing)) + 2 * pad


def _params(c: SyntheticConfig) -> dict:
  """All random parameters of the stack (host NumPy float32 arrays, seeded by `c.seed`).

  Sampled on the host with NumPy's PCG64: a few thousand numbers, and it avoids compiling a
  jax.random kernel per parameter shape (seconds each on a small CPU).
  """
  rng = np.random.default_rng(c.seed)
  u = lambda shape: rng.random(shape, dtype=np.float32)  # noqa: E731

  pad = _CELL_REACH + 1   # the domain warp can push coordinates one cell outside the image
  g = _grid(c.size, c.cell_size, pad)
  idx = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).astype(np.float32)
  cells = {
    "base": (idx - pad + 0.5 + c.seed_jitter * (u((g, g, 2)) - 0.5) * 2) * c.cell_size,
    "weight": (c.size_variation * c.cell_size * u((g, g))) ** 2,
    "drift_phase": 2 * math.pi * u((g, g, 2)),
    "drift_freq": 2 * math.pi / (c.drift_period * (0.5 + u((g, g, 2)))),
    "calibre_phase": 2 * math.pi * u((g, g)),
    "calibre_freq": 2 * math.pi / (c.drift_period * (0.5 + u((g, g)))),
    "shade": c.cytoplasm_mean + c.cytoplasm_spread * (2 * u((g, g)) - 1),
  }

  k = c.warp_components
  angle = 2 * math.pi * u((2, k))
  wavelength = c.warp_wavelength * c.cell_size * (0.6 + 0.8 * u((2, k)))
  warp = {
    "freq": np.stack([np.cos(angle), np.sin(angle)], -1) * (2 * math.pi / wavelength)[..., None],
    "phase": 2 * math.pi * u((2, k)),
    "zrate": c.warp_z_rate * (2 * u((2, k)) - 1),
    "amp": np.full((2, k), c.warp_amplitude * c.cell_size / math.sqrt(k), np.float32),
  }

  def objects(spacing, probability, size_a, size_b, depth):
    gp = _grid(c.size, spacing, 1)
    oidx = np.stack(np.meshgrid(np.arange(gp), np.arange(gp), indexing="ij"), -1).astype(np.float32)
    a = size_a[0] + (size_a[1] - size_a[0]) * u((gp, gp))
    b = size_b[0] + (size_b[1] - size_b[0]) * u((gp, gp))
    # keep each object inside its own grid cell so a 3x3 neighbourhood finds it
    slack = np.maximum(spacing / 2 - np.maximum(a, b), 0.0)[..., None]
    return {
      "centre": (oidx - 1 + 0.5) * spacing + slack * (2 * u((gp, gp, 2)) - 1),
      "a": a, "b": b,
      "angle": math.pi * u((gp, gp)),
      "zc": -depth[1] + (c.sections - 1 + 2 * depth[1]) * u((gp, gp)),
      "depth": depth[0] + (depth[1] - depth[0]) * u((gp, gp)),
      "present": u((gp, gp)) < probability,
    }

  mito = objects(c.mito_cell, c.mito_probability, c.mito_length, c.mito_width, c.mito_depth)
  # vesicles: spheres (a == b), about one section deep, only inside clusters
  ves = objects(c.vesicle_cell, c.vesicle_probability, c.vesicle_radius, c.vesicle_radius, (0.6, 1.2))
  ves["b"] = ves["a"]
  cluster = rng.standard_normal(ves["present"].shape).astype(np.float32)
  # smooth the cluster field on the object grid (separable 1-2-1 passes) so clusters are blobs
  for _ in range(_CLUSTER_SMOOTHING_PASSES):
    cluster = (np.roll(cluster, 1, 0) + 2 * cluster + np.roll(cluster, -1, 0)) / 4
    cluster = (np.roll(cluster, 1, 1) + 2 * cluster + np.roll(cluster, -1, 1)) / 4
  ves["present"] = ves["present"] & (cluster >= np.quantile(cluster, 1 - c.vesicle_cluster_fraction))
  tree = {"cells": cells, "warp": warp, "mito": mito, "ves": ves}
  return jax.tree_util.tree_map(lambda x: x if x.dtype == bool else x.astype(np.float32), tree)


def _neighbours(p: jax.Array, spacing: float, offset: int, reach: int, grid: int):
  """Grid indices `[H, W, K, 2]` of the (2·reach+1)² grid cells around each point `p [H, W, 2]` (px)."""
  g = jnp.floor(p / spacing).astype(jnp.int32) + offset
  d = jnp.arange(-reach, reach + 1)
  dd = jnp.stack(jnp.meshgrid(d, d, indexing="ij"), -1).reshape(-1, 2)
  return jnp.clip(g[:, :, None, :] + dd, 0, grid - 1)


@functools.partial(jax.jit, static_argnums=2)
def _render(params: dict, z: jax.Array, c: SyntheticConfig):
  """One noiseless, unblurred section at (traced, float) depth z.

  Returns:
    image `[H, W] float32`, boundary distance `[H, W] float32` (px), cell id `[H, W] int32`.
  """
  h = w = c.size
  yx = jnp.stack(jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij"), -1)

  # domain warp: smooth, z-dependent bending of the plane
  wp = params["warp"]
  arg = jnp.einsum("hwc,akc->hwak", yx, wp["freq"]) + wp["phase"] + wp["zrate"] * z
  p = yx + jnp.sum(wp["amp"] * jnp.sin(arg), -1)

  # neurites: nearest two seeds of the power diagram
  cl = params["cells"]
  g = cl["base"].shape[0]
  seeds = cl["base"] + c.seed_drift * c.cell_size * jnp.sin(cl["drift_freq"] * z + cl["drift_phase"])
  nb = _neighbours(p, c.cell_size, _CELL_REACH + 1, _CELL_REACH, g)
  s = seeds[nb[..., 0], nb[..., 1]]                       # [H, W, K, 2]
  weight = cl["weight"] + c.calibre_change * c.cell_size ** 2 * jnp.sin(cl["calibre_freq"] * z + cl["calibre_phase"])
  wgt = weight[nb[..., 0], nb[..., 1]]                     # [H, W, K]
  power = jnp.sum((p[:, :, None] - s) ** 2, -1) - wgt
  take = lambda arr, i: jnp.take_along_axis(arr, i[..., None], axis=2)[..., 0]  # noqa: E731
  # two argmins are much cheaper than lax.top_k on CPU
  first = jnp.argmin(power, -1)
  p1 = take(power, first)
  second = jnp.argmin(jnp.where(jnp.arange(power.shape[-1]) == first[..., None], jnp.inf, power), -1)
  p2 = take(power, second)
  sa = jnp.take_along_axis(s, first[..., None, None], axis=2)[:, :, 0]
  sb = jnp.take_along_axis(s, second[..., None, None], axis=2)[:, :, 0]
  # exact distance to the bisector of the power diagram
  dist = (p2 - p1) / (2 * jnp.linalg.norm(sb - sa, axis=-1) + 1e-6)
  cy, cx = take(nb[..., 0], first), take(nb[..., 1], first)
  cell_id = (cy * g + cx).astype(jnp.int32)
  img = cl["shade"][cy, cx] * (1 - c.membrane_darkness * jnp.exp(-0.5 * (dist / c.membrane_width) ** 2))

  def ellipsoids(obj, spacing):
    """Coverage `[H, W]` in [0, 1], normalised radius and along-axis coordinate of the nearest object."""
    go = obj["centre"].shape[0]
    nbo = _neighbours(yx, spacing, 1, _OBJECT_REACH, go)
    pick = lambda arr: arr[nbo[..., 0], nbo[..., 1]]  # noqa: E731
    rel = yx[:, :, None] - pick(obj["centre"])
    ang = pick(obj["angle"])
    along = rel[..., 0] * jnp.cos(ang) + rel[..., 1] * jnp.sin(ang)
    across = -rel[..., 0] * jnp.sin(ang) + rel[..., 1] * jnp.cos(ang)
    dz = (z - pick(obj["zc"])) / pick(obj["depth"])
    scale = jnp.sqrt(jnp.clip(1 - dz ** 2, 1e-6, 1.0))
    q = jnp.sqrt((along / (pick(obj["a"]) * scale)) ** 2 + (across / (pick(obj["b"]) * scale)) ** 2)
    alive = pick(obj["present"]) & (jnp.abs(dz) < 1)
    q = jnp.where(alive, q, jnp.inf)
    best = jnp.argmin(q, -1)[..., None]
    qb = jnp.take_along_axis(q, best, -1)[..., 0]
    alongb = jnp.take_along_axis(along, best, -1)[..., 0]
    radius = jnp.take_along_axis(pick(obj["a"]) * scale, best, -1)[..., 0]
    cover = jax.nn.sigmoid(_EDGE_SHARPNESS * (1 - qb))
    return cover, qb, alongb, radius

  mcover, mq, malong, _ = ellipsoids(params["mito"], c.mito_cell)
  cristae = _CRISTAE_DEPTH * jnp.sin(2 * math.pi * malong / _CRISTAE_PERIOD)
  rim = _RIM_DARKNESS * jnp.exp(-0.5 * ((mq - 1) / _RIM_WIDTH) ** 2)
  mito_img = c.mito_shade + cristae
  img = img * (1 - mcover) + mito_img * mcover
  img = img * (1 - rim * (mq < 2))

  vcover, vq, _, vr = ellipsoids(params["ves"], c.vesicle_cell)
  shell = jnp.exp(-0.5 * ((vq - 1) * vr / _VESICLE_SHELL_SIGMA) ** 2)
  img = img * (1 - _VESICLE_DARKNESS * jnp.where(jnp.isfinite(vq), shell, 0.0))
  return img, dist, cell_id


def make_stack(config: SyntheticConfig | None = None, *, progress: bool = True) -> SyntheticStack:
  """Renders a synthetic EM stack.

  Args:
    config: `SyntheticConfig`; defaults give 20 sections of 448² px.
    progress: show a tqdm bar over sections.
  Returns:
    `SyntheticStack(images [Z, H, W] float32 in [floor, 1], membranes [Z, H, W] bool,
    cells [Z, H, W] int32)`.
  """
  c = config or SyntheticConfig()
  _check_config(c)
  # seed and depth never change shapes: keep them out of the static config so every stack of
  # one section size reuses the same compiled functions
  static = dataclasses.replace(c, seed=0, sections=0)
  params = _params(c)
  noise_rng = np.random.default_rng([c.seed, 1])

  images, membranes, cells = [], [], []
  for z in tqdm(range(c.sections), desc="synthetic EM", unit="section", disable=not progress):
    img, dist, cell = _render(params, np.float32(z), static)
    noise = noise_rng.standard_normal((2, c.size, c.size), dtype=np.float32)
    images.append(np.asarray(_finish(img, noise, static)))
    membranes.append(np.asarray(dist < _MEMBRANE_LABEL_SIGMAS * c.membrane_width))
    cells.append(np.asarray(cell))
  return SyntheticStack(np.stack(images).astype(np.float32), np.stack(membranes), np.stack(cells))


@functools.partial(jax.jit, static_argnums=2)
def _finish(img: jax.Array, noise: jax.Array, c: SyntheticConfig) -> jax.Array:
  """Texture, point-spread blur, noise and clipping of one rendered section.

  Args:
    img: `[H, W] float32` noiseless section.
    noise: `[2, H, W] float32` standard normal draws (texture, sensor noise).
  Returns:
    `[H, W] float32` in `[floor, 1]`.
  """
  texture = gaussian_blur(noise[0], c.texture_sigma)
  # blurring white noise shrinks its std by ~2·sqrt(pi)·sigma; undo that so amplitude is the std
  texture = texture * (2 * math.sqrt(math.pi) * max(c.texture_sigma, 0.5))
  img = img * (1 + c.texture_amplitude * texture)
  img = gaussian_blur(img, c.blur_sigma) + c.noise_sigma * noise[1]
  return jnp.clip(img, c.floor, 1.0)

