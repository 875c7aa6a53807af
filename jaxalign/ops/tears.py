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
from jax import lax

from jaxalign.ops import fields as _fields
from jaxalign.ops.losses import SPRING_OFFSETS, shifted

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

  # Steps 2**(n-1), ..., 2, 1, then 1 again (the "+1" pass that mends most ties).
  n = max(int(math.ceil(math.log2(max(h, w, 2)))), 1)
  margin = 2 ** (n - 1)

  def one_step(i, best):
    # A loop over a traced step, not n unrolled passes of 8 shifts: compiling the unrolled version cost
    # 2.6 s at 1000² (most of a pair's tear-code compile time). Shifts are windows of a padded copy.
    step = jnp.left_shift(1, jnp.maximum(n - 1 - i, 0))
    padded = jnp.pad(best, ((margin, margin), (margin, margin), (0, 0)), constant_values=_FAR)
    best_d = d2(best)
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        if dy == dx == 0:
          continue
        cand = lax.dynamic_slice(padded, (margin + dy * step, margin + dx * step, 0), (h, w, 2))
        cd = d2(cand)
        better = cd < best_d
        best = jnp.where(better[..., None], cand, best)
        best_d = jnp.where(better, cd, best_d)
    return best

  return lax.fori_loop(0, n + 1, one_step, seeds)


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


# The list sweep of `refine_tears` computes costs only on the zone and its cost windows. Its lists have
# a static length, a fraction of the image, which sets their cost: the sweep takes the shortest of
# these tiers that holds the ring, and sweeps densely beyond the last. Measured at 1000² (2 cores),
# per pass: dense 0.53 s, list of 1/4 of the image 0.16 s; a 2 % crack ring's whole refinement
# 0.38 s with 1/10-long lists, 0.57 s with 1/4 (hence a short tier too); DOLW7's fold (12 % ring)
# swept densely with only a 1/10 tier, 2.2 s per pair.
SPARSE_ZONE_FRACTIONS = (1 / 16, 1 / 4)


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

  # Only zone pixels may change, and their costs only read the pixels of their windows (the ring).
  # While the ring is small (a band along a crack: a few % of the image) the sweep runs on lists:
  # one sample per ring pixel and candidate, window sums as 2 (2r+1) separable lookups, so its cost
  # follows the band, not the section; otherwise it runs on the whole image.
  ring = _box_mean(zone.astype(jnp.float32), radius) > 0
  capacities = sorted({max(1, int(math.ceil(f * h * w))) for f in SPARSE_ZONE_FRACTIONS})
  n_ring = jnp.sum(ring)

  def lists(capacity):
    return lambda: _sweep_lists(field, src_and_valid, tgt, tgt_valid, zone, ring, capacity, iterations, radius)

  branches = [lists(c) for c in capacities]
  branches.append(lambda: _sweep_dense(field, src_and_valid, tgt, tgt_valid, zone, iterations, radius))
  tier = jnp.sum(n_ring > jnp.asarray(capacities, jnp.int32))  # first tier that holds the ring
  return jax.lax.switch(tier, branches)


def _until_unchanged(step, field: jax.Array, iterations: int) -> jax.Array:
  """Runs `step(f) -> (f, changed)` up to `iterations` times. A sweep that changes nothing leaves the
  next one the same field, so it would change nothing either: stopping there gives the same result."""
  def body(state):
    i, f, _ = state
    f, changed = step(f)
    return i + 1, f, changed
  state = (jnp.asarray(0, jnp.int32), field.astype(jnp.float32), jnp.asarray(True))
  return jax.lax.while_loop(lambda s: (s[0] < iterations) & s[2], body, state)[1]


def _neighbour_shift(x: jax.Array, dy: jax.Array, dx: jax.Array) -> jax.Array:
  """`losses.shifted(x, dy, dx, 0, 0.0)` for a traced offset with |dy|, |dx| <= 1 (`[H, W, C]`)."""
  h, w = x.shape[:2]
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  return lax.dynamic_slice(padded, (1 + dy, 1 + dx, 0), (h, w, x.shape[2]))


def _over_candidates(visit, carry):
  """Runs `visit(dy, dx, carry) -> carry` over `_PROPAGATION` in order. A loop, not 8 unrolled copies of
  the cost: compiling the unrolled sweeps was about 2 s of a tear-aware pair's first call."""
  offsets = jnp.asarray(_PROPAGATION, jnp.int32)
  return lax.fori_loop(0, len(_PROPAGATION), lambda k, c: visit(offsets[k, 0], offsets[k, 1], c), carry)


