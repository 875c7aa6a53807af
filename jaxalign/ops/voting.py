"""Vector voting (Popovych et al. 2024, Methods "Vector voting").

Given n candidate fields for the same section (each from aligning it to a different neighbour),
every minimal-majority subset S (size floor(n/2) + 1) is scored per pixel by the mean pairwise
distance of its members; a softmin over subsets (temperature T) gives subset weights, and each
subset's weight is spread equally to its members. The consensus is the weighted sum of fields, so
one or more outliers (fewer than a majority) are ignored wherever the majority agrees.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

from jaxalign.errors import InputError
from jaxalign.ops.fields import blur_field

# Paper default (FAFB v15, n = 3).
DEFAULT_TEMPERATURE = 5.7
# Distances are measured on slightly blurred fields so single-pixel noise does not flip votes.
DEFAULT_BLUR_SIGMA = 1.0


def _weights_for_size(dist: dict, valid: jax.Array | None, n: int, k: int, temperature) -> jax.Array:
  """Per-field weights `[n, H, W]` from a softmin over (valid) k-subsets.

  Args:
    dist: {(i, j): `[H, W]` distance (px) between fields i < j}.
    valid: `[n, H, W]` float 0/1, or None when every voter is valid.
    n, k: number of voters and subset size (static).
  """
  subsets = list(itertools.combinations(range(n), k))
  # n and k are tiny (paper: n = 3 or 5), so subsets are unrolled at trace time: plain
  # elementwise arithmetic, no gathers over the image.
  logits = []
  for subset in subsets:
    pairs = list(itertools.combinations(subset, 2))
    mean_d = sum(dist[p] for p in pairs) / len(pairs) if pairs else jnp.zeros_like(dist[(0, 1)])
    logits.append(-mean_d / temperature)
  logits = jnp.stack(logits)  # [S, H, W]
  if valid is not None:
    # A subset is admissible only if all its members are valid voters.
    admissible = jnp.stack([functools.reduce(jnp.multiply, [valid[i] for i in subset]) for subset in subsets]) > 0
    logits = jnp.where(admissible, logits, -jnp.inf)
    logits = jnp.where(admissible.any(axis=0)[None], logits, 0.0)
  subset_w = jax.nn.softmax(logits, axis=0)  # [S, H, W]
  per_field = [sum(subset_w[s] for s, subset in enumerate(subsets) if i in subset) / k for i in range(n)]
  return jnp.stack(per_field)


@functools.partial(jax.jit, static_argnames=("blur_sigma",))
def vote_weights(fields: jax.Array, *, temperature: float | jax.Array = DEFAULT_TEMPERATURE,
                 blur_sigma: float = DEFAULT_BLUR_SIGMA, valid: jax.Array | None = None) -> jax.Array:
  """Per-voter weights of the vector vote.

  Args:
    fields: `[n, H, W, 2]` float32, pixels, (dy, dx): candidate fields for one section.
    temperature: softmin temperature T in px (paper: 5.7 for n = 3).
    blur_sigma: Gaussian sigma (px, static) applied to the copies used for distances only.
    valid: optional `[n, H, W]` bool: False where voter i's target had no data. At each pixel the
      vote runs over the m valid voters with subsets of size floor(m/2) + 1; with m = 0 it falls
      back to voting over all n (the field is unconstrained by data there).
  Returns:
    `[n, H, W]` float32 weights summing to 1 over voters, zero for invalid voters (when m > 0).
  """
  if fields.ndim != 4 or fields.shape[-1] != 2:
    raise InputError(f"vector_vote needs fields of shape [n, H, W, 2], got {fields.shape}")
  n = fields.shape[0]
  blurred = blur_field(fields, blur_sigma) if blur_sigma > 0 else fields
  if n < 2:
    raise InputError(f"vector_vote needs at least 2 fields, got {n}")
  dist = {(i, j): jnp.sqrt(jnp.sum((blurred[i] - blurred[j]) ** 2, axis=-1) + 1e-12)
          for i, j in itertools.combinations(range(n), 2)}
  if valid is None:
    return _weights_for_size(dist, None, n, n // 2 + 1, temperature)
  v = jnp.asarray(valid, jnp.float32)
  m = v.sum(axis=0)  # [H, W]
  v = jnp.where(m[None] > 0, v, 1.0)
  m = jnp.where(m > 0, m, n)
  weights = jnp.zeros(fields.shape[:-1], jnp.float32)
  # One softmin per possible valid count; each pixel keeps the one matching its own count.
  for count in range(1, n + 1):
    w_k = _weights_for_size(dist, v, n, count // 2 + 1, temperature)
    weights = jnp.where((m == count)[None], w_k, weights)
  return weights


@functools.partial(jax.jit, static_argnames=("blur_sigma",))
def vector_vote(fields: jax.Array, *, temperature: float | jax.Array = DEFAULT_TEMPERATURE,
                blur_sigma: float = DEFAULT_BLUR_SIGMA, valid: jax.Array | None = None) -> jax.Array:
  """Consensus of n candidate fields by vector voting.

  Args:
    fields: `[n, H, W, 2]` float32, pixels, (dy, dx).
    temperature, blur_sigma, valid: see `vote_weights`.
  Returns:
    `[H, W, 2]` float32 voted field: sum_i w_i fields_i.
  """
  w = vote_weights(fields, temperature=temperature, blur_sigma=blur_sigma, valid=valid)
  return jnp.einsum("nhw,nhwc->hwc", w, fields.astype(jnp.float32))
