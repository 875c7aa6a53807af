"""Supervised training of the defect / tissue detector (`jaxalign.detector.UNet`).

Labels are synthetic but the tissue is real: aligned EM sections from `../shared/data/em`
(isbi2012_train, gerhard_vnc_stack1, every 4th flyem_medulla_fibsem slice; the last sections of each
stack are held out) are downsampled to a coarse MIP, cut into patches and damaged by the team's
ground-truth generator (`jaxalign.groundtruth.distort_stack`), which returns exact crack / fold /
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

from jaxalign import detector, fields, groundtruth
from jaxalign.errors import InputError

DEFAULT_DATA_ROOT = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "em"
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
  crack_width: tuple[float, float] = (2.0, 8.0)
  fold_width: tuple[float, float] = (4.0, 20.0)
  fold_darkness: tuple[float, float] = (0.2, 0.55)
  fold_edge_probability: float = 0.5
  crack_bright_probability: float = 0.5
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
class DetectorTrainConfig:
  """Training run.

  Attributes:
    detector: UNet architecture.
    synth: synthetic data.
    stacks: source stacks (never `damaged_pair_dolw7`).
    steps, batch, learning_rate, weight_decay, warmup: optimisation.
    pos_weight: BCE weight of positive pixels per class (crack, fold, tissue); defects are rare.
    dice_weight: weight of the soft Dice term (crack and fold).
    checkpoint_every, keep_checkpoints: orbax cadence / retention.
    seed: data and init seed.
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
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  seed: int = 0


def config_to_dict(cfg: DetectorTrainConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ----------------------------------------------------------------------------------------------
# Data


class LabelledSet(NamedTuple):
  """Images `[N, P, P]` float32 in [0, 1] and labels `[N, P, P, 3]` float32 (crack, fold, tissue)."""
  images: np.ndarray
  labels: np.ndarray


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


def build_datasets(cfg: DetectorTrainConfig, root=DEFAULT_DATA_ROOT) -> tuple[LabelledSet, LabelledSet]:
  """(train, held-out) labelled sets from `cfg.stacks` (held-out = last sections of each stack)."""
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
  cat = lambda parts: LabelledSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
  return cat(parts_tr), cat(parts_va)


def augment_batch(rng: np.random.Generator, data: LabelledSet, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """A random batch with random flips / 90° rotations (the defects have no preferred direction)."""
  idx = rng.integers(0, len(data.images), batch)
  imgs, labs = data.images[idx], data.labels[idx]
  k = int(rng.integers(0, 4))
  imgs, labs = np.rot90(imgs, k, axes=(1, 2)), np.rot90(labs, k, axes=(1, 2))
  if rng.uniform() < 0.5:
    imgs, labs = imgs[:, :, ::-1], labs[:, :, ::-1]
  return np.ascontiguousarray(imgs), np.ascontiguousarray(labs)


# ----------------------------------------------------------------------------------------------
# Loss and step


def detector_loss(logits: jax.Array, labels: jax.Array, pos_weight: Sequence[float], dice_weight: float) -> jax.Array:
  """Weighted BCE (all classes) + soft Dice (crack, fold).

  Args:
    logits: `[B, H, W, 3]` float32. labels: `[B, H, W, 3]` float32 in {0, 1}.
    pos_weight: per-class weight of positive pixels. dice_weight: weight of the Dice term.
  Returns:
    scalar float32.
  """
  pw = jnp.asarray(pos_weight, jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  bce = -(pw * labels * log_p + (1.0 - labels) * log_not_p)
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
def train_step(model, optimizer, images, labels, *, pos_weight, dice_weight):
  """One optimiser step on a batch `[B, P, P]` / `[B, P, P, 3]`; returns the loss (before the step)."""
  def loss_fn(m):
    return detector_loss(m(images), labels, pos_weight, dice_weight)
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
  train_set, val_set = datasets if datasets is not None else build_datasets(cfg, root)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
  logging.info("detector data: %d train / %d held-out patches (%.1f s)", len(train_set.images),
               len(val_set.images), time.time() - t0)
  model = detector.UNet(cfg.detector, rngs=nnx.Rngs(cfg.seed))
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
    x, y = augment_batch(rng, train_set, cfg.batch)
    loss = float(train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y),
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
                                        "stacks": [s.name for s in cfg.stacks]})
  return TrainResult(model, stop, losses, weights)
