"""Self-supervised SEAMLeSS training (the metroem part), flax NNX + optax + orbax.

Paper: Popovych et al., Nat. Commun. 2024, Results "SEAMLeSS training", Methods "Image pair alignment".

One call of `train(config, workdir)` trains every level of a `Pyramid`, coarse to fine:

* **Data** (`build_dataset`): pairs of neighbouring sections of the shared, already aligned stacks
  (every `stride`-th section), the last sections of each stack held out for validation. One side of
  each pair is distorted by a seeded random smooth field `D` (affine + smooth noise), so the ground
  truth `invert(D)` is known for validation EPE; synthetic artifacts (knife-chatter stripes, missing
  blobs = no data + defect mask, contrast changes) are applied to either side, and src/tgt are
  randomly swapped. Each step takes random crops, random flips/transposes (fields transformed with
  them) and random per-image contrast (gamma) changes.
* **Stage 1**: `masked_mse(warp(src, f), tgt) + gamma * elastic(f)` on normalised images; the elastic
  weight is zeroed where the field samples src defects.
* **Stage 2**: `masked_mse(warp(enc(src), f), enc(tgt)) - alpha * best_sample(enc(src), enc(tgt))
  + gamma * elastic(f)`, where best_sample is the encoding MSE *before* this level's correction over
  32-px chunks, averaged over the chunks at or below the k-th percentile (k = 50): it keeps the
  encodings of misaligned tissue apart, so the encoder cannot collapse.
* After a level is trained, its fields for the whole training (and validation) set are computed and,
  upsampled, become the initial fields of the next finer level.
* Orbax `CheckpointManager`s keep the last N checkpoints and the best (lowest validation EPE), each with
  the pyramid parameters, the optimiser state, the global step and the config; `train` resumes from the
  latest one. Metrics go to `metrics.jsonl` (one JSON object per line). The train step is one jitted
  function per (level, stage), data-parallel over local devices via `NamedSharding` when there are
  several.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import fields, losses, models, preprocess
from jaxalign.errors import InputError

# A bilinear sample "has data" only if all four neighbours do (`fields.FULL_SUPPORT`).
FULL_SUPPORT = fields.FULL_SUPPORT
# A best-sample chunk needs at least this fraction of valid pixels to take part.
MIN_CHUNK_COVERAGE = 0.5
DEFAULT_STACKS = (("isbi2012_train", 1), ("gerhard_vnc_stack1", 1), ("flyem_medulla_fibsem", 4))
DEFAULT_DATA_ROOT = str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "em")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Fixed per-pair distortion and artifacts (lengths in MIP-0 pixels) and per-step augmentation.

  Attributes:
    max_translation: largest random translation of the distorted side, px.
    max_rotation_deg: largest random rotation about the centre, degrees.
    max_scale: largest relative scale change (0.02 = ±2 %).
    smooth_amplitude: largest displacement of the smooth non-rigid component, px.
    smooth_spacing: spacing of that component's random control grid, px (its wavelength).
    stripe_probability: chance that a pair gets knife-chatter stripes (on one side).
    stripe_amplitude: (min, max) relative intensity modulation of the stripes.
    stripe_period: (min, max) stripe period, px.
    blob_probability: chance that a pair gets missing-data blobs (on one side).
    blob_radius: (min, max) blob radius, px; up to `max_blobs` blobs.
    max_blobs: maximum number of blobs per pair.
    gamma_range: (min, max) per-image contrast exponent applied at every step.
    swap_probability: chance that src and tgt exchange roles.
  """
  max_translation: float = 24.0
  max_rotation_deg: float = 2.0
  max_scale: float = 0.02
  smooth_amplitude: float = 8.0
  smooth_spacing: int = 64
  stripe_probability: float = 0.4
  stripe_amplitude: tuple[float, float] = (0.2, 0.5)
  stripe_period: tuple[float, float] = (6.0, 20.0)
  blob_probability: float = 0.4
  blob_radius: tuple[float, float] = (8.0, 40.0)
  max_blobs: int = 3
  gamma_range: tuple[float, float] = (0.7, 1.4)
  swap_probability: float = 0.5


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training of a whole pyramid (paper defaults noted; our default command uses far fewer epochs).

  Attributes:
    pyramid: the architecture (levels coarse to fine).
    data_root: folder holding the shared stacks (`<data_root>/<stack>/NNN.png`).
    stacks: (stack name, section stride) pairs; neighbours are sections `stride` apart.
    val_sections: sections held out at the end of each stack (their neighbour pairs validate).
    variants: distorted copies of each training pair (different random distortions/artifacts).
    crop: training crop side, pixels of the level (multiple of the aligner's internal pyramid).
    batch_size: pairs per step (a multiple of the local device count).
    stage1_epochs, stage2_epochs: per level (paper: 100 and 500). An epoch = one pass over the pairs.
    learning_rate: Adam learning rate.
    gammas: elastic weight per level, coarse first (paper 5-25, higher at coarser levels); the last
      entry repeats for further levels.
    alpha: weight of the stage-2 pre-alignment best-sample term (paper 0.7).
    chunk: best-sample chunk side, px (paper 32).
    percentile: best-sample percentile k (paper 50).
    loss_blur_sigma: Gaussian blur (px of the level) of both images before the stage-1 MSE. Without it
      the cheapest way to lower the MSE between noisy, weakly correlated sections is a half-pixel
      shift everywhere (bilinear interpolation then averages out noise), and the aligner learns that
      constant bias instead of the alignment.
    eval_every: validation EPE every this many steps (and at the end of each stage).
    checkpoint_every: checkpoint every this many steps (and at the end of each stage).
    keep_last: checkpoints kept (plus the best one).
    seed: seed of every random choice.
    augment: distortion/artifact settings.
  """
  pyramid: models.PyramidConfig = models.PyramidConfig()
  data_root: str = DEFAULT_DATA_ROOT
  stacks: tuple[tuple[str, int], ...] = DEFAULT_STACKS
  val_sections: int = 3
  variants: int = 1
  crop: int = 128
  batch_size: int = 4
  stage1_epochs: int = 100
  stage2_epochs: int = 500
  learning_rate: float = 1e-3
  gammas: tuple[float, ...] = (25.0, 12.0, 5.0)
  alpha: float = 0.7
  chunk: int = 32
  percentile: float = 50.0
  loss_blur_sigma: float = 1.5
  eval_every: int = 100
  checkpoint_every: int = 100
  keep_last: int = 3
  seed: int = 0
  augment: AugmentConfig = AugmentConfig()

  def gamma(self, level: int) -> float:
    return float(self.gammas[min(level, len(self.gammas) - 1)])


def validate_train_config(cfg: TrainConfig) -> None:
  """Raises InputError naming the first malformed setting."""
  models.validate_pyramid_config(cfg.pyramid)
  n_dev = jax.local_device_count()
  checks = [
      (cfg.batch_size >= 1 and cfg.batch_size % n_dev == 0,
       f"batch_size must be a positive multiple of the {n_dev} local device(s), got {cfg.batch_size}"),
      (cfg.stage1_epochs >= 0 and cfg.stage2_epochs >= 0 and cfg.stage1_epochs + cfg.stage2_epochs > 0,
       f"stage1_epochs/stage2_epochs must be >= 0 and not both 0, got {cfg.stage1_epochs}/{cfg.stage2_epochs}"),
      (cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}"),
      (len(cfg.gammas) >= 1 and all(g >= 0 for g in cfg.gammas), f"gammas must be >= 0, got {cfg.gammas}"),
      (cfg.alpha >= 0, f"alpha must be >= 0, got {cfg.alpha}"),
      (cfg.loss_blur_sigma >= 0, f"loss_blur_sigma must be >= 0, got {cfg.loss_blur_sigma}"),
      (0 < cfg.percentile <= 100, f"percentile must be in (0, 100], got {cfg.percentile}"),
      (cfg.chunk >= 2 and cfg.crop % cfg.chunk == 0, f"crop {cfg.crop} must be a multiple of chunk {cfg.chunk}"),
      (cfg.eval_every >= 1 and cfg.checkpoint_every >= 1 and cfg.keep_last >= 1,
       "eval_every, checkpoint_every and keep_last must be >= 1"),
      (cfg.val_sections >= 2, f"val_sections must be >= 2 (one validation pair needs two), got {cfg.val_sections}"),
      (cfg.variants >= 1, f"variants must be >= 1, got {cfg.variants}"),
      (len(cfg.stacks) >= 1, "no training stacks given"),
  ]
  for lv in cfg.pyramid.levels:
    if lv.aligner is None:
      raise InputError(f"train config: level mip {lv.mip} is encoder-only; train it with train_encoder "
                       "(`jaxalign train --recipe=encoder`)")
    mult = 2 ** (lv.aligner.scales - 1)
    checks.append((cfg.crop % mult == 0,
                   f"crop {cfg.crop} must be a multiple of 2**(aligner.scales-1) = {mult} (level mip {lv.mip})"))
  for name, stride in cfg.stacks:
    checks.append((isinstance(stride, int) and stride >= 1, f"stack {name}: stride must be >= 1, got {stride}"))
  for ok, msg in checks:
    if not ok:
      raise InputError(f"train config: {msg}")


def config_to_dict(cfg: TrainConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict) -> TrainConfig:
  """Inverse of `config_to_dict`; raises InputError on malformed input."""
  try:
    d = dict(d)
    pyr = models.pyramid_config_from_dict(d.pop("pyramid"))
    aug = d.pop("augment", {})
    aug = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
    d["stacks"] = tuple((str(n), int(s)) for n, s in d.get("stacks", DEFAULT_STACKS))
    d["gammas"] = tuple(float(g) for g in d.get("gammas", TrainConfig.gammas))
    cfg = TrainConfig(pyramid=pyr, augment=aug, **d)
  except (KeyError, TypeError, ValueError) as e:
    raise InputError(f"malformed train config ({type(e).__name__}: {e})") from None
  validate_train_config(cfg)
  return cfg


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def _valid(x: jax.Array) -> jax.Array:
  """`[B, H, W]` float {0, 1}: where an image `[B, H, W]` / encoding `[B, H, W, C]` has data."""
  nz = x != 0
  if x.ndim == 4:
    nz = jnp.any(nz, axis=-1)
  return nz.astype(jnp.float32)


def blur_masked(x: jax.Array, sigma: float) -> jax.Array:
  """Gaussian blur over (H, W) of images `[B, H, W]` or encodings `[B, H, W, C]`; no-data pixels stay 0."""
  if sigma <= 0:
    return x
  valid = _valid(x)
  if x.ndim == 4:
    y = jnp.moveaxis(fields.gaussian_blur(jnp.moveaxis(x, -1, 1), sigma), 1, -1)
    return y * valid[..., None]
  return fields.gaussian_blur(x, sigma) * valid


def loss_masks(src: jax.Array, tgt: jax.Array, field: jax.Array, src_defects: jax.Array):
  """MSE and elastic masks `[B, H, W]` float for `warp(src, field)` vs `tgt` (gradient-stopped field).

  mse mask: tgt has data and the warped src has data on all four bilinear neighbours.
  elastic mask: 0 where the field samples a src defect (the field may tear there), else 1.
  """
  f = jax.lax.stop_gradient(field)
  mse_mask = (fields.warp(_valid(src), f) > FULL_SUPPORT).astype(jnp.float32) * _valid(tgt)
  torn = fields.warp(src_defects.astype(jnp.float32), f) > 0
  return mse_mask, 1.0 - torn.astype(jnp.float32)


def stage1_loss(src, tgt, field, src_defects, gamma: float):
  """Stage 1: `masked_mse(warp(src, f), tgt) + gamma * elastic_loss(f)`.

  Args:
    src, tgt: `[B, H, W]` float32 images (normalised; 0 = no data).
    field: `[B, H, W, 2]` float32, pixels, (dy, dx).
    src_defects: `[B, H, W]` bool/float, True on src defects (elastic weight zeroed where sampled).
    gamma: elastic weight.
  Returns:
    (scalar loss, dict of its terms).
  """
  mse_mask, el_mask = loss_masks(src, tgt, field, src_defects)
  mse = losses.masked_mse(fields.warp(src, field), tgt, mse_mask)
  elastic = losses.elastic_loss(field, el_mask)
  return mse + gamma * elastic, {"mse": mse, "elastic": elastic}


def chunk_mse(a: jax.Array, b: jax.Array, mask: jax.Array, chunk: int):
  """Per-chunk masked MSE of encodings and the chunk's valid fraction.

  Args:
    a, b: `[B, H, W, C]` float32 encodings (H, W multiples of `chunk`).
    mask: `[B, H, W]` float weights.
    chunk: chunk side, px.
  Returns:
    (`[B, H/chunk, W/chunk]` MSE (channels averaged; 0 where a chunk is empty),
     `[B, H/chunk, W/chunk]` fraction of valid pixels).
  """
  bsz, h, w, _ = a.shape
  if h % chunk or w % chunk:
    raise InputError(f"best-sample chunks: spatial size {h}x{w} is not a multiple of chunk {chunk}")
  sq = jnp.mean((a - b) ** 2, axis=-1) * mask
  shape = (bsz, h // chunk, chunk, w // chunk, chunk)
  num = sq.reshape(shape).sum(axis=(2, 4))
  den = mask.reshape(shape).sum(axis=(2, 4))
  return num / jnp.maximum(den, 1e-12), den / (chunk * chunk)


def best_sample_similarity(a, b, mask, *, chunk: int = 32, percentile: float = 50.0):
  """Pre-alignment "best sample" encoding MSE (paper stage 2; chunk 32 px, k = 50).

  Per pair: the chunk MSEs of chunks with at least `MIN_CHUNK_COVERAGE` valid pixels; those at or
  below their k-th percentile (linear interpolation, as `numpy.percentile`) are averaged. The batch
  result is the mean over pairs that have any valid chunk. The percentile threshold is
  gradient-stopped (the selection is a choice, not a function to differentiate).

  Args:
    a, b: `[B, H, W, C]` float32 encodings before alignment (src warped by the initial field, tgt).
    mask: `[B, H, W]` float weights (where both have data).
  Returns:
    scalar float32.
  """
  mse, cover = chunk_mse(a, b, mask, chunk)
  ok = cover >= MIN_CHUNK_COVERAGE
  thr = jnp.nanpercentile(jnp.where(ok, jax.lax.stop_gradient(mse), jnp.nan), percentile, axis=(1, 2))
  sel = (ok & (mse <= thr[:, None, None])).astype(jnp.float32)
  n = sel.sum(axis=(1, 2))
  per_pair = (mse * sel).sum(axis=(1, 2)) / jnp.maximum(n, 1.0)
  has = (n > 0).astype(jnp.float32)
  return (per_pair * has).sum() / jnp.maximum(has.sum(), 1.0)


def stage2_loss(src_enc, tgt_enc, init_field, field, src_defects, gamma: float, alpha: float,
                chunk: int, percentile: float):
  """Stage 2: `mse(warp(enc(src), f), enc(tgt)) - alpha * best_sample + gamma * elastic(f)`.

  Args:
    src_enc, tgt_enc: `[B, H, W, C]` float32 encodings (0 = no data).
    init_field: `[B, H, W, 2]` the field before this level's correction ("pre-alignment").
    field: `[B, H, W, 2]` the level's output field, pixels, (dy, dx).
    src_defects: `[B, H, W]` src defect mask.
  Returns:
    (scalar loss, dict of its terms).
  """
  mse_mask, el_mask = loss_masks(src_enc, tgt_enc, field, src_defects)
  mse = losses.masked_mse(fields.warp(src_enc, field), tgt_enc, mse_mask)
  pre_mask, _ = loss_masks(src_enc, tgt_enc, init_field, src_defects)
  pre = best_sample_similarity(fields.warp(src_enc, jax.lax.stop_gradient(init_field)), tgt_enc, pre_mask,
                               chunk=chunk, percentile=percentile)
  elastic = losses.elastic_loss(field, el_mask)
  return mse - alpha * pre + gamma * elastic, {"mse": mse, "best_sample": pre, "elastic": elastic}


# ----------------------------------------------------------------------------------------------
# Synthetic distortions and artifacts (dataset construction; seeded, jitted per shape)
# ----------------------------------------------------------------------------------------------

def _random_distortion(key, shape, aug):
  """Random affine + smooth field `[H, W, 2]` (MIP-0 px, (dy, dx)); amplitudes from `aug`."""
  h, w = shape
  k_t, k_r, k_s, k_n = jax.random.split(key, 4)
  t = jax.random.uniform(k_t, (2,), minval=-aug.max_translation, maxval=aug.max_translation)
  ang = jnp.deg2rad(jax.random.uniform(k_r, (), minval=-aug.max_rotation_deg, maxval=aug.max_rotation_deg))
  sc = 1.0 + jax.random.uniform(k_s, (), minval=-aug.max_scale, maxval=aug.max_scale)
  c = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0])
  rot = sc * jnp.array([[jnp.cos(ang), -jnp.sin(ang)], [jnp.sin(ang), jnp.cos(ang)]])
  m = jnp.concatenate([rot, (c - rot @ c + t)[:, None]], axis=1)
  affine = fields.from_affine(m, (h, w))
  # Smooth part: white noise on a coarse grid, blurred, upsampled by factors of 2 to full size.
  ups = max(0, int(math.log2(aug.smooth_spacing)))
  gh, gw = -(-h // 2 ** ups), -(-w // 2 ** ups)
  noise = jax.random.normal(k_n, (2, gh, gw))
  noise = fields.gaussian_blur(noise, 1.0)
  for _ in range(ups):
    noise = fields.upsample_image(noise)
  noise = noise[:, :h, :w]
  noise = noise / jnp.maximum(jnp.max(jnp.abs(noise)), 1e-6) * aug.smooth_amplitude
  return affine + jnp.moveaxis(noise, 0, -1)


def _stripes(key, image, aug: AugmentConfig):
  """Knife-chatter stripes: periodic multiplicative intensity bands along a random direction."""
  h, w = image.shape
  k_a, k_p, k_d, k_ph = jax.random.split(key, 4)
  amp = jax.random.uniform(k_a, (), minval=aug.stripe_amplitude[0], maxval=aug.stripe_amplitude[1])
  period = jax.random.uniform(k_p, (), minval=aug.stripe_period[0], maxval=aug.stripe_period[1])
  theta = jax.random.uniform(k_d, (), minval=0.0, maxval=jnp.pi)
  phase = jax.random.uniform(k_ph, (), minval=0.0, maxval=2 * jnp.pi)
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  s = yy * jnp.cos(theta) + xx * jnp.sin(theta)
  return image * (1.0 + amp * jnp.sin(2 * jnp.pi * s / period + phase))


def _blobs(key, shape, aug: AugmentConfig):
  """`[H, W]` bool mask of up to `max_blobs` random discs (missing data)."""
  h, w = shape
  k_n, k_c, k_r = jax.random.split(key, 3)
  n = jax.random.randint(k_n, (), 1, aug.max_blobs + 1)
  cy = jax.random.uniform(k_c, (aug.max_blobs,), maxval=h)
  cx = jax.random.uniform(jax.random.fold_in(k_c, 1), (aug.max_blobs,), maxval=w)
  r = jax.random.uniform(k_r, (aug.max_blobs,), minval=aug.blob_radius[0], maxval=aug.blob_radius[1])
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
  inside = (d2 <= (r ** 2)[:, None, None]) & (jnp.arange(aug.max_blobs) < n)[:, None, None]
  return jnp.any(inside, axis=0)


def _make_pair_impl(key, a, b, aug: AugmentConfig):
  """One training pair from neighbouring aligned sections `a`, `b` `[H, W]` (MIP 0).

  Returns (src, tgt, src_defects, gt_field) with `warp(src, gt_field) ≈ tgt`.
  """
  k_swap, k_d, k_st, k_stp, k_stside, k_bl, k_blp, k_blside = jax.random.split(key, 8)
  swap = jax.random.uniform(k_swap) < aug.swap_probability
  first, second = jnp.where(swap, b, a), jnp.where(swap, a, b)
  d = _random_distortion(k_d, a.shape, aug)
  src = fields.warp(first, d)
  tgt = second
  gt = fields.invert(d)
  # Stripes on one side (either), missing blobs on one side (either).
  do_st = jax.random.uniform(k_stp) < aug.stripe_probability
  st_src = jax.random.uniform(k_stside) < 0.5
  striped = lambda x: _stripes(k_st, x, aug)
  src = jnp.where(do_st & st_src, striped(src), src)
  tgt = jnp.where(do_st & ~st_src, striped(tgt), tgt)
  do_bl = jax.random.uniform(k_blp) < aug.blob_probability
  bl_src = jax.random.uniform(k_blside) < 0.5
  blob = _blobs(k_bl, a.shape, aug) & do_bl
  src_def = blob & bl_src
  src = jnp.where(src_def, 0.0, src)
  tgt = jnp.where(blob & ~bl_src, 0.0, tgt)
  return src, tgt, src_def, gt


_make_pair = jax.jit(_make_pair_impl, static_argnames=("aug",))
random_distortion = jax.jit(_random_distortion, static_argnames=("shape", "aug"))


class PairSet(NamedTuple):
  """Pairs of one shape at MIP 0: src, tgt `[N, H, W]`, src_defects `[N, H, W]` bool,
  gt `[N, H, W, 2]` (MIP-0 px), names."""
  src: np.ndarray
  tgt: np.ndarray
  src_defects: np.ndarray
  gt: np.ndarray
  names: tuple[str, ...]


def _load_stack(root: pathlib.Path, name: str, stride: int) -> np.ndarray:
  from PIL import Image
  folder = root / name
  if not folder.is_dir():
    raise InputError(f"training stack {name!r}: folder {folder} does not exist")
  files = sorted(folder.glob("[0-9][0-9][0-9].png"))[::stride]
  if len(files) < 2:
    raise InputError(f"training stack {name!r}: needs at least 2 sections NNN.png (stride {stride}), found {len(files)}")
  imgs = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
  shapes = {im.shape for im in imgs}
  if len(shapes) != 1:
    raise InputError(f"training stack {name!r}: sections differ in shape {sorted(shapes)}")
  # 0 means no data; real pixels that happen to be black are lifted just above it.
  return np.maximum(np.stack(imgs), 1.0 / 512)


def make_pairs(sections: np.ndarray, key, aug: AugmentConfig, *, variants: int = 1, multiple: int = 1,
               name: str = "stack") -> PairSet:
  """Distorted neighbour pairs from an aligned stack `[Z, H, W]` (padded with zeros to `multiple`)."""
  sections = np.asarray(sections, np.float32)
  if sections.ndim != 3 or sections.shape[0] < 2:
    raise InputError(f"{name}: need an aligned stack [Z >= 2, H, W], got shape {sections.shape}")
  z, h, w = sections.shape
  pad = ((0, -h % multiple), (0, -w % multiple))
  out = {k: [] for k in ("src", "tgt", "def", "gt")}
  names = []
  for v in range(variants):
    for i in range(z - 1):
      k = jax.random.fold_in(jax.random.fold_in(key, v), i)
      a, b = np.pad(sections[i], pad), np.pad(sections[i + 1], pad)
      s, t, d, g = _make_pair(k, jnp.asarray(a), jnp.asarray(b), aug=aug)
      out["src"].append(np.asarray(s)); out["tgt"].append(np.asarray(t))
      out["def"].append(np.asarray(d)); out["gt"].append(np.asarray(g))
      names.append(f"{name}:{i}-{i + 1}/v{v}")
  return PairSet(np.stack(out["src"]), np.stack(out["tgt"]), np.stack(out["def"]), np.stack(out["gt"]),
                 tuple(names))


def build_dataset(cfg: TrainConfig) -> tuple[list[PairSet], list[PairSet]]:
  """(training pair sets, validation pair sets), one set per stack (shapes differ between stacks)."""
  root = pathlib.Path(cfg.data_root)
  if not root.is_dir():
    raise InputError(f"data_root {root} does not exist")
  multiple = models.Pyramid(cfg.pyramid, rngs=nnx.Rngs(0)).multiple
  key = jax.random.PRNGKey(cfg.seed)
  train_sets, val_sets = [], []
  for si, (name, stride) in enumerate(tqdm(cfg.stacks, desc="building pairs", leave=False)):
    secs = _load_stack(root, name, stride)
    if secs.shape[0] < cfg.val_sections + 2:
      raise InputError(f"training stack {name!r}: {secs.shape[0]} sections is too few to hold out "
                       f"{cfg.val_sections} for validation")
    k = jax.random.fold_in(key, si)
    train_sets.append(make_pairs(secs[:-cfg.val_sections], jax.random.fold_in(k, 0), cfg.augment,
                                 variants=cfg.variants, multiple=multiple, name=name))
    val_sets.append(make_pairs(secs[-cfg.val_sections:], jax.random.fold_in(k, 1), cfg.augment,
                               variants=1, multiple=multiple, name=name))
  return train_sets, val_sets


# ----------------------------------------------------------------------------------------------
# Per-level data: images at the level's MIP + initial fields
# ----------------------------------------------------------------------------------------------

class LevelData(NamedTuple):
  """One stack's pairs at a level's MIP: src, tgt `[N, h, w]`, src_defects `[N, h, w]` float,
  init `[N, h, w, 2]` and gt `[N, h, w, 2]` (px of this level)."""
  src: np.ndarray
  tgt: np.ndarray
  src_defects: np.ndarray
  init: np.ndarray
  gt: np.ndarray


@jax.jit
def _down_pair(src, tgt, sdef, gt):
  return (fields.downsample_image(src, "mean"), fields.downsample_image(tgt, "mean"),
          fields.downsample_image(sdef, "max"), fields.downsample_field(gt))


def level_data(ps: PairSet, mip: int, init: np.ndarray | None) -> LevelData:
  """Takes a MIP-0 pair set to `mip`; `init` `[N, h, w, 2]` at that MIP (zeros when None)."""
  src, tgt, sdef, gt = (jnp.asarray(ps.src), jnp.asarray(ps.tgt), jnp.asarray(ps.src_defects, jnp.float32),
                        jnp.asarray(ps.gt))
  for _ in range(mip):
    src, tgt, sdef, gt = _down_pair(src, tgt, sdef, gt)
  if init is None:
    init = np.zeros(gt.shape, np.float32)
  return LevelData(np.asarray(src), np.asarray(tgt), np.asarray(sdef), np.asarray(init, np.float32), np.asarray(gt))


@jax.jit
def _normalize_batch(x):
  return jax.vmap(preprocess.normalize)(x)


def _apply_level_graph(graphdef, state, src, tgt, init):
  level = nnx.merge(graphdef, state)
  return level(src, tgt, init)


_apply_level = jax.jit(_apply_level_graph, static_argnums=0)


def predict_fields(level: models.Level, data: LevelData, *, batch: int = 1) -> np.ndarray:
  """The level's network fields `[N, h, w, 2]` (px of its level) for every pair of `data`."""
  graphdef, state = nnx.split(level)
  out = []
  for i in range(data.src.shape[0]):
    out.append(np.asarray(_apply_level(graphdef, state, jnp.asarray(data.src[i:i + 1]),
                                       jnp.asarray(data.tgt[i:i + 1]), jnp.asarray(data.init[i:i + 1])))[0])
  return np.stack(out)


def _field_up(f: np.ndarray, from_mip: int, to_mip: int) -> np.ndarray:
  return np.asarray(models.field_to_mip(jnp.asarray(f), from_mip, to_mip))


@jax.jit
def _epe_stats(field, gt, src, tgt, scale):
  """Mean and p95 endpoint error (MIP-0 px) over pixels where both images have data."""
  valid = (fields.warp((src != 0).astype(jnp.float32), gt) > FULL_SUPPORT) & (tgt != 0)
  err = jnp.linalg.norm(field - gt, axis=-1) * scale
  mean = jnp.sum(jnp.where(valid, err, 0.0)) / jnp.maximum(valid.sum(), 1)
  return mean, err, valid


def epe(fields_: np.ndarray, data: LevelData, mip: int) -> dict:
  """Endpoint error of fields `[N, h, w, 2]` vs ground truth, in MIP-0 pixels (mean and p95)."""
  errs = []
  for i in range(fields_.shape[0]):
    _, err, valid = _epe_stats(jnp.asarray(fields_[i]), jnp.asarray(data.gt[i]), jnp.asarray(data.src[i]),
                               jnp.asarray(data.tgt[i]), float(2 ** mip))
    errs.append(np.asarray(err)[np.asarray(valid)])
  allerr = np.concatenate(errs) if errs else np.zeros(1)
  return {"epe_mean": float(allerr.mean()), "epe_p95": float(np.percentile(allerr, 95))}


# ----------------------------------------------------------------------------------------------
# Batches and augmentation
# ----------------------------------------------------------------------------------------------

class Batch(NamedTuple):
  """src, tgt `[B, c, c]`, src_defects `[B, c, c]` float, init `[B, c, c, 2]` (px of the level)."""
  src: Any
  tgt: Any
  src_defects: Any
  init: Any


def sample_batch(rng: np.random.Generator, datas: Sequence[LevelData], batch_size: int, crop: int) -> Batch:
  """Random crops (host-side slicing) from random pairs of all stacks; smaller sections are zero-padded."""
  sizes = np.array([d.src.shape[0] for d in datas], np.float64)
  out = {k: np.zeros((batch_size, crop, crop) + ((2,) if k == "init" else ()), np.float32)
         for k in ("src", "tgt", "src_defects", "init")}
  for b in range(batch_size):
    si = rng.choice(len(datas), p=sizes / sizes.sum())
    d = datas[si]
    i = rng.integers(d.src.shape[0])
    h, w = d.src.shape[1:]
    ch, cw = min(crop, h), min(crop, w)
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    for k in ("src", "tgt", "src_defects", "init"):
      out[k][b, :ch, :cw] = getattr(d, k)[i, y0:y0 + ch, x0:x0 + cw]
  return Batch(**out)


def augment(key, batch: Batch, gamma_range: tuple[float, float]) -> Batch:
  """Per-pair random flips of y and x, transposes and contrast (gamma) changes.

  Field components follow the geometry: flipping y negates dy, transposing swaps (dy, dx). The
  geometric transforms are applied identically to src, tgt, defects and the initial field, so
  `warp(src, f) ≈ tgt` still holds for the transformed f. Crops must be square.
  """
  def one(k, src, tgt, sdef, init):
    k_fy, k_fx, k_t, k_gs, k_gt = jax.random.split(k, 5)
    fy, fx, tr = (jax.random.uniform(k_fy) < 0.5, jax.random.uniform(k_fx) < 0.5, jax.random.uniform(k_t) < 0.5)
    def geo(x, is_field):
      x = jnp.where(fy, jnp.flip(x, 0), x)
      x = jnp.where(fx, jnp.flip(x, 1), x)
      x = jnp.where(tr, jnp.swapaxes(x, 0, 1), x)
      if is_field:
        sign = jnp.stack([jnp.where(fy, -1.0, 1.0), jnp.where(fx, -1.0, 1.0)])
        x = x * sign
        x = jnp.where(tr, x[..., ::-1], x)
      return x
    g_s = jax.random.uniform(k_gs, minval=gamma_range[0], maxval=gamma_range[1])
    g_t = jax.random.uniform(k_gt, minval=gamma_range[0], maxval=gamma_range[1])
    contrast = lambda x, g: jnp.where(x > 0, jnp.abs(x) ** g, 0.0)
    return (contrast(geo(src, False), g_s), contrast(geo(tgt, False), g_t), geo(sdef, False), geo(init, True))

  keys = jax.random.split(key, batch.src.shape[0])
  return Batch(*jax.vmap(one)(keys, batch.src, batch.tgt, batch.src_defects, batch.init))


# ----------------------------------------------------------------------------------------------
# Train step
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float, steps: int) -> optax.GradientTransformation:
  # Cached so that optimisers of equal settings share one object: the optimiser's graph definition
  # (a static jit argument) then compares equal and the train step is not recompiled.
  sched = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1)
  return optax.adam(sched)


