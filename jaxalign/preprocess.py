"""Per-section preprocessing: masking and normalisation that ignore 'no data' (zero) pixels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keeps normalisation finite on flat (zero-variance) sections.
NORMALIZE_EPS = 1e-6
# Stand-in for a normalised value of exactly 0 on tissue (0 is reserved for "no data").
TISSUE_AT_MEAN = 1e-6


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
