"""Training: losses vs NumPy references, augmentation geometry, a tiny model learning, compile-once,
checkpoint/resume, and clear errors for malformed configs and datasets."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from jaxalign.ops import losses
from jaxalign.models import nnx_weights, seamless, train_data, train_encoder, train_pyramid
from jaxalign.errors import InputError
from tests.conftest import load_sections


def np_warp(img, field):
  """float64 reference warp (pull, bilinear, outside = 0) of `[H, W]` by `[H, W, 2]`."""
  h, w = img.shape
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  coords = np.stack([yy + field[..., 0], xx + field[..., 1]])
  return ndimage.map_coordinates(np.asarray(img, np.float64), coords, order=1, mode="grid-constant", cval=0.0)


def tiny_level_cfg(mip=0):
  return seamless.LevelConfig(mip=mip, encoder=seamless.EncoderConfig(channels=4, blocks=1, out_channels=3),
                            aligner=seamless.AlignerConfig(scales=2, channels=6, dilations=(1,), radius=1),
                            finetune=None)


def tiny_train_cfg(**kw):
  base = dict(pyramid=seamless.PyramidConfig(levels=(tiny_level_cfg(0),)), crop=32, batch_size=2, chunk=16,
              stage1_epochs=1, stage2_epochs=1, eval_every=2, checkpoint_every=2, keep_last=2,
              learning_rate=3e-3)
  base.update(kw)
  return train_data.TrainConfig(**base)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

def test_stage1_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  b, h, w = 2, 24, 28
  src = rng.normal(size=(b, h, w)).astype(np.float32)
  tgt = rng.normal(size=(b, h, w)).astype(np.float32)
  src[0, 5:9, 5:9] = 0.0    # no data in src
  tgt[1, 10:14, 2:6] = 0.0  # no data in tgt
  defects = np.zeros((b, h, w), bool)
  defects[0, 15:18, 15:20] = True
  field = (rng.normal(size=(b, h, w, 2)) * 1.5).astype(np.float32)

  # reference masks and MSE, float64
  num = den = 0.0
  for i in range(b):
    warped = np_warp(src[i], field[i])
    support = np_warp((src[i] != 0).astype(float), field[i]) > train_data.FULL_SUPPORT
    mask = support & (tgt[i] != 0)
    num += ((warped - tgt[i]) ** 2)[mask].sum()
    den += mask.sum()
  mse_ref = num / den
  el_mask_ref = 1.0 - (np.stack([np_warp(defects[i].astype(float), field[i]) for i in range(b)]) > 0)

  loss0, terms = train_pyramid.stage1_loss(jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(field), jnp.asarray(defects), 0.0)
  np.testing.assert_allclose(float(loss0), mse_ref, rtol=1e-4)
  np.testing.assert_allclose(float(terms["mse"]), mse_ref, rtol=1e-4)
  # the elastic term is gamma times the kernel's masked elastic loss, with the weight zeroed on defects
  gamma = 7.0
  loss_g, _ = train_pyramid.stage1_loss(jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(field), jnp.asarray(defects), gamma)
  el_ref = float(losses.elastic_loss(jnp.asarray(field), jnp.asarray(el_mask_ref, jnp.float32)))
  np.testing.assert_allclose(float(loss_g) - float(loss0), gamma * el_ref, rtol=1e-4)
  assert el_mask_ref.min() == 0.0  # the defect really released some springs


def np_best_sample(a, b, mask, chunk, pct):
  """Loop reference: chunks with >= 50 % valid pixels, keep those <= the k-th percentile, average."""
  vals = []
  for n in range(a.shape[0]):
    mses = []
    for y in range(0, a.shape[1], chunk):
      for x in range(0, a.shape[2], chunk):
        m = mask[n, y:y + chunk, x:x + chunk].astype(np.float64)
        if m.sum() / chunk ** 2 < train_data.MIN_CHUNK_COVERAGE:
          continue
        d = ((a[n, y:y + chunk, x:x + chunk] - b[n, y:y + chunk, x:x + chunk]) ** 2).mean(-1)
        mses.append((d * m).sum() / m.sum())
    if mses:
      mses = np.array(mses)
      thr = np.percentile(mses, pct)
      vals.append(mses[mses <= thr].mean())
  return float(np.mean(vals))


@pytest.mark.parametrize("pct", [50.0, 25.0, 100.0])
def test_best_sample_selection_matches_numpy(pct):
  rng = np.random.default_rng(1)
  bsz, h, w, c, chunk = 3, 64, 96, 4, 16
  a = rng.normal(size=(bsz, h, w, c)).astype(np.float32)
  # chunks of very different similarity, so the selection matters
  scale = rng.uniform(0.05, 2.0, size=(bsz, h // chunk, w // chunk))
  noise = rng.normal(size=a.shape) * np.repeat(np.repeat(scale, chunk, 1), chunk, 2)[..., None]
  b = (a + noise).astype(np.float32)
  mask = np.ones((bsz, h, w), np.float32)
  mask[0, :20, :40] = 0.0          # partly empty chunks (some under 50 % coverage)
  mask[2, 30:, :] = 0.0
  got = float(train_pyramid.best_sample_similarity(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask), chunk=chunk,
                                           percentile=pct))
  np.testing.assert_allclose(got, np_best_sample(a, b, mask, chunk, pct), rtol=1e-5)
  # the bottom half is strictly more similar than all chunks together
  if pct == 50.0:
    assert got < np_best_sample(a, b, mask, chunk, 100.0)


def test_stage2_loss_matches_numpy_reference():
  rng = np.random.default_rng(2)
  bsz, h, w, c = 2, 32, 32, 3
  se = rng.normal(size=(bsz, h, w, c)).astype(np.float32)
  te = rng.normal(size=(bsz, h, w, c)).astype(np.float32)
  field = (rng.normal(size=(bsz, h, w, 2)) * 0.8).astype(np.float32)
  init = np.zeros_like(field)
  defects = np.zeros((bsz, h, w), bool)
  alpha = 0.7
  loss, terms = train_pyramid.stage2_loss(jnp.asarray(se), jnp.asarray(te), jnp.asarray(init), jnp.asarray(field),
                                  jnp.asarray(defects), 0.0, alpha, 16, 50.0)
  num = den = 0.0
  for i in range(bsz):
    warped = np.stack([np_warp(se[i, ..., k], field[i]) for k in range(c)], -1)
    mask = np_warp(np.ones((h, w)), field[i]) > train_data.FULL_SUPPORT
    num += ((warped - te[i]) ** 2).mean(-1)[mask].sum()
    den += mask.sum()
  mse_ref = num / den
  pre_mask = np.ones((bsz, h, w))
  pre_ref = np_best_sample(se, te, pre_mask, 16, 50.0)
  np.testing.assert_allclose(float(terms["mse"]), mse_ref, rtol=1e-4)
  np.testing.assert_allclose(float(terms["best_sample"]), pre_ref, rtol=1e-4)
  np.testing.assert_allclose(float(loss), mse_ref - alpha * pre_ref, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Data and augmentation
# ------------------------------------------------------------------------------------------------

def test_augment_keeps_pair_geometry():
  """After random flips/transposes, the transformed field still maps the transformed src onto tgt."""
  rng = np.random.default_rng(3)
  n = 48
  base = ndimage.gaussian_filter(rng.normal(size=(n + 16, n + 16)), 2.0)
  tgt = base[8:8 + n, 8:8 + n]
  shift = np.array([2.0, -3.0])   # warp(src, shift) == tgt  <=>  src(r + shift) = tgt(r)
  src = base[8 - 2:8 - 2 + n, 8 + 3:8 + 3 + n]
  field = np.broadcast_to(shift, (n, n, 2)).astype(np.float32)
  np.testing.assert_allclose(np_warp(src, field)[4:-4, 4:-4], tgt[4:-4, 4:-4], atol=1e-6)
  bsz = 8
  batch = train_pyramid.Batch(jnp.asarray(np.stack([src + 5] * bsz), jnp.float32),
                      jnp.asarray(np.stack([tgt + 5] * bsz), jnp.float32),
                      jnp.zeros((bsz, n, n)), jnp.asarray(np.stack([field] * bsz)))
  out = train_pyramid.augment(jax.random.PRNGKey(0), batch, (1.0, 1.0))
  fields_seen = set()
  for i in range(bsz):
    s, t, f = np.asarray(out.src[i]), np.asarray(out.tgt[i]), np.asarray(out.init[i])
    fields_seen.add(tuple(np.round(f[0, 0], 3)))
    np.testing.assert_allclose(np_warp(s, f)[4:-4, 4:-4], t[4:-4, 4:-4], atol=1e-4)
  assert len(fields_seen) >= 3  # several different flips/transposes happened


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

TINY_AUG = dataclasses.replace(train_data.AugmentConfig(), max_translation=3.0, smooth_amplitude=1.5, smooth_spacing=16,
                               max_rotation_deg=0.5, stripe_probability=0.0, blob_probability=0.0,
                               swap_probability=0.0)


@pytest.fixture(scope="module")
def tiny_sections():
  return load_sections("flyem_medulla_fibsem", range(5), crop=64)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_sections):
  return (train_data.make_pairs(tiny_sections[:3], jax.random.PRNGKey(0), TINY_AUG, multiple=2, name="t"),
          train_data.make_pairs(tiny_sections[3:], jax.random.PRNGKey(1), TINY_AUG, multiple=2, name="v"))


def test_make_pairs_ground_truth_undoes_the_distortion(tiny_sections, tiny_pairs):
  """warp(src, gt) ≈ the undistorted section (swap disabled, so src is the distorted first section)."""
  ps = tiny_pairs[0]
  assert ps.src.shape == (2, 64, 64) and ps.gt.shape == (2, 64, 64, 2)
  inner = (slice(12, -12), slice(12, -12))
  for i in range(2):
    back = np_warp(ps.src[i], ps.gt[i])
    err = np.abs(back[inner] - tiny_sections[i][inner]).mean()
    err_distorted = np.abs(ps.src[i][inner] - tiny_sections[i][inner]).mean()
    # what is left is bilinear resampling blur (two interpolations), far below the distortion's error
    assert err < 0.5 * err_distorted, (err, err_distorted)
    assert np.abs(ps.gt[i]).max() > 1.0  # a real distortion was applied


def test_tiny_model_trains_and_compiles_once(tiny_pairs):
  cfg = tiny_train_cfg()
  level = seamless.Level(tiny_level_cfg(), rngs=nnx.Rngs(0))
  opt = train_pyramid.make_optimizer(level, cfg, 100)
  ts = train_pyramid.TrainStep(level, opt, cfg, 0, stage=1)
  data = train_pyramid.level_data(tiny_pairs[0], 0, None)
  rng = np.random.default_rng(0)
  fixed = train_pyramid.sample_batch(rng, [data], cfg.batch_size, cfg.crop)
  key = jax.random.PRNGKey(0)
  traces = train_pyramid.TRACE_COUNT[0]
  first = float(ts(fixed, key)["loss"])
  for i in range(12):
    # fresh batches too: the step must not retrace for new data
    ts(train_pyramid.sample_batch(rng, [data], cfg.batch_size, cfg.crop), jax.random.PRNGKey(i + 1))
    ts(fixed, key)
  last = float(ts(fixed, key)["loss"])
  assert train_pyramid.TRACE_COUNT[0] == traces + 1  # compiled once, for all batches
  assert last < 0.95 * first, (first, last)


def test_checkpoint_save_restore_identical(tmp_path):
  """Orbax round trip of parameters + optimiser state + meta: a fresh model restores to identical outputs."""
  cfg = tiny_train_cfg()
  pyr = seamless.Pyramid(cfg.pyramid, rngs=nnx.Rngs(1))
  opt = train_pyramid.make_optimizer(pyr.levels[0], cfg, 10)
  # make the optimiser state non-trivial
  grads = jax.tree.map(lambda p: jnp.ones_like(p), nnx.state(pyr.levels[0], nnx.Param))
  opt.update(pyr.levels[0], grads)
  ck = train_pyramid.Checkpoints(tmp_path, keep_last=2)
  for step, val in ((3, 9.0), (5, 4.0), (7, 6.0)):
    ck.save(step, pyr, opt, {"step": step, "level": 0, "stage": 1}, val_epe=val)
  assert ck.last.all_steps() == [5, 7]           # keep_last = 2
  assert ck.best.all_steps() == [5]              # lowest validation EPE
  assert ck.latest_step() == 7 and ck.restore_meta(7) == {"step": 7, "level": 0, "stage": 1}
  fresh = seamless.Pyramid(cfg.pyramid, rngs=nnx.Rngs(99))
  fresh_opt = train_pyramid.make_optimizer(fresh.levels[0], cfg, 10)
  x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 1, size=(1, 32, 32)), jnp.float32)
  y, z = jnp.roll(x, 2, axis=2), jnp.zeros((1, 32, 32, 2))
  assert not np.array_equal(np.asarray(fresh.levels[0](x, y, z)), np.asarray(pyr.levels[0](x, y, z)))
  ck.restore(7, fresh, fresh_opt)
  ck.close()
  np.testing.assert_array_equal(np.asarray(fresh.levels[0](x, y, z)), np.asarray(pyr.levels[0](x, y, z)))
  a = jax.tree.leaves(nnx.state(opt))
  b = jax.tree.leaves(nnx.state(fresh_opt))
  assert len(a) == len(b) and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))


@pytest.mark.slow
def test_checkpoint_resume_and_restore(tmp_path, tiny_pairs):
  cfg = tiny_train_cfg()
  n_pairs = tiny_pairs[0].src.shape[0]
  total = sum(p.steps for p in train_pyramid.schedule(cfg, n_pairs))
  assert total == 2  # 2 pairs / batch 2 = 1 step per epoch; 1 epoch per stage
  wd = tmp_path / "run"
  part = train_pyramid.train(cfg, wd, datasets=([tiny_pairs[0]], [tiny_pairs[1]]), max_steps=1)
  assert part.step == 1 and not (wd / "pyramid.npz").exists()
  full = train_pyramid.train(cfg, wd, datasets=([tiny_pairs[0]], [tiny_pairs[1]]))
  assert full.step == total
  recs = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in recs if "loss" in r]
  assert steps == sorted(steps) and steps.count(1) == 1 and steps[-1] == total  # resumed after 2, no redo

  # restore the last checkpoint into a fresh pyramid: identical outputs
  src = jnp.asarray(tiny_pairs[1].src[:1, :32, :32])
  tgt = jnp.asarray(tiny_pairs[1].tgt[:1, :32, :32])
  init = jnp.zeros((1, 32, 32, 2))
  fresh = seamless.Pyramid(cfg.pyramid, rngs=nnx.Rngs(123))
  before = np.asarray(fresh.levels[0](src, tgt, init))
  ck = train_pyramid.Checkpoints(wd, cfg.keep_last)
  assert ck.latest_step() == total
  ck.restore(total, fresh)
  ck.close()
  want = np.asarray(full.pyramid.levels[0](src, tgt, init))
  np.testing.assert_array_equal(np.asarray(fresh.levels[0](src, tgt, init)), want)
  assert not np.array_equal(before, want)
  # the exported compact weights give the same outputs too
  loaded = seamless.load_weights(wd / "pyramid")
  np.testing.assert_array_equal(np.asarray(loaded.levels[0](src, tgt, init)), want)
  # a different config in the same workdir is refused instead of mixing runs
  with pytest.raises(InputError, match="different config"):
    train_pyramid.train(dataclasses.replace(cfg, learning_rate=1e-2), wd, datasets=([tiny_pairs[0]], [tiny_pairs[1]]))


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, msg", [
    (dict(batch_size=0), "batch_size"),
    (dict(crop=40), "multiple"),
    (dict(stage1_epochs=0, stage2_epochs=0), "epochs"),
    (dict(percentile=0.0), "percentile"),
    (dict(gammas=(-1.0,)), "gammas"),
    (dict(pyramid=seamless.PyramidConfig(levels=(tiny_level_cfg(0), tiny_level_cfg(1)))), "coarse to fine"),
])
def test_malformed_config_is_input_error(kw, msg):
  with pytest.raises(InputError, match=msg):
    train_data.validate_train_config(tiny_train_cfg(**kw))


def test_malformed_dataset_and_config_dict_are_input_errors(tmp_path):
  with pytest.raises(InputError, match="does not exist"):
    train_data.build_dataset(tiny_train_cfg(data_root=str(tmp_path / "nope")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="at least 2 sections"):
    train_data.build_dataset(tiny_train_cfg(data_root=str(tmp_path), stacks=(("empty", 1),)))
  with pytest.raises(InputError, match="stack"):
    train_data.make_pairs(np.zeros((1, 8, 8)), jax.random.PRNGKey(0), train_data.AugmentConfig())
  d = nnx_weights.config_to_dict(tiny_train_cfg())
  assert train_data.config_from_dict(d) == tiny_train_cfg()
  d["pyramid"]["levels"][0]["encoder"]["channels"] = "wide"
  with pytest.raises(InputError):
    train_data.config_from_dict(d)
  del d["pyramid"]
  with pytest.raises(InputError, match="malformed"):
    train_data.config_from_dict(d)


def test_blur_masked_matches_scipy_and_keeps_no_data():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 30, 34)).astype(np.float32)
  x[1, 5:12, 8:20] = 0.0
  got = np.asarray(train_pyramid.blur_masked(jnp.asarray(x), 1.5))
  for i in range(2):
    ref = ndimage.gaussian_filter(x[i].astype(np.float64), 1.5, mode="mirror", truncate=3.0) * (x[i] != 0)
    np.testing.assert_allclose(got[i], ref, atol=1e-5)
  enc = np.stack([x, 2 * x], -1)
  got_e = np.asarray(train_pyramid.blur_masked(jnp.asarray(enc), 1.5))
  np.testing.assert_allclose(got_e[..., 1], 2 * got, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Encoder-only level (issue 19): known-warp loss, stripe energy, training/resume and errors
# ------------------------------------------------------------------------------------------------

def test_shift_offsets_and_integer_shift_match_numpy():
  offs = train_encoder._shift_offsets(train_encoder.EncoderTrainConfig())
  assert offs.dtype.kind == "i" and len(offs) == len({tuple(o) for o in offs}) and not np.any(np.all(offs == 0, -1))
  x = np.random.default_rng(0).normal(size=(2, 9, 11, 3)).astype(np.float32)
  for dy, dx in ((1, -2), (-3, 0), (2, 2)):
    got = np.asarray(train_encoder._shifted(jnp.asarray(x), dy, dx))
    ref = np.zeros_like(x)  # ref[y, x] = x[y + dy, x + dx], zeros outside
    for y in range(9):
      for xx in range(11):
        if 0 <= y + dy < 9 and 0 <= xx + dx < 11:
          ref[:, y, xx] = x[:, y + dy, xx + dx]
    np.testing.assert_array_equal(got, ref)


def _smooth_encodings(shift=(1.5, -2.0), size=48, seed=0):
  rng = np.random.default_rng(seed)
  base = ndimage.gaussian_filter(rng.normal(size=(1, size + 16, size + 16, 4)), (0, 1.5, 1.5, 0))
  base /= base.std()
  from jaxalign.ops import fields
  tgt = base[:, 8:8 + size, 8:8 + size].astype(np.float32)
  field = np.broadcast_to(np.array(shift, np.float32), (1, size, size, 2)).copy()
  # src such that warp(src, field) == tgt: src(r + shift) = tgt(r)
  src = np.asarray(fields.warp(jnp.asarray(base), jnp.asarray(np.broadcast_to(
      -np.array(shift, np.float32), base.shape[:3] + (2,)).copy())))[:, 8:8 + size, 8:8 + size]
  return jnp.asarray(src), jnp.asarray(tgt), jnp.asarray(field)


def test_encoder_loss_prefers_the_true_alignment_and_matches_reference():
  src, tgt, field = _smooth_encodings()
  offs = train_encoder._shift_offsets(train_encoder.EncoderTrainConfig())
  kw = dict(margin=6, chunk=16, temperature=0.1, nce_weight=1.0)
  loss, t = train_encoder.encoder_loss(src, tgt, field, offs, **kw)
  # aligned MSE equals the kernel's masked MSE on the same mask (float64 reference of the inner part)
  from jaxalign.ops import fields
  warped = np.asarray(fields.warp(src, field), np.float64)
  inner = np.zeros((48, 48), bool)
  inner[6:-6, 6:-6] = True
  support = np.asarray(fields.warp((src != 0).any(-1).astype(jnp.float32), field))[0] > train_data.FULL_SUPPORT
  m = inner & support
  ref = np.mean(((warped[0] - np.asarray(tgt[0], np.float64)) ** 2)[m])
  np.testing.assert_allclose(float(t["mse"]), ref, rtol=1e-4, atol=1e-6)
  assert float(t["acc"]) > 0.9 and float(t["mse_wrong"]) > 5 * float(t["mse"])
  wrong, tw = train_encoder.encoder_loss(src, tgt, field + 2.0, offs, **kw)
  assert float(wrong) > float(loss) + 1.0 and float(tw["acc"]) < 0.5
  g = jax.grad(lambda s: train_encoder.encoder_loss(s, tgt, field, offs, **kw)[0])(src)
  assert np.all(np.isfinite(np.asarray(g)))


def test_stripe_power_fraction_closed_form():
  rng = np.random.default_rng(1)
  img = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 1.0)
  period, theta = 8.0, 0.0  # along y: frequency bin 64 / 8 = 8 exactly
  yy = np.arange(64)[:, None] * np.ones((1, 64))
  stripe = 0.5 * np.sin(2 * np.pi * yy / period)
  f = train_encoder.stripe_power_fraction(img, img + stripe, period, theta)
  win = np.outer(np.hanning(64), np.hanning(64))
  total = np.sum(np.abs(np.fft.fft2((img - img.mean()) * win)) ** 2)
  stripe_power = np.sum(np.abs(np.fft.fft2((stripe - stripe.mean()) * win)) ** 2)  # all near ±bin 8
  np.testing.assert_allclose(f, stripe_power / total, rtol=0.02)
  assert train_encoder.stripe_power_fraction(img, img, period, theta) == 0.0
  # an "encoding" that passes the image through unchanged has ratio 1; channels add up
  enc = np.stack([img, img], -1)
  np.testing.assert_allclose(train_encoder.stripe_power_fraction(enc, enc + stripe[..., None], period, theta), f, rtol=1e-6)


def tiny_encoder_cfg(**kw):
  base = dict(encoder=seamless.EncoderConfig(channels=4, blocks=1, out_channels=3), encoding_levels=0, crop=32,
              margin=4, chunk=8, batch_size=2, steps=4, eval_every=2, checkpoint_every=2, keep_last=2,
              val_pairs=1, shift_radii=(1.0,), shift_directions=4, learning_rate=3e-3)
  base.update(kw)
  return train_encoder.EncoderTrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_level_stacks():
  rng = np.random.default_rng(5)
  base = ndimage.gaussian_filter(rng.uniform(size=(3, 40, 40)), (0, 1.2, 1.2))
  imgs = (0.2 + 0.6 * (base - base.min()) / (base.max() - base.min())).astype(np.float32)
  return [train_encoder.LevelStack("tiny", imgs, 32.0)]


def _params(pyramid):
  return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(pyramid, nnx.Param))}


def test_encoder_training_resumes_at_the_right_step(tmp_path, tiny_level_stacks):
  cfg = tiny_encoder_cfg()
  st = tiny_level_stacks
  full = train_encoder.train_encoder(cfg, tmp_path / "a", stacks=st, val_stacks=st, progress=False)
  assert full.step == 4 and full.weights_path.is_file()
  part = train_encoder.train_encoder(cfg, tmp_path / "b", stacks=st, val_stacks=st, max_steps=2, progress=False)
  assert part.step == 2 and not part.weights_path.exists()
  resumed = train_encoder.train_encoder(cfg, tmp_path / "b", stacks=st, val_stacks=st, progress=False)
  assert resumed.step == 4
  a, b = _params(full.pyramid), _params(resumed.pyramid)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
  rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  assert rows[0]["event"] == "start" and "val_epe_raw" in rows[0] and all("val_epe" in r for r in rows if "loss" in r)
  back = seamless.load_weights(tmp_path / "a" / "encoder")
  assert back.cfg.levels[0].aligner is None and back.cfg.levels[0].nm == 32.0


@pytest.mark.parametrize("kw,msg", [
    (dict(crop=30), "multiple of chunk"),
    (dict(steps=0), "steps"),
    (dict(nm=0.0), "nm must be"),
    (dict(stacks=()), "no training stacks"),
    (dict(stacks=(("isbi2012_train", 4.0, 5, 5, 1),)), "first < stop"),
])
def test_malformed_encoder_config_is_input_error(kw, msg):
  with pytest.raises(InputError, match=msg):
    train_encoder.validate_encoder_config(tiny_encoder_cfg(**kw))


def test_empty_or_missing_encoder_dataset_is_input_error(tmp_path, tiny_level_stacks):
  cfg = tiny_encoder_cfg()
  with pytest.raises(InputError, match="empty"):
    train_encoder.train_encoder(cfg, tmp_path / "e", stacks=[], val_stacks=tiny_level_stacks, progress=False)
  small = [train_encoder.LevelStack("small", np.ones((2, 16, 16), np.float32), 32.0)]
  with pytest.raises(InputError, match="crop"):
    train_encoder.train_encoder(cfg, tmp_path / "e", stacks=small, val_stacks=tiny_level_stacks, progress=False)
  assert not (tmp_path / "e").exists()  # nothing half-written
  with pytest.raises(InputError, match="does not exist"):
    train_encoder.load_level_stacks(tiny_encoder_cfg(data_root=str(tmp_path / "nowhere")))
  import pathlib
  if (pathlib.Path(train_data.DEFAULT_DATA_ROOT) / "isbi2012_train").is_dir():
    with pytest.raises(InputError, match="at least 2"):
      train_encoder.load_level_stacks(tiny_encoder_cfg(stacks=(("isbi2012_train", 4.0, 0, 1, 1),),
                                               data_root=train_data.DEFAULT_DATA_ROOT))


def test_validation_epe_in_mip0_pixels_over_pixels_with_data():
  # Fields off by (3, 4) level px everywhere: 5 level px = 5 * 2**mip MIP-0 px; the tgt's empty left
  # half is not scored (its error is set to 100 px there to show it).
  n, h, w = 2, 16, 16
  src = np.ones((n, h, w), np.float32)
  tgt = np.ones((n, h, w), np.float32)
  tgt[:, :, : w // 2] = 0.0
  gt = np.zeros((n, h, w, 2), np.float32)
  pred = np.broadcast_to(np.array([3.0, 4.0], np.float32), (n, h, w, 2)).copy()
  pred[:, :, : w // 2] = [60.0, 80.0]
  data = train_pyramid.LevelData(src, tgt, np.zeros_like(src), np.zeros_like(gt), gt)
  out = train_pyramid.epe(pred, data, mip=2)
  assert out["epe_mean"] == pytest.approx(20.0) and out["epe_p95"] == pytest.approx(20.0)
