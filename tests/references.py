"""Shared test references: what more than one test file uses, in one place (test files import from
here rather than from one another).

* Independent float64 references of the kernels (SciPy): `reference_warp`, `compose_ref`, and
  `smooth_field` (random smooth fields).
* Block/stack alignment fixtures: translated texture stacks (`texture_stack`, `random_shifts`,
  `expected_fields`) and a fast exact aligner (`phase_aligner`). The stand-in aligner is FFT
  cross-correlation: for integer translations between textured images it returns the exact shift as
  a constant field, so block/stack logic can be tested against closed-form expectations without the
  (slow) Online Field Finetuner.

Only NumPy, SciPy and JAX here (no jaxalign model code): worker processes of the distributed tests
import this module to unpickle `phase_aligner`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage


def texture_stack(shifts, size: int = 64, *, seed: int = 0, change: float = 0.3, margin: int = 40,
                  smooth: float = 1.5) -> np.ndarray:
  """`[Z, size, size]` float32 sections: crops of one slowly changing texture at offsets `shifts`.

  Section z is `T_z(r + shifts[z])` (crop origin at margin + shift), values in ~[0.5, 1.5] (never 0).
  Aligning section z into section 0's frame therefore needs the constant field `shifts[0] - shifts[z]`.
  """
  shifts = np.asarray(shifts, int)
  rng = np.random.default_rng(seed)
  big = size + 2 * margin
  base = ndimage.gaussian_filter(rng.standard_normal((big, big)), smooth)
  base /= base.std()
  out = []
  for z, (dy, dx) in enumerate(shifts):
    var = ndimage.gaussian_filter(rng.standard_normal((big, big)), smooth)
    tex = base + change * var / var.std()
    y0, x0 = margin + dy, margin + dx
    out.append(tex[y0:y0 + size, x0:x0 + size])
  out = np.stack(out)
  return (1.0 + 0.2 * (out - out.mean()) / out.std()).astype(np.float32)


@jax.jit
def _phase_shift(src: jax.Array, tgt: jax.Array) -> jax.Array:
  """Integer shift d `[2]` maximising sum_r tgt(r) src(r + d) (cross-correlation of mean-free data).

  Plain (unwhitened) correlation: whitening amplifies the non-periodic crop edges on small images."""
  def prep(x):
    m = x != 0
    mean = jnp.where(m, x, 0).sum() / jnp.maximum(m.sum(), 1)
    return jnp.where(m, x - mean, 0.0)
  s, t = prep(src), prep(tgt)
  cross = jnp.conj(jnp.fft.fft2(t)) * jnp.fft.fft2(s)
  corr = jnp.real(jnp.fft.ifft2(cross))
  h, w = src.shape
  i = jnp.argmax(corr)
  dy, dx = i // w, i % w
  dy = jnp.where(dy > h // 2, dy - h, dy)
  dx = jnp.where(dx > w // 2, dx - w, dx)
  return jnp.stack([dy, dx]).astype(jnp.float32)


_batch_shift = jax.jit(jax.vmap(_phase_shift))


def phase_aligner(srcs, tgts, *, src_defects=None, tgt_defects=None, init_fields=None):
  """Batched pair aligner (block protocol): constant integer-translation fields `[B, H, W, 2]`."""
  srcs = jnp.asarray(srcs, jnp.float32)
  tgts = jnp.asarray(tgts, jnp.float32)
  if src_defects is not None:
    srcs = jnp.where(jnp.asarray(src_defects), 0.0, srcs)
  if tgt_defects is not None:
    tgts = jnp.where(jnp.asarray(tgt_defects), 0.0, tgts)
  d = _batch_shift(srcs, tgts)  # [B, 2]
  return jnp.broadcast_to(d[:, None, None, :], srcs.shape + (2,))


def expected_fields(shifts, size: int) -> np.ndarray:
  """float64 `[Z, size, size, 2]`: the exact fields into section 0's frame, shifts[0] - shifts[z]."""
  shifts = np.asarray(shifts, np.float64)
  d = shifts[0][None] - shifts
  return np.broadcast_to(d[:, None, None, :], (len(shifts), size, size, 2)).copy()


def random_shifts(z: int, *, seed: int = 1, step: int = 3, limit: int = 12) -> np.ndarray:
  """`[Z, 2]` int random-walk section offsets, |offset| <= limit."""
  rng = np.random.default_rng(seed)
  out = [np.zeros(2, int)]
  for _ in range(z - 1):
    out.append(np.clip(out[-1] + rng.integers(-step, step + 1, 2), -limit, limit))
  return np.stack(out)


# ----------------------------------------------------------------------------------- kernel references

def smooth_field(rng, shape, amplitude, sigma):
  """Random smooth field [H, W, 2], max |component| = amplitude px (float64)."""
  f = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap") for _ in range(2)], -1)
  return f / np.abs(f).max() * amplitude


def reference_warp(img, field, order=1, cval=0.0):
  """Independent reference: scipy map_coordinates in float64 (grid-constant = blend to cval)."""
  h, w = img.shape
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  coords = [yy + field[..., 0], xx + field[..., 1]]
  mode = "grid-constant" if order == 1 else "mirror"
  return ndimage.map_coordinates(img.astype(np.float64), coords, order=order, mode=mode, cval=cval)


def compose_ref(a, b):
  """float64 c(r) = b(r) + a(r + b(r)), a bilinear and clamped at the border (SciPy)."""
  h, w = a.shape[:2]
  yy, xx = np.mgrid[:h, :w].astype(np.float64)
  coords = [yy + b[..., 0], xx + b[..., 1]]
  a_at = np.stack([ndimage.map_coordinates(a[..., c], coords, order=1, mode="nearest") for c in range(2)], -1)
  return b + a_at
