"""Supervised training of the defect / tissue detector (`jaxalign.models.detector.UNet`).

Labels are synthetic but the tissue is real: aligned EM sections from `../shared/data/em`
(isbi2012_train, gerhard_vnc_stack1, every 4th flyem_medulla_fibsem slice; the last sections of each
stack are held out) are downsampled to a coarse MIP, cut into patches and damaged by the team's
ground-truth generator (`jaxalign.bench.groundtruth.distort_stack`), which returns exact crack / fold /
missing-data masks: a crack is a gap with no tissue, a fold squeezes a strip of tissue of width 2b into
a band of width b (compressed, doubled tissue). On top, `render_appearance` (here) gives them the
looks of raw sections:

* folds: the band is darkened by a random factor (real folds are 0.3-0.5x as bright; DOLW7: 0.39x)
  and, often, bordered by thin bright lines (the slivers of empty film along a real fold's edges);
* cracks: the gap is either empty (0 = no data) or bright (electron-transparent film, as in TEM);
* resin: a region beyond a wavy boundary replaced by flat, bright, noisy, slightly shaded
  intensity (labelled not-tissue), as at the edge of a section.

`damaged_pair_dolw7` is never used for training: its real fold mask is a test only.

Loss: per-class weighted binary cross-entropy (positive weights for the rare crack / fold pixels) +
soft Dice on crack and fold. Optimiser: optax AdamW with cosine decay. Checkpoints: an orbax
`CheckpointManager` (`ocp.args.Composite` of StandardSave params / optimiser state + JsonSave meta)
under `workdir/checkpoints/`, so an interrupted run resumes; the final weights go to
`workdir/detector.{npz,json}` (the format `detector.load_weights` reads).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from jaxalign.models import detector, nnx_weights
from jaxalign.ops import fields
from jaxalign.bench import groundtruth
from jaxalign.bench.evaluation import em_data_dir
from jaxalign.errors import InputError

DEFAULT_DATA_ROOT = em_data_dir()  # `$JAXALIGN_EM_DATA`, else ../shared/data/em
FORBIDDEN_STACKS = ("damaged_pair_dolw7",)
DARK_BLOBS = 3


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """Which sections of a shared stack to use.

  Attributes:
    name: folder under the data root.
    stride: use every `stride`-th section (flyem's 10 nm slices are near-duplicates).
    holdout: the last `holdout` used sections are held out for validation / evaluation.
  """
  name: str
  stride: int = 1
  holdout: int = 3


DEFAULT_STACKS = (StackSpec("isbi2012_train", 1, 4), StackSpec("gerhard_vnc_stack1", 1, 3),
                  StackSpec("flyem_medulla_fibsem", 4, 4))


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Synthetic defects and their appearance (pixels of the patch's MIP; intensities in [0, 1]).

  Attributes:
    patch: patch edge (px); a multiple of the UNet's `multiple`.
    mips: MIP levels the source sections are downsampled to (several, for scale robustness).
    crops_per_section: random patches cut per section and MIP.
    crack_probability, fold_probability: chance a patch gets a crack / a fold.
    crack_width, fold_width: (min, max) crack gap / fold band width, px.
    fold_darkness: (min, max) intensity factor inside a fold band.
    fold_edge_probability: chance a fold gets thin bright edge lines.
    crack_bright_probability: chance a crack gap is bright film rather than empty (0).
      Defaults (2-14 px, mostly empty) match the ground-truth generator's cracks (4-14 px at MIP 1,
      empty), which the benchmarks and users see; session 1's (2-8 px, half bright) left wide empty
      gaps undetected (they looked like the no-data margin of a section).
    bright: (min, max) intensity of bright film / resin.
    resin_probability: chance a patch gets a resin region.
    resin_noise: (min, max) sigma of the resin's pixel noise.
    gamma: (min, max) exponent applied to tissue intensities (contrast of other stains / scopes).
    dark_blob_probability, dark_blob_radius, dark_blob_factor: unlabelled dark, round, soft-edged
      blobs (up to `DARK_BLOBS`; dense organelles, dark cells) so that "dark" alone is not "fold".
      Off by default (the shipped weights were trained without them and without gamma; a run with
      gamma (0.6, 1.8) and blobs 0.5 learned folds far more slowly: fold IoU 0 after 300 steps).
      Their random draws use a separate stream, so enabling them leaves the other draws unchanged.
    elastic_amplitude, max_translation: smooth distortion from the generator, px (small: the
      detector does not care about the field, only the defect appearance).
  """
  patch: int = 128
  mips: tuple[int, ...] = (1, 2)
  crops_per_section: int = 4
  crack_probability: float = 0.55
  fold_probability: float = 0.55
  crack_width: tuple[float, float] = (2.0, 14.0)
  fold_width: tuple[float, float] = (4.0, 20.0)
  fold_darkness: tuple[float, float] = (0.2, 0.55)
  fold_edge_probability: float = 0.5
  crack_bright_probability: float = 0.2
  bright: tuple[float, float] = (0.7, 0.97)
  resin_probability: float = 0.35
  resin_noise: tuple[float, float] = (0.005, 0.04)
  gamma: tuple[float, float] = (1.0, 1.0)
  dark_blob_probability: float = 0.0
  dark_blob_radius: tuple[float, float] = (3.0, 16.0)
  dark_blob_factor: tuple[float, float] = (0.25, 0.7)
  elastic_amplitude: float = 4.0
  max_translation: float = 3.0


@dataclasses.dataclass(frozen=True)
class HardNegativeConfig:
  """Hard negatives: dark, undamaged tissue that a detector trained on synthetic folds calls "fold".

  Dense organelles, dark cell profiles and membrane-rich regions look like a fold band (dark) and were
  the main false positives on real sections (docs/benchmarks/detector.md). Two mechanisms, both on
  real tissue (no synthetic look-alikes, which slowed fold learning, see `SynthConfig`):

  Attributes:
    dark_weight: BCE weight of crack / fold *negative* pixels that are dark (1 = off): the
      `dark_radius` box mean of the image is below `dark_level` x the patch's median tissue
      intensity (a fold band is 0.2-0.55x as bright, so such pixels are what the net confuses).
    dark_level: see `dark_weight`.
    dark_radius: box radius (px) of the local mean used for "dark".
    mined_patches: undamaged patches of training sections added to the training set (0 = off):
      the ones where `mine_from` (a detector) finds the most crack / fold pixels.
    mined_candidates: undamaged patches scored to pick `mined_patches` from.
    mined_weight: BCE weight of the negative crack / fold pixels of a mined patch that the mining
      detector called defect (grown by `mined_grow` px).
    mined_grow: see `mined_weight`.
    mine_from: detector weights (path without suffix) used for mining; None = the model being
      trained at initialisation (only useful with `DetectorTrainConfig.init_weights`).
  """
  dark_weight: float = 1.0
  dark_level: float = 0.6
  dark_radius: int = 2
  mined_patches: int = 0
  mined_candidates: int = 512
  mined_weight: float = 4.0
  mined_grow: int = 2
  mine_from: str | None = None


@dataclasses.dataclass(frozen=True)
class DetectorTrainConfig:
  """Training run.

  Attributes:
    detector: UNet architecture.
    synth: synthetic data.
    stacks: source stacks (never `damaged_pair_dolw7`).
    steps, batch, learning_rate, weight_decay, warmup: optimisation.
    pos_weight: BCE weight of positive pixels per class (crack, fold, tissue); defects are rare.
    dice_weight: weight of the soft Dice term (crack and fold).
    init_weights: start from these detector weights (path without suffix; fine-tuning) instead of a
      fresh initialisation; their architecture must equal `detector`.
    checkpoint_every, keep_checkpoints: orbax cadence / retention.
    seed: data and init seed.
    hard_negatives: extra weight on dark undamaged tissue and mined false positives (off by default).
  """
  detector: detector.DetectorConfig = detector.DetectorConfig(channels=(8, 16, 32, 48))
  synth: SynthConfig = SynthConfig()
  stacks: tuple[StackSpec, ...] = DEFAULT_STACKS
  steps: int = 800
  batch: int = 8
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  warmup: int = 30
  pos_weight: tuple[float, float, float] = (4.0, 2.0, 1.0)
  dice_weight: float = 1.0
  init_weights: str | None = None
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  seed: int = 0
  hard_negatives: HardNegativeConfig = HardNegativeConfig()


# ----------------------------------------------------------------------------------------------
# Data


class LabelledSet(NamedTuple):
  """Images `[N, P, P]` float32 in [0, 1], labels `[N, P, P, 3]` float32 (crack, fold, tissue) and
  optional per-pixel BCE weights `[N, P, P, 3]` float32 (None = all 1)."""
  images: np.ndarray
  labels: np.ndarray
  weights: np.ndarray | None = None

  def pixel_weights(self) -> np.ndarray:
    """`weights`, or ones `[N, P, P, 3]` float32 when absent."""
    return self.weights if self.weights is not None else np.ones(self.labels.shape, np.float32)


def concat_sets(parts: Sequence[LabelledSet]) -> LabelledSet:
  """One `LabelledSet` from several (weights filled with 1 where a part has none)."""
  parts = [p for p in parts if len(p.images)]
  weights = None
  if any(p.weights is not None for p in parts):
    weights = np.concatenate([p.pixel_weights() for p in parts])
  return LabelledSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), weights)


