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
import numpy as np

from jaxalign.errors import InputError
from jaxalign.fields import blur_field

# Paper default (FAFB v15, n = 3).
DEFAULT_TEMPERATURE = 5.7
# Distances are measured on slightly blurred fields so single-pixel noise does not flip votes.
DEFAULT_BLUR_SIGMA = 1.0


def _subsets(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Membership `[S, n]` (float) of all k-subsets of n, and pair lists `[S, P, 2]` of each subset."""
  combos = list(itertools.combinations(range(n), k))
  member = np.zeros((len(combos), n), np.float32)
  for s, c in enumerate(combos):
    member[s, list(c)] = 1.0
  pairs = np.array([list(itertools.combinations(c, 2)) or [(c[0], c[0])] for c in combos], np.int32)
  return member, pairs


def _weights_for_size(dist: jax.Array, valid: jax.Array, k: int, temperature) -> jax.Array:
  """Per-field weights `[n, H, W]` from a softmin over valid k-subsets.

  Args:
    dist: `[n, n, H, W]` pairwise distances (px).
    valid: `[n, H, W]` float 0/1.
  """
  n = valid.shape[0]
  member, pairs = _subsets(n, k)
  pair_d = dist[pairs[..., 0], pairs[..., 1]]  # [S, P, H, W]
  mean_d = pair_d.mean(axis=1)  # [S, H, W]
  # A subset is admissible only if all its members are valid voters.
  admissible = jnp.einsum("sn,nhw->shw", jnp.asarray(member), 1.0 - valid) == 0
  logits = jnp.where(admissible, -mean_d / temperature, -jnp.inf)
  any_ok = admissible.any(axis=0)
  logits = jnp.where(any_ok[None], logits, 0.0)
  subset_w = jax.nn.softmax(logits, axis=0)  # [S, H, W]
  return jnp.einsum("sn,shw->nhw", jnp.asarray(member), subset_w) / k


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
  diff = blurred[:, None] - blurred[None, :]
  dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1) + 1e-12)  # [n, n, H, W]
  if valid is None:
    return _weights_for_size(dist, jnp.ones(fields.shape[:-1], jnp.float32), n // 2 + 1, temperature)
  v = jnp.asarray(valid, jnp.float32)
  m = v.sum(axis=0)  # [H, W]
  v = jnp.where(m[None] > 0, v, 1.0)
  m = jnp.where(m > 0, m, n)
  weights = jnp.zeros(fields.shape[:-1], jnp.float32)
  # One softmin per possible valid count; each pixel keeps the one matching its own count.
  for count in range(1, n + 1):
    w_k = _weights_for_size(dist, v, count // 2 + 1, temperature)
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
