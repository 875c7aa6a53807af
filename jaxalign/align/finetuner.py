"""Online Field Finetuner: gradient descent (optax) directly on a displacement field.

Paper: Popovych et al., Nat. Commun. 15, 289 (2024), "Online field finetuner", Methods "Loss masking"
and "Elastic regularizer". For one level, the field `f [H, W, 2]` (float32, pixels, (dy, dx), pull
semantics on tgt's grid) minimises

    masked_mse(warp(src, f), tgt, mse_mask) + gamma * elastic_loss(f, elastic_mask)

- `src`, `tgt` are images `[H, W]` or channels-last encodings `[H, W, C]` (SEAMLeSS encoder output).
- `mse_mask` keeps pixels where tgt has data and where the *warped* src has data on all four bilinear
  neighbours, so that no-data regions (zeros, masked defects) neither add error nor attract the field.
- the elastic term has per-spring weights: a spring is cut where its source-space segment under the
  run's *initial* field crosses a src crack or fold (`jaxalign.ops.tears`: one spring wide, so the field
  tears there and tissue on both sides aligns independently, while defect pixels stay attached to
  their side), and springs touching tgt defects are cut. The MSE mask is recomputed from the current
  field at every step (gradient stopped); the spring weights are fixed for the run (see
  `_spring_weights` for why).

The whole loop is one `lax.while_loop` (learning-rate schedule, early stop on plateau), jitted with the
config static, so it compiles once per (shape, config); `finetune_batch` vmaps it over pairs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxalign.ops import fields as _fields
from jaxalign.errors import InputError
from jaxalign.ops import losses as _losses
from jaxalign.ops import preprocess as _preprocess
from jaxalign.ops import tears as _tears



@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Settings of one finetuner run (one pyramid level). Hashable: it is a static jit argument.

  Attributes:
    iterations: maximum number of optimiser steps.
    learning_rate: initial step size. With Adam this is roughly the displacement, in pixels of the
      current level, that a pixel may move per step.
    schedule: "cosine" (decays to `final_lr_fraction * learning_rate` over `iterations`),
      "exponential" (same end point, geometric) or "constant".
    final_lr_fraction: end-of-schedule learning rate as a fraction of `learning_rate`.
    optimizer: "adam" (paper, metroem) or "sgd" (momentum 0.9).
    gamma: weight of the elastic (spring) regulariser; paper 5-25, larger at coarser levels.
    mask_elastic_at_defects: cut the springs that cross src defects and those touching tgt defects
      (paper: the elastic term is dropped at defects). False is only for the ablation that shows why
      masking matters.
    defect_dilation: radius (pixels of this level) by which tgt defect masks are grown before their
      springs are cut.
    tear_jump_px: full-resolution px; a spring is cut where the nearest-tissue map jumps by this much
      more than the sample spacing along it (`jaxalign.ops.tears.tear_springs`).
    patience: stop after this many steps without a relative loss improvement of `rel_tol`.
    rel_tol: relative improvement that resets the plateau counter.
  """
  iterations: int = 200
  learning_rate: float = 0.1
  schedule: str = "cosine"
  final_lr_fraction: float = 0.05
  optimizer: str = "adam"
  gamma: float = 10.0
  mask_elastic_at_defects: bool = True
  defect_dilation: int = 0
  tear_jump_px: float = _tears.TEAR_JUMP_PX
  patience: int = 30
  rel_tol: float = 1e-4

  def __post_init__(self):
    if self.iterations < 1:
      raise InputError(f"FinetuneConfig.iterations must be >= 1, got {self.iterations}")
    if self.learning_rate <= 0:
      raise InputError(f"FinetuneConfig.learning_rate must be > 0, got {self.learning_rate}")
    if self.schedule not in ("cosine", "exponential", "constant"):
      raise InputError(f"FinetuneConfig.schedule must be cosine|exponential|constant, got {self.schedule!r}")
    if self.optimizer not in ("adam", "sgd"):
      raise InputError(f"FinetuneConfig.optimizer must be adam|sgd, got {self.optimizer!r}")
    if self.gamma < 0:
      raise InputError(f"FinetuneConfig.gamma must be >= 0, got {self.gamma}")
    if not 0 < self.final_lr_fraction <= 1:
      raise InputError(f"FinetuneConfig.final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}")


