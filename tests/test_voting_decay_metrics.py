"""vector_vote, decay_field, cpc and normalisation vs closed forms and NumPy references."""

import itertools

import numpy as np
import pytest

import jax.numpy as jnp

import jaxalign as ja


def numpy_vote(fields, temperature):
  """Float64 reference of the paper's vote (no blur): softmin over minimal-majority subsets."""
  n = fields.shape[0]
  k = n // 2 + 1
  subsets = list(itertools.combinations(range(n), k))
  dists = []
  for s in subsets:
    pairs = list(itertools.combinations(s, 2))
    dists.append(np.mean([np.linalg.norm(fields[i] - fields[j], axis=-1) for i, j in pairs], axis=0))
  d = np.stack(dists)
  w = np.exp(-(d - d.min(0)) / temperature)
  w /= w.sum(0)
  out = np.zeros(fields.shape[1:])
  for ws, s in zip(w, subsets):
    out += ws[..., None] * np.mean([fields[i] for i in s], axis=0)
  return out


def test_vote_rejects_80px_outlier_at_default_temperature():
  rng = np.random.default_rng(0)
  a = rng.normal(scale=0.3, size=(24, 24, 2))
  b = a + rng.normal(scale=0.3, size=(24, 24, 2))
  c = a + np.array([80.0, 0.0])
  out = np.asarray(ja.vector_vote(jnp.float32(np.stack([a, c, b])), blur_sigma=0.0))
  assert np.max(np.abs(out - (a + b) / 2)) < 0.01


def test_vote_matches_numpy_reference_n3_n5():
  rng = np.random.default_rng(1)
  for n in (3, 5):
    fields = rng.normal(scale=4.0, size=(n, 10, 12, 2))
    out = np.asarray(ja.vector_vote(jnp.float32(fields), temperature=2.0, blur_sigma=0.0))
    np.testing.assert_allclose(out, numpy_vote(fields, 2.0), atol=1e-4)


def test_vote_of_equal_fields_is_that_field():
  rng = np.random.default_rng(2)
  f = rng.normal(scale=3.0, size=(16, 16, 2))
  out = np.asarray(ja.vector_vote(jnp.float32(np.stack([f, f, f]))))
  np.testing.assert_allclose(out, f, atol=1e-5)


def test_vote_n5_with_two_outliers():
  rng = np.random.default_rng(3)
  good = rng.normal(scale=2.0, size=(16, 16, 2))
  fields = np.stack([good + rng.normal(scale=0.05, size=good.shape) for _ in range(3)]
                    + [good + [40.0, 0.0], good + [0.0, -60.0]])
  # Six of the ten 3-subsets hold one outlier (mean distance ~2/3 of its offset), so n = 5 needs
  # a lower temperature than the paper's T = 5.7 for n = 3 to shut them out completely.
  out = np.asarray(ja.vector_vote(jnp.float32(fields), temperature=2.0))
  np.testing.assert_allclose(out, fields[:3].mean(0), atol=0.05)
  at_default = np.asarray(ja.vector_vote(jnp.float32(fields)))
  assert np.max(np.linalg.norm(at_default - fields[:3].mean(0), axis=-1)) < 1.5  # 40-60 px outliers


def test_invalid_voters_are_ignored():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(16, 16, 2))
  b = a + 20.0
  c = a - 20.0
  valid = np.ones((3, 16, 16), bool)
  valid[1] = False  # b's target had no data anywhere
  valid[2, :8] = False  # c's target had no data in the top half
  out = np.asarray(ja.vector_vote(jnp.float32(np.stack([a, b, c])), valid=valid, blur_sigma=0.0))
  # Top half: only a is valid. Bottom half: a and c valid -> subsets of size 2 = {a, c}: their mean.
  np.testing.assert_allclose(out[:8], a[:8], atol=1e-5)
  np.testing.assert_allclose(out[8:], (a[8:] + c[8:]) / 2, atol=1e-5)
  w = np.asarray(ja.vote_weights(jnp.float32(np.stack([a, b, c])), valid=valid))
  np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-6)
  assert np.all(w[1] == 0)
  # No valid voter at all: defined as the vote over all fields.
  none_valid = np.zeros((3, 16, 16), bool)
  out_none = np.asarray(ja.vector_vote(jnp.float32(np.stack([a, b, c])), valid=none_valid, blur_sigma=0.0))
  np.testing.assert_allclose(out_none, ja.vector_vote(jnp.float32(np.stack([a, b, c])), blur_sigma=0.0), atol=1e-5)


