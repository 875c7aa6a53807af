"""Displacement-field kernels: warp, compose, invert, resampling between MIP levels, blurs.

Conventions (../shared/DESIGN.md §1):
  * image: float32 `[..., H, W]` (or channels-last `[..., H, W, C]` encodings); 0 means no data.
  * field: float32 `[..., H, W, 2]`, pixels of its own level, components (dy, dx), pull semantics:
    `warp(M, u)[i, j] = M(i + u[i, j, 0], j + u[i, j, 1])`, bilinear, pixel centres at integer
    coordinates, outside the image = `fill`.
  * `compose(a, b)` is `c` with `warp(warp(M, a), b) == warp(M, c)`: `c(r) = b(r) + a(r + b(r))`.
  * Level k+1 is 2x coarser: fields are 2x2-averaged and halved going down, bilinearly
    upsampled and doubled going up.

Every kernel is a pure function, jit-compiled at the boundary, vmappable and differentiable.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxalign.errors import InputError

# Gaussian kernels are truncated at this many standard deviations.
GAUSSIAN_TRUNCATE = 3.0
# Fixed-point iterations of `invert`; contraction rate is the field's gradient norm, so 30 steps
# bring a smooth field (|grad| <~ 0.3) far below 1e-3 px.
INVERT_ITERATIONS = 30
# A bilinear sample of a {0, 1} data mask counts as "has data" only above this (all four taps valid);
# float32 rounding of the bilinear weights keeps a fully valid sample a hair below 1.
FULL_SUPPORT = 0.999


def _flatten_leading(x: jax.Array, core_ndim: int):
  """Reshapes `[..., *core]` to `[B, *core]`; returns the array and the leading shape."""
  lead = x.shape[:x.ndim - core_ndim]
  return x.reshape((-1,) + x.shape[x.ndim - core_ndim:]), lead


# Up to this many channels are gathered one 1-D gather per channel (several times faster on CPU
# than gathering rows of a [N, C] array); wider encodings gather whole rows.
_PER_CHANNEL_GATHER_MAX = 4


def _gather(flat: jax.Array, idx: jax.Array) -> jax.Array:
  """`flat [N, C]` rows at in-bounds `idx [...]` -> `[..., C]`."""
  c = flat.shape[-1]
  if c <= _PER_CHANNEL_GATHER_MAX:
    return jnp.stack([flat[:, k][idx] for k in range(c)], axis=-1)
  return flat.at[idx].get(mode="promise_in_bounds")


def _sample_bilinear(images: jax.Array, y: jax.Array, x: jax.Array, *, fill: float | jax.Array,
                     clamp: bool) -> jax.Array:
  """Bilinear sampling of a batch of channels-last images at arbitrary coordinates.

  Args:
    images: `[B, H, W, C]` float32.
    y, x: `[B, ...]` float32, absolute sample positions (pixels) in image b.
    fill: value of the image outside `[0, H-1] x [0, W-1]` (ignored when `clamp`).
    clamp: if True, coordinates are clamped to the image (border replicated) instead of filled.
  Returns:
    `[B, ..., C]` float32.
  """
  nb, h, w, c = images.shape
  if clamp:
    y = jnp.clip(y, 0.0, h - 1.0)
    x = jnp.clip(x, 0.0, w - 1.0)
    pad_before, pad_after = 0, 1
  else:
    # One ring of `fill` before and two after: clamping coordinates to [-1, n] then reads fill
    # for every corner outside the image with the correct weights, so no per-corner masks.
    y = jnp.clip(y, -1.0, float(h))
    x = jnp.clip(x, -1.0, float(w))
    pad_before, pad_after = 1, 2
  hp, wp = h + pad_before + pad_after, w + pad_before + pad_after
  y0 = jnp.floor(y)
  x0 = jnp.floor(x)
  wy = y - y0
  wx = x - x0
  # One flat gather over the whole batch: image b starts at b * hp * wp.
  batch_start = (jnp.arange(nb, dtype=jnp.int32) * (hp * wp)).reshape((nb,) + (1,) * (y.ndim - 1))
  base = batch_start + (y0.astype(jnp.int32) + pad_before) * wp + (x0.astype(jnp.int32) + pad_before)

  def sample_plane(plane):  # [B, H, W] -> [B, ...]; 1-D gathers are fastest on CPU
    pad = ((0, 0), (pad_before, pad_after), (pad_before, pad_after))
    padded = jnp.pad(plane, pad, mode="edge") if clamp else jnp.pad(plane, pad, constant_values=fill)
    flat = padded.reshape(-1)
    v00, v01, v10, v11 = flat[base], flat[base + 1], flat[base + wp], flat[base + wp + 1]
    top = v00 + (v01 - v00) * wx
    bottom = v10 + (v11 - v10) * wx
    return top + (bottom - top) * wy

  if c == 1:
    return sample_plane(images[..., 0])[..., None]
  if c <= _PER_CHANNEL_GATHER_MAX:
    return jnp.stack([sample_plane(images[..., k]) for k in range(c)], axis=-1)
  pad = ((0, 0), (pad_before, pad_after), (pad_before, pad_after), (0, 0))
  padded = jnp.pad(images, pad, mode="edge") if clamp else jnp.pad(images, pad, constant_values=fill)
  flat = padded.reshape(-1, c)
  take = lambda idx: flat.at[idx].get(mode="promise_in_bounds")
  v00, v01, v10, v11 = take(base), take(base + 1), take(base + wp), take(base + wp + 1)
  top = v00 + (v01 - v00) * wx[..., None]
  bottom = v10 + (v11 - v10) * wx[..., None]
  return top + (bottom - top) * wy[..., None]


def _sample_nearest(images: jax.Array, coords: jax.Array, *, fill) -> jax.Array:
  """Nearest-neighbour sampling; `images [B, H, W, C]`, `coords [B, ..., 2]` (y, x) px -> `[B, ..., C]`."""
  nb, h, w, c = images.shape
  yi = jnp.floor(coords[..., 0] + 0.5).astype(jnp.int32)
  xi = jnp.floor(coords[..., 1] + 0.5).astype(jnp.int32)
  inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
  batch_start = (jnp.arange(nb, dtype=jnp.int32) * (h * w)).reshape((nb,) + (1,) * (yi.ndim - 1))
  idx = batch_start + jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
  vals = _gather(images.reshape(-1, c), idx)
  return jnp.where(inside[..., None], vals, fill)


def _grid(h: int, w: int) -> jax.Array:
  """`[H, W, 2]` float32 absolute (y, x) pixel coordinates."""
  return jnp.stack(_grid_yx(h, w), axis=-1)


def _grid_yx(h: int, w: int) -> tuple[jax.Array, jax.Array]:
  """Two `[H, W]` float32 arrays: the row and column coordinate of every pixel."""
  return tuple(jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                            indexing="ij"))


def sample(image: jax.Array, points: jax.Array, *, fill: float | jax.Array = 0.0) -> jax.Array:
  """Bilinear samples of `image` at arbitrary points, with `warp`'s interpolation (same values:
  `warp(image, field)[i, j] == sample(image, [i, j] + field[i, j])`).

  Args:
    image: `[H, W]` or channels-last `[H, W, C]` float32.
    points: `[..., 2]` float32 absolute (y, x) positions, pixels.
    fill: value outside the image (0 = no data).
  Returns:
    `[...]` (or `[..., C]`) float32.
  """
  channels_last = image.ndim == 3
  img = (image if channels_last else image[..., None])[None].astype(jnp.float32)
  pts = points.astype(jnp.float32)[None]
  out = _sample_bilinear(img, pts[..., 0], pts[..., 1], fill=jnp.asarray(fill, jnp.float32), clamp=False)[0]
  return out if channels_last else out[..., 0]


@functools.partial(jax.jit, static_argnames=("mode",))
def warp(image: jax.Array, field: jax.Array, *, mode: str = "bilinear",
         fill: float | jax.Array = 0.0) -> jax.Array:
  """Pulls `image` through `field`: `out[i, j] = image(i + field[i, j, 0], j + field[i, j, 1])`.

  Args:
    image: `[..., H, W]` float32 (then `image.ndim == field.ndim - 1`), or channels-last
      `[..., H, W, C]` (then `image.ndim == field.ndim`). Leading dims equal the field's.
    field: `[..., H, W, 2]` float32, pixels, (dy, dx).
    mode: "bilinear" (blends towards `fill` across the border, like scipy
      `map_coordinates(order=1, mode="grid-constant")`) or "nearest".
    fill: value outside the image (0 = no data).
  Returns:
    Warped image with the shape of `image`, float32.
  """
  if field.shape[-1] != 2:
    raise InputError(f"field must have shape [..., H, W, 2], got {field.shape}")
  channels_last = image.ndim == field.ndim
  if not channels_last and image.ndim != field.ndim - 1:
    raise InputError(f"image shape {image.shape} does not fit field shape {field.shape}")
  img = image if channels_last else image[..., None]
  if img.shape[:-1] != field.shape[:-1]:
    raise InputError(f"image shape {image.shape} does not match field shape {field.shape}")
  if mode not in ("bilinear", "nearest"):
    raise InputError(f"warp mode must be 'bilinear' or 'nearest', got {mode!r}")
  img_b, lead = _flatten_leading(img.astype(jnp.float32), 3)
  fld_b, _ = _flatten_leading(field.astype(jnp.float32), 3)
  h, w = fld_b.shape[1:3]
  fill = jnp.asarray(fill, jnp.float32)
  if mode == "nearest":
    out = _sample_nearest(img_b, _grid(h, w) + fld_b, fill=fill)
  else:
    yy, xx = _grid_yx(h, w)
    out = _sample_bilinear(img_b, yy + fld_b[..., 0], xx + fld_b[..., 1], fill=fill, clamp=False)
  out = out.reshape(lead + img.shape[-3:])
  return out if channels_last else out[..., 0]


@jax.jit
def compose(a: jax.Array, b: jax.Array) -> jax.Array:
  """Composition `c(r) = b(r) + a(r + b(r))` so that `warp(warp(M, a), b) == warp(M, c)`.

  Args:
    a: `[..., H, W, 2]` float32, pixels, (dy, dx): the field applied first.
    b: `[..., H, W, 2]` float32, pixels, (dy, dx): the field applied second.
  Returns:
    `[..., H, W, 2]` float32; `a` is sampled bilinearly with coordinates clamped to the border.
  """
  if a.shape != b.shape or a.shape[-1] != 2:
    raise InputError(f"compose needs two fields of equal shape [..., H, W, 2], got {a.shape} and {b.shape}")
  a_b, lead = _flatten_leading(a.astype(jnp.float32), 3)
  b_b, _ = _flatten_leading(b.astype(jnp.float32), 3)
  yy, xx = _grid_yx(*a.shape[-3:-1])
  sampled = _sample_bilinear(a_b, yy + b_b[..., 0], xx + b_b[..., 1], fill=0.0, clamp=True)
  return (b_b + sampled).reshape(a.shape)


@functools.partial(jax.jit, static_argnames=("iterations",))
def invert(field: jax.Array, *, iterations: int = INVERT_ITERATIONS) -> jax.Array:
  """Approximate inverse `g` with `compose(field, g) ≈ 0` (so `warp(warp(M, field), g) ≈ M`).

  Solves `g(r) = -field(r + g(r))` by fixed-point iteration; converges where the field's
  Jacobian has norm < 1 (any smooth, folding-free field).

  Args:
    field: `[..., H, W, 2]` float32, pixels, (dy, dx).
    iterations: fixed-point steps (static: it fixes the unrolled loop structure for autodiff).
  Returns:
    `[..., H, W, 2]` float32 inverse field.
  """
  f_b, _ = _flatten_leading(field.astype(jnp.float32), 3)
  yy, xx = _grid_yx(*field.shape[-3:-1])

  def step(_, g):
    return -_sample_bilinear(f_b, yy + g[..., 0], xx + g[..., 1], fill=0.0, clamp=True)

  return jax.lax.fori_loop(0, iterations, step, -f_b).reshape(field.shape)


def identity(shape) -> jax.Array:
  """Zero field for images of `shape = (..., H, W)`: `[..., H, W, 2]` float32."""
  return jnp.zeros(tuple(shape) + (2,), jnp.float32)


@functools.partial(jax.jit, static_argnames=("shape",))
def from_affine(matrix: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Field of an affine map given in (y, x) pixel coordinates.

  Args:
    matrix: `[2, 3]` float32: the sample point of output pixel (y, x) is
      `(y', x') = matrix @ (y, x, 1)`.
    shape: (H, W).
  Returns:
    `[H, W, 2]` float32 field `(y' - y, x' - x)`, pixels, (dy, dx).
  """
  matrix = jnp.asarray(matrix, jnp.float32)
  if matrix.shape != (2, 3):
    raise InputError(f"affine matrix must be [2, 3] in (y, x) pixel coordinates, got {matrix.shape}")
  grid = _grid(*shape)
  homog = jnp.concatenate([grid, jnp.ones(grid.shape[:-1] + (1,), jnp.float32)], axis=-1)
  return homog @ matrix.T - grid