class FinetuneStats(NamedTuple):
  """Diagnostics of a run: steps taken, loss of the first and of the returned field (scalars)."""
  steps: jax.Array
  initial_loss: jax.Array
  final_loss: jax.Array


def _schedule(config: FinetuneConfig) -> optax.Schedule:
  lr = config.learning_rate
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, config.iterations, alpha=config.final_lr_fraction)
  if config.schedule == "exponential":
    return optax.exponential_decay(lr, transition_steps=config.iterations,
                                   decay_rate=config.final_lr_fraction, end_value=lr * config.final_lr_fraction)
  return optax.constant_schedule(lr)


def _optimizer(config: FinetuneConfig) -> optax.GradientTransformation:
  sched = _schedule(config)
  if config.optimizer == "adam":
    return optax.adam(sched)
  return optax.sgd(sched, momentum=0.9)


def _data_mask(x: jax.Array) -> jax.Array:
  """`[H, W]` float {0, 1}: 1 where an image `[H, W]` / encoding `[H, W, C]` is not all zero."""
  nz = x != 0
  if x.ndim == 3:
    nz = jnp.any(nz, axis=-1)
  return nz.astype(jnp.float32)


def _loss_terms(field, src, tgt, src_valid, tgt_valid, springs, config: FinetuneConfig, upsample: int = 0,
                gamma_scale=1.0):
  """Returns (total, (mse, elastic)) for one field; data masks are functions of the stopped field.

  With `upsample` r > 0 the images and masks are 2**r finer than the field: the field is upsampled
  (`fields.upsample_field`, r times) before warping, so the MSE sees the finer images while the
  optimised field (and its elastic term) stays on its own coarse grid. `gamma_scale` (traced scalar)
  multiplies `config.gamma`, so a stiffer run reuses the compiled program.
  """
  fine = field
  for _ in range(upsample):
    fine = _fields.upsample_field(fine)
  fixed = lax.stop_gradient(fine)
  warped_valid = _fields.warp(src_valid, fixed)
  mse_mask = (warped_valid > _fields.FULL_SUPPORT).astype(jnp.float32) * tgt_valid
  mse = _losses.masked_mse(_fields.warp(src, fine), tgt, mse_mask)
  elastic = _losses.elastic_loss(field, None, springs)
  total = mse + config.gamma * gamma_scale * elastic
  return total, (mse, elastic)


def _spring_weights(init_field, src_nearest, has_src_defects, tgt_defects, scale: int,
                    config: FinetuneConfig):
  """`[H, W, 4]` per-spring elastic weights (layout of `losses.elastic_loss`), fixed for the whole run.

  Springs crossing a src tear are cut, and so are springs with an end on a (dilated) tgt defect; both
  are folded into one array before the loop so each step pays one multiply per spring.

  Cuts are taken from the *initial* field and kept fixed: recomputing them every step lets springs
  switch on and off, and Adam's momentum then carries pixels far off (measured on the crack
  benchmark: 2-4x larger errors at the tear).
  """
  if not config.mask_elastic_at_defects:
    return jnp.ones(init_field.shape[:-1] + (len(_losses.SPRING_OFFSETS),), jnp.float32)
  tgt_ok = 1.0 - _preprocess.dilate(tgt_defects > 0, config.defect_dilation).astype(jnp.float32)
  ones = jnp.ones(init_field.shape[:-1] + (len(_losses.SPRING_OFFSETS),), jnp.float32)
  if has_src_defects is False:
    # Known at trace time (`tears=False` in `jaxalign.align.pair`): no tear code is traced at all.
    return ones * _tears.spring_pairs(tgt_ok)
  # Without src defects every spring stays: skip the segment sampling (a cond, which under vmap
  # becomes a select that computes both branches; hence the static case above).
  springs = lax.cond(has_src_defects,
                     lambda: _tears.tear_springs(init_field, src_nearest, scale=scale,
                                                 jump_px=config.tear_jump_px),
                     lambda: jnp.ones(init_field.shape[:-1] + (len(_losses.SPRING_OFFSETS),), jnp.float32))
  return springs * _tears.spring_pairs(tgt_ok)