def make_optimizer(level: models.Level, cfg: TrainConfig, steps: int) -> nnx.Optimizer:
  """Adam with a cosine decay over the stage (`steps`), on the level's parameters."""
  return nnx.Optimizer(level, _adam(float(cfg.learning_rate), int(steps)), wrt=nnx.Param)


class StepSettings(NamedTuple):
  """Static (hashable) settings of a train step."""
  stage: int
  gamma: float
  alpha: float
  chunk: int
  percentile: float
  gamma_range: tuple[float, float]
  blur_sigma: float


# Number of times a train step has been traced (each trace is a compilation); tests read it.
TRACE_COUNT = [0]


def _step_impl(graphdef, hp: StepSettings, state, batch: Batch, key):
  """`state, batch, key -> state, metrics` for the pure nnx state of `(level, optimizer)`."""
  TRACE_COUNT[0] += 1  # runs at trace time only
  lvl, opt = nnx.merge(graphdef, state)
  b = augment(key, batch, hp.gamma_range)
  src, tgt = _normalize_batch(b.src), _normalize_batch(b.tgt)

  def loss_fn(model):
    se, te = model.encode(src), model.encode(tgt)
    f = model.residual(se, te, b.init)
    if hp.stage == 1:
      return stage1_loss(blur_masked(src, hp.blur_sigma), blur_masked(tgt, hp.blur_sigma), f, b.src_defects,
                         hp.gamma)
    # Encodings are not blurred: the encoder would learn pixel-scale texture that the blur erases,
    # which makes the encoding MSE trivially small whatever the field.
    return stage2_loss(se, te, b.init, f, b.src_defects, hp.gamma, hp.alpha, hp.chunk, hp.percentile)

  (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(lvl)
  opt.update(lvl, grads)
  return nnx.state((lvl, opt)), dict(terms, loss=loss)


@functools.lru_cache(maxsize=None)
def _jitted_step(mesh: jax.sharding.Mesh | None):
  """One jitted step function per mesh (None = single device); its cache is keyed by graphdef/settings."""
  if mesh is None:
    # No buffer donation: the live Level shares these arrays after `sync` (checkpoints, eval).
    return jax.jit(_step_impl, static_argnums=(0, 1))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.jit(_step_impl, static_argnums=(0, 1), in_shardings=(repl, data, repl),
                 out_shardings=(repl, repl))


class TrainStep:
  """Jitted train step of one (level, stage): `step(batch, key) -> metrics`, updating its state.

  The state is the pure nnx state of `(level, optimizer)`; the graph definition and the loss
  settings are static, so the step compiles once per (architecture, settings, batch shape) and is
  shared by every TrainStep with equal ones (e.g. after a resume). With several local devices the
  batch is split over a ('data',) mesh and the state replicated (`NamedSharding`).
  """

  def __init__(self, level: models.Level, optimizer: nnx.Optimizer, cfg: TrainConfig, level_index: int,
               stage: int, mesh: jax.sharding.Mesh | None = None):
    if stage not in (1, 2):
      raise InputError(f"stage must be 1 or 2, got {stage}")
    self.graphdef, self.state = nnx.split((level, optimizer))
    self.hp = StepSettings(stage, cfg.gamma(level_index), float(cfg.alpha), int(cfg.chunk),
                           float(cfg.percentile), tuple(cfg.augment.gamma_range), float(cfg.loss_blur_sigma))
    self.mesh = mesh
    self._step = _jitted_step(mesh)
    self._data_sharding = None
    if mesh is not None:
      self._data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
      self.state = jax.device_put(self.state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def __call__(self, batch: Batch, key) -> dict:
    if self._data_sharding is not None:
      batch = jax.device_put(batch, self._data_sharding)
    self.state, metrics = self._step(self.graphdef, self.hp, self.state, batch, key)
    return metrics

  def sync(self, level: models.Level, optimizer: nnx.Optimizer) -> None:
    """Writes the step's current state back into the live `level` and `optimizer` objects."""
    nnx.update((level, optimizer), self.state)


def data_mesh() -> jax.sharding.Mesh | None:
  """A 1-D ('data',) mesh over the local devices when there are several, else None."""
  devs = jax.local_devices()
  return jax.sharding.Mesh(np.array(devs), ("data",)) if len(devs) > 1 else None


# ----------------------------------------------------------------------------------------------
# Schedule, checkpoints, loop
# ----------------------------------------------------------------------------------------------

class Phase(NamedTuple):
  level: int
  stage: int
  start: int  # global step at which this phase starts
  steps: int


def schedule(cfg: TrainConfig, n_train_pairs: int) -> list[Phase]:
  """(level, stage, start step, steps) for the whole run; an epoch = ceil(pairs / batch) steps."""
  spe = max(1, -(-n_train_pairs // cfg.batch_size))
  phases, start = [], 0
  for li in range(len(cfg.pyramid.levels)):
    for stage, ep in ((1, cfg.stage1_epochs), (2, cfg.stage2_epochs)):
      n = ep * spe
      if n:
        phases.append(Phase(li, stage, start, n))
        start += n
  return phases


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


class Checkpoints:
  """Two orbax CheckpointManagers under `workdir`: `last/` (keep `keep_last`) and `best/` (lowest val EPE)."""

  def __init__(self, workdir: pathlib.Path, keep_last: int):
    ocp = _ocp()
    self.last = ocp.CheckpointManager(
        (workdir / "checkpoints" / "last").resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True, enable_async_checkpointing=False))
    self.best = ocp.CheckpointManager(
        (workdir / "checkpoints" / "best").resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["val_epe"],
                                             best_mode="min", enable_async_checkpointing=False))

  @staticmethod
  def _args(pyramid, optimizer, meta):
    ocp = _ocp()
    return ocp.args.Composite(params=ocp.args.StandardSave(nnx.state(pyramid, nnx.Param)),
                              opt=ocp.args.StandardSave(nnx.state(optimizer)),
                              meta=ocp.args.JsonSave(meta))

  def save(self, step: int, pyramid, optimizer, meta: dict, val_epe: float | None = None) -> None:
    if step not in self.last.all_steps():
      self.last.save(step, args=self._args(pyramid, optimizer, meta))
    if val_epe is not None and step not in self.best.all_steps():
      self.best.save(step, args=self._args(pyramid, optimizer, meta), metrics={"val_epe": float(val_epe)})

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def restore_meta(self, step: int) -> dict:
    ocp = _ocp()
    return self.last.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, pyramid, optimizer=None) -> None:
    """Restores parameters (and the optimiser state, if given) into the live objects."""
    ocp = _ocp()
    abstract = lambda s: jax.tree.map(ocp.utils.to_shape_dtype_struct, s)
    items = {"params": ocp.args.StandardRestore(abstract(nnx.state(pyramid, nnx.Param)))}
    if optimizer is not None:
      items["opt"] = ocp.args.StandardRestore(abstract(nnx.state(optimizer)))
    got = self.last.restore(step, args=ocp.args.Composite(**items))
    nnx.update(pyramid, got["params"])
    if optimizer is not None:
      nnx.update(optimizer, got["opt"])

  def close(self) -> None:
    self.last.close()
    self.best.close()


class TrainResult(NamedTuple):
  pyramid: models.Pyramid
  step: int
  metrics_path: pathlib.Path
  weights_path: pathlib.Path


def _write_metrics(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as fh:
    fh.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, workdir, *, datasets=None, max_steps: int | None = None) -> TrainResult:
  """Trains (or resumes training of) every level of `cfg.pyramid`, coarse to fine.

  Args:
    cfg: TrainConfig.
    workdir: output folder: `checkpoints/{last,best}/`, `metrics.jsonl`, `config.json`, and the final
      weights `pyramid.{npz,json}` (the format `models.load_weights` reads).
    datasets: optional (train pair sets, val pair sets) instead of `build_dataset(cfg)` (tests).
    max_steps: stop after this global step (simulates an interruption; tests).
  Returns:
    TrainResult with the trained pyramid and the last global step.
  """
  validate_train_config(cfg)
  workdir = pathlib.Path(workdir)
  cfg_path = workdir / "config.json"
  cfg_dict = config_to_dict(cfg)
  if cfg_path.exists() and json.loads(cfg_path.read_text()) != cfg_dict:
    raise InputError(f"{workdir} holds a run with a different config; use a new workdir to start over")
  # The dataset is checked before anything is written, so bad input leaves no half-made workdir.
  train_sets, val_sets = datasets if datasets is not None else build_dataset(cfg)
  if not train_sets or sum(s.src.shape[0] for s in train_sets) == 0:
    raise InputError("training dataset is empty")
  if not val_sets or sum(s.src.shape[0] for s in val_sets) == 0:
    raise InputError("validation dataset is empty")
  workdir.mkdir(parents=True, exist_ok=True)
  if not cfg_path.exists():
    cfg_path.write_text(json.dumps(cfg_dict, indent=1))
  metrics_path = workdir / "metrics.jsonl"
  n_pairs = sum(s.src.shape[0] for s in train_sets)
  phases = schedule(cfg, n_pairs)
  total = phases[-1].start + phases[-1].steps
  pyramid = models.Pyramid(cfg.pyramid, rngs=nnx.Rngs(cfg.seed))
  ckpt = Checkpoints(workdir, cfg.keep_last)
  mesh = data_mesh()

  step = ckpt.latest_step() or 0
  resume_opt = None
  if step:
    meta = ckpt.restore_meta(step)
    logging.info("resuming from step %d (level %d, stage %d)", step, meta["level"], meta["stage"])
    resume_opt = meta
    ckpt.restore(step, pyramid)  # parameters now; optimiser state once its phase is built

  levels_cfg = cfg.pyramid.levels
  init_train = [None] * len(train_sets)
  init_val = [None] * len(val_sets)
  prev_mip = None
  t_start = time.time()
  try:
    for li, level in enumerate(pyramid.levels):
      mip = levels_cfg[li].mip
      if prev_mip is not None:
        init_train = [_field_up(f, prev_mip, mip) for f in init_train]
        init_val = [_field_up(f, prev_mip, mip) for f in init_val]
      tdata = [level_data(s, mip, i) for s, i in zip(train_sets, init_train)]
      vdata = [level_data(s, mip, i) for s, i in zip(val_sets, init_val)]
      level_phases = [p for p in phases if p.level == li]
      level_end = level_phases[-1].start + level_phases[-1].steps if level_phases else 0
      if step < level_end:
        base = {"level": li, "mip": mip}
        base_epe = [epe(d.init, d, mip) for d in vdata]
        _write_metrics(metrics_path, dict(base, step=step, event="level_start",
                                          val_epe_init=float(np.mean([e["epe_mean"] for e in base_epe]))))
        for ph in level_phases:
          if step >= ph.start + ph.steps:
            continue
          opt = make_optimizer(level, cfg, ph.steps)
          if resume_opt is not None and resume_opt["level"] == li and resume_opt["stage"] == ph.stage \
              and step > ph.start:
            ckpt.restore(step, pyramid, opt)
          resume_opt = None
          ts = TrainStep(level, opt, cfg, li, ph.stage, mesh)
          rng = np.random.default_rng([cfg.seed, li, ph.stage, step])
          key = jax.random.PRNGKey(cfg.seed)
          end = ph.start + ph.steps
          if max_steps is not None:
            end = min(end, max_steps)
          pbar = tqdm(total=end - step, desc=f"level {li} (mip {mip}) stage {ph.stage}", leave=False)
          t0, n0 = time.time(), step
          while step < end:
            m = ts(sample_batch(rng, tdata, cfg.batch_size, cfg.crop), jax.random.fold_in(key, step))
            step += 1
            pbar.update(1)
            last = step == ph.start + ph.steps or step == end
            if step % cfg.eval_every == 0 or step % cfg.checkpoint_every == 0 or last:
              m = {k: float(v) for k, v in m.items()}
              ts.sync(level, opt)
              rec = dict(base, step=step, stage=ph.stage, **m,
                         steps_per_s=(step - n0) / max(time.time() - t0, 1e-9))
              val = None
              if step % cfg.eval_every == 0 or last:
                vf = [predict_fields(level, d) for d in vdata]
                ev = [epe(f, d, mip) for f, d in zip(vf, vdata)]
                val = float(np.mean([e["epe_mean"] for e in ev]))
                rec.update(val_epe=val, val_epe_p95=float(np.mean([e["epe_p95"] for e in ev])))
              _write_metrics(metrics_path, rec)
              logging.info("step %d %s", step, json.dumps(rec))
              pbar.set_postfix(loss=f"{m['loss']:.4f}", val_epe=None if val is None else f"{val:.2f}")
              if step % cfg.checkpoint_every == 0 or last:
                ckpt.save(step, pyramid, opt, {"step": step, "level": li, "stage": ph.stage,
                                               "config": cfg_dict}, val_epe=val)
          pbar.close()
          ts.sync(level, opt)
          if max_steps is not None and step >= max_steps and step < total:
            return TrainResult(pyramid, step, metrics_path, workdir / "pyramid.npz")
      if li + 1 < len(pyramid.levels):
        # The trained level's fields start the next finer level.
        init_train = [predict_fields(level, d) for d in tqdm(tdata, desc="fields for next level", leave=False)]
        init_val = [predict_fields(level, d) for d in vdata]
        prev_mip = mip
  finally:
    ckpt.close()
  weights = models.save_weights(pyramid, workdir / "pyramid")
  _write_metrics(metrics_path, {"event": "done", "step": step, "seconds": time.time() - t_start})
  return TrainResult(pyramid, step, metrics_path, weights)


# ----------------------------------------------------------------------------------------------
# absl flags shared by `jaxalign train` and experiments/train_pyramid.py
# ----------------------------------------------------------------------------------------------

def define_flags(flags_module) -> None:
  """Defines the training flags on `absl.flags` (call once, at import of the command module)."""
  f = flags_module
  d = TrainConfig()
  f.DEFINE_string("workdir", None, "output folder (checkpoints, metrics.jsonl, pyramid.{npz,json}); resumes if present")
  f.DEFINE_string("data_root", d.data_root, "folder with the shared EM stacks")
  f.DEFINE_list("stacks", [f"{n}:{s}" for n, s in d.stacks], "stack:stride pairs of training stacks")
  f.DEFINE_list("mips", [str(lv.mip) for lv in d.pyramid.levels], "MIP of each level, coarse first")
  f.DEFINE_integer("encoder_channels", d.pyramid.levels[0].encoder.channels, "encoder width")
  f.DEFINE_integer("encoder_blocks", d.pyramid.levels[0].encoder.blocks, "encoder residual blocks")
  f.DEFINE_integer("encoding_channels", d.pyramid.levels[0].encoder.out_channels, "C of the encodings")
  f.DEFINE_integer("aligner_channels", d.pyramid.levels[0].aligner.channels, "aligner width")
  f.DEFINE_integer("aligner_scales", d.pyramid.levels[0].aligner.scales, "aligner internal pyramid depth")
  f.DEFINE_integer("crop", d.crop, "training crop side (px of the level)")
  f.DEFINE_integer("batch_size", d.batch_size, "pairs per step")
  f.DEFINE_integer("variants", d.variants, "distorted copies of each training pair")
  f.DEFINE_integer("val_sections", d.val_sections, "sections held out at the end of each stack")
  f.DEFINE_integer("stage1_epochs", d.stage1_epochs, "stage-1 epochs per level (paper 100)")
  f.DEFINE_integer("stage2_epochs", d.stage2_epochs, "stage-2 epochs per level (paper 500)")
  f.DEFINE_float("learning_rate", d.learning_rate, "Adam learning rate")
  f.DEFINE_list("gammas", [str(g) for g in d.gammas], "elastic weight per level, coarse first (paper 5-25)")
  f.DEFINE_float("alpha", d.alpha, "stage-2 best-sample weight (paper 0.7)")
  f.DEFINE_integer("eval_every", d.eval_every, "validation EPE every N steps")
  f.DEFINE_integer("checkpoint_every", d.checkpoint_every, "checkpoint every N steps")
  f.DEFINE_integer("keep_last", d.keep_last, "checkpoints kept (plus the best)")
  f.DEFINE_integer("seed", d.seed, "random seed")
  f.DEFINE_integer("max_steps", None, "stop after this global step (resume later with the same command)")
  f.DEFINE_string("export", None, "also copy the final weights to this path prefix (e.g. jaxalign/weights/default)")
  # Encoder-only level (issue 19): `--recipe=encoder`. Shared flags (crop, batch_size, learning_rate,
  # encoder widths, eval/checkpoint cadence) take the encoder recipe's defaults unless given.
  e = EncoderTrainConfig()
  f.DEFINE_enum("recipe", "pyramid", ["pyramid", "encoder"],
                "pyramid: Encoder+Aligner levels, two-stage losses; encoder: one encoder-only level "
                "trained with the known-warp loss, aligned by the finetuner on its encodings")
  f.DEFINE_float("nm", e.nm, "encoder recipe: pixel size (nm) of the level")
  f.DEFINE_integer("encoding_levels", e.encoding_levels, "encoder recipe: coarser encoding reductions at inference")
  f.DEFINE_integer("steps", e.steps, "encoder recipe: total train steps")
  f.DEFINE_list("encoder_dilations", [str(d) for d in e.encoder.dilations],
                "encoder recipe: dilation of each residual block (one per block)")
  f.DEFINE_float("nce_weight", e.nce_weight, "encoder recipe: weight of the InfoNCE term")
  f.DEFINE_float("temperature", e.temperature, "encoder recipe: InfoNCE temperature")


def config_from_flags(FLAGS) -> TrainConfig:
  """TrainConfig from the flags of `define_flags`; InputError on malformed values."""
  try:
    stacks = []
    for item in FLAGS.stacks:
      name, _, stride = item.partition(":")
      stacks.append((name, int(stride or 1)))
    mips = [int(m) for m in FLAGS.mips]
    gammas = tuple(float(g) for g in FLAGS.gammas)
  except ValueError as e:
    raise InputError(f"bad --stacks/--mips/--gammas value ({e})") from None
  enc = models.EncoderConfig(channels=FLAGS.encoder_channels, blocks=FLAGS.encoder_blocks,
                             out_channels=FLAGS.encoding_channels)
  al = models.AlignerConfig(scales=FLAGS.aligner_scales, channels=FLAGS.aligner_channels)
  pyr = models.PyramidConfig(levels=tuple(models.LevelConfig(mip=m, encoder=enc, aligner=al,
                                                                    finetune=models.default_finetune(m)) for m in mips))
  cfg = TrainConfig(pyramid=pyr, data_root=FLAGS.data_root, stacks=tuple(stacks), val_sections=FLAGS.val_sections,
                    variants=FLAGS.variants, crop=FLAGS.crop, batch_size=FLAGS.batch_size,
                    stage1_epochs=FLAGS.stage1_epochs, stage2_epochs=FLAGS.stage2_epochs,
                    learning_rate=FLAGS.learning_rate, gammas=gammas, alpha=FLAGS.alpha,
                    eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every,
                    keep_last=FLAGS.keep_last, seed=FLAGS.seed)
  validate_train_config(cfg)
  return cfg


def encoder_config_from_flags(FLAGS) -> EncoderTrainConfig:
  """EncoderTrainConfig from the flags of `define_flags` (`--recipe=encoder`); InputError on bad values."""
  d = EncoderTrainConfig()
  given = lambda name, default: getattr(FLAGS, name) if FLAGS[name].present else default
  enc = models.EncoderConfig(channels=given("encoder_channels", d.encoder.channels),
                             blocks=given("encoder_blocks", d.encoder.blocks),
                             out_channels=given("encoding_channels", d.encoder.out_channels),
                             dilations=tuple(int(x) for x in FLAGS.encoder_dilations))
  cfg = EncoderTrainConfig(encoder=enc, nm=FLAGS.nm, encoding_levels=FLAGS.encoding_levels, data_root=FLAGS.data_root,
                           crop=given("crop", d.crop), batch_size=given("batch_size", d.batch_size),
                           steps=FLAGS.steps, learning_rate=given("learning_rate", d.learning_rate),
                           temperature=FLAGS.temperature, nce_weight=FLAGS.nce_weight,
                           eval_every=given("eval_every", d.eval_every),
                           checkpoint_every=given("checkpoint_every", d.checkpoint_every),
                           keep_last=FLAGS.keep_last, seed=FLAGS.seed)
  validate_encoder_config(cfg)
  return cfg


def main_from_flags(FLAGS) -> TrainResult:
  """Runs `train` (or `train_encoder` with `--recipe=encoder`) from parsed flags (shared by the CLI
  command and the experiment scripts)."""
  if not FLAGS.workdir:
    raise InputError("--workdir is required")
  if FLAGS.recipe == "encoder":
    res = train_encoder(encoder_config_from_flags(FLAGS), FLAGS.workdir, max_steps=FLAGS.max_steps)
  else:
    res = train(config_from_flags(FLAGS), FLAGS.workdir, max_steps=FLAGS.max_steps)
  if FLAGS.export and res.weights_path.exists():  # only a finished run writes its weights
    models.save_weights(res.pyramid, FLAGS.export)
    logging.info("exported weights to %s", FLAGS.export)
  return res


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


def encoder_config_to_dict(cfg: EncoderTrainConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


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
    secs = _load_stack(root, name, 1)[first:stop:stride]
    if secs.shape[0] < 2:
      raise InputError(f"{which} stack {name!r}: sections {first}:{stop}:{stride} hold {secs.shape[0]} "
                       "section(s); need at least 2")
    mip = fields.level_nearest(nm, cfg.nm)
    h, w = secs.shape[1:]
    secs = secs[:, :h - h % 2 ** mip, :w - w % 2 ** mip]
    level = np.asarray(fields.pyramid(jnp.asarray(secs), mip + 1, "mean")[mip], np.float32)
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
  blob = _blobs(kb, (h, w), blob_aug) & (jax.random.uniform(kp) < aug.blob_probability)
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
    d = _random_distortion(kd, (c, c), shape_aug)
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
    m = (fields.warp(_valid(src_enc), jax.lax.stop_gradient(f)) > FULL_SUPPORT).astype(jnp.float32)
    return m * _valid(tgt_enc) * inner

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
  cfg_dict = encoder_config_to_dict(cfg)
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
  opt = nnx.Optimizer(level, _adam(float(cfg.learning_rate), int(cfg.steps)), wrt=nnx.Param)
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
      _write_metrics(metrics_path, rec)
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
        _write_metrics(metrics_path, rec)
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
  _write_metrics(metrics_path, {"event": "done", "step": step, "seconds": time.time() - t_start})
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