def _check_even(shape, what: str) -> None:
  h, w = shape
  if h % 2 or w % 2:
    raise InputError(f"{what}: spatial size {h}x{w} must be even to go one MIP level down "
                     "(pad to a multiple of 2**levels first)")


@functools.partial(jax.jit, static_argnames=("reduce",))
def downsample_image(image: jax.Array, *, reduce: str = "mean") -> jax.Array:
  """One MIP level down: `[..., H, W]` -> `[..., H/2, W/2]` by 2x2 mean, max or min (each output pixel
  covers 2x2 input pixels: twice the nm per px).

  Images use "mean", defect masks "max", tissue masks "min" (DESIGN.md §1).
  """
  _check_even(image.shape[-2:], "downsample_image")
  h, w = image.shape[-2:]
  blocks = image.reshape(image.shape[:-2] + (h // 2, 2, w // 2, 2))
  if reduce == "mean":
    return blocks.mean(axis=(-3, -1))
  if reduce == "max":
    return blocks.max(axis=(-3, -1))
  if reduce == "min":
    return blocks.min(axis=(-3, -1))
  raise InputError(f"reduce must be 'mean', 'max' or 'min', got {reduce!r}")


@jax.jit
def downsample_field(field: jax.Array) -> jax.Array:
  """One MIP level down: `[..., H, W, 2]` -> `[..., H/2, W/2, 2]`, 2x2 mean times 0.5 (px of level k+1)."""
  _check_even(field.shape[-3:-1], "downsample_field")
  h, w = field.shape[-3:-1]
  blocks = field.reshape(field.shape[:-3] + (h // 2, 2, w // 2, 2, 2))
  return 0.5 * blocks.mean(axis=(-4, -2))


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
  """Doubles `axis` by linear interpolation with half-pixel centres (fine j <- coarse (j - 0.5) / 2)."""
  n = x.shape[axis]
  fine = jnp.arange(2 * n, dtype=jnp.float32)
  pos = jnp.clip((fine - 0.5) / 2.0, 0.0, n - 1.0)
  i0 = jnp.floor(pos).astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, n - 1)
  t = pos - i0
  shape = [1] * x.ndim
  shape[axis] = 2 * n
  t = t.reshape(shape)
  return jnp.take(x, i0, axis=axis) * (1 - t) + jnp.take(x, i1, axis=axis) * t


@jax.jit
def upsample_image(image: jax.Array) -> jax.Array:
  """One MIP level up: `[..., H, W]` -> `[..., 2H, 2W]`, bilinear with half-pixel centres, edges clamped."""
  return _upsample_axis(_upsample_axis(image, image.ndim - 2), image.ndim - 1)


@jax.jit
def upsample_field(field: jax.Array) -> jax.Array:
  """One MIP level up: `[..., H, W, 2]` -> `[..., 2H, 2W, 2]`, bilinear, times 2 (px of level k-1)."""
  return 2.0 * _upsample_axis(_upsample_axis(field, field.ndim - 3), field.ndim - 2)


def level_nearest(pixel_nm: float, target_nm: float) -> int:
  """MIP level whose pixel (2**level * `pixel_nm`, nm) is nearest `target_nm` on a log scale; 0 when
  `target_nm` is 0 or finer than the pixel (DESIGN.md §1: level k is 2**k coarser)."""
  if target_nm <= 0:
    return 0
  return max(0, int(round(math.log2(target_nm / pixel_nm))))


def pyramid(image: jax.Array, levels: int, *, reduce: str = "mean") -> list[jax.Array]:
  """MIP pyramid `[level 0 = image, level 1, ..., level levels-1]`, each `[..., H/2^k, W/2^k]`
  (level k: 2^k times the input's nm per px).

  Args:
    image: `[..., H, W]` float32 (H, W divisible by 2**(levels-1)).
    levels: number of levels returned (>= 1).
    reduce: "mean" for images, "max" for defect masks, "min" for tissue masks.
  """
  if levels < 1:
    raise InputError(f"pyramid needs levels >= 1, got {levels}")
  out = [jnp.asarray(image)]
  for _ in range(levels - 1):
    out.append(downsample_image(out[-1], reduce=reduce))
  return out


def gaussian_kernel(sigma: float) -> jax.Array:
  """Normalised 1-D Gaussian taps `[2r+1]`, r = ceil(GAUSSIAN_TRUNCATE * sigma)."""
  radius = max(1, int(math.ceil(GAUSSIAN_TRUNCATE * sigma)))
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


@functools.partial(jax.jit, static_argnames=("sigma", "border"))
def gaussian_blur(image: jax.Array, sigma: float, *, border: str = "reflect") -> jax.Array:
  """Separable Gaussian blur over the last two axes, reflect-padded.

  Args:
    image: `[..., H, W]` float32.
    sigma: standard deviation in pixels (static: it fixes the kernel size); 0 returns the input.
    border: "reflect" (even: mirror the values) or "odd" (point-symmetric about the border pixel:
      continues the local slope, so a linear ramp, e.g. an affine field, is blurred into itself
      up to the border). Static.
  Returns:
    `[..., H, W]` float32.
  """
  if sigma <= 0:
    return image
  k = gaussian_kernel(sigma)
  r = (k.shape[0] - 1) // 2
  x, lead = _flatten_leading(image.astype(jnp.float32), 2)
  h, w = x.shape[1:]
  if border == "odd":
    x = jnp.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect", reflect_type="odd")
  else:
    # Reflect padding needs r < size; fall back to edge replication for tiny images.
    pad_mode = "reflect" if r < min(h, w) else "edge"
    x = jnp.pad(x, ((0, 0), (r, r), (r, r)), mode=pad_mode)
  # Weighted sums of shifted slices rather than lax.conv: XLA:CPU (jaxlib 0.10) intermittently
  # crashes on convolutions inside while loops, and blurs run inside the finetuner's loop.
  x = sum(k[t] * x[:, t:t + h, :] for t in range(2 * r + 1))
  x = sum(k[t] * x[:, :, t:t + w] for t in range(2 * r + 1))
  return x.reshape(lead + (h, w))


@functools.partial(jax.jit, static_argnames=("sigma", "border"))
def blur_field(field: jax.Array, sigma: float, *, border: str = "reflect") -> jax.Array:
  """Gaussian blur of each component of `[..., H, W, 2]` over (H, W); sigma in pixels and `border`
  as `gaussian_blur` (static)."""
  return jnp.moveaxis(gaussian_blur(jnp.moveaxis(field, -1, 0), sigma, border=border), 0, -1)


# --------------------------------------------------------------------------- median filter


def _batcher_comparators(n: int) -> list[tuple[int, int]]:
  """Batcher's odd-even merge sort network on `n` (a power of two) wires, as (low, high) wire pairs."""
  pairs = []
  p = 1
  while p < n:
    k = p
    while k >= 1:
      for j in range(k % p, n - k, 2 * k):
        for i in range(min(k, n - j - k)):
          if (i + j) // (2 * p) == (i + j + k) // (2 * p):
            pairs.append((i + j, i + j + k))
      k //= 2
    p *= 2
  return pairs


@functools.lru_cache(maxsize=None)
def _median_program(size: int) -> tuple[tuple[tuple[int, int, bool, bool], ...], int]:
  """A straight-line program for the median of `size` values: Batcher's network on the next power of
  two, padded with -inf/+inf wires that are resolved here (a comparator against a constant is a
  no-op or a swap), then pruned to what the median depends on.

  Returns `(ops, out)`: values 0..size-1 are the inputs; op k reads values (x, y) and defines value
  `size + 2k` = min (if its flag is set) and `size + 2k + 1` = max (if set); `out` is the median.
  """
  n = 1
  while n < size:
    n *= 2
  low = (n - size) // 2
  lo, hi = -1, -2  # the constant wires
  wires = [lo] * low + list(range(size)) + [hi] * (n - size - low)
  ops = []
  for a, b in _batcher_comparators(n):
    x, y = wires[a], wires[b]
    if x == lo or y == hi:
      continue  # already in order
    if x == hi or y == lo:
      wires[a], wires[b] = y, x
      continue
    v = size + 2 * len(ops)
    ops.append((x, y))
    wires[a], wires[b] = v, v + 1
  out = wires[low + (size - 1) // 2]
  needed, program = {out}, []
  for k in range(len(ops) - 1, -1, -1):
    v = size + 2 * k
    want_min, want_max = v in needed, v + 1 in needed
    if want_min or want_max:
      program.append((k, ops[k][0], ops[k][1], want_min, want_max))
      needed |= set(ops[k])
  program.reverse()
  return tuple(program), out


def _median_along(x: jax.Array, size: int, stride: int, axis: int) -> jax.Array:
  """Running median along `axis` of the taps `-r, -r + stride, ..., r` (r = size // 2; edge-replicated
  borders)."""
  r = size // 2
  length = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (r, r)
  xp = jnp.pad(x, pad, mode="edge")
  taps = range(0, size, stride)
  values = {i: jax.lax.slice_in_dim(xp, t, t + length, axis=axis) for i, t in enumerate(taps)}
  size = len(taps)
  program, out = _median_program(size)
  # Elementwise min/max fuse into a few XLA loops: ~20x faster than jnp.median's sort on CPU.
  for k, i, j, want_min, want_max in program:
    if want_min:
      values[size + 2 * k] = jnp.minimum(values[i], values[j])
    if want_max:
      values[size + 2 * k + 1] = jnp.maximum(values[i], values[j])
  return values[out]


@functools.partial(jax.jit, static_argnames=("size", "stride"))
def median_filter_field(field: jax.Array, size: int, *, stride: int = 1) -> jax.Array:
  """Separable median filter of each component of a field: a running median of `size` pixels along
  x, then along y (an approximation of the 2-D `size`² median), borders edge-replicated.

  A robust smoother: it keeps affine trends and step edges (tears at cracks) but removes compact
  deviations narrower than about half the window, e.g. a neurite that runs obliquely through the
  section and drags the field with it.

  Args:
    field: `[..., H, W, 2]` float32, pixels, (dy, dx).
    size: odd window length in pixels (static: it fixes the shape of the network); 1 returns the input.
    stride: use every `stride`-th pixel of the window (`(size - 1) / 2` must be a multiple of it):
      a wide window at a fraction of the cost, for fields that are smooth at the scale of `stride`.
  Returns:
    `[..., H, W, 2]` float32.
  """
  if size < 1 or size % 2 == 0:
    raise InputError(f"median_filter_field: size must be odd and >= 1, got {size}")
  if stride < 1 or (size // 2) % stride:
    raise InputError(f"median_filter_field: stride {stride} must divide the window radius {size // 2}")
  if size == 1:
    return field
  field = jnp.asarray(field, jnp.float32)
  components = jnp.moveaxis(field, -1, 0)  # [2, ..., H, W]
  h_axis = components.ndim - 3  # within one component

  def one(c):
    return _median_along(_median_along(c, size, stride, h_axis + 1), size, stride, h_axis)

  # One component at a time in a loop: a loop's output is materialised, so XLA cannot fuse the
  # network into a consumer that reads each value several times (an upsampling recomputed it per
  # read: align_pair ran 10x slower); it also halves the peak memory of the network.
  return jnp.moveaxis(jax.lax.map(one, components), 0, -1)
