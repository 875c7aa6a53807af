"""Online Field Finetuner on one level: images and channels-last encodings, batched, masked.

Reference: tgt = warp(src, u) for a known sub-2-px field u on a real ssTEM crop; the error is the
endpoint error against u (not the code's own output).
"""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxalign.ops import fields, preprocess
from jaxalign.align.finetuner import FinetuneConfig, finetune, finetune_batch
from jaxalign.errors import InputError
from tests.conftest import load_sections

N = 128
CFG = FinetuneConfig(iterations=150, learning_rate=0.1, gamma=1.0)


@pytest.fixture(scope="module")
def img():
  return np.asarray(preprocess.normalize(jnp.asarray(load_sections("isbi2012_train", [1], crop=N)[0])))


def _shift(dy, dx):
  return np.asarray(fields.from_affine(np.array([[1, 0, dy], [0, 1, dx]], np.float32), (N, N)))


def _interior_epe(f, u, margin=8):
  e = np.linalg.norm(np.asarray(f) - u, axis=-1)[margin:-margin, margin:-margin]
  return float(np.median(e)), float(np.percentile(e, 95))


def _encode(x):
  """A 2-channel channels-last 'encoding' [..., H, W, 2]: the image and its vertical gradient."""
  return np.stack([x, np.gradient(x, axis=-2)], -1).astype(np.float32)


def test_recovers_subpixel_shift_on_encoding(img):
  u = _shift(0.8, -1.1)
  enc = _encode(img)
  tenc = np.asarray(fields.warp(jnp.asarray(enc), jnp.asarray(u)))
  f, stats = finetune(enc, tenc, src_mask=np.ones((N, N)), tgt_mask=np.ones((N, N)), config=CFG,
                      return_stats=True)
  assert f.shape == (N, N, 2)
  med, p95 = _interior_epe(f, u)
  assert med <= 0.1 and p95 <= 0.5, (med, p95)
  assert float(stats.final_loss) < 0.2 * float(stats.initial_loss)


def test_batch_equals_single_runs(img):
  us = np.stack([_shift(0.8, -1.1), _shift(-1.2, 0.5)])
  srcs = _encode(np.stack([img, img[::-1].copy()]))
  tgts = np.asarray(fields.warp(jnp.asarray(srcs), jnp.asarray(us)))
  ones = np.ones((2, N, N))
  fb = np.asarray(finetune_batch(srcs, tgts, src_masks=ones, tgt_masks=ones, config=CFG))
  for b in range(2):
    single = np.asarray(finetune(srcs[b], tgts[b], src_mask=ones[b], tgt_mask=ones[b], config=CFG))
    np.testing.assert_allclose(fb[b], single, atol=1e-3)
    med, _ = _interior_epe(fb[b], us[b])
    assert med <= 0.1


def test_plateau_stops_early_on_identical_images(img):
  enc = _encode(img)
  ones = np.ones((N, N))
  _, stats = finetune(enc, enc, src_mask=ones, tgt_mask=ones, config=CFG, return_stats=True)
  assert int(stats.steps) < CFG.iterations


def test_config_validation():
  # InputError like every other config (exit status 2 at the command line), naming the setting.
  with pytest.raises(InputError, match="schedule"):
    FinetuneConfig(schedule="bogus")
  with pytest.raises(InputError, match="iterations"):
    FinetuneConfig(iterations=0)


def test_bad_shapes_raise_input_error(img):
  from jaxalign.errors import InputError
  with pytest.raises(InputError):
    finetune(img, img[:, :64], config=CFG)
  with pytest.raises(InputError):
    finetune(img, img, src_defects=np.zeros((8, 8)), config=CFG)