def finetune_core(src, tgt, init_field, src_valid, tgt_valid, src_defects, tgt_defects,
                   config: FinetuneConfig, *, src_nearest=None, has_src_defects=None, scale: int = 1,
                   upsample: int = 0, gamma_scale=1.0):
  """Unbatched, traceable finetuner. Masks are float `[H, W]` in {0, 1}. Returns (field, stats).

  `src_nearest` (`[H * scale, W * scale, 2]`, `tears.nearest_tissue` of the full-resolution src defect
  mask) lets a coarse level cut springs at defects thinner than its pixels; by default it is computed
  from `src_defects` at this level (`scale` 1). `has_src_defects=False` (a Python bool) says at trace
  time that there are none, and no tear code is traced. With `src_nearest`, pass `has_src_defects` (scalar bool: the
  full-resolution mask has any defect), since a coarse level's own mask may have lost thin ones.

  `upsample` r > 0 (static): `src`, `tgt`, `src_valid`, `tgt_valid` are `[2**r H, 2**r W]`, 2**r finer
  than the field `[H, W, 2]` and the defect masks `[H, W]`; the valid masks must then already
  exclude defects. The MSE is taken at the images' resolution (sub-pixel precision of a coarse
  field without the bilinear bias of matching at its own grid), the field stays coarse.
  """
  init_field = init_field.astype(jnp.float32)
  if not upsample:
    src_valid = src_valid * (1.0 - src_defects)
    tgt_valid = tgt_valid * (1.0 - tgt_defects)
  if src_nearest is None and has_src_defects is not False:
    src_nearest, has_src_defects, scale = _tears.nearest_tissue(src_defects), jnp.any(src_defects > 0), 1
  springs = _spring_weights(init_field, src_nearest, has_src_defects, tgt_defects, scale, config)
  opt = _optimizer(config)
  grad_fn = jax.value_and_grad(_loss_terms, has_aux=True)

  def loss_and_grad(f):
    (loss, _), g = grad_fn(f, src, tgt, src_valid, tgt_valid, springs, config, upsample, gamma_scale)
    return loss, g

  inf = jnp.asarray(jnp.inf, jnp.float32)
  # state: step, field, opt_state, best_field, best_loss, reference loss for plateau, stall count,
  # loss of the initial field. Only fields that were scored are returned, so the loss and its
  # gradient are traced once (compile time matters: one trace per pyramid level).
  state = (jnp.asarray(0, jnp.int32), init_field, opt.init(init_field), init_field, inf, inf,
           jnp.asarray(0, jnp.int32), inf)

  def cond(s):
    step, stall = s[0], s[6]
    return (step < config.iterations) & (stall < config.patience)

  def body(s):
    step, f, opt_state, best_f, best_loss, ref_loss, stall, loss0 = s
    loss, g = loss_and_grad(f)
    loss0 = jnp.where(step == 0, loss, loss0)
    improved = loss < best_loss
    best_f = jnp.where(improved, f, best_f)
    best_loss = jnp.where(improved, loss, best_loss)
    significant = loss < ref_loss * (1.0 - config.rel_tol)
    ref_loss = jnp.where(significant, loss, ref_loss)
    stall = jnp.where(significant, 0, stall + 1)
    updates, opt_state = opt.update(g, opt_state, f)
    f = optax.apply_updates(f, updates)
    return step + 1, f, opt_state, best_f, best_loss, ref_loss, stall, loss0

  step, _, _, best_f, best_loss, _, _, loss0 = lax.while_loop(cond, body, state)
  return best_f, FinetuneStats(step, loss0, best_loss)


def _finetune_batch(srcs, tgts, init_fields, src_valid, tgt_valid, src_defects, tgt_defects, *,
                    config: FinetuneConfig):
  return jax.vmap(functools.partial(finetune_core, config=config))(
      srcs, tgts, init_fields, src_valid, tgt_valid, src_defects, tgt_defects)


_finetune_jit = jax.jit(finetune_core, static_argnames=("config",))
_finetune_batch_jit = jax.jit(_finetune_batch, static_argnames=("config",))


def _as_mask(m, default: jax.Array) -> jax.Array:
  """Float {0, 1} mask `[..., H, W]`; `default` when `m` is None."""
  if m is None:
    return default
  return (jnp.asarray(m) > 0).astype(jnp.float32)