def load_stack(root: pathlib.Path, spec: StackSpec) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) sections of a shared stack, float32 `[Z, H, W]` in [0, 1]."""
  from PIL import Image
  if spec.name in FORBIDDEN_STACKS:
    raise InputError(f"{spec.name} is a test set (real fold mask); it must not be used for training")
  folder = pathlib.Path(root) / spec.name
  files = sorted(folder.glob("[0-9][0-9][0-9].png"))[::spec.stride]
  if not files:
    raise InputError(f"no sections NNN.png in {folder}")
  if len(files) <= spec.holdout:
    raise InputError(f"{spec.name}: {len(files)} sections, cannot hold out {spec.holdout}")
  stack = np.stack([np.asarray(Image.open(f), np.float32) / 255.0 for f in files])
  return stack[:len(files) - spec.holdout], stack[len(files) - spec.holdout:]


def _to_mip(stack: np.ndarray, mip: int) -> np.ndarray:
  x = jnp.asarray(stack)
  for _ in range(mip):
    x = fields.downsample_image(x[..., :x.shape[-2] // 2 * 2, :x.shape[-1] // 2 * 2], reduce="mean")
  return np.asarray(x)


def cut_patches(stack: np.ndarray, synth: SynthConfig, rng: np.random.Generator) -> np.ndarray:
  """Random `[N, P, P]` patches of every section at every MIP of `synth.mips`."""
  out = []
  p = synth.patch
  for mip in synth.mips:
    lvl = _to_mip(stack, mip)
    _, h, w = lvl.shape
    if h < p or w < p:
      logging.warning("MIP %d sections %dx%d are smaller than the %d px patch; skipped", mip, h, w, p)
      continue
    for sec in lvl:
      for _ in range(synth.crops_per_section):
        y, x = rng.integers(0, h - p + 1), rng.integers(0, w - p + 1)
        out.append(sec[y:y + p, x:x + p])
  if not out:
    raise InputError(f"no {p} px patches could be cut at MIPs {synth.mips}")
  return np.stack(out)


def _appearance_params(rng: np.random.Generator, extra: np.random.Generator, synth: SynthConfig,
                       p: int) -> dict[str, np.ndarray]:
  """Per-patch random appearance parameters (float32 scalars / small vectors); `extra` feeds the
  optional gamma / dark-blob draws."""
  ang = rng.uniform(0, 2 * math.pi)
  return dict(
    fold_dark=rng.uniform(*synth.fold_darkness),
    fold_edge=float(rng.uniform() < synth.fold_edge_probability),
    edge_value=rng.uniform(*synth.bright),
    crack_bright=float(rng.uniform() < synth.crack_bright_probability),
    crack_value=rng.uniform(*synth.bright),
    resin=float(rng.uniform() < synth.resin_probability),
    resin_value=rng.uniform(*synth.bright),
    resin_noise=rng.uniform(*synth.resin_noise),
    resin_normal=np.array([math.sin(ang), math.cos(ang)]),
    # boundary passes 10-45 % of the way in from the edge the normal points to
    resin_offset=rng.uniform(0.1, 0.45) * p,
    resin_wave=rng.uniform(0, 6), resin_k=2 * math.pi / rng.uniform(40, 160), resin_phase=rng.uniform(0, 2 * math.pi),
    shade=rng.uniform(-0.04, 0.04, size=2),
    gamma=extra.uniform(*synth.gamma),
    blob_on=(extra.uniform(size=DARK_BLOBS) < synth.dark_blob_probability).astype(np.float32),
    blob_centre=extra.uniform(0, p, size=(DARK_BLOBS, 2)),
    blob_radius=extra.uniform(*synth.dark_blob_radius, size=(DARK_BLOBS, 2)),
    blob_factor=extra.uniform(*synth.dark_blob_factor, size=DARK_BLOBS),
  )


@jax.jit
def render_appearance(image, crack, fold, tissue, prm, key):
  """Gives generated defects and resin a raw-section look; returns (image, labels).

  Args:
    image: `[P, P]` float32 distorted section (folds not yet darkened; 0 = no data).
    crack, fold, tissue: `[P, P]` bool masks from the generator (distorted frame).
    prm: dict of per-patch parameters (`_appearance_params`).
    key: PRNG key for the noise.
  Returns:
    image `[P, P]` float32 in [0, 1]; labels `[P, P, 3]` float32 (crack, fold, tissue).
  """
  p = image.shape[0]
  k1, k2 = jax.random.split(key)
  yy, xx = jnp.meshgrid(jnp.arange(p, dtype=jnp.float32), jnp.arange(p, dtype=jnp.float32), indexing="ij")
  img = jnp.where(image > 0, jnp.maximum(image, 1e-6) ** prm["gamma"], 0.0)
  # unlabelled dark blobs (soft edges), before the fold so a fold over a blob stays a fold
  r2 = (((yy[..., None] - prm["blob_centre"][:, 0]) / prm["blob_radius"][:, 0]) ** 2
        + ((xx[..., None] - prm["blob_centre"][:, 1]) / prm["blob_radius"][:, 1]) ** 2)
  weight = prm["blob_on"] * jax.nn.sigmoid(4.0 * (1.0 - r2))
  img = img * jnp.prod(1.0 - weight * (1.0 - prm["blob_factor"]), axis=-1)
  img = jnp.where(fold, img * prm["fold_dark"], img)
  edge = detector.dilate(fold, 1) & ~fold & tissue & (prm["fold_edge"] > 0)
  img = jnp.where(edge, prm["edge_value"] + 0.02 * jax.random.normal(k1, img.shape), img)
  crack_val = prm["crack_value"] + 0.03 * jax.random.normal(k2, img.shape)
  img = jnp.where(crack & (prm["crack_bright"] > 0), crack_val, img)
  # resin beyond a wavy line parallel to one side: flat bright intensity + noise + slight shading
  c = (p - 1) / 2.0
  n = prm["resin_normal"]
  along = (yy - c) * n[0] + (xx - c) * n[1]
  across = -(yy - c) * n[1] + (xx - c) * n[0]
  s = along - (c - prm["resin_offset"]) + prm["resin_wave"] * jnp.sin(prm["resin_k"] * across + prm["resin_phase"])
  resin = (s > 0) & (prm["resin"] > 0)
  shading = prm["shade"][0] * (yy / p - 0.5) + prm["shade"][1] * (xx / p - 0.5)
  resin_img = prm["resin_value"] + shading + prm["resin_noise"] * jax.random.normal(jax.random.fold_in(key, 3), img.shape)
  img = jnp.clip(jnp.where(resin, resin_img, img), 0.0, 1.0)
  labels = jnp.stack([crack & ~resin, fold & ~resin, tissue & ~resin], -1).astype(jnp.float32)
  # a bright crack pixel must not be exactly 0 after clipping, nor a dark one nonzero: keep the
  # "no data" convention exact
  img = jnp.where((img == 0) & (image > 0), 1.0 / 255.0, img)
  img = jnp.where((img == 0) & (resin | (crack & (prm["crack_bright"] > 0))), 1.0 / 255.0, img)
  return img, labels


def synthesize(sections: np.ndarray, synth: SynthConfig, seed: int, *, progress: bool = False) -> LabelledSet:
  """Labelled patches from real sections: patches -> generator defects -> appearance.

  Args:
    sections: `[Z, H, W]` float32 in [0, 1], real aligned EM sections.
    synth: `SynthConfig`.
    seed: RNG seed (patch positions, generator, appearance).
  Returns:
    `LabelledSet` with `[N, P, P]` images and `[N, P, P, 3]` labels.
  """
  rng = np.random.default_rng(seed)
  patches = cut_patches(sections, synth, rng)
  gcfg = groundtruth.DistortionConfig(
    seed=seed, undistorted=(), elastic_amplitude=synth.elastic_amplitude, max_translation=synth.max_translation,
    max_rotation_deg=0.5, crack_probability=synth.crack_probability, fold_probability=synth.fold_probability,
    crack_width=synth.crack_width, fold_width=synth.fold_width, fold_darkness=1.0,
    defect_wave_amplitude=4.0, defect_wavelength=(80.0, 200.0), blob_probability=0.15, blob_radius=(5.0, 15.0),
    blank_probability=0.02, chatter_probability=0.1)
  ds = groundtruth.distort_stack(patches, gcfg, progress=progress)
  images, labels = [], []
  key = jax.random.key(seed)
  extra = np.random.default_rng((seed, 1))
  for i in range(len(patches)):
    prm = {k: jnp.asarray(v, jnp.float32) for k, v in _appearance_params(rng, extra, synth, synth.patch).items()}
    img, lab = render_appearance(jnp.asarray(ds.images[i]), jnp.asarray(ds.crack[i]), jnp.asarray(ds.fold[i]),
                                 jnp.asarray(ds.tissue[i]), prm, jax.random.fold_in(key, i))
    images.append(np.asarray(img))
    labels.append(np.asarray(lab))
  return LabelledSet(np.stack(images).astype(np.float32), np.stack(labels).astype(np.float32))


def build_datasets(cfg: DetectorTrainConfig, root=DEFAULT_DATA_ROOT, *,
                   mining_model: detector.UNet | None = None) -> tuple[LabelledSet, LabelledSet]:
  """(train, held-out) labelled sets from `cfg.stacks` (held-out = last sections of each stack).

  With `cfg.hard_negatives`: mined undamaged patches are appended to the training set (mined by
  `mine_from`, else by `mining_model`) and dark negative pixels re-weighted. The held-out set is
  never re-weighted (its scores are plain pixel scores)."""
  train_secs, val_secs = [], []
  for spec in cfg.stacks:
    tr, va = load_stack(pathlib.Path(root), spec)
    train_secs.append((spec.name, tr))
    val_secs.append((spec.name, va))
  parts_tr, parts_va = [], []
  for i, ((name, tr), (_, va)) in enumerate(zip(train_secs, val_secs)):
    parts_tr.append(synthesize(tr, cfg.synth, cfg.seed * 1000 + i))
    parts_va.append(synthesize(va, cfg.synth, cfg.seed * 1000 + 500 + i))
    logging.info("%s: %d train / %d held-out sections", name, len(tr), len(va))
  train_set = concat_sets(parts_tr)
  hn = cfg.hard_negatives
  if hn.mined_patches > 0:
    miner = mining_model
    if hn.mine_from is not None:
      miner = detector.load_weights(hn.mine_from)
    if miner is None:
      raise InputError("hard negative mining needs a detector: set HardNegativeConfig.mine_from "
                       "(or DetectorTrainConfig.init_weights)")
    mined = mine_hard_negatives(miner, [tr for _, tr in train_secs], cfg.synth, hn, cfg.seed * 1000 + 900)
    logging.info("mined %d hard-negative patches (%d defect-called px)", len(mined.images),
                 int(np.sum(mined.weights[..., :2] > 1)))
    train_set = concat_sets([train_set, mined])
  if hn.dark_weight != 1.0:
    train_set = train_set._replace(weights=np.asarray(dark_negative_weights(
      jnp.asarray(train_set.images), jnp.asarray(train_set.labels), jnp.asarray(train_set.pixel_weights()),
      weight=hn.dark_weight, level=hn.dark_level, radius=hn.dark_radius)))
  return train_set, concat_sets(parts_va)


@functools.partial(jax.jit, static_argnames=("radius",))
def dark_negative_weights(images: jax.Array, labels: jax.Array, weights: jax.Array, *, weight: float,
                          level: float, radius: int) -> jax.Array:
  """Multiplies the crack / fold BCE weight of dark negative pixels by `weight`.

  Args:
    images: `[N, P, P]` float32 in [0, 1] (0 = no data). labels: `[N, P, P, 3]` float32.
    weights: `[N, P, P, 3]` float32 current weights.
    weight, level, radius: see `HardNegativeConfig.dark_weight` / `dark_level` / `dark_radius`.
  Returns:
    `[N, P, P, 3]` float32 weights: x `weight` where the pixel has data, is neither crack nor fold,
    and its `(2 radius + 1)^2` box mean is below `level` x the patch's median data intensity.
  """
  data = images > 0
  # the median of a patch's data pixels: no-data pixels are pushed to the top half, then the
  # data-count-th order statistic is read
  ranked = jnp.sort(jnp.where(data, images, 2.0).reshape(images.shape[0], -1), axis=-1)
  count = jnp.maximum(jnp.sum(data, axis=(1, 2)), 1)
  median = jnp.take_along_axis(ranked, ((count - 1) // 2)[:, None], axis=-1)[:, 0]
  k = 2 * radius + 1
  local = jax.lax.reduce_window(images, 0.0, jax.lax.add, (1, k, k), (1, 1, 1), "SAME") / float(k * k)
  dark = data & (local < level * median[:, None, None]) & (labels[..., 0] < 0.5) & (labels[..., 1] < 0.5)
  boost = jnp.where(dark, weight, 1.0)
  return weights * jnp.stack([boost, boost, jnp.ones_like(boost)], axis=-1)


def mine_hard_negatives(model: detector.UNet, stacks: Sequence[np.ndarray], synth: SynthConfig,
                        config: HardNegativeConfig, seed: int) -> LabelledSet:
  """Undamaged training patches on which `model` calls the most crack / fold pixels.

  Args:
    model: the mining detector.
    stacks: training sections per stack, each `[Z, H, W]` float32 in [0, 1] (never held-out ones).
    synth: patch size and MIPs (`cut_patches`).
    config: `mined_candidates` patches are cut (spread over the stacks), the `mined_patches` with
      the most defect-called pixels kept.
    seed: patch positions.
  Returns:
    `LabelledSet`: the clean patches, labels (no crack / fold; tissue where there is data) and
    weights (`mined_weight` on the negative crack / fold pixels the miner called defect, grown by
    `mined_grow` px; 1 elsewhere).
  """
  rng = np.random.default_rng(seed)
  per_stack = max(1, config.mined_candidates // max(len(stacks), 1))
  cands = []
  for st in stacks:
    patches = cut_patches(st, synth, rng)
    cands.append(patches[rng.permutation(len(patches))[:per_stack]])
  cands = np.concatenate(cands)
  probs = predict_set(model, LabelledSet(cands, np.zeros(cands.shape + (3,), np.float32)))
  called = np.asarray(detector.dilate(jnp.asarray(np.max(probs[..., :2], axis=-1) > 0.5), config.mined_grow))
  order = np.argsort(-called.sum(axis=(1, 2)), kind="stable")[:config.mined_patches]
  images, called = cands[order], called[order]
  labels = np.zeros(images.shape + (3,), np.float32)
  labels[..., 2] = images > 0
  boost = np.where(called, np.float32(config.mined_weight), np.float32(1.0))
  weights = np.stack([boost, boost, np.ones_like(boost)], axis=-1).astype(np.float32)
  return LabelledSet(images.astype(np.float32), labels, weights)


def augment_batch(rng: np.random.Generator, data: LabelledSet,
                  batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A random batch (images, labels, weights) with random flips / 90° rotations (the defects have
  no preferred direction)."""
  idx = rng.integers(0, len(data.images), batch)
  imgs, labs = data.images[idx], data.labels[idx]
  wts = data.weights[idx] if data.weights is not None else np.ones(labs.shape, np.float32)
  k = int(rng.integers(0, 4))
  imgs, labs, wts = (np.rot90(a, k, axes=(1, 2)) for a in (imgs, labs, wts))
  if rng.uniform() < 0.5:
    imgs, labs, wts = imgs[:, :, ::-1], labs[:, :, ::-1], wts[:, :, ::-1]
  return np.ascontiguousarray(imgs), np.ascontiguousarray(labs), np.ascontiguousarray(wts)