def _sweep_dense(field, src_and_valid, tgt, tgt_valid, zone, iterations: int, radius: int):
  """`refine_tears` on whole images (any zone size)."""
  ones = jnp.ones(field.shape[:-1] + (1,), jnp.float32)

  def step(f):
    def visit(dy, dx, carry):
      best_f, best_c, changed = carry
      cand = _neighbour_shift(f, dy, dx)
      # Edge pixels would see the zero padding as a candidate: keep only real neighbours.
      inside = _neighbour_shift(ones, dy, dx)[..., 0] > 0
      c = _patch_cost(cand, src_and_valid, tgt, tgt_valid, radius)
      take = zone & inside & (c < best_c)
      return jnp.where(take[..., None], cand, best_f), jnp.where(take, c, best_c), changed | take

    start = (f, _patch_cost(f, src_and_valid, tgt, tgt_valid, radius), jnp.zeros(f.shape[:-1], bool))
    best_f, _, changed = _over_candidates(visit, start)
    return best_f, jnp.any(changed)

  return _until_unchanged(step, field, iterations)


def _sweep_lists(field, src_and_valid, tgt, tgt_valid, zone, ring, capacity: int, iterations: int,
                 radius: int):
  """`refine_tears` on pixel lists: the ring (pixels some zone pixel's window reads) and the zone,
  each at most `capacity` long (static). Same costs and decisions as `_sweep_dense`."""
  h, w = zone.shape
  n = h * w
  # Lists padded with index n: gathers read a zero row appended at n, scatters drop it.
  ring_idx = jnp.nonzero(ring.reshape(-1), size=capacity, fill_value=n)[0]
  zone_idx = jnp.nonzero(zone.reshape(-1), size=capacity, fill_value=n)[0]
  ring_ok = ring_idx < n
  zone_ok = zone_idx < n

  def coords(idx):
    return idx // w, idx % w

  ry, rx = coords(jnp.minimum(ring_idx, n - 1))
  zy, zx = coords(jnp.minimum(zone_idx, n - 1))
  ring_pts = jnp.stack([ry, rx], -1).astype(jnp.float32)
  ring_tgt = jnp.where(ring_ok, tgt.reshape(-1)[jnp.minimum(ring_idx, n - 1)], 0.0)
  ring_weight = jnp.where(ring_ok, tgt_valid.reshape(-1)[jnp.minimum(ring_idx, n - 1)], 0.0)
  # Window sums, separably: along x at ring pixels, then along y at zone pixels, each as lookups of
  # positions in the ring list (capacity = not in the list or outside the image: reads 0). Every pixel
  # a zone pixel's window reads is in the ring, so the sums equal the dense box sums.
  position = jnp.full((n + 1,), capacity, jnp.int32).at[ring_idx].set(jnp.arange(capacity, dtype=jnp.int32))

  def positions(ys, xs, offsets):
    out = []
    for dy, dx in offsets:
      y, x = ys + dy, xs + dx
      inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
      out.append(jnp.where(inside, position[jnp.clip(y, 0, h - 1) * w + jnp.clip(x, 0, w - 1)], capacity))
    return jnp.stack(out, -1)

  span = range(-radius, radius + 1)
  along_x = positions(ry, rx, [(0, d) for d in span])  # [capacity, 2r+1]
  along_y = positions(zy, zx, [(d, 0) for d in span])
  area = float((2 * radius + 1) ** 2)
  zero = jnp.zeros((1,), jnp.float32)

  def neighbour_values(f_flat, ys, xs, dy, dx):
    """f at (ys + dy, xs + dx), 0 outside the image (as `shifted`), and whether it is inside."""
    y, x = ys + dy, xs + dx
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    v = f_flat[jnp.clip(y, 0, h - 1) * w + jnp.clip(x, 0, w - 1)]
    return jnp.where(inside[:, None], v, 0.0), inside

  def zone_costs(f_flat, dy, dx):
    cand, _ = neighbour_values(f_flat, ry, rx, dy, dx)
    diff = _sample_cost(_fields.sample(src_and_valid, ring_pts + cand), ring_tgt) * ring_weight
    rows = jnp.sum(jnp.concatenate([diff, zero])[along_x], axis=-1)
    return jnp.sum(jnp.concatenate([rows, zero])[along_y], axis=-1) / area

  def step(f):
    f_flat = f.reshape(-1, 2)

    def visit(dy, dx, carry):
      best_v, best_c, changed = carry
      cand, inside = neighbour_values(f_flat, zy, zx, dy, dx)
      c = zone_costs(f_flat, dy, dx)
      take = zone_ok & inside & (c < best_c)
      return jnp.where(take[:, None], cand, best_v), jnp.where(take, c, best_c), changed | take

    start = (f_flat[jnp.minimum(zone_idx, n - 1)], zone_costs(f_flat, 0, 0), jnp.zeros(zone_idx.shape, bool))
    best_v, _, changed = _over_candidates(visit, start)
    return f_flat.at[zone_idx].set(best_v, mode="drop").reshape(f.shape), jnp.any(changed)

  return _until_unchanged(step, field, iterations)
