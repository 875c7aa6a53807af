"""Losses on fields and images: elastic (spring) regulariser, masked mean and masked MSE.

The elastic energy follows SEAMLeSS/metroem's spring mesh: every pixel is joined to its 8
neighbours by springs of rest length 1 (edges) and sqrt(2) (diagonals). A field moves pixel p to
p + u(p); a spring p-q stretched to length L stores (L - rest)^2. The energy is zero for any rigid
motion (translation, rotation) and positive for shear and scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Offsets of the four spring directions; the other four are the same springs seen from the
# other end, so each spring is counted once per endpoint with half its energy.
SPRING_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))
# Keeps the spring-length sqrt differentiable when two pixels land on the same point.
_LENGTH_EPS = 1e-12


def shifted(x: jax.Array, dy: int, dx: int, axis_y: int, fill: float = 0.0) -> jax.Array:
  """`out[..., i, j, ...] = x[..., i + dy, j + dx, ...]`, `fill` outside; `axis_y` is the H axis."""
  axis_x = axis_y + 1
  h, w = x.shape[axis_y], x.shape[axis_x]
  pad = [(0, 0)] * x.ndim
  pad[axis_y] = (max(-dy, 0), max(dy, 0))
  pad[axis_x] = (max(-dx, 0), max(dx, 0))
  xp = jnp.pad(x, pad, constant_values=fill)
  start_y = max(dy, 0)
  start_x = max(dx, 0)
  xp = jax.lax.slice_in_dim(xp, start_y, start_y + h, axis=axis_y)
  return jax.lax.slice_in_dim(xp, start_x, start_x + w, axis=axis_x)


@jax.jit
def elastic_energy(field: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Per-pixel spring energy of a displacement field.

  energy[p] = 1/2 * sum over the 8 neighbours q of p inside the image of
              m(p) m(q) (|q - p + u(q) - u(p)| - |q - p|)^2

  Args:
    field: `[..., H, W, 2]` float32, pixels, (dy, dx).
    mask: optional `[..., H, W]` bool or float weights: where the regulariser applies. A spring
      counts only when both ends are in the mask, so the field may tear at masked pixels
      (defects) and masked pixels carry no energy.
  Returns:
    `[..., H, W]` float32 energy, px^2.
  """
  field = field.astype(jnp.float32)
  m = jnp.ones(field.shape[:-1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  m = jnp.broadcast_to(m, field.shape[:-1])
  axis_y = field.ndim - 3
  energy = jnp.zeros(field.shape[:-1], jnp.float32)
  for dy, dx in SPRING_OFFSETS:
    rest = jnp.sqrt(jnp.float32(dy * dy + dx * dx))
    neighbour = shifted(field, dy, dx, axis_y)
    # Zero-padded mask also removes springs that leave the image.
    weight = m * shifted(m, dy, dx, axis_y)
    vec = neighbour - field + jnp.array([dy, dx], jnp.float32)
    length = jnp.sqrt(jnp.sum(vec * vec, axis=-1) + _LENGTH_EPS)
    spring = weight * (length - rest) ** 2
    # Half to each endpoint: p gets it here, q = p + offset gets it via the reverse shift.
    energy = energy + 0.5 * spring + 0.5 * shifted(spring, -dy, -dx, axis_y)
  return energy


@jax.jit
def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Weighted mean of `x` `[...]` (any units, e.g. squared intensity per pixel) over all axes; `mask`
  (bool or weights) broadcasts to `x`. Scalar.

  An all-zero mask gives 0 (not NaN) so optimisation on empty regions stays finite.
  """
  x = jnp.asarray(x, jnp.float32)
  if mask is None:
    return x.mean()
  m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1e-12)


@jax.jit
def elastic_loss(field: jax.Array, mask: jax.Array | None = None,
                 spring_weights: jax.Array | None = None) -> jax.Array:
  """Masked mean spring energy (scalar, px^2) of `field [..., H, W, 2]` over pixels in `mask [..., H, W]`.

  Equals `sum(elastic_energy(field, mask)) / sum(mask)` for a 0/1 mask, computed spring by spring
  on overlapping slices (no per-pixel map, no padding): this is the finetuner's inner loop.

  Args:
    field: `[..., H, W, 2]` float32, pixels, (dy, dx).
    mask: optional `[..., H, W]` per-pixel weights (a spring counts with the product of its ends').
    spring_weights: optional `[..., H, W, 4]` per-spring weights: entry k at p weighs the spring from
      p to p + `SPRING_OFFSETS[k]` (entries whose neighbour is outside the image are ignored). This is
      how a tear is cut one spring wide (see `jaxalign.ops.tears`), instead of freeing whole pixels.
  """
  field = field.astype(jnp.float32)
  h, w = field.shape[-3:-1]
  m = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, jnp.float32), field.shape[:-1])
  sw = None if spring_weights is None else jnp.broadcast_to(
      jnp.asarray(spring_weights, jnp.float32), field.shape[:-1] + (len(SPRING_OFFSETS),))
  total = jnp.zeros(field.shape[:-3], jnp.float32)
  for k, (dy, dx) in enumerate(SPRING_OFFSETS):
    rest = float(np.hypot(dy, dx))
    x0, x1 = max(0, -dx), w - max(0, dx)
    p = field[..., 0:h - dy, x0:x1, :]
    q = field[..., dy:h, x0 + dx:x1 + dx, :]
    vy = q[..., 0] - p[..., 0] + dy
    vx = q[..., 1] - p[..., 1] + dx
    spring = (jnp.sqrt(vy * vy + vx * vx + _LENGTH_EPS) - rest) ** 2
    if m is not None:
      spring = spring * m[..., 0:h - dy, x0:x1] * m[..., dy:h, x0 + dx:x1 + dx]
    if sw is not None:
      spring = spring * sw[..., 0:h - dy, x0:x1, k]
    total = total + spring.sum(axis=(-2, -1))
  count = jnp.float32(h * w) if m is None else jnp.maximum(m.sum(axis=(-2, -1)), 1e-12)
  return (total / count).mean()


@jax.jit
def masked_mse(a: jax.Array, b: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean squared difference over pixels in `mask` (scalar).

  Args:
    a, b: `[..., H, W]` images or channels-last `[..., H, W, C]` encodings (channels averaged).
    mask: optional `[..., H, W]` bool or float weights.
  """
  sq = (jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2
  if mask is not None and sq.ndim == jnp.ndim(mask) + 1:
    sq = sq.mean(axis=-1)
  return masked_mean(sq, mask)