# ----------------------------------------------------------------------------------------------
# Loss and step


def detector_loss(logits: jax.Array, labels: jax.Array, pos_weight: Sequence[float], dice_weight: float,
                  weights: jax.Array | None = None) -> jax.Array:
  """Weighted BCE (all classes) + soft Dice (crack, fold).

  Args:
    logits: `[B, H, W, 3]` float32. labels: `[B, H, W, 3]` float32 in {0, 1}.
    pos_weight: per-class weight of positive pixels. dice_weight: weight of the Dice term.
    weights: optional `[B, H, W, 3]` float32 per-pixel BCE weights (hard negatives), applied on top
      of `pos_weight`; the BCE stays a plain mean over pixels.
  Returns:
    scalar float32.
  """
  pw = jnp.asarray(pos_weight, jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  bce = -(pw * labels * log_p + (1.0 - labels) * log_not_p)
  if weights is not None:
    bce = bce * weights
  prob = jax.nn.sigmoid(logits[..., :2])
  lab = labels[..., :2]
  inter = jnp.sum(prob * lab, axis=(1, 2))
  denom = jnp.sum(prob, axis=(1, 2)) + jnp.sum(lab, axis=(1, 2))
  dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
  return bce.mean() + dice_weight * dice.mean()


def make_optimizer(model: detector.UNet, cfg: DetectorTrainConfig) -> nnx.Optimizer:
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup, max(cfg.steps, cfg.warmup + 1),
                                             cfg.learning_rate * 0.05)
  return nnx.Optimizer(model, optax.adamw(sched, weight_decay=cfg.weight_decay), wrt=nnx.Param)


