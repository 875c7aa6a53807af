"""Elastic energy and masked losses vs closed forms, a float64 NumPy reference and finite differences."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

import jaxalign as ja


def numpy_elastic_energy(field, mask=None):
  """Independent float64 reference with explicit loops over the 8 neighbour directions."""
  h, w, _ = field.shape
  m = np.ones((h, w)) if mask is None else mask.astype(np.float64)
  e = np.zeros((h, w))
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      if dy == dx == 0:
        continue
      rest = np.hypot(dy, dx)
      for i in range(h):
        for j in range(w):
          qi, qj = i + dy, j + dx
          if 0 <= qi < h and 0 <= qj < w:
            v = np.array([dy, dx]) + field[qi, qj] - field[i, j]
            e[i, j] += 0.5 * m[i, j] * m[qi, qj] * (np.hypot(*v) - rest) ** 2
  return e


def rotation_field(shape, degrees, centre=None):
  h, w = shape
  cy, cx = centre or ((h - 1) / 2, (w - 1) / 2)
  t = np.deg2rad(degrees)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  y, x = yy - cy, xx - cx
  return np.stack([np.cos(t) * y - np.sin(t) * x - y, np.sin(t) * y + np.cos(t) * x - x], -1)


def test_energy_matches_numpy_reference():
  rng = np.random.default_rng(0)
  f = rng.normal(scale=0.5, size=(9, 11, 2))
  mask = rng.random((9, 11)) > 0.3
  np.testing.assert_allclose(ja.elastic_energy(jnp.float32(f)), numpy_elastic_energy(f), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ja.elastic_energy(jnp.float32(f), mask), numpy_elastic_energy(f, mask),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field", [
  np.broadcast_to(np.array([3.7, -12.2]), (32, 32, 2)),
  rotation_field((32, 32), 5.0),
  rotation_field((32, 32), -20.0) + np.array([1.5, 2.0]),
])
def test_rigid_motions_have_no_energy(field):
  assert float(np.max(ja.elastic_energy(jnp.float32(field)))) < 1e-4


@pytest.mark.parametrize("matrix", [[[1.0, 0.1, 0], [0, 1.0, 0]], [[1.05, 0, 0], [0, 1.05, 0]]])
def test_shear_and_scale_cost_energy(matrix):
  f = ja.from_affine(jnp.float32(matrix), (32, 32))
  assert float(ja.elastic_loss(f)) > 1e-4


def test_masked_pixels_contribute_nothing():
  rng = np.random.default_rng(1)
  f = jnp.float32(rng.normal(size=(16, 16, 2)))
  mask = np.ones((16, 16), bool)
  mask[:, 8] = False
  e = np.asarray(ja.elastic_energy(f, mask))
  assert np.all(e[:, 8] == 0)
  # A tear along the masked column costs nothing: move the right half rigidly.
  tear = np.zeros((16, 16, 2), np.float32)
  tear[:, 9:, 1] = 5.0
  assert float(ja.elastic_loss(jnp.float32(tear), mask)) < 1e-6
  assert float(ja.elastic_loss(jnp.float32(tear))) > 0.1


def test_elastic_gradients_match_finite_differences():
  rng = np.random.default_rng(2)
  f = jnp.asarray(rng.normal(scale=0.3, size=(8, 8, 2)), jnp.float32)
  mask = jnp.asarray(rng.random((8, 8)) > 0.2)
  with jax.enable_x64(True):
    f64 = jnp.asarray(np.asarray(f), jnp.float64)
    check_grads(lambda x: ja.elastic_loss(x, mask).astype(jnp.float64), (f64,), order=1,
                              modes=["rev", "fwd"], eps=1e-4, atol=2e-3, rtol=2e-3)


def test_masked_mean_and_mse_vs_numpy():
  rng = np.random.default_rng(3)
  a, b = rng.random((2, 10, 12))
  enc_a, enc_b = rng.random((2, 10, 12, 4))
  mask = rng.random((10, 12)) > 0.5
  np.testing.assert_allclose(ja.masked_mean(jnp.float32(a), mask), a[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(ja.masked_mse(jnp.float32(a), jnp.float32(b), mask), ((a - b)[mask] ** 2).mean(), rtol=1e-5)
  ref = ((enc_a - enc_b) ** 2).mean(-1)[mask].mean()
  np.testing.assert_allclose(ja.masked_mse(jnp.float32(enc_a), jnp.float32(enc_b), mask), ref, rtol=1e-5)
  assert float(ja.masked_mean(jnp.float32(a), np.zeros_like(mask))) == 0.0


def test_spring_weights_match_numpy_reference():
  rng = np.random.default_rng(4)
  f = rng.normal(scale=0.5, size=(7, 9, 2))
  sw = (rng.random((7, 9, 4)) > 0.3).astype(np.float64)
  offsets = ((0, 1), (1, 0), (1, 1), (1, -1))
  total = 0.0
  for i in range(7):
    for j in range(9):
      for k, (dy, dx) in enumerate(offsets):
        qi, qj = i + dy, j + dx
        if 0 <= qi < 7 and 0 <= qj < 9:
          v = np.array([dy, dx]) + f[qi, qj] - f[i, j]
          total += sw[i, j, k] * (np.hypot(*v) - np.hypot(dy, dx)) ** 2
  got = ja.elastic_loss(jnp.float32(f), None, jnp.float32(sw))
  np.testing.assert_allclose(float(got), total / (7 * 9), rtol=1e-4)
