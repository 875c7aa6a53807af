"""Composition with decay (ABCD; Popovych et al. 2024, "Composition with decay").

A stitch field that corrects block N+1 at its interface with block N is applied to the sections
of block N+1 attenuated and low-passed with their distance d (in sections) from the interface:
gain clip(1 - d / decay_distance, 0, 1) and a Gaussian-like blur of sigma = blur_rate * d px,
realised with a field MIP hierarchy (2x2 averages, bilinear back up) and linear interpolation
between levels, i.e. trilinear in (y, x, level).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxalign.ops.fields import downsample_field, upsample_field

DEFAULT_DECAY_DISTANCE = 100.0
DEFAULT_BLUR_RATE = 0.2
# Coarsest hierarchy level: 2**8 = 256 px blocks, beyond any blur reached within decay_distance.
MAX_DECAY_LEVELS = 8


def num_levels(h: int, w: int) -> int:
  """MIP levels of the decay blur hierarchy for an `h` x `w` section (at most `MAX_DECAY_LEVELS`)."""
  return max(0, min(MAX_DECAY_LEVELS, int(math.floor(math.log2(max(1, min(h, w)))))))


def _hierarchy(field: jax.Array) -> jax.Array:
  """`[L+1, H, W, 2]`: the field low-passed at scales 1, 2, 4, ... 2^L px, all at level-0 size."""
  h, w = field.shape[-3:-1]
  levels = num_levels(h, w)
  block = 2 ** levels
  ph, pw = (-h) % block, (-w) % block
  # Edge padding: the field beyond the section continues smoothly rather than dropping to zero.
  padded = jnp.pad(field, ((0, ph), (0, pw), (0, 0)), mode="edge")
  out = [field]
  coarse = padded
  for level in range(1, levels + 1):
    coarse = downsample_field(coarse)
    up = coarse
    for _ in range(level):
      up = upsample_field(up)
    out.append(up[:h, :w])
  return jnp.stack(out)


@jax.jit
def decay_field(field: jax.Array, distance: float | jax.Array, *,
                decay_distance: float | jax.Array = DEFAULT_DECAY_DISTANCE,
                blur_rate: float | jax.Array = DEFAULT_BLUR_RATE) -> jax.Array:
  """The stitch field as seen `distance` sections from the block interface.

  Args:
    field: `[H, W, 2]` float32, pixels, (dy, dx) (vmap for several sections).
    distance: sections from the interface (>= 0; traced, so one compile serves all distances).
    decay_distance: distance at which the field has decayed to zero (paper: 100).
    blur_rate: blur sigma growth, px per section (paper: 0.2).
  Returns:
    `[H, W, 2]` float32: `clip(1 - d/decay_distance, 0, 1) * lowpass_{blur_rate * d}(field)`.
  """
  distance = jnp.maximum(jnp.asarray(distance, jnp.float32), 0.0)
  # (D - d) / D rather than 1 - d / D: exactly 0 at d = D in float32.
  gain = jnp.clip((decay_distance - distance) / decay_distance, 0.0, 1.0)
  hier = _hierarchy(field.astype(jnp.float32))
  top = hier.shape[0] - 1
  # A 2^l-px box average followed by bilinear upsampling acts like a blur of sigma ~ 2^l - 1 px.
  level = jnp.clip(jnp.log2(1.0 + blur_rate * distance), 0.0, float(top))
  lo = jnp.floor(level).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, top)
  t = level - lo
  blurred = hier[lo] * (1.0 - t) + hier[hi] * t
  return gain * blurred
