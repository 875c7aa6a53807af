"""Per-section preprocessing: masking, normalisation and destriping that ignore 'no data' (zero) pixels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Keeps normalisation finite on flat (zero-variance) sections.
NORMALIZE_EPS = 1e-6
# Stand-in for a normalised value of exactly 0 on tissue (0 is reserved for "no data").
TISSUE_AT_MEAN = 1e-6
# Destriping (`destripe`). A spectral bin is a stripe peak where its power exceeds this multiple of
# its neighbourhood's (geometric mean, Gaussian of DESTRIPE_BACKGROUND_SIGMA bins). On the shared EM
# stacks (isbi, gerhard, FIB-SEM, DOLW7; 20 sections, with and without missing-data blobs) one
# gerhard section has 26 bins above it, every other none.
DESTRIPE_PEAK_RATIO = 30.0
DESTRIPE_BACKGROUND_SIGMA = 3.0
# Periods longer than this (px) are tissue-scale structure and are never notched.
DESTRIPE_MAX_PERIOD = 64.0
# Bins notched around each peak: a multiplicative stripe copies the image's (mostly low-frequency)
# spectrum around its frequency, not just one bin.
DESTRIPE_NOTCH_RADIUS = 2


@jax.jit
def apply_mask(image: jax.Array, exclude: jax.Array | None) -> jax.Array:
  """Zeroes pixels to be ignored (defects, non-tissue): `[..., H, W]` -> `[..., H, W]`.

  Args:
    image: `[..., H, W]` float32.
    exclude: `[..., H, W]` bool (True = no data there), or None.
  """
  if exclude is None:
    return image
  return jnp.where(jnp.asarray(exclude, bool), 0.0, image)


@jax.jit
def normalize(image: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Zero-mean, unit-variance over non-zero pixels only; zeros (no data) stay zero.

  Args:
    image: `[H, W]` float32 (vmap for stacks).
    mask: optional `[H, W]` bool of pixels to use (True = tissue); combined with `image != 0`.
  Returns:
    `[H, W]` float32.
  """
  image = jnp.asarray(image, jnp.float32)
  valid = image != 0
  if mask is not None:
    valid = valid & jnp.asarray(mask, bool)
  n = jnp.maximum(valid.sum(), 1)
  mean = jnp.where(valid, image, 0.0).sum() / n
  var = jnp.where(valid, (image - mean) ** 2, 0.0).sum() / n
  out = (image - mean) / jnp.sqrt(var + NORMALIZE_EPS)
  # A tissue pixel that lands exactly on the mean must not turn into "no data" (0).
  out = jnp.where(out == 0, TISSUE_AT_MEAN, out)
  return jnp.where(valid, out, 0.0)


@jax.jit
def preprocess_section(image: jax.Array, defects: jax.Array | None = None,
                       tissue: jax.Array | None = None) -> jax.Array:
  """Masks then normalises one section (DESIGN.md §3 step 1).

  Defect pixels (cracks, folds) and non-tissue pixels are zeroed ("no data"), then the remaining
  non-zero pixels are normalised to zero mean and unit variance; zeros stay zero.

  Args:
    image: `[H, W]` float32 (any intensity scale; 0 = no data).
    defects: optional `[H, W]` bool, True on defects.
    tissue: optional `[H, W]` bool, True on tissue.
  Returns:
    `[H, W]` float32.
  """
  image = jnp.asarray(image, jnp.float32)
  exclude = jnp.zeros(image.shape, bool)
  if defects is not None:
    exclude = exclude | jnp.asarray(defects, bool)
  if tissue is not None:
    exclude = exclude | ~jnp.asarray(tissue, bool)
  return normalize(apply_mask(image, exclude))


@jax.jit
def preprocess_stack(images: jax.Array, defects: jax.Array | None = None,
                     tissue: jax.Array | None = None) -> jax.Array:
  """`preprocess_section` on every section of `[Z, H, W]` (vmapped); masks `[Z, H, W]` bool or None."""
  return jax.vmap(preprocess_section)(images, defects, tissue)


