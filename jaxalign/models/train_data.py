"""SEAMLeSS training configuration and data (the configs of `jaxalign.models.train_pyramid.train`, the
shared stacks, synthetic distortions and artifacts, and the training pairs made from them).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign.bench.evaluation import em_data_dir
from jaxalign.errors import InputError
from jaxalign.models import seamless as models
from jaxalign.ops import fields

# A bilinear sample "has data" only if all four neighbours do (`fields.FULL_SUPPORT`).
FULL_SUPPORT = fields.FULL_SUPPORT
# A best-sample chunk needs at least this fraction of valid pixels to take part.
MIN_CHUNK_COVERAGE = 0.5
DEFAULT_STACKS = (("isbi2012_train", 1), ("gerhard_vnc_stack1", 1), ("flyem_medulla_fibsem", 4))
# The shared stacks (`$JAXALIGN_EM_DATA`, else ../shared/data/em): one home, `bench.evaluation.em_data_dir`.
DEFAULT_DATA_ROOT = str(em_data_dir())


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


def config_from_dict(d: dict) -> TrainConfig:
  """Inverse of `nnx_weights.config_to_dict`; raises InputError on malformed input."""
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
# Synthetic distortions and artifacts (dataset construction; seeded, jitted per shape)
# ----------------------------------------------------------------------------------------------

def distortion_field(key, shape, aug):
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


def random_blobs(key, shape, aug: AugmentConfig):
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
  d = distortion_field(k_d, a.shape, aug)
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
  blob = random_blobs(k_bl, a.shape, aug) & do_bl
  src_def = blob & bl_src
  src = jnp.where(src_def, 0.0, src)
  tgt = jnp.where(blob & ~bl_src, 0.0, tgt)
  return src, tgt, src_def, gt


_make_pair = jax.jit(_make_pair_impl, static_argnames=("aug",))
random_distortion = jax.jit(distortion_field, static_argnames=("shape", "aug"))


class PairSet(NamedTuple):
  """Pairs of one shape at MIP 0: src, tgt `[N, H, W]`, src_defects `[N, H, W]` bool,
  gt `[N, H, W, 2]` (MIP-0 px), names."""
  src: np.ndarray
  tgt: np.ndarray
  src_defects: np.ndarray
  gt: np.ndarray
  names: tuple[str, ...]


def load_stack(root: pathlib.Path, name: str, stride: int) -> np.ndarray:
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
    secs = load_stack(root, name, stride)
    if secs.shape[0] < cfg.val_sections + 2:
      raise InputError(f"training stack {name!r}: {secs.shape[0]} sections is too few to hold out "
                       f"{cfg.val_sections} for validation")
    k = jax.random.fold_in(key, si)
    train_sets.append(make_pairs(secs[:-cfg.val_sections], jax.random.fold_in(k, 0), cfg.augment,
                                 variants=cfg.variants, multiple=multiple, name=name))
    val_sets.append(make_pairs(secs[-cfg.val_sections:], jax.random.fold_in(k, 1), cfg.augment,
                               variants=1, multiple=multiple, name=name))
  return train_sets, val_sets