def _prepare(src, tgt, init_field, src_mask, tgt_mask, src_defects, tgt_defects, spatial_ndim_offset):
  src = jnp.asarray(src, jnp.float32)
  tgt = jnp.asarray(tgt, jnp.float32)
  if src.shape != tgt.shape:
    raise InputError(f"finetune: src shape {src.shape} does not match tgt shape {tgt.shape}")
  channels_last = src.ndim == 3 + spatial_ndim_offset
  if src.ndim not in (2 + spatial_ndim_offset, 3 + spatial_ndim_offset):
    raise InputError(f"finetune: src must be [H, W] or [H, W, C] (plus batch), got {src.shape}")
  spatial = src.shape[:-1] if channels_last else src.shape
  if init_field is None:
    init_field = jnp.zeros(spatial + (2,), jnp.float32)
  init_field = jnp.asarray(init_field, jnp.float32)
  if init_field.shape != spatial + (2,):
    raise InputError(f"finetune: init_field shape {init_field.shape} != {spatial + (2,)}")
  data = jax.vmap(_data_mask) if spatial_ndim_offset else _data_mask
  zeros = jnp.zeros(spatial, jnp.float32)
  sv = _as_mask(src_mask, None) if src_mask is not None else data(src)
  tv = _as_mask(tgt_mask, None) if tgt_mask is not None else data(tgt)
  sd = _as_mask(src_defects, zeros)
  td = _as_mask(tgt_defects, zeros)
  for name, m in (("src_mask", sv), ("tgt_mask", tv), ("src_defects", sd), ("tgt_defects", td)):
    if m.shape != spatial:
      raise InputError(f"finetune: {name} shape {m.shape} != {spatial}")
  return src, tgt, init_field, sv, tv, sd, td


def finetune(src, tgt, init_field=None, *, src_mask=None, tgt_mask=None, src_defects=None,
             tgt_defects=None, config: FinetuneConfig | None = None, return_stats: bool = False):
  """Refines a field so that `warp(src, field) ≈ tgt` by gradient descent on the field itself.

  Args:
    src: `[H, W]` float32 image (normalised, 0 = no data) or `[H, W, C]` channels-last encoding.
    tgt: same shape as `src`.
    init_field: `[H, W, 2]` float32, pixels, (dy, dx), pull semantics; zeros when None.
    src_mask, tgt_mask: `[H, W]` bool/0-1, True where the image has data. Default: where the image
      (any channel of an encoding) is non-zero. Pass them explicitly for encodings of no-data regions.
    src_defects, tgt_defects: `[H, W]` bool/0-1 cracks/folds (excluded from the MSE; the elastic term
      is released there so the field can tear).
    config: `FinetuneConfig` (static: a new config compiles a new loop).
    return_stats: also return `FinetuneStats` (steps taken, initial and final loss).
  Returns:
    `[H, W, 2]` float32 field in pixels, (dy, dx) (and `FinetuneStats` if `return_stats`).
  Raises:
    InputError: src/tgt shapes differ or are not `[H, W]` / `[H, W, C]`; mask or field shape mismatch.
  """
  config = config or FinetuneConfig()
  args = _prepare(src, tgt, init_field, src_mask, tgt_mask, src_defects, tgt_defects, 0)
  field, stats = _finetune_jit(*args, config=config)
  return (field, stats) if return_stats else field


def finetune_batch(srcs, tgts, init_fields=None, *, src_masks=None, tgt_masks=None, src_defects=None,
                   tgt_defects=None, config: FinetuneConfig | None = None, return_stats: bool = False):
  """`finetune` vmapped over a leading batch axis B (one compile per (B, H, W[, C]) and config).

  Args:
    srcs, tgts: `[B, H, W]` or `[B, H, W, C]` float32.
    init_fields: `[B, H, W, 2]` float32 pixels (dy, dx), zeros when None.
    src_masks, tgt_masks, src_defects, tgt_defects: `[B, H, W]` or None (as in `finetune`).
  Returns:
    `[B, H, W, 2]` float32 fields (and batched `FinetuneStats` if `return_stats`).
  """
  config = config or FinetuneConfig()
  args = _prepare(srcs, tgts, init_fields, src_masks, tgt_masks, src_defects, tgt_defects, 1)
  field, stats = _finetune_batch_jit(*args, config=config)
  return (field, stats) if return_stats else field
