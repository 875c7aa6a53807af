"""Self-supervised SEAMLeSS training (the metroem part), flax NNX + optax + orbax.

The configs and the training data are in `jaxalign.models.train_data`, encoder-only levels in
`jaxalign.models.train_encoder`, the flags of `jaxalign train` in `jaxalign.models.train_flags`.

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

import functools
import json
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

from jaxalign.bench.evaluation import endpoint_errors
from jaxalign.errors import InputError
from jaxalign.models import nnx_weights
from jaxalign.models import seamless as models
from jaxalign.ops import fields, losses, preprocess
from jaxalign.models.train_data import (FULL_SUPPORT, MIN_CHUNK_COVERAGE, PairSet, TrainConfig,
                                       build_dataset, validate_train_config)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def valid_mask(x: jax.Array) -> jax.Array:
  """`[B, H, W]` float {0, 1}: where an image `[B, H, W]` / encoding `[B, H, W, C]` has data."""
  nz = x != 0
  if x.ndim == 4:
    nz = jnp.any(nz, axis=-1)
  return nz.astype(jnp.float32)


def blur_masked(x: jax.Array, sigma: float) -> jax.Array:
  """Gaussian blur over (H, W) of images `[B, H, W]` or encodings `[B, H, W, C]`; no-data pixels stay 0."""
  if sigma <= 0:
    return x
  valid = valid_mask(x)
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
  mse_mask = (fields.warp(valid_mask(src), f) > FULL_SUPPORT).astype(jnp.float32) * valid_mask(tgt)
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
  return (fields.downsample_image(src, reduce="mean"), fields.downsample_image(tgt, reduce="mean"),
          fields.downsample_image(sdef, reduce="max"), fields.downsample_field(gt))


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


def epe(fields_: np.ndarray, data: LevelData, mip: int) -> dict:
  """Endpoint error of fields `[N, h, w, 2]` vs ground truth, in MIP-0 pixels (mean and p95), over the
  pixels where both images have data."""
  errs = []
  for i in range(fields_.shape[0]):
    valid = (np.asarray(fields.warp(jnp.asarray(data.src[i] != 0, jnp.float32), jnp.asarray(data.gt[i])))
             > FULL_SUPPORT) & (np.asarray(data.tgt[i]) != 0)
    errs.append(endpoint_errors(fields_[i], data.gt[i])[valid] * float(2 ** mip))
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
def adam_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
  # Cached so that optimisers of equal settings share one object: the optimiser's graph definition
  # (a static jit argument) then compares equal and the train step is not recompiled.
  sched = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.1)
  return optax.adam(sched)


def make_optimizer(level: models.Level, cfg: TrainConfig, steps: int) -> nnx.Optimizer:
  """Adam with a cosine decay over the stage (`steps`), on the level's parameters."""
  return nnx.Optimizer(level, adam_optimizer(float(cfg.learning_rate), int(steps)), wrt=nnx.Param)


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


def write_metrics(path: pathlib.Path, record: dict) -> None:
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
  cfg_dict = nnx_weights.config_to_dict(cfg)
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
        write_metrics(metrics_path, dict(base, step=step, event="level_start",
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
              write_metrics(metrics_path, rec)
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
  write_metrics(metrics_path, {"event": "done", "step": step, "seconds": time.time() - t_start})
  return TrainResult(pyramid, step, metrics_path, weights)