@nnx.jit(static_argnames=("pos_weight", "dice_weight"))
def train_step(model, optimizer, images, labels, weights=None, *, pos_weight, dice_weight):
  """One optimiser step on a batch `[B, P, P]` / `[B, P, P, 3]` (optional per-pixel BCE weights
  `[B, P, P, 3]`); returns the loss (before the step)."""
  def loss_fn(m):
    return detector_loss(m(images), labels, pos_weight, dice_weight, weights)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def pixel_scores(pred, truth) -> dict[str, float]:
  """Pixel precision, recall and IoU of a bool prediction against a bool truth (any equal shapes).

  Empty-vs-empty counts as perfect (1.0); the counts are returned too so scores can be pooled.
  """
  pred = np.asarray(pred, bool)
  truth = np.asarray(truth, bool)
  tp = int(np.sum(pred & truth))
  fp = int(np.sum(pred & ~truth))
  fn = int(np.sum(~pred & truth))
  return dict(precision=tp / (tp + fp) if tp + fp else 1.0, recall=tp / (tp + fn) if tp + fn else 1.0,
              iou=tp / (tp + fp + fn) if tp + fp + fn else 1.0, tp=tp, fp=fp, fn=fn)


@functools.partial(jax.jit, static_argnums=0)
def _eval_probs(graphdef, state, images):
  return jax.nn.sigmoid(nnx.merge(graphdef, state)(images))


