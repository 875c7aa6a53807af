"""GPU-only checks (`python -m pytest -q -m gpu`): the kernels, the pair aligner and a training step
on the accelerator, against float64 SciPy references, known distortions and the CPU backend.

Skipped (with the reason) where JAX has no GPU backend. They use synthetic EM
(`jaxalign.bench.synthetic`) rather than ../shared/data, so they also run on a machine that holds only
the repository (`experiments/device_check.sh`).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import jaxalign as ja
from jaxalign.ops import fields
from jaxalign.models import seamless, train_data, train_pyramid
from jaxalign.bench.synthetic import SyntheticConfig, make_stack
from tests.references import reference_warp, smooth_field
from tests.references import compose_ref
from tests.test_train import TINY_AUG, tiny_level_cfg, tiny_train_cfg

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a JAX GPU backend")]

N = 256


def _cpu():
  return jax.devices("cpu")[0]


@pytest.fixture(scope="module")
def sections():
  """`[2, N, N]` float32 synthetic EM sections (neighbours, 40-nm-like)."""
  return make_stack(SyntheticConfig(sections=2, size=N, seed=3), progress=False).images


def test_warp_and_compose_on_gpu_match_float64_references(sections):
  u = smooth_field(np.random.default_rng(1), (N, N), 8.0, 24.0)
  v = smooth_field(np.random.default_rng(2), (N, N), 5.0, 24.0)
  got = ja.warp(jnp.asarray(sections[0]), jnp.asarray(u, jnp.float32))
  assert got.devices() == {jax.devices()[0]}  # computed on the default (GPU) device
  np.testing.assert_allclose(np.asarray(got), reference_warp(sections[0], u), atol=2e-4)
  # compose(a, b) applies a then b: c(r) = b(r) + a(r + b(r)) (sample points clamped to the section).
  c = np.asarray(ja.compose(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)))
  np.testing.assert_allclose(c, compose_ref(u, v), atol=2e-4)


def test_align_pair_on_gpu_recovers_a_known_field_and_agrees_with_cpu(sections):
  u = smooth_field(np.random.default_rng(4), (N, N), 6.0, 24.0).astype(np.float32)
  tgt = np.asarray(fields.warp(jnp.asarray(sections[0]), jnp.asarray(u)))
  f_gpu = np.asarray(ja.align_pair(sections[0], tgt))
  with jax.default_device(_cpu()):
    f_cpu = np.asarray(ja.align_pair(sections[0], tgt))
  inner = (slice(32, -32), slice(32, -32))
  epe_gpu = np.linalg.norm(f_gpu - u, axis=-1)[inner]
  assert np.median(epe_gpu) < 0.3 and np.percentile(epe_gpu, 95) < 1.0, np.median(epe_gpu)
  # Same algorithm, float32 on both: the backends differ by rounding only.
  assert np.median(np.linalg.norm(f_gpu - f_cpu, axis=-1)[inner]) < 0.05


def test_training_step_on_gpu_lowers_the_loss(sections):
  cfg = tiny_train_cfg()
  crops = np.asarray(sections)[:, :64, :64]
  pairs = train_data.make_pairs(np.concatenate([crops, crops[::-1]]), jax.random.PRNGKey(0), TINY_AUG, multiple=2,
                           name="gpu")
  level = seamless.Level(tiny_level_cfg(), rngs=nnx.Rngs(0))
  step = train_pyramid.TrainStep(level, train_pyramid.make_optimizer(level, cfg, 100), cfg, 0, stage=1)
  batch = train_pyramid.sample_batch(np.random.default_rng(0), [train_pyramid.level_data(pairs, 0, None)], cfg.batch_size,
                             cfg.crop)
  key = jax.random.PRNGKey(0)
  first = float(step(batch, key)["loss"])
  for _ in range(12):
    step(batch, key)
  assert float(step(batch, key)["loss"]) < 0.95 * first
