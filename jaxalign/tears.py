"""Tears: which springs of the elastic regulariser are cut where a field crosses a crack or fold.

Paper: Popovych et al. 2024, Methods "Loss masking" / "Elastic regularizer": the elastic term is
dropped at defects so the field may tear and the tissue on both sides of a crack or fold aligns
independently. Dropping it for whole *pixels* (every spring of every pixel that samples a defect)
leaves a band as wide as the defect with neither data nor springs: those pixels drift, and at coarse
levels, where a crack is thinner than a pixel, nothing is released at all, so the field cannot tear
until the finest levels and large regions fall into local minima.

Here a tear is one spring wide. The source defect mask is turned into a nearest-tissue map (for every
defect pixel, the nearest pixel outside the defect; jump flooding). A spring between neighbouring
target pixels p, q is cut when its source-space segment `p + u(p) -> q + u(q)` crosses a defect's
medial axis, i.e. when the nearest-tissue points of consecutive samples along the segment jump by
more than the step between the samples plus `jump_px`. Springs that only enter a defect from one side
are kept, so defect pixels stay attached to the tissue on their side and follow it. The test samples
the full-resolution mask, so it also cuts at coarse levels where the defect is sub-pixel.

`refine_tears` then moves the tear line to where the images put it (see its docstring).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxalign import fields as _fields
from jaxalign.losses import SPRING_OFFSETS, shifted

# A spring is cut when the nearest-tissue map jumps by this many full-resolution pixels more than the
# spacing of the samples: cracks and folds narrower than ~2 px are bridged (sub-pixel effect on EPE).
TEAR_JUMP_PX = 2.0
# Samples per spring, per full-resolution pixel of rest length: spacing <= 1/2 px at rest.
SAMPLES_PER_PX = 2
# Stands in for "no tissue found yet" in jump flooding (farther than any image side).
_FAR = 1e7


def identity_coordinates(shape) -> jax.Array:
  """`[H, W, 2]` float32 (y, x) of every pixel: `nearest_tissue` of an image without defects."""
  h, w = shape
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  return jnp.stack([yy, xx], -1)


@jax.jit
def nearest_tissue(defects: jax.Array) -> jax.Array:
  """Nearest pixel outside the defect mask, by jump flooding (exact up to rare 1-px ties).

  Args:
    defects: `[H, W]` bool or {0, 1}: cracks / folds.
  Returns:
    `[H, W, 2]` float32 (y, x) pixel coordinates: the pixel itself outside defects, the nearest
    non-defect pixel inside. An image with no non-defect pixel gives `_FAR` everywhere.
  """
  h, w = defects.shape
  own = identity_coordinates((h, w))
  seeds = jnp.where(jnp.asarray(defects)[..., None] > 0, _FAR, own)

  def d2(c):
    return jnp.sum((c - own) ** 2, axis=-1)

  steps = [2 ** k for k in range(max(int(math.ceil(math.log2(max(h, w, 2)))) - 1, 0), -1, -1)] + [1]
  best = seeds
  for step in steps:
    best_d = d2(best)
    for dy in (-step, 0, step):
      for dx in (-step, 0, step):
        if dy == dx == 0:
          continue
        cand = shifted(best, dy, dx, 0, _FAR)
        cd = d2(cand)
        better = cd < best_d
        best = jnp.where(better[..., None], cand, best)
        best_d = jnp.where(better, cd, best_d)
  return best


def spring_pairs(mask: jax.Array) -> jax.Array:
  """`[H, W, 4]` per-spring weights `m(p) * m(p + o_k)` of a per-pixel mask `[H, W]` (0 outside)."""
  m = jnp.asarray(mask, jnp.float32)[..., None]
  return jnp.concatenate([m * shifted(m, dy, dx, 0, 0.0) for dy, dx in SPRING_OFFSETS], -1)


def _gather(nearest: jax.Array, points: jax.Array) -> jax.Array:
  """Nearest-neighbour lookup of `nearest [Hf, Wf, 2]` at `points [..., 2]` (y, x), clamped."""
  hf, wf = nearest.shape[:2]
  iy = jnp.clip(jnp.round(points[..., 0]), 0, hf - 1).astype(jnp.int32)
  ix = jnp.clip(jnp.round(points[..., 1]), 0, wf - 1).astype(jnp.int32)
  return nearest.reshape(-1, 2)[iy * wf + ix]


@functools.partial(jax.jit, static_argnames=("scale",))
def tear_springs(field: jax.Array, nearest: jax.Array, *, scale: int = 1,
                 jump_px: float = TEAR_JUMP_PX) -> jax.Array:
  """Per-spring weights `[H, W, 4]` float32 {0, 1}: 0 where the spring crosses a tear.

  Args:
    field: `[H, W, 2]` float32, pixels of its level (`scale` full-resolution px each), (dy, dx):
      target grid -> source.
    nearest: `[Hf, Wf, 2]` float32 `nearest_tissue` of the full-resolution source defect mask,
      `Hf >= H * scale`.
    scale: full-resolution pixels per pixel of `field` (2**level). Static: it fixes the sample count.
    jump_px: full-resolution px; see `TEAR_JUMP_PX`.
  Returns:
    `[H, W, 4]` weights for the springs p -> p + `SPRING_OFFSETS[k]` (layout of
    `losses.elastic_loss(spring_weights=...)`).
  """
  # Sample point of every target pixel, in full-resolution source coordinates (pixel centres).
  pts = (identity_coordinates(field.shape[:2]) + field.astype(jnp.float32) + 0.5) * scale - 0.5
  samples = SAMPLES_PER_PX * 2 * scale + 1  # diagonal springs are sqrt(2) * scale long at rest
  t = jnp.linspace(0.0, 1.0, samples, dtype=jnp.float32)[:, None]
  weights = []
  for dy, dx in SPRING_OFFSETS:
    q = shifted(pts, dy, dx, 0, 0.0)  # outside the image: irrelevant, those springs do not exist
    seg = pts[..., None, :] * (1.0 - t) + q[..., None, :] * t  # [H, W, S, 2]
    near = _gather(nearest, seg)
    jump = jnp.linalg.norm(near[..., 1:, :] - near[..., :-1, :], axis=-1)
    step = jnp.linalg.norm(seg[..., 1:, :] - seg[..., :-1, :], axis=-1)
    weights.append(jnp.all(jump <= step + jump_px, axis=-1))
  return jnp.stack(weights, -1).astype(jnp.float32)


# --------------------------------------------------------------------------- tear refinement

# Cost per pixel, in units of the normalised images' variance, of sampling no data (a crack gap, a
# fold, outside the section): twice the squared difference expected between unrelated images, so a
# sample on tissue of the right content always wins over a sample in the gap.
GAP_COST = 4.0
# Neighbour directions a displacement can be taken from (8-connected).
_PROPAGATION = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _box_mean(x: jax.Array, radius: int) -> jax.Array:
  """Mean over a (2r+1)² window of `x [H, W]` (zero outside), by cumulative sums (no convolution:
  this runs inside a loop, where jaxlib 0.10's CPU convolution is unreliable)."""
  k = 2 * radius + 1
  p = jnp.pad(x, ((radius + 1, radius), (radius + 1, radius)))
  c = jnp.cumsum(jnp.cumsum(p, axis=0), axis=1)
  s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
  return s / float(k * k)


def _sample_cost(sampled: jax.Array, tgt: jax.Array) -> jax.Array:
  """Per-pixel cost of `sampled [..., 2]` = (source, source valid mask) against `tgt [...]`: squared
  difference where the sample has data, `GAP_COST` where it has none."""
  data = (sampled[..., 1] > _fields.FULL_SUPPORT).astype(jnp.float32)
  return data * (sampled[..., 0] - tgt) ** 2 + GAP_COST * (1.0 - data)


def _patch_cost(field, src_and_valid, tgt, tgt_valid, radius):
  """`[H, W]`: window mean of squared difference (tissue) plus `GAP_COST` where the sample has no data.

  `src_and_valid` is `[H, W, 2]`: the source and its valid mask, warped by one gather."""
  diff = _sample_cost(_fields.warp(src_and_valid, field), tgt)
  return _box_mean(diff * tgt_valid, radius)


# The sparse sweep of `refine_tears` computes costs only on the zone and its cost windows, up to this
# fraction of the image (static: it fixes the length of the pixel list); larger zones sweep densely.
SPARSE_ZONE_FRACTION = 0.25


def refine_tears(field: jax.Array, src: jax.Array, tgt: jax.Array, src_valid: jax.Array, tgt_valid: jax.Array,
                 zone: jax.Array, *, iterations: int, radius: int) -> jax.Array:
  """Moves the tear line to where the images say it is: discrete propagation next to defects.

  Gradient descent cannot decide on which side of a crack a pixel belongs: the two candidate
  displacements are a crack width apart. Here each pixel in `zone` repeatedly compares its displacement
  with its 8 neighbours' (a PatchMatch-style propagation step) by the window cost of `_patch_cost` and
  takes the cheapest, so the correct side's displacement spreads over pixels left on the wrong side,
  one pixel per iteration.

  Args:
    field: `[H, W, 2]` float32 px (dy, dx), tgt grid.
    src, tgt: `[H, W]` float32 normalised images (0 = no data).
    src_valid, tgt_valid: `[H, W]` float32 {0, 1}: data that is not a defect.
    zone: `[H, W]` bool: pixels allowed to change (next to a defect).
    iterations: propagation steps (the widest misplaced band it can fix, px). Static.
    radius: window radius, px. Static.
  Returns:
    `[H, W, 2]` float32 field.
  """
  h, w = zone.shape
  src_and_valid = jnp.stack([src, src_valid], -1).astype(jnp.float32)
  zone = zone.astype(bool)

  # Only zone pixels may change, and their costs only read the pixels of their windows (the ring):
  # while the ring is small (a band along a crack: a few % of the image), costs are computed on a
  # list of its pixels and only the window sums run over the whole image (one sample per ring pixel
  # and candidate instead of one per image pixel).
  ring = _box_mean(zone.astype(jnp.float32), radius) > 0
  capacity = max(1, int(math.ceil(SPARSE_ZONE_FRACTION * h * w)))
  n_ring = jnp.sum(ring)
  flat = jnp.nonzero(ring.reshape(-1), size=capacity, fill_value=0)[0]
  used = (jnp.arange(capacity) < n_ring).astype(jnp.float32)
  ry, rx = flat // w, flat % w
  ring_pts = jnp.stack([ry, rx], -1).astype(jnp.float32)
  ring_tgt = tgt.reshape(-1)[flat]
  ring_weight = tgt_valid.reshape(-1)[flat] * used  # list padding adds 0 (to pixel 0)

  def dense_cost(cand, dy, dx):
    del dy, dx
    return _patch_cost(cand, src_and_valid, tgt, tgt_valid, radius)

  def sparse_cost(f, dy, dx):
    # The candidate at ring pixel p is f(p + (dy, dx)), 0 outside the image (as `shifted`).
    y, x = ry + dy, rx + dx
    inside = ((y >= 0) & (y < h) & (x >= 0) & (x < w))[:, None]
    cand = jnp.where(inside, f.reshape(-1, 2)[jnp.clip(y, 0, h - 1) * w + jnp.clip(x, 0, w - 1)], 0.0)
    diff = _sample_cost(_fields.sample(src_and_valid, ring_pts + cand), ring_tgt)
    dense = jnp.zeros((h * w,), jnp.float32).at[flat].add(diff * ring_weight)
    return _box_mean(dense.reshape(h, w), radius)

  def run(cost_of):
    def step(state):
      i, f, _ = state
      best_f = f
      best_c = cost_of(f, 0, 0)
      changed = jnp.zeros(f.shape[:-1], bool)
      for dy, dx in _PROPAGATION:
        cand = shifted(f, dy, dx, 0, 0.0)
        # Edge pixels would see the zero padding as a candidate: keep only real neighbours.
        inside = shifted(jnp.ones(f.shape[:-1] + (1,), jnp.float32), dy, dx, 0, 0.0)[..., 0] > 0
        c = cost_of(cand if cost_of is dense_cost else f, dy, dx)
        take = zone & inside & (c < best_c)
        best_f = jnp.where(take[..., None], cand, best_f)
        best_c = jnp.where(take, c, best_c)
        changed = changed | take
      return i + 1, best_f, jnp.any(changed)

    # A sweep that changes nothing leaves the next one the same field, so it would change nothing
    # either: stopping there gives the result of all `iterations` sweeps.
    state = (jnp.asarray(0, jnp.int32), field.astype(jnp.float32), jnp.asarray(True))
    return jax.lax.while_loop(lambda s: (s[0] < iterations) & s[2], step, state)[1]

  return jax.lax.cond(n_ring <= capacity, lambda: run(sparse_cost), lambda: run(dense_cost))