def predict_set(model: detector.UNet, data: LabelledSet, batch: int = 8) -> np.ndarray:
  """Probabilities `[N, P, P, 3]` for a labelled set (last batch padded: one compilation)."""
  graphdef, state = nnx.split(model)
  out = []
  n = len(data.images)
  for b0 in range(0, n, batch):
    x = data.images[b0:b0 + batch]
    pad = batch - len(x)
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
    out.append(np.asarray(_eval_probs(graphdef, state, jnp.asarray(x)))[:batch - pad])
  return np.concatenate(out)


def evaluate_set(model: detector.UNet, data: LabelledSet, threshold: float = 0.5) -> dict[str, dict]:
  """Pooled pixel scores per class (`pixel_scores`) on a labelled set, probabilities > threshold."""
  probs = predict_set(model, data)
  return {name: pixel_scores(probs[..., i] > threshold, data.labels[..., i] > 0.5)
          for i, name in enumerate(detector.CLASSES)}


# ----------------------------------------------------------------------------------------------
# Training loop with orbax checkpoints


def _ocp():
  import orbax.checkpoint as ocp
  return ocp


def _manager(workdir: pathlib.Path, keep: int):
  ocp = _ocp()
  return ocp.CheckpointManager((workdir / "checkpoints").resolve(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                    enable_async_checkpointing=False))


