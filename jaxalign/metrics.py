"""Alignment quality: chunked Pearson correlation (CPC) and the low-CPC fraction."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def low_cpc_fraction(cpc_map: jax.Array, threshold: float = LOW_CPC_THRESHOLD) -> float:
  """Fraction of scored (non-NaN) chunks with CPC < threshold; NaN if no chunk was scored."""
  c = jnp.asarray(cpc_map)
  scored = ~jnp.isnan(c)
  n = int(scored.sum())
  if n == 0:
    return float("nan")
  return float(jnp.sum(scored & (c < threshold)) / n)