def _periodic_gaussian(x: jax.Array, sigma: float) -> jax.Array:
  """Gaussian blur of `[H, W]` with periodic (wrap-around) borders, by the convolution theorem."""
  h, w = x.shape
  fy = jnp.fft.fftfreq(h)[:, None]
  fx = jnp.fft.fftfreq(w)[None, :]
  kernel = jnp.exp(-2.0 * (jnp.pi * sigma) ** 2 * (fy * fy + fx * fx))
  return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(x) * kernel))


@jax.jit
def destripe(image: jax.Array) -> jax.Array:
  """Removes periodic stripes (knife chatter, scan noise) by notching isolated peaks of the spectrum.

  Stripes are narrow peaks in the power spectrum that tissue does not make: a bin whose power is
  `DESTRIPE_PEAK_RATIO` times that of its neighbourhood, at a period shorter than
  `DESTRIPE_MAX_PERIOD`, is zeroed with `DESTRIPE_NOTCH_RADIUS` bins around it (wrap-around). An image
  without such peaks comes back unchanged (up to FFT rounding, ~1e-6 of its range).

  Args:
    image: `[H, W]` float32, 0 = no data (filled with the tissue mean for the transform and zeroed again).
  Returns:
    `[H, W]` float32.
  """
  image = jnp.asarray(image, jnp.float32)
  valid = image != 0
  mean = jnp.where(valid, image, 0.0).sum() / jnp.maximum(valid.sum(), 1)
  centred = jnp.where(valid, image - mean, 0.0)
  spectrum = jnp.fft.fft2(centred)
  log_power = jnp.log(jnp.abs(spectrum) ** 2 + 1e-20)
  h, w = image.shape
  frequency = jnp.hypot(jnp.fft.fftfreq(h)[:, None], jnp.fft.fftfreq(w)[None, :])
  peaks = (log_power - _periodic_gaussian(log_power, DESTRIPE_BACKGROUND_SIGMA) > jnp.log(DESTRIPE_PEAK_RATIO)) & \
      (frequency > 1.0 / DESTRIPE_MAX_PERIOD)
  r = DESTRIPE_NOTCH_RADIUS
  notch = peaks
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      notch = notch | jnp.roll(peaks, (dy, dx), axis=(0, 1))
  out = jnp.real(jnp.fft.ifft2(jnp.where(notch, 0.0, spectrum))) + mean
  # Keep tissue non-zero: 0 means "no data".
  out = jnp.where(out == 0, TISSUE_AT_MEAN, out)
  return jnp.where(valid, out, 0.0)


def _square_filter(mask: jax.Array, radius: int, init: float, reducer) -> jax.Array:
  """`reducer` (lax.max / lax.min) of `[..., H, W]` over a `(2 radius + 1)^2` square; `init` outside."""
  x = mask.astype(jnp.float32)
  # Separable: a square's max/min is the row window's of the column window's. XLA:CPU reduces the
  # whole (2r+1)² window per pixel otherwise (r = 8 at 512²: 60 ms, most of a tear pair's set-up).
  k = 2 * radius + 1
  lead = (1,) * (x.ndim - 2)
  x = jax.lax.reduce_window(x, init, reducer, lead + (k, 1), (1,) * x.ndim, "SAME")
  return jax.lax.reduce_window(x, init, reducer, lead + (1, k), (1,) * x.ndim, "SAME") > 0.5


@functools.partial(jax.jit, static_argnames=("radius",))
def dilate(mask: jax.Array, radius: int) -> jax.Array:
  """Binary dilation of `[..., H, W]` bool by a `(2 radius + 1)^2` square; returns bool."""
  if radius <= 0:
    return mask.astype(bool)
  return _square_filter(mask, radius, 0.0, jax.lax.max)


@functools.partial(jax.jit, static_argnames=("radius",))
def erode(mask: jax.Array, radius: int) -> jax.Array:
  """Binary erosion of `[..., H, W]` bool by a `(2 radius + 1)^2` square; outside counts as True."""
  if radius <= 0:
    return mask.astype(bool)
  return _square_filter(mask, radius, 1.0, jax.lax.min)