class TrainResult(NamedTuple):
  model: detector.UNet
  step: int
  losses: list
  weights_path: pathlib.Path


def train(cfg: DetectorTrainConfig, workdir, *, datasets: tuple[LabelledSet, LabelledSet] | None = None,
          root=DEFAULT_DATA_ROOT, max_steps: int | None = None, progress: bool = True) -> TrainResult:
  """Trains (or resumes) the detector.

  Args:
    cfg: `DetectorTrainConfig`.
    workdir: output folder: `checkpoints/` (orbax), `metrics.jsonl`, `config.json`, final
      `detector.{npz,json}`.
    datasets: optional (train, held-out) `LabelledSet`s instead of `build_datasets(cfg, root)`.
    root: shared EM data folder.
    max_steps: stop at this step (an interruption, for tests); default `cfg.steps`.
    progress: tqdm bar.
  Returns:
    `TrainResult` (model, last step, losses of this run, final weights path).
  """
  from tqdm import tqdm
  ocp = _ocp()
  if cfg.steps < 1 or cfg.batch < 1:
    raise InputError(f"steps and batch must be positive, got {cfg.steps}, {cfg.batch}")
  if cfg.synth.patch % cfg.detector.multiple:
    raise InputError(f"patch {cfg.synth.patch} must be a multiple of {cfg.detector.multiple}")
  t0 = time.time()
  # data first: a bad stack list fails before anything is written
  init = detector.load_weights(cfg.init_weights) if cfg.init_weights else None
  if init is not None and tuple(init.cfg.channels) != tuple(cfg.detector.channels):
    raise InputError(f"init_weights {cfg.init_weights} have widths {init.cfg.channels}, "
                     f"the run asks for {cfg.detector.channels}")
  train_set, val_set = datasets if datasets is not None else build_datasets(cfg, root, mining_model=init)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(nnx_weights.config_to_dict(cfg), indent=1))
  logging.info("detector data: %d train / %d held-out patches (%.1f s)", len(train_set.images),
               len(val_set.images), time.time() - t0)
  model = detector.UNet(cfg.detector, rngs=nnx.Rngs(cfg.seed))
  if init is not None:
    nnx.update(model, nnx.state(init, nnx.Param))
    logging.info("detector initialised from %s", cfg.init_weights)
  optimizer = make_optimizer(model, cfg)
  mgr = _manager(workdir, cfg.keep_checkpoints)
  start = 0
  latest = mgr.latest_step()
  if latest is not None:
    abstract = lambda s: jax.tree.map(ocp.utils.to_shape_dtype_struct, s)
    got = mgr.restore(latest, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract(nnx.state(model, nnx.Param))),
      opt=ocp.args.StandardRestore(abstract(nnx.state(optimizer)))))
    nnx.update(model, got["params"])
    nnx.update(optimizer, got["opt"])
    start = latest
    logging.info("resumed detector training at step %d", start)
  stop = min(cfg.steps, max_steps) if max_steps is not None else cfg.steps
  # the batch stream depends only on (seed, step), so a resumed run sees the same batches
  losses = []
  metrics_path = workdir / "metrics.jsonl"
  bar = tqdm(range(start, stop), desc="train-detector", disable=not progress)
  for step in bar:
    rng = np.random.default_rng((cfg.seed, step))
    x, y, wt = augment_batch(rng, train_set, cfg.batch)
    loss = float(train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y), jnp.asarray(wt),
                            pos_weight=tuple(cfg.pos_weight), dice_weight=cfg.dice_weight))
    losses.append(loss)
    bar.set_postfix(loss=f"{loss:.4f}")
    done = step + 1
    if done % cfg.checkpoint_every == 0 or done == stop:
      record = {"step": done, "loss": float(np.mean(losses[-cfg.checkpoint_every:])),
                "seconds": time.time() - t0}
      if len(val_set.images):
        scores = evaluate_set(model, val_set)
        record.update({f"val_{k}_iou": v["iou"] for k, v in scores.items()})
      logging.info("detector step %d: %s", done, record)
      with metrics_path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
      if done not in mgr.all_steps():
        mgr.save(done, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
                                               opt=ocp.args.StandardSave(nnx.state(optimizer)),
                                               meta=ocp.args.JsonSave(record)))
  bar.close()
  mgr.close()
  weights = detector.save_weights(model, workdir / "detector",
                                  meta={"steps": stop, "train_patches": len(train_set.images),
                                        "stacks": [s.name for s in cfg.stacks], "init_weights": cfg.init_weights})
  return TrainResult(model, stop, losses, weights)
