"""Encoder-only SEAMLeSS levels (issue 19): an encoder trained self-supervised with a known-warp loss,
whose encodings the Online Field Finetuner aligns (`train_encoder`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from jaxalign.errors import InputError
from jaxalign.models import nnx_weights
from jaxalign.models import seamless as models
from jaxalign.ops import fields, losses, preprocess
from jaxalign.models.train_data import (DEFAULT_DATA_ROOT, FULL_SUPPORT, MIN_CHUNK_COVERAGE, AugmentConfig,
                                       load_stack, random_blobs, distortion_field)
from jaxalign.models.train_pyramid import (TRACE_COUNT, Checkpoints, TrainResult, adam_optimizer, chunk_mse,
                                           valid_mask, write_metrics)


# ----------------------------------------------------------------------------------------------
# Encoder-only levels (issue 19): an encoder whose encodings the Online Field Finetuner aligns
# ----------------------------------------------------------------------------------------------
#
# The paper aligned FAFB's coarse levels with encoder-only networks and the finetuner on their
# encodings. Here such an encoder is trained self-supervised with a known-warp signal: a real section
# (or a real neighbour pair, so natural section-to-section change is part of what must be ignored) is
# warped by a known smooth random field `d`, and each view gets its own artifacts (knife-chatter
# stripes of random period/orientation/phase/amplitude/waveform, contrast/gamma/brightness, blur,
# noise, missing blobs). The loss asks that `warp(enc(src), d)` matches `enc(tgt)` (MSE on the
# per-channel normalised encodings) and that it matches it *better than at wrong alignments*
# `d + delta` (InfoNCE over a ring of shifts, per chunk): the first term makes the encoding ignore
# what differs between the views (artifacts), the second keeps it sharp enough to localise, so the
# smooth (or constant) encoding that would trivially satisfy the first is not a solution.


# (stack, nm per pixel (y/x), first section, stop section, stride): training / validation sections.
# Sections from the stop of the validation range on are never seen in training or validation: they
# are the held-out sections of experiments/eval_encoder.py (isbi 25-29, gerhard 16-19, flyem 112-127,
# and the damaged DOLW7 pair, which is not used at all).
ENCODER_TRAIN_STACKS = (("isbi2012_train", 4.0, 0, 22, 1), ("gerhard_vnc_stack1", 4.6, 0, 14, 1),
                        ("flyem_medulla_fibsem", 10.0, 0, 100, 4))
ENCODER_VAL_STACKS = (("isbi2012_train", 4.0, 22, 25, 1), ("gerhard_vnc_stack1", 4.6, 14, 16, 1),
                      ("flyem_medulla_fibsem", 10.0, 100, 112, 4))


@dataclasses.dataclass(frozen=True)
class EncoderAugmentConfig:
  """Known warp and per-view artifacts of encoder training (lengths in px of the level unless nm).

  Attributes:
    max_translation, max_rotation_deg, max_scale, smooth_amplitude, smooth_spacing: the known field
      (as `AugmentConfig`, but in level px).
    neighbour_probability: chance that the two views come from neighbouring sections (else one).
    stripe_probability: chance, per view, of knife-chatter stripes.
    stripe_amplitude: (min, max) relative modulation.
    stripe_period_nm: (min, max) stripe period, nm (converted to each stack's level px).
    harmonic: largest relative amplitude of the stripes' second harmonic (non-sinusoidal chatter).
    gain, offset, gamma_range: per-view contrast `clip(gain * x**gamma + offset)`.
    noise_sigma: (min, max) additive Gaussian noise (images on [0, 1]).
    max_blur: largest blend towards a sigma-1 blur (focus changes).
    blob_probability, blob_radius, max_blobs: missing-data discs per view (zeros = no data).
  """
  max_translation: float = 4.0
  max_rotation_deg: float = 3.0
  max_scale: float = 0.03
  smooth_amplitude: float = 2.0
  smooth_spacing: int = 16
  neighbour_probability: float = 0.5
  stripe_probability: float = 0.7
  stripe_amplitude: tuple[float, float] = (0.05, 0.6)
  stripe_period_nm: tuple[float, float] = (80.0, 640.0)
  harmonic: float = 0.5
  gain: tuple[float, float] = (0.7, 1.3)
  offset: tuple[float, float] = (-0.1, 0.1)
  gamma_range: tuple[float, float] = (0.6, 1.6)
  noise_sigma: tuple[float, float] = (0.0, 0.08)
  max_blur: float = 1.0
  blob_probability: float = 0.2
  blob_radius: tuple[float, float] = (3.0, 10.0)
  max_blobs: int = 2


@dataclasses.dataclass(frozen=True)
class EncoderTrainConfig:
  """Training of one encoder-only level placed at `nm` (issue 19).

  Attributes:
    encoder: architecture.
    nm: pixel size (nm) the level works at: each stack is reduced to its MIP nearest this.
    encoding_levels: coarser encoding reductions the finetuner uses at inference (stored with the
      weights; validation runs the same).
    data_root: folder of the shared stacks.
    stacks, val_stacks: (name, nm per px, first, stop, stride) section ranges.
    crop: square crop side, level px (multiple of `chunk`).
    margin: border (level px) left out of the loss (convolution padding).
    batch_size: pairs per step.
    steps: total steps.
    learning_rate: Adam, cosine-decayed over `steps` to 10 %.
    shift_radii: wrong alignments (level px) the InfoNCE term contrasts with the true one, each in
      `shift_directions` directions (rotated between radii).
    shift_directions: directions per radius.
    temperature: InfoNCE temperature on the chunk MSE.
    nce_weight: weight of the InfoNCE term (the aligned MSE has weight 1).
    chunk: InfoNCE chunk side, level px.
    val_pairs: validation pairs per validation stack (fixed, seeded; stripes on both views).
    eval_every, checkpoint_every, keep_last, seed: as `TrainConfig`.
    augment: known warp and artifacts.
  """
  encoder: models.EncoderConfig = models.EncoderConfig(channels=12, blocks=3, out_channels=6, dilations=(1, 2, 4))
  nm: float = 32.0
  encoding_levels: int = 2
  data_root: str = DEFAULT_DATA_ROOT
  stacks: tuple[tuple[str, float, int, int, int], ...] = ENCODER_TRAIN_STACKS
  val_stacks: tuple[tuple[str, float, int, int, int], ...] = ENCODER_VAL_STACKS
  crop: int = 64
  margin: int = 6
  batch_size: int = 6
  steps: int = 6000
  learning_rate: float = 2e-3
  shift_radii: tuple[float, ...] = (1.0, 2.0, 3.0)
  shift_directions: int = 8
  temperature: float = 0.1
  nce_weight: float = 1.0
  chunk: int = 16
  val_pairs: int = 3
  eval_every: int = 250
  checkpoint_every: int = 250
  keep_last: int = 3
  seed: int = 0
  augment: EncoderAugmentConfig = EncoderAugmentConfig()

  def level_config(self) -> models.LevelConfig:
    """The encoder-only `LevelConfig` these weights ship as (MIP 3 = 32 nm on 4 nm data by default)."""
    return models.LevelConfig(mip=fields.level_nearest(4.0, self.nm), encoder=self.encoder, aligner=None,
                              finetune=(("gamma", models.ENCODING_GAMMAS[0]),
                                        ("learning_rate", models.ENCODING_LEARNING_RATES[0]),
                                        ("iterations", models.ENCODING_ITERATIONS[0])),
                              nm=float(self.nm), encoding_levels=int(self.encoding_levels))


def validate_encoder_config(cfg: EncoderTrainConfig) -> None:
  """Raises InputError naming the first malformed setting."""
  e, a = cfg.encoder, cfg.augment
  checks = [
      (all(isinstance(v, int) and v >= 1 for v in (e.channels, e.out_channels)) and e.blocks >= 0,
       f"encoder channels/out_channels must be >= 1 and blocks >= 0, got {e}"),
      (cfg.nm > 0, f"nm must be > 0, got {cfg.nm}"),
      (cfg.encoding_levels >= 0, f"encoding_levels must be >= 0, got {cfg.encoding_levels}"),
      (cfg.chunk >= 4 and cfg.crop % cfg.chunk == 0, f"crop {cfg.crop} must be a multiple of chunk {cfg.chunk} (>= 4)"),
      (0 <= cfg.margin and cfg.crop - 2 * cfg.margin >= cfg.chunk,
       f"crop {cfg.crop} leaves no chunk inside a margin of {cfg.margin}"),
      (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
      (cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}"),
      (cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}"),
      (len(cfg.shift_radii) >= 1 and all(r > 0 for r in cfg.shift_radii) and cfg.shift_directions >= 1,
       f"shift_radii must be > 0 and shift_directions >= 1, got {cfg.shift_radii}, {cfg.shift_directions}"),
      (cfg.temperature > 0 and cfg.nce_weight >= 0, "temperature must be > 0 and nce_weight >= 0"),
      (cfg.val_pairs >= 1, f"val_pairs must be >= 1, got {cfg.val_pairs}"),
      (cfg.eval_every >= 1 and cfg.checkpoint_every >= 1 and cfg.keep_last >= 1,
       "eval_every, checkpoint_every and keep_last must be >= 1"),
      (len(cfg.stacks) >= 1, "no training stacks given"),
      (len(cfg.val_stacks) >= 1, "no validation stacks given"),
      (0 < a.stripe_period_nm[0] <= a.stripe_period_nm[1], f"bad stripe_period_nm {a.stripe_period_nm}"),
      (0 <= a.neighbour_probability <= 1 and 0 <= a.stripe_probability <= 1 and 0 <= a.blob_probability <= 1,
       "probabilities must be in [0, 1]"),
  ]
  for name, nm, first, stop, stride in tuple(cfg.stacks) + tuple(cfg.val_stacks):
    checks.append((nm > 0 and 0 <= first < stop and stride >= 1,
                   f"stack {name}: need nm > 0, 0 <= first < stop and stride >= 1, got {(nm, first, stop, stride)}"))
  for ok, msg in checks:
    if not ok:
      raise InputError(f"encoder train config: {msg}")
  try:
    models.validate_pyramid_config(models.PyramidConfig(levels=(cfg.level_config(),)))
  except InputError as err:
    raise InputError(f"encoder train config: {err}") from None


class LevelStack(NamedTuple):
  """One stack's sections at the level: images `[Z, h, w]` float32 (0 = no data) and the level's nm."""
  name: str
  images: np.ndarray
  level_nm: float


def load_level_stacks(cfg: EncoderTrainConfig, which: str = "train") -> list[LevelStack]:
  """Sections of `cfg.stacks` (or `cfg.val_stacks`) reduced (2x2 means) to each stack's MIP nearest
  `cfg.nm`. Raises InputError for a missing folder or a range without two sections."""
  root = pathlib.Path(cfg.data_root)
  if not root.is_dir():
    raise InputError(f"data_root {root} does not exist")
  out = []
  for name, nm, first, stop, stride in (cfg.stacks if which == "train" else cfg.val_stacks):
    secs = load_stack(root, name, 1)[first:stop:stride]
    if secs.shape[0] < 2:
      raise InputError(f"{which} stack {name!r}: sections {first}:{stop}:{stride} hold {secs.shape[0]} "
                       "section(s); need at least 2")
    mip = fields.level_nearest(nm, cfg.nm)
    h, w = secs.shape[1:]
    secs = secs[:, :h - h % 2 ** mip, :w - w % 2 ** mip]
    level = np.asarray(fields.pyramid(jnp.asarray(secs), mip + 1, reduce="mean")[mip], np.float32)
    if min(level.shape[1:]) < cfg.crop:
      raise InputError(f"{which} stack {name!r}: {level.shape[1]}x{level.shape[2]} px at {nm * 2 ** mip:g} nm "
                       f"is smaller than the crop {cfg.crop}")
    out.append(LevelStack(name, level, float(nm * 2 ** mip)))
  return out


class EncoderBatch(NamedTuple):
  """a, b `[B, c, c]` (b is warped by the known field), level_nm `[B]`."""
  a: Any
  b: Any
  level_nm: Any


def sample_encoder_batch(rng: np.random.Generator, stacks: Sequence[LevelStack], cfg: EncoderTrainConfig,
                         crop: int | None = None) -> EncoderBatch:
  """Random crops of one section (two views) or of a neighbour pair, with random flips/transposes."""
  crop = crop or cfg.crop
  sizes = np.array([s.images.shape[0] * s.images.shape[1] * s.images.shape[2] for s in stacks], np.float64)
  a = np.zeros((cfg.batch_size, crop, crop), np.float32)
  b = np.zeros_like(a)
  nm = np.zeros((cfg.batch_size,), np.float32)
  for i in range(cfg.batch_size):
    st = stacks[rng.choice(len(stacks), p=sizes / sizes.sum())]
    z, h, w = st.images.shape
    k = rng.integers(z)
    k2 = k
    if rng.random() < cfg.augment.neighbour_probability:
      k2 = k + 1 if k + 1 < z else k - 1
    if rng.random() < 0.5:
      k, k2 = k2, k
    y0, x0 = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    pa, pb = st.images[k, y0:y0 + crop, x0:x0 + crop], st.images[k2, y0:y0 + crop, x0:x0 + crop]
    if rng.random() < 0.5:
      pa, pb = pa[::-1], pb[::-1]
    if rng.random() < 0.5:
      pa, pb = pa[:, ::-1], pb[:, ::-1]
    if rng.random() < 0.5:
      pa, pb = pa.T, pb.T
    a[i], b[i], nm[i] = pa, pb, st.level_nm
  return EncoderBatch(a, b, nm)


def _view_artifacts(key, image, level_nm, aug: EncoderAugmentConfig, force_stripes: bool = False):
  """One view's artifacts on `image [h, w]` (0 = no data stays 0; blobs add no data)."""
  h, w = image.shape
  ks = jax.random.split(key, 12)
  u = lambda k, lohi: jax.random.uniform(k, (), minval=lohi[0], maxval=lohi[1])
  valid = image != 0
  x = jnp.abs(image) ** u(ks[0], aug.gamma_range)
  x = u(ks[1], aug.gain) * x + u(ks[2], aug.offset)
  blur = jax.random.uniform(ks[3]) * aug.max_blur
  x = (1 - blur) * x + blur * fields.gaussian_blur(x, 1.0)
  # Knife chatter: period in nm -> px of this stack's level; log-uniform period, random waveform.
  lo, hi = jnp.log(aug.stripe_period_nm[0] / level_nm), jnp.log(aug.stripe_period_nm[1] / level_nm)
  period = jnp.exp(jax.random.uniform(ks[4], (), minval=lo, maxval=hi))
  theta = jax.random.uniform(ks[5], (), maxval=jnp.pi)
  phase = jax.random.uniform(ks[6], (), maxval=2 * jnp.pi)
  amp = u(ks[7], aug.stripe_amplitude)
  harm = jax.random.uniform(ks[8]) * aug.harmonic
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  ph = 2 * jnp.pi * (yy * jnp.cos(theta) + xx * jnp.sin(theta)) / period + phase
  wave = (jnp.sin(ph) + harm * jnp.sin(2 * ph + phase)) / (1 + harm)
  on = force_stripes | (jax.random.uniform(ks[9]) < aug.stripe_probability)
  x = x * jnp.where(on, 1.0 + amp * wave, 1.0)
  x = x + jax.random.normal(ks[10], (h, w)) * u(ks[11], aug.noise_sigma)
  blob_aug = AugmentConfig(blob_radius=aug.blob_radius, max_blobs=aug.max_blobs)
  kb, kp = jax.random.split(jax.random.fold_in(key, 99))
  blob = random_blobs(kb, (h, w), blob_aug) & (jax.random.uniform(kp) < aug.blob_probability)
  x = jnp.clip(x, 1.0 / 512, 1.5)
  return jnp.where(valid & ~blob, x, 0.0)


def _shift_offsets(cfg: EncoderTrainConfig) -> np.ndarray:
  """`[K, 2]` integer wrong-alignment offsets (dy, dx), level px: for each radius r, the
  `shift_directions` points of the ring of radius r rounded to the integer grid (duplicates dropped)."""
  out = []
  for i, r in enumerate(cfg.shift_radii):
    ang = 2 * np.pi * (np.arange(cfg.shift_directions) + 0.5 * (i % 2)) / cfg.shift_directions
    pts = np.round(np.stack([r * np.sin(ang), r * np.cos(ang)], -1)).astype(np.int64)
    out.extend(tuple(p) for p in pts if tuple(p) != (0, 0))
  uniq = list(dict.fromkeys(out))
  return np.asarray(uniq, np.int64).reshape(-1, 2)


def _shifted(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """`x [B, H, W, ...]` sampled at `r + (dy, dx)` (integer), zeros outside."""
  h, w = x.shape[1:3]
  pad = [(0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx))] + [(0, 0)] * (x.ndim - 3)
  p = jnp.pad(x, pad)
  return p[:, abs(dy) + dy:abs(dy) + dy + h, abs(dx) + dx:abs(dx) + dx + w]


def make_encoder_views(key, batch: EncoderBatch, aug: EncoderAugmentConfig, force_stripes: bool = False):
  """(src `[B, c, c]`, tgt `[B, c, c]`, field `[B, c, c, 2]`) with `warp(src, field) ≈ tgt`: tgt is
  view b warped by the known random field, and each view has its own artifacts."""
  c = batch.a.shape[-1]
  shape_aug = dataclasses.replace(AugmentConfig(), max_translation=aug.max_translation,
                                  max_rotation_deg=aug.max_rotation_deg, max_scale=aug.max_scale,
                                  smooth_amplitude=aug.smooth_amplitude, smooth_spacing=aug.smooth_spacing)

  def one(k, a, b, nm):
    kd, ks, kt = jax.random.split(k, 3)
    d = distortion_field(kd, (c, c), shape_aug)
    tgt = fields.warp(b, d)
    return (_view_artifacts(ks, a, nm, aug, force_stripes), _view_artifacts(kt, tgt, nm, aug, force_stripes), d)

  keys = jax.random.split(key, batch.a.shape[0])
  return jax.vmap(one)(keys, jnp.asarray(batch.a), jnp.asarray(batch.b), jnp.asarray(batch.level_nm))


def encoder_loss(src_enc, tgt_enc, field, offsets, *, margin: int, chunk: int, temperature: float,
                 nce_weight: float):
  """Known-warp encoder loss: aligned MSE + nce_weight * InfoNCE against wrong alignments.

  Args:
    src_enc, tgt_enc: `[B, c, c, C]` float32 encodings (0 = no data).
    field: `[B, c, c, 2]` the known field with `warp(src, field) ≈ tgt`, level px.
    offsets: `[K, 2]` integer wrong-alignment offsets (level px) added to `field`.
    margin: border px left out; chunk: InfoNCE chunk side (c multiple of it).
  Returns:
    (scalar loss, dict of terms: mse (aligned), nce, mse_wrong (mean over offsets), acc (fraction of
    chunks where the true alignment has the lowest MSE)).
  """
  c = src_enc.shape[1]
  inner = np.zeros((c, c), np.float32)
  inner[margin:c - margin, margin:c - margin] = 1.0

  def masked(f):
    m = (fields.warp(valid_mask(src_enc), jax.lax.stop_gradient(f)) > FULL_SUPPORT).astype(jnp.float32)
    return m * valid_mask(tgt_enc) * inner

  mask0 = masked(field)
  warped = fields.warp(src_enc, field)
  mse0_c, cover = chunk_mse(warped, tgt_enc, mask0, chunk)
  mse0 = losses.masked_mse(warped, tgt_enc, mask0)
  # Wrong alignments: the aligned encoding read at r + delta, i.e. `warp(src, field + delta)` up to the
  # field's variation over |delta| px (the known field is smooth), for integer delta: shifted slices,
  # not one bilinear warp (and its scatter-add gradient) per offset, which cost 25x more on CPU. They
  # are scored on the true alignment's mask (shifted into place), so only the encodings differ.
  wrong = jnp.stack([chunk_mse(_shifted(warped, int(dy), int(dx)), tgt_enc,
                               mask0 * _shifted(mask0, int(dy), int(dx)), chunk)[0]
                     for dy, dx in np.asarray(offsets)], axis=-1)  # [B, n, n, K]
  logits = -jnp.concatenate([mse0_c[..., None], wrong], axis=-1) / temperature
  ok = (cover >= MIN_CHUNK_COVERAGE).astype(jnp.float32)
  nce_c = -jax.nn.log_softmax(logits, axis=-1)[..., 0]
  nce = jnp.sum(nce_c * ok) / jnp.maximum(ok.sum(), 1.0)
  acc = jnp.sum((jnp.argmax(logits, axis=-1) == 0) * ok) / jnp.maximum(ok.sum(), 1.0)
  mse_wrong = jnp.sum(wrong.mean(-1) * ok) / jnp.maximum(ok.sum(), 1.0)
  return mse0 + nce_weight * nce, {"mse": mse0, "nce": nce, "mse_wrong": mse_wrong, "acc": acc}


def multiscale_encoder_loss(src_enc, tgt_enc, field, offsets, *, reductions: int, margin: int, chunk: int,
                            temperature: float, nce_weight: float):
  """`encoder_loss` at the level and at each of its `reductions` 2x2-mean reductions (averaged).

  The finetuner aligns the encodings coarse to fine over such reductions (`models.finetune_encodings`),
  so they must stay informative there too: an encoding of pixel-scale, sign-alternating features
  satisfies the level's loss but averages out to nothing one reduction up (seen in training: the
  validation EPE grew while the level's loss fell). Offsets stay integer px of each reduction (so
  wrong alignments are 2**k times larger there); margin and chunk shrink with it (chunk >= 4).
  Returns (scalar, terms of the level itself plus `loss_k`).
  """
  total, terms = encoder_loss(src_enc, tgt_enc, field, offsets, margin=margin, chunk=chunk,
                              temperature=temperature, nce_weight=nce_weight)
  terms = dict(terms, loss_0=total)
  s, t, f = src_enc, tgt_enc, field
  n = 1
  for k in range(1, reductions + 1):
    c = s.shape[1] // 2
    if c % max(chunk >> k, 4) or c < 8:
      break
    s = models.down_channels_last(s) * jnp.all(models.down_channels_last((s != 0).astype(jnp.float32)) > 0.99,
                                                 axis=-1, keepdims=True)
    t = models.down_channels_last(t) * jnp.all(models.down_channels_last((t != 0).astype(jnp.float32)) > 0.99,
                                                 axis=-1, keepdims=True)
    f = fields.downsample_field(f)
    lk, _ = encoder_loss(s, t, f, offsets, margin=-(-margin // 2 ** k), chunk=max(chunk >> k, 4),
                         temperature=temperature, nce_weight=nce_weight)
    terms[f"loss_{k}"] = lk
    total = total + lk
    n += 1
  return total / n, terms


class EncoderStepSettings(NamedTuple):
  reductions: int
  margin: int
  chunk: int
  temperature: float
  nce_weight: float
  offsets: tuple[tuple[float, float], ...]
  augment: EncoderAugmentConfig


def _encoder_step_impl(graphdef, hp: EncoderStepSettings, state, batch: EncoderBatch, key):
  TRACE_COUNT[0] += 1
  level, opt = nnx.merge(graphdef, state)
  src, tgt, d = make_encoder_views(key, batch, hp.augment)

  def loss_fn(model):
    return multiscale_encoder_loss(model.encode(src), model.encode(tgt), d, np.asarray(hp.offsets, np.int64),
                                   reductions=hp.reductions, margin=hp.margin, chunk=hp.chunk, temperature=hp.temperature, nce_weight=hp.nce_weight)

  (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(level)
  opt.update(level, grads)
  return nnx.state((level, opt)), dict(terms, loss=loss)


_encoder_step = jax.jit(_encoder_step_impl, static_argnums=(0, 1))


class ValPair(NamedTuple):
  src: np.ndarray
  tgt: np.ndarray
  gt: np.ndarray
  level_nm: float


def encoder_val_pairs(stacks: Sequence[LevelStack], cfg: EncoderTrainConfig, *, size: int = 128) -> list[ValPair]:
  """Fixed held-out ground-truth pairs (seeded): up to `size`² centre crops, stripes on both views."""
  out = []
  for si, st in enumerate(stacks):
    z, h, w = st.images.shape
    c = min(size, h, w)
    c -= c % 2 ** max(cfg.encoding_levels, 0)
    y0, x0 = (h - c) // 2, (w - c) // 2
    for j in range(cfg.val_pairs):
      k, k2 = j % (z - 1), j % (z - 1) + 1
      batch = EncoderBatch(st.images[k:k + 1, y0:y0 + c, x0:x0 + c], st.images[k2:k2 + 1, y0:y0 + c, x0:x0 + c],
                           np.array([st.level_nm], np.float32))
      key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1000), si * 100 + j)
      s, t, d = make_encoder_views(key, batch, cfg.augment, force_stripes=True)
      out.append(ValPair(np.asarray(s[0]), np.asarray(t[0]), np.asarray(d[0]), st.level_nm))
  return out


def pair_epe(field: np.ndarray, pair: ValPair, margin: int = 0) -> np.ndarray:
  """Endpoint errors (level px) of `field` vs the pair's ground truth where both views have data."""
  valid = (np.asarray(fields.warp(jnp.asarray((pair.src != 0).astype(np.float32)), jnp.asarray(pair.gt)))
           > FULL_SUPPORT) & (pair.tgt != 0)
  if margin:
    inner = np.zeros_like(valid)
    inner[margin:-margin, margin:-margin] = True
    valid &= inner
  return np.linalg.norm(field - pair.gt, axis=-1)[valid]


def align_encoded(level: models.Level, src: np.ndarray, tgt: np.ndarray, encoding_levels: int) -> np.ndarray:
  """The encoder-only level's field `[h, w, 2]` (level px) for images at the level (`[h, w]`)."""
  graphdef, state = nnx.split(level)
  zero = jnp.zeros(src.shape + (2,), jnp.float32)
  _, se, te = models.level_forward(graphdef, state, jnp.asarray(src), jnp.asarray(tgt), zero)
  return np.asarray(models.finetune_encodings(se, te, zero, src_mask=src != 0, tgt_mask=tgt != 0,
                                              levels=encoding_levels, config=finetune_config_of(level)))


def finetune_config_of(level: models.Level):
  return models.finetune_config(level.cfg)


def align_raw(src: np.ndarray, tgt: np.ndarray, encoding_levels: int) -> np.ndarray:
  """The same coarse-to-fine finetuner on the normalised images themselves (one channel)."""
  s = np.asarray(preprocess.normalize(jnp.asarray(src)))[..., None]
  t = np.asarray(preprocess.normalize(jnp.asarray(tgt)))[..., None]
  zero = jnp.zeros(src.shape + (2,), jnp.float32)
  return np.asarray(models.finetune_encodings(s, t, zero, src_mask=src != 0, tgt_mask=tgt != 0,
                                              levels=encoding_levels, config=models.encoding_finetune(0)))


def stripe_power_fraction(clean: np.ndarray, striped: np.ndarray, period: float, theta: float,
                          radius: int = 2) -> float:
  """Fraction of a signal's power that stripes add at their own frequency.

  `(striped - clean)` (images `[h, w]` or encodings `[h, w, C]`, channels summed), Hann-windowed,
  power summed over the FFT bins within `radius` of ±(cos θ, sin θ) / period, divided by the total
  (windowed, mean-removed) power of `clean`. Comparing this fraction for an encoding and for the
  image it encodes gives the stripe energy ratio (issue 19 target: ≤ 10 %).

  Args:
    clean, striped: same shape; stripes multiply by `1 + a sin(2π (y cos θ + x sin θ) / period + φ)`.
    period: px; theta: radians.
  """
  clean = np.asarray(clean, np.float64)
  striped = np.asarray(striped, np.float64)
  if clean.ndim == 2:
    clean, striped = clean[..., None], striped[..., None]
  h, w, _ = clean.shape
  win = np.outer(np.hanning(h), np.hanning(w))[..., None]
  spec = lambda x: np.abs(np.fft.fft2((x - x.mean(axis=(0, 1))) * win, axes=(0, 1))) ** 2
  p_diff, p_clean = spec(striped - clean).sum(-1), spec(clean).sum(-1)
  ky, kx = np.cos(theta) / period * h, np.sin(theta) / period * w
  fy = np.fft.fftfreq(h) * h
  fx = np.fft.fftfreq(w) * w
  dy = lambda c: np.minimum(np.abs(fy[:, None] - c), h - np.abs(fy[:, None] - c))
  dx = lambda c: np.minimum(np.abs(fx[None, :] - c), w - np.abs(fx[None, :] - c))
  near = ((dy(ky) <= radius) & (dx(kx) <= radius)) | ((dy(-ky) <= radius) & (dx(-kx) <= radius))
  return float(p_diff[near].sum() / max(p_clean.sum(), 1e-30))


def _tensorboard_writer(logdir: pathlib.Path):
  """A `SummaryWriter`-like object (tensorboardX or flax.metrics.tensorboard) or None if neither is installed."""
  try:
    from tensorboardX import SummaryWriter  # type: ignore
    return SummaryWriter(str(logdir))
  except ImportError:
    pass
  try:
    from flax.metrics import tensorboard  # type: ignore  (needs TensorFlow)
    return tensorboard.SummaryWriter(str(logdir))
  except Exception:  # noqa: BLE001 - any import failure means "not installed"
    return None


def _tb_scalars(writer, step: int, record: dict) -> None:
  if writer is None:
    return
  for k, v in record.items():
    if isinstance(v, (int, float)) and k != "step":
      (writer.add_scalar if hasattr(writer, "add_scalar") else writer.scalar)(k, v, step)
  if hasattr(writer, "flush"):
    writer.flush()


def train_encoder(cfg: EncoderTrainConfig, workdir, *, stacks=None, val_stacks=None,
                  max_steps: int | None = None, progress: bool = True) -> TrainResult:
  """Trains (or resumes) an encoder-only level with the known-warp loss (`encoder_loss`).

  Writes under `workdir`: `config.json`, `metrics.jsonl` (train terms every `eval_every` steps, with
  validation EPE of the finetuner on the encodings (and, at step 0, on the raw images) over fixed
  held-out pairs, and the validation stripe power ratio encoding / image), TensorBoard events when
  tensorboardX (or flax's writer with TensorFlow) is installed, orbax checkpoints (`checkpoints/last`,
  `checkpoints/best` by validation EPE) and at the end `encoder.{npz,json}` (a one-level `Pyramid`,
  `models.load_weights` format). Rerunning with the same workdir resumes at the latest checkpoint's
  step (parameters, optimiser state, step; the data stream is a function of (seed, step)). SIGTERM /
  Ctrl-C checkpoint the current step before exiting.

  Args:
    cfg: EncoderTrainConfig.
    workdir: output folder.
    stacks, val_stacks: optional lists of `LevelStack` instead of loading `cfg.stacks` (tests).
    max_steps: stop after this global step (simulates an interruption).
    progress: show a tqdm bar (loss, val EPE, ETA).
  """
  import signal
  validate_encoder_config(cfg)
  workdir = pathlib.Path(workdir)
  cfg_path = workdir / "config.json"
  cfg_dict = nnx_weights.config_to_dict(cfg)
  if cfg_path.exists() and json.loads(cfg_path.read_text()) != cfg_dict:
    raise InputError(f"{workdir} holds a run with a different config; use a new workdir to start over")
  stacks = stacks if stacks is not None else load_level_stacks(cfg, "train")
  val_stacks = val_stacks if val_stacks is not None else load_level_stacks(cfg, "val")
  if not stacks or sum(s.images.shape[0] for s in stacks) == 0:
    raise InputError("encoder training dataset is empty")
  if not val_stacks or sum(s.images.shape[0] for s in val_stacks) == 0:
    raise InputError("encoder validation dataset is empty")
  for s in list(stacks) + list(val_stacks):
    if s.images.ndim != 3 or s.images.shape[0] < 1 or min(s.images.shape[1:]) < cfg.crop:
      raise InputError(f"stack {s.name}: need [Z >= 1, h >= crop, w >= crop] images at the level, got "
                       f"{s.images.shape} (crop {cfg.crop})")
  workdir.mkdir(parents=True, exist_ok=True)
  if not cfg_path.exists():
    cfg_path.write_text(json.dumps(cfg_dict, indent=1))
  metrics_path = workdir / "metrics.jsonl"
  pyramid = models.Pyramid(models.PyramidConfig(levels=(cfg.level_config(),)), rngs=nnx.Rngs(cfg.seed))
  level = pyramid.levels[0]
  opt = nnx.Optimizer(level, adam_optimizer(float(cfg.learning_rate), int(cfg.steps)), wrt=nnx.Param)
  ckpt = Checkpoints(workdir, cfg.keep_last)
  step = ckpt.latest_step() or 0
  if step:
    logging.info("resuming encoder training from step %d", step)
    ckpt.restore(step, pyramid, opt)
  vals = encoder_val_pairs(val_stacks, cfg)
  hp = EncoderStepSettings(int(cfg.encoding_levels), int(cfg.margin), int(cfg.chunk), float(cfg.temperature), float(cfg.nce_weight),
                           tuple(map(tuple, _shift_offsets(cfg).tolist())), cfg.augment)
  writer = _tensorboard_writer(workdir / "tensorboard")
  end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)

  def validate(with_raw: bool) -> dict:
    errs = [pair_epe(align_encoded(level, p.src, p.tgt, cfg.encoding_levels), p, cfg.margin) for p in vals]
    nm = np.concatenate([e * p.level_nm for e, p in zip(errs, vals)])
    px = np.concatenate(errs)
    rec = {"val_epe": float(np.median(px)), "val_epe_p95": float(np.percentile(px, 95)),
           "val_epe_nm": float(np.median(nm)), "val_stripe_ratio": val_stripe_ratio(level, val_stacks[0])}
    if with_raw:
      raw = np.concatenate([pair_epe(align_raw(p.src, p.tgt, cfg.encoding_levels), p, cfg.margin) for p in vals])
      rec.update(val_epe_raw=float(np.median(raw)), val_epe_raw_p95=float(np.percentile(raw, 95)))
    return rec

  interrupted = []
  old_handler = signal.getsignal(signal.SIGTERM)
  try:
    signal.signal(signal.SIGTERM, lambda *a: interrupted.append(True))
  except ValueError:  # not the main thread (e.g. some test runners): no SIGTERM checkpoint
    old_handler = None
  t_start, n0 = time.time(), step
  pbar = tqdm(total=cfg.steps, initial=step, desc=f"encoder {cfg.nm:g} nm", disable=not progress)
  graphdef, state = nnx.split((level, opt))
  acc_terms, n_acc = None, 0
  try:
    if step == 0:
      rec = dict(step=0, event="start", **validate(True))
      write_metrics(metrics_path, rec)
      _tb_scalars(writer, 0, rec)
    while step < end and not interrupted:
      rng = np.random.default_rng([cfg.seed, step])
      batch = sample_encoder_batch(rng, stacks, cfg)
      state, m = _encoder_step(graphdef, hp, state, batch, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step))
      # Logged terms are means since the last record (one batch is too noisy to read a curve from).
      acc_terms = m if acc_terms is None else jax.tree.map(jnp.add, acc_terms, m)
      n_acc += 1
      step += 1
      pbar.update(1)
      if step % cfg.eval_every == 0 or step % cfg.checkpoint_every == 0 or step == end:
        nnx.update((level, opt), state)
        rec = dict(step=step, **{k: float(v) / n_acc for k, v in acc_terms.items()},
                   steps_per_s=(step - n0) / max(time.time() - t_start, 1e-9))
        acc_terms, n_acc = None, 0
        val = None
        if step % cfg.eval_every == 0 or step == cfg.steps:
          rec.update(validate(False))
          val = rec["val_epe"]
        write_metrics(metrics_path, rec)
        _tb_scalars(writer, step, rec)
        pbar.set_postfix(loss=f"{rec['loss']:.3f}", val_epe=None if val is None else f"{val:.3f}")
        logging.info("step %d %s", step, json.dumps(rec))
        if step % cfg.checkpoint_every == 0 or step == end:
          ckpt.save(step, pyramid, opt, {"step": step, "config": cfg_dict}, val_epe=val)
    nnx.update((level, opt), state)
    if interrupted and step not in ckpt.last.all_steps():
      ckpt.save(step, pyramid, opt, {"step": step, "config": cfg_dict})
      logging.info("interrupted: checkpointed step %d", step)
  except KeyboardInterrupt:
    nnx.update((level, opt), state)
    if step not in ckpt.last.all_steps():
      ckpt.save(step, pyramid, opt, {"step": step, "config": cfg_dict})
    raise
  finally:
    pbar.close()
    ckpt.close()
    if old_handler is not None:
      signal.signal(signal.SIGTERM, old_handler)
  if step < cfg.steps:
    return TrainResult(pyramid, step, metrics_path, workdir / "encoder.npz")
  weights = models.save_weights(pyramid, workdir / "encoder")
  write_metrics(metrics_path, {"event": "done", "step": step, "seconds": time.time() - t_start})
  return TrainResult(pyramid, step, metrics_path, weights)


def val_stripe_ratio(level: models.Level, stack: LevelStack, *, period_nm: float = 192.0,
                     theta: float = 0.6, amplitude: float = 0.4) -> float:
  """Stripe energy ratio encoding / image (`stripe_power_fraction`) on the first section of `stack`."""
  img = stack.images[0]
  h, w = img.shape
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  period = period_nm / stack.level_nm
  striped = img * (1 + amplitude * np.sin(2 * np.pi * (yy * np.cos(theta) + xx * np.sin(theta)) / period))
  striped = striped.astype(np.float32)
  enc = lambda x: np.asarray(level.encode(jnp.asarray(x)[None]))[0]
  norm = lambda x: np.asarray(preprocess.normalize(jnp.asarray(x)))
  f_img = stripe_power_fraction(norm(img), norm(striped), period, theta)
  f_enc = stripe_power_fraction(enc(img), enc(striped), period, theta)
  return float(f_enc / max(f_img, 1e-30))