def wave_field(shape, wavelength, amplitude=2.0):
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
  v = amplitude * np.sin(2 * np.pi * xx / wavelength) * np.ones_like(yy)
  return np.stack([v, v], -1)


def test_decay_identity_at_zero_and_zero_beyond_decay_distance():
  rng = np.random.default_rng(5)
  f = rng.normal(size=(64, 64, 2)).astype(np.float32)
  np.testing.assert_allclose(ja.decay_field(f, 0.0), f, atol=1e-6)
  assert np.all(np.asarray(ja.decay_field(f, 100.0)) == 0)
  assert np.all(np.asarray(ja.decay_field(f, 150.0, decay_distance=100.0)) == 0)
  # Attenuation alone for a constant field (blur leaves constants unchanged).
  const = np.full((64, 64, 2), 3.0, np.float32)
  np.testing.assert_allclose(ja.decay_field(const, 25.0), 3.0 * 0.75, atol=1e-5)


def test_decay_damps_short_wavelengths_more():
  short = wave_field((256, 256), 8.0)
  long = wave_field((256, 256), 256.0)
  d = 40.0
  gain = 1 - d / 100.0

  def damping(f):
    out = np.asarray(ja.decay_field(jnp.float32(f), d))[64:-64, 64:-64]
    return np.std(out) / (gain * np.std(f[64:-64, 64:-64]))

  assert damping(short) < 0.1
  assert damping(long) > 0.8


def numpy_cpc(a, b, chunk, min_tissue=0.5):
  h, w = a.shape[0] // chunk, a.shape[1] // chunk
  out = np.full((h, w), np.nan)
  for i in range(h):
    for j in range(w):
      pa = a[i * chunk:(i + 1) * chunk, j * chunk:(j + 1) * chunk]
      pb = b[i * chunk:(i + 1) * chunk, j * chunk:(j + 1) * chunk]
      v = (pa != 0) & (pb != 0)
      if v.sum() >= min_tissue * chunk * chunk:
        out[i, j] = np.corrcoef(pa[v], pb[v])[0, 1]
  return out


def test_cpc_matches_numpy_corrcoef():
  rng = np.random.default_rng(6)
  a = rng.random((130, 100)) + 0.1
  b = 0.6 * a + 0.4 * rng.random((130, 100))
  a[:40, :40] = 0  # no data: first chunk dropped entirely, others partly
  b[70:, 50:60] = 0
  out = np.asarray(ja.cpc(jnp.float32(a), jnp.float32(b), chunk=32))
  ref = numpy_cpc(a, b, 32)
  assert out.shape == (4, 3)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
  np.testing.assert_allclose(out[~np.isnan(ref)], ref[~np.isnan(ref)], atol=1e-4)
  assert np.isnan(out[0, 0])
  frac = ja.low_cpc_fraction(out)
  assert frac == pytest.approx(np.mean(ref[~np.isnan(ref)] < 0.25))


def test_normalize_ignores_zeros():
  rng = np.random.default_rng(7)
  img = rng.random((20, 20)) * 5 + 2
  img[:5] = 0
  out = np.asarray(ja.normalize(jnp.float32(img)))
  assert np.all(out[:5] == 0)
  tissue = img[5:]
  np.testing.assert_allclose(out[5:], (tissue - tissue.mean()) / tissue.std(), atol=1e-4)
