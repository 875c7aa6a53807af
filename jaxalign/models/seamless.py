"""SEAMLeSS models in flax NNX: Encoder, Aligner, a Level and a coarse-to-fine Pyramid.

Paper: Popovych et al., Nat. Commun. 2024, Methods "Image pair alignment" / Results "SEAMLeSS training".

* `Encoder`: image `[B, H, W]` -> dense encoding `[B, H, W, C]` at the same resolution (residual conv
  blocks). Each channel is normalised to zero mean / unit variance over the image's tissue (so the
  encoding cannot collapse to a constant under the stage-2 loss) and is zero where the image has no
  data (DESIGN.md §1: 0 = no data).
* `Aligner`: (src encoding, tgt encoding) -> residual field `[B, H, W, 2]` in pixels of its level. It
  is internally multi-scale: an internal pyramid of `scales` levels (each 2x coarser), coarse to fine,
  each predicting a residual that is composed with the upsampled coarser estimate, so one level
  corrects displacements of several tens of its own pixels.
* `Level`: Encoder + Aligner + its MIP (resolution) + its Online Field Finetuner settings. An
  *encoder-only* level (`LevelConfig.aligner=None`, as the paper's FAFB coarse alignment) has no
  Aligner: the Online Field Finetuner aligns its encodings directly, coarse to fine over
  `encoding_levels` 2x2-mean reductions of the encodings. A level may be placed in physical units
  (`LevelConfig.nm`): given the images' `resolution_nm`, it runs at the MIP whose pixel is nearest.
* `Pyramid`: levels coarse -> fine; implements the team's pluggable aligner protocol
  (`jaxalign.align.protocols.PairAligner`) `pyramid(src, tgt, *, init_field=None, src_defects=None,
  tgt_defects=None) -> field [H, W, 2]` with `warp(src, field) ≈ tgt`, so
  `ja.align_pair(src, tgt, model=pyramid)` just calls it.

`pretrained()` loads the default pyramid shipped in `jaxalign/models/weights/` (see the README there for the
data and the exact command that reproduces it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxalign.ops import fields
from jaxalign.models import nnx_weights
from jaxalign.errors import InputError, check_image, check_pair

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = "default"
# Keeps the per-channel normalisation of encodings finite when a channel is constant.
ENCODING_EPS = 1e-4
# Images are considered "no data" where they are exactly zero (DESIGN.md §1); float tolerance.
NO_DATA_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Configs (frozen, JSON-serialisable: they travel with checkpoints and shipped weights)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Encoder architecture.

  Attributes:
    channels: width of the residual blocks.
    blocks: number of residual blocks (two 3x3 convs each).
    out_channels: C of the encoding `[B, H, W, C]`.
    dilations: dilation of the two convs of each residual block (one entry per block; () = all 1).
      Growing dilations widen the receptive field cheaply (1, 2, 4: 31 px instead of 15 px), which
      an encoder needs to tell a periodic artifact spanning a few periods from tissue.
  """
  channels: int = 12
  blocks: int = 2
  out_channels: int = 6
  dilations: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class AlignerConfig:
  """Aligner architecture.

  Attributes:
    scales: internal pyramid depth; the coarsest internal scale is 2**(scales-1) coarser than the
      level, which sets the capture range (about 8 * 2**(scales-1) level pixels).
    channels: width of each internal scale's conv net.
    dilations: dilation of the 3x3 convs of one internal scale's net (their sum sets its receptive
      field, in pixels of that scale).
    radius: search radius R of the local correlation (cost volume) at each internal scale, pixels
      of that scale; the soft-argmax over the (2R+1)^2 displacements is each scale's first guess.
  """
  scales: int = 3
  channels: int = 16
  dilations: tuple[int, ...] = (1, 2, 1)
  radius: int = 2


@dataclasses.dataclass(frozen=True)
class LevelConfig:
  """One pyramid level.

  Attributes:
    mip: resolution level (0 = full resolution; k = 2**k coarser).
    encoder: Encoder architecture.
    aligner: Aligner architecture.
    finetune: overrides of `jaxalign.align.finetuner.FinetuneConfig` for this level (JSON-able dict, as a
      tuple of (name, value) pairs so the config stays hashable); `None` disables the finetuner.
    nm: pixel size (nm) this level was trained at; when > 0 and the caller gives the images'
      `resolution_nm`, the level runs at the MIP whose pixel is nearest (`fields.level_nearest`)
      instead of `mip` (DESIGN.md §1: levels in physical units). 0 = always `mip`.
    encoding_levels: encoder-only levels: the finetuner first aligns up to this many 2x2-mean
      reductions of the encodings (coarse to fine, `ENCODING_GAMMAS` etc.), which extends its capture
      range by 2**encoding_levels; fewer where the image is too small (`MIN_ENCODING_SIZE`).
  """
  mip: int = 0
  encoder: EncoderConfig = EncoderConfig()
  aligner: AlignerConfig | None = AlignerConfig()
  finetune: tuple[tuple[str, Any], ...] | None = ()
  nm: float = 0.0
  encoding_levels: int = 0


# Finetuner settings per MIP (index = mip; the last entry repeats): coarse levels get a stronger
# elastic prior (paper: gamma 5-25, higher at coarser levels) and larger steps; the fine level only
# polishes, so it gets few iterations and small steps (learning rate in px of the level per step).
FINETUNE_GAMMAS = (5.0, 8.0, 12.0, 18.0)
FINETUNE_LEARNING_RATES = (0.05, 0.1, 0.15, 0.2)
FINETUNE_ITERATIONS = (100, 150, 200, 250)


# Encoder-only levels: finetuner settings at the level itself (index 0) and at each coarser 2x2-mean
# reduction of its encodings (the last entry repeats). As the raw finetuner's physical defaults
# (pair.COARSE_GAMMAS): the paper's strong prior, stiffer at coarser levels.
ENCODING_GAMMAS = (5.0, 10.0, 20.0, 25.0)
ENCODING_LEARNING_RATES = (0.1, 0.15, 0.2, 0.2)
ENCODING_ITERATIONS = (150, 150, 200, 250)
# The coarsest encoding reduction keeps at least this many pixels per side.
MIN_ENCODING_SIZE = 16


def encoding_finetune(k: int):
  """`FinetuneConfig` of an encoder-only level at its k-th coarser encoding reduction (0 = itself)."""
  from jaxalign.align import finetuner
  pick = lambda seq: seq[min(k, len(seq) - 1)]
  return finetuner.FinetuneConfig(gamma=pick(ENCODING_GAMMAS), learning_rate=pick(ENCODING_LEARNING_RATES),
                                  iterations=pick(ENCODING_ITERATIONS))


def default_finetune(mip: int) -> tuple[tuple[str, Any], ...]:
  """Finetuner overrides (as LevelConfig.finetune) for a level at `mip`."""
  pick = lambda seq: seq[min(mip, len(seq) - 1)]
  return (("gamma", pick(FINETUNE_GAMMAS)), ("learning_rate", pick(FINETUNE_LEARNING_RATES)),
          ("iterations", pick(FINETUNE_ITERATIONS)))


@dataclasses.dataclass(frozen=True)
class PyramidConfig:
  """A pyramid: levels from coarse to fine (strictly decreasing `mip`)."""
  levels: tuple[LevelConfig, ...] = tuple(LevelConfig(mip=m, finetune=default_finetune(m)) for m in (2, 1, 0))


def pyramid_config_from_dict(d: dict) -> PyramidConfig:
  """Inverse of `nnx_weights.config_to_dict` for `PyramidConfig`; raises InputError naming a malformed entry."""
  try:
    levels = []
    for i, lv in enumerate(d["levels"]):
      enc = dict(lv.get("encoder", {}))
      if "dilations" in enc:
        enc["dilations"] = tuple(int(x) for x in enc["dilations"])
      enc = EncoderConfig(**enc)
      al = dict(lv.get("aligner") or {})
      if "dilations" in al:
        al["dilations"] = tuple(int(x) for x in al["dilations"])
      ft = lv.get("finetune", ())
      ft = None if ft is None else tuple((str(k), v) for k, v in (ft.items() if isinstance(ft, dict) else ft))
      aligner = None if lv.get("aligner", {}) is None else AlignerConfig(**al)
      levels.append(LevelConfig(mip=int(lv["mip"]), encoder=enc, aligner=aligner, finetune=ft,
                                nm=float(lv.get("nm", 0.0)), encoding_levels=int(lv.get("encoding_levels", 0))))
    cfg = PyramidConfig(levels=tuple(levels))
  except (KeyError, TypeError, ValueError) as e:
    raise InputError(f"malformed pyramid config ({type(e).__name__}: {e})") from None
  validate_pyramid_config(cfg)
  return cfg


def validate_pyramid_config(cfg: PyramidConfig) -> None:
  """Raises InputError if the config cannot describe a working pyramid."""
  if not cfg.levels:
    raise InputError("pyramid config has no levels")
  mips = [lv.mip for lv in cfg.levels]
  if any(m < 0 for m in mips) or any(a <= b for a, b in zip(mips, mips[1:])):
    raise InputError(f"pyramid levels must go coarse to fine with strictly decreasing mip >= 0, got mips {mips}")
  for i, lv in enumerate(cfg.levels):
    e, a = lv.encoder, lv.aligner
    for name, v in (("encoder.channels", e.channels), ("encoder.out_channels", e.out_channels)):
      if not isinstance(v, int) or v < 1:
        raise InputError(f"level {i}: {name} must be a positive integer, got {v!r}")
    if e.blocks < 0:
      raise InputError(f"level {i}: encoder.blocks must be >= 0, got {e.blocks}")
    if e.dilations and (len(e.dilations) != e.blocks or any(int(d) < 1 for d in e.dilations)):
      raise InputError(f"level {i}: encoder.dilations must have one positive entry per block, got {e.dilations}")
    if not (lv.nm >= 0) or not isinstance(lv.encoding_levels, int) or lv.encoding_levels < 0:
      raise InputError(f"level {i}: nm must be >= 0 and encoding_levels a non-negative integer, got "
                       f"{lv.nm!r}, {lv.encoding_levels!r}")
    if a is None:
      if lv.finetune is None:
        raise InputError(f"level {i}: an encoder-only level (aligner None) needs the finetuner (finetune not None)")
      continue
    for name, v in (("aligner.scales", a.scales), ("aligner.channels", a.channels)):
      if not isinstance(v, int) or v < 1:
        raise InputError(f"level {i}: {name} must be a positive integer, got {v!r}")
    if not isinstance(a.radius, int) or a.radius < 1:
      raise InputError(f"level {i}: aligner.radius must be a positive integer, got {a.radius!r}")
    if not a.dilations or any(int(d) < 1 for d in a.dilations):
      raise InputError(f"level {i}: aligner.dilations must be positive integers, got {a.dilations}")


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class ResBlock(nnx.Module):
  """x + conv(gelu(conv(gelu(x)))), 3x3, channels-last `[B, H, W, C]`."""

  def __init__(self, channels: int, *, dilation: int = 1, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, channels, (3, 3), kernel_dilation=dilation, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), kernel_dilation=dilation, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + self.conv2(jax.nn.gelu(self.conv1(jax.nn.gelu(x))))


def _normalize_images(images: jax.Array) -> jax.Array:
  """Zero mean / unit variance over each image's non-zero pixels, zeros kept (`[B, H, W]`)."""
  from jaxalign.ops import preprocess  # the team's kernel; imported lazily (lands with the kernels)
  return jax.vmap(preprocess.normalize)(images)


class Encoder(nnx.Module):
  """Image `[B, H, W]` float32 -> encoding `[B, H, W, C]` float32 (same resolution).

  The input is normalised over its non-zero pixels first; each output channel is normalised to zero
  mean and unit variance over the image's tissue and multiplied by the tissue mask (image != 0), so
  masked pixels stay 0 = no data.
  """

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.stem = nnx.Conv(1, cfg.channels, (3, 3), rngs=rngs)
    dil = tuple(cfg.dilations) or (1,) * cfg.blocks
    self.blocks = nnx.List([ResBlock(cfg.channels, dilation=int(d), rngs=rngs) for d in dil])
    self.head = nnx.Conv(cfg.channels, cfg.out_channels, (1, 1), rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    tissue = (jnp.abs(images) > NO_DATA_EPS).astype(jnp.float32)[..., None]
    x = self.stem(_normalize_images(images)[..., None])
    for blk in self.blocks:
      x = blk(x)
    e = self.head(jax.nn.gelu(x))
    # Per image and channel: zero mean, unit variance over tissue. A constant (collapsed) encoding
    # is then impossible, which the stage-2 loss would otherwise favour.
    n = jnp.maximum(tissue.sum(axis=(1, 2), keepdims=True), 1.0)
    mean = (e * tissue).sum(axis=(1, 2), keepdims=True) / n
    var = (((e - mean) * tissue) ** 2).sum(axis=(1, 2), keepdims=True) / n
    e = (e - mean) * jax.lax.rsqrt(var + ENCODING_EPS)
    return e * tissue


def down_channels_last(x: jax.Array) -> jax.Array:
  """One MIP level down (2x2 mean) of a channels-last `[B, H, W, C]` array."""
  return jnp.moveaxis(fields.downsample_image(jnp.moveaxis(x, -1, -3), reduce="mean"), -3, -1)


# Initial inverse temperature of the soft-argmax over correlations (encoding channels have unit
# variance, so a correlation is about [-1, 1]; this makes the best of the offsets dominate clearly).
SOFTARGMAX_BETA = 8.0


def _offsets(radius: int) -> np.ndarray:
  """`[(2R+1)^2, 2]` integer (dy, dx) displacements of the cost volume, row-major."""
  r = np.arange(-radius, radius + 1)
  return np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)


def local_correlation(src: jax.Array, tgt: jax.Array, radius: int) -> jax.Array:
  """Cost volume `[B, H, W, (2R+1)^2]`: mean over C of `tgt(r) * src(r + d)` for each offset d.

  Offsets d run row-major over `[-R, R]^2` (as `_offsets`). Shifted slices, not a patch-extraction
  conv: the latter costs C*(2R+1)^2 times more arithmetic on CPU.

  Args:
    src, tgt: `[B, H, W, C]` encodings; src outside the image counts as 0 (no data).
    radius: R, pixels.
  """
  h, w = src.shape[1:3]
  p = jnp.pad(src, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
  outs = [jnp.mean(p[:, radius + dy:radius + dy + h, radius + dx:radius + dx + w] * tgt, axis=-1)
          for dy, dx in _offsets(radius)]
  return jnp.stack(outs, axis=-1)


def _box3(x: jax.Array) -> jax.Array:
  """3x3 spatial mean of `[B, H, W, K]` (zero padded): pools matching evidence over neighbours."""
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME") / 9.0


class _ScaleNet(nnx.Module):
  """One internal scale of the Aligner: (warped src enc, tgt enc) -> residual field (px of that scale).

  A local cost volume gives a soft-argmax displacement (a matching guess that works from the first
  step), and a small dilated conv net on [cost volume, tgt enc, guess] adds a correction.
  """

  def __init__(self, in_channels: int, cfg: AlignerConfig, *, rngs: nnx.Rngs):
    self.radius = cfg.radius
    n_off = (2 * cfg.radius + 1) ** 2
    convs = []
    c_in = n_off + in_channels + 2
    for d in cfg.dilations:
      convs.append(nnx.Conv(c_in, cfg.channels, (3, 3), kernel_dilation=int(d), rngs=rngs))
      c_in = cfg.channels
    self.convs = nnx.List(convs)
    # Zero-initialised correction: an untrained aligner returns the soft-argmax guess.
    self.out = nnx.Conv(c_in, 2, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.log_beta = nnx.Param(jnp.log(jnp.float32(SOFTARGMAX_BETA)))

  def __call__(self, src: jax.Array, tgt: jax.Array) -> jax.Array:
    corr = local_correlation(src, tgt, self.radius)
    weights = jax.nn.softmax(jnp.exp(self.log_beta[...]) * _box3(corr), axis=-1)
    guess = weights @ jnp.asarray(_offsets(self.radius), jnp.float32)
    x = jnp.concatenate([corr, tgt, guess], axis=-1)
    for conv in self.convs:
      x = jax.nn.gelu(conv(x))
    # Where tgt has no data, the guess is meaningless: fall back to the (regularised) correction.
    has_data = jnp.any(tgt != 0, axis=-1, keepdims=True)
    return jnp.where(has_data, guess, 0.0) + self.out(x)


class Aligner(nnx.Module):
  """(src enc `[B, H, W, C]`, tgt enc `[B, H, W, C]`) -> residual field `[B, H, W, 2]`, px of this level.

  H and W must be divisible by 2**(scales-1). The returned field `r` satisfies
  `warp(src, r) ≈ tgt` (pull semantics, (dy, dx)).
  """

  def __init__(self, in_channels: int, cfg: AlignerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.nets = nnx.List([_ScaleNet(in_channels, cfg, rngs=rngs) for _ in range(cfg.scales)])

  def __call__(self, src: jax.Array, tgt: jax.Array) -> jax.Array:
    srcs, tgts = [src], [tgt]
    for _ in range(self.cfg.scales - 1):
      srcs.append(down_channels_last(srcs[-1]))
      tgts.append(down_channels_last(tgts[-1]))
    field = jnp.zeros(srcs[-1].shape[:-1] + (2,), jnp.float32)
    for s in reversed(range(self.cfg.scales)):
      if s < self.cfg.scales - 1:
        field = fields.upsample_field(field)
      warped = fields.warp(srcs[s], field)
      field = fields.compose(field, self.nets[s](warped, tgts[s]))
    return field


class Level(nnx.Module):
  """Encoder + Aligner at one resolution (`cfg.mip`), with its finetuner settings."""

  def __init__(self, cfg: LevelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg.encoder, rngs=rngs)
    # Encoder-only level: the finetuner aligns the encodings (no network field).
    self.aligner = None if cfg.aligner is None else Aligner(cfg.encoder.out_channels, cfg.aligner, rngs=rngs)

  @property
  def multiple(self) -> int:
    """H, W at this level must be divisible by this (the aligner's internal pyramid, or the
    encoding reductions of an encoder-only level)."""
    if self.cfg.aligner is None:
      return 2 ** self.cfg.encoding_levels
    return 2 ** (self.cfg.aligner.scales - 1)

  def encode(self, images: jax.Array) -> jax.Array:
    """`[B, H, W]` -> `[B, H, W, C]`."""
    return self.encoder(images)

  def residual(self, src_enc: jax.Array, tgt_enc: jax.Array, init_field: jax.Array) -> jax.Array:
    """Full field at this level: `compose(init_field, aligner(warp(src_enc, init_field), tgt_enc))`.

    Args:
      src_enc, tgt_enc: `[B, H, W, C]` encodings.
      init_field: `[B, H, W, 2]` float32, px of this level: starting estimate (src -> tgt).
    Returns:
      `[B, H, W, 2]` float32, px of this level, with `warp(src, field) ≈ tgt`.
    """
    if self.aligner is None:
      return init_field
    warped = fields.warp(src_enc, init_field)
    return fields.compose(init_field, self.aligner(warped, tgt_enc))

  def __call__(self, src: jax.Array, tgt: jax.Array, init_field: jax.Array) -> jax.Array:
    """Images `[B, H, W]` + init field `[B, H, W, 2]` -> field `[B, H, W, 2]` (no finetuner)."""
    return self.residual(self.encode(src), self.encode(tgt), init_field)


def finetune_config(level_cfg: LevelConfig):
  """This level's `FinetuneConfig` (or None when the finetuner is disabled)."""
  if level_cfg.finetune is None:
    return None
  from jaxalign.align import finetuner
  return finetuner.FinetuneConfig(**dict(level_cfg.finetune))


def field_to_mip(field: jax.Array, from_mip: int, to_mip: int) -> jax.Array:
  """Moves a field `[..., H, W, 2]` between MIP levels (px rescaled)."""
  for _ in range(max(0, from_mip - to_mip)):
    field = fields.upsample_field(field)
  for _ in range(max(0, to_mip - from_mip)):
    field = fields.downsample_field(field)
  return field


@functools.partial(jax.jit, static_argnums=0)
def level_forward(graphdef, state, src, tgt, init_field):
  """Jitted network pass of one level: returns (field, src enc, tgt enc), batch of one."""
  level = nnx.merge(graphdef, state)
  src_enc = level.encode(src[None])
  tgt_enc = level.encode(tgt[None])
  field = level.residual(src_enc, tgt_enc, init_field[None])
  return field[0], src_enc[0], tgt_enc[0]


class Pyramid(nnx.Module):
  """SEAMLeSS levels from coarse to fine; callable as a pluggable pair aligner.

  `pyramid(src, tgt, *, init_field=None, src_defects=None, tgt_defects=None) -> field [H, W, 2]`:
  for each level (coarse -> fine) the images are taken at the level's MIP, encoded, the level's
  residual is composed with the upsampled coarser field, and (if configured) the Online Field
  Finetuner refines it on the encodings. The field is returned at the input's resolution.
  """

  def __init__(self, cfg: PyramidConfig = PyramidConfig(), *, rngs: nnx.Rngs | None = None):
    validate_pyramid_config(cfg)
    self.cfg = cfg
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.levels = nnx.List([Level(lv, rngs=rngs) for lv in cfg.levels])

  def level_mips(self, resolution_nm=None) -> list[int]:
    """MIP of each level: `LevelConfig.mip`, or, for levels placed in nm (`LevelConfig.nm` > 0) when
    `resolution_nm` ((z, y, x) nm per pixel, or one y/x value) is given, the MIP whose pixel is
    nearest `nm`. Levels stay coarse to fine (a level never runs finer than the next one)."""
    from jaxalign import errors
    res = errors.check_resolution(resolution_nm)
    mips = []
    for lv in self.cfg.levels:
      if lv.nm > 0 and res is not None:
        mips.append(fields.level_nearest(0.5 * (res[1] + res[2]), lv.nm))
      else:
        mips.append(lv.mip)
    for i in range(len(mips) - 2, -1, -1):
      mips[i] = max(mips[i], mips[i + 1])
    return mips

  def _multiple(self, mips: Sequence[int]) -> int:
    return max(2 ** m * lv.multiple for m, lv in zip(mips, self.levels))

  @property
  def multiple(self) -> int:
    """Input H, W are zero-padded (no data) up to a multiple of this (at the configured MIPs)."""
    return self._multiple([lv.cfg.mip for lv in self.levels])

  def __call__(self, src, tgt, *, init_field=None, src_defects=None, tgt_defects=None,
               use_finetuner: bool = True, resolution_nm=None) -> jax.Array:
    """Aligns `src` to `tgt`.

    Args:
      src, tgt: `[H, W]` float32 images at MIP 0 of this pyramid (0 = no data).
      init_field: optional `[H, W, 2]` float32, pixels, (dy, dx): starting estimate.
      src_defects, tgt_defects: optional `[H, W]` bool masks of cracks/folds (True = defect); defect
        pixels are zeroed (no data), and the finetuner's elastic weight is zeroed on src defects.
      use_finetuner: run each level's Online Field Finetuner (if configured; encoder-only levels
        always run it, since it is their only way to produce a field).
      resolution_nm: optional nm per pixel of the images ((z, y, x) or one value): levels with
        `LevelConfig.nm` then run at the MIP nearest their trained pixel size (`level_mips`).
    Returns:
      `[H, W, 2]` float32 field, pixels, (dy, dx), with `warp(src, field) ≈ tgt`.
    """
    src, tgt, src_def, tgt_def, init = check_pair(src, tgt, src_defects, tgt_defects, init_field)
    h, w = src.shape
    init = np.zeros((h, w, 2), np.float32) if init is None else init
    src_def = np.zeros((h, w), bool) if src_def is None else src_def
    tgt_def = np.zeros((h, w), bool) if tgt_def is None else tgt_def
    src = np.where(src_def, 0.0, src).astype(np.float32)
    tgt = np.where(tgt_def, 0.0, tgt).astype(np.float32)

    mips = self.level_mips(resolution_nm)
    m = self._multiple(mips)
    ph, pw = -h % m, -w % m
    pad2 = ((0, ph), (0, pw))
    src_p = jnp.asarray(np.pad(src, pad2))
    tgt_p = jnp.asarray(np.pad(tgt, pad2))
    sdef_p = jnp.asarray(np.pad(src_def, pad2))
    tdef_p = jnp.asarray(np.pad(tgt_def, pad2))
    init_p = jnp.asarray(np.pad(init, pad2 + ((0, 0),)))

    n_mips = mips[0] + 1
    src_mips = fields.pyramid(src_p, n_mips, reduce="mean")
    tgt_mips = fields.pyramid(tgt_p, n_mips, reduce="mean")
    sdef_mips = fields.pyramid(sdef_p.astype(jnp.float32), n_mips, reduce="max")
    tdef_mips = fields.pyramid(tdef_p.astype(jnp.float32), n_mips, reduce="max")

    field, field_mip = init_p, 0
    for level, mip in zip(self.levels, mips):
      field = field_to_mip(field, field_mip, mip)
      field_mip = mip
      graphdef, state = nnx.split(level)
      field, src_enc, tgt_enc = level_forward(graphdef, state, src_mips[mip], tgt_mips[mip], field)
      if level.cfg.aligner is None:
        field = finetune_encodings(src_enc, tgt_enc, field, src_mask=src_mips[mip] != 0,
                                   tgt_mask=tgt_mips[mip] != 0, src_defects=sdef_mips[mip] > 0,
                                   tgt_defects=tdef_mips[mip] > 0, levels=level.cfg.encoding_levels,
                                   config=finetune_config(level.cfg))
        continue
      ft_cfg = finetune_config(level.cfg) if use_finetuner else None
      if ft_cfg is not None:
        from jaxalign.align import finetuner
        field = finetuner.finetune(
            src_enc, tgt_enc, field,
            src_mask=src_mips[mip] != 0, tgt_mask=tgt_mips[mip] != 0,
            src_defects=sdef_mips[mip] > 0, config=ft_cfg)
      logging.debug("pyramid level mip %d done", mip)
    field = field_to_mip(jnp.asarray(field), field_mip, 0)
    return field[:h, :w]

  def encode(self, image, level: int = -1, *, resolution_nm=None) -> jax.Array:
    """Encoding `[H', W', C]` of a MIP-0 image `[H, W]` by `levels[level]` at that level's MIP
    (`level_mips(resolution_nm)`)."""
    image = check_image(image, "image")
    lv = self.levels[level]
    mips = self.level_mips(resolution_nm)
    mip = mips[level]
    m = self._multiple(mips)
    img = jnp.asarray(np.pad(image, ((0, -image.shape[0] % m), (0, -image.shape[1] % m))))
    img = fields.pyramid(img, mip + 1, reduce="mean")[mip]
    enc = lv.encode(img[None])[0]
    sh, sw = -(-image.shape[0] // 2 ** mip), -(-image.shape[1] // 2 ** mip)
    return enc[:sh, :sw]


def finetune_encodings(src_enc, tgt_enc, init_field, *, src_mask, tgt_mask, src_defects=None,
                     tgt_defects=None, levels: int = 0, config=None) -> jax.Array:
  """Online Field Finetuner on encodings, coarse to fine over 2x2-mean reductions of them.

  Encoder-only levels (paper: FAFB coarse alignment) produce their field this way. The encodings
  and the field are reduced `levels` times (fewer where a side would drop below
  `MIN_ENCODING_SIZE`); at each reduction k (coarsest first) the finetuner runs with
  `encoding_finetune(k)`, and its correction is upsampled to the next finer one (as
  `jaxalign.align.pair`: init_k + up(f_{k+1} - init_{k+1})). `config` (this level's own finetuner
  settings) replaces `encoding_finetune(0)` at the level itself.

  Args:
    src_enc, tgt_enc: `[H, W, C]` float32 encodings (0 = no data).
    init_field: `[H, W, 2]` float32, px of this level, (dy, dx).
    src_mask, tgt_mask: `[H, W]` bool, where the images have data.
    src_defects, tgt_defects: optional `[H, W]` bool.
    levels: number of coarser encoding reductions.
    config: optional `FinetuneConfig` for the level itself.
  Returns:
    `[H, W, 2]` float32 field, px of this level, with `warp(src_enc, field) ≈ tgt_enc`.
  """
  from jaxalign.align import finetuner
  h, w = src_enc.shape[:2]
  levels = max(0, min(int(levels), int(math.floor(math.log2(max(min(h, w) / MIN_ENCODING_SIZE, 1))))))
  while levels and (h % 2 ** levels or w % 2 ** levels):
    levels -= 1
  zeros = jnp.zeros((h, w), jnp.float32)
  sd = zeros if src_defects is None else jnp.asarray(src_defects, jnp.float32)
  td = zeros if tgt_defects is None else jnp.asarray(tgt_defects, jnp.float32)
  se, te = [jnp.asarray(src_enc)], [jnp.asarray(tgt_enc)]
  sm, tm = [jnp.asarray(src_mask, jnp.float32)], [jnp.asarray(tgt_mask, jnp.float32)]
  sdp, tdp, init = [sd], [td], [jnp.asarray(init_field, jnp.float32)]
  for _ in range(levels):
    # Tissue masks by min (DESIGN.md §1), encodings averaged and zeroed off tissue.
    sm.append(fields.downsample_image(sm[-1], reduce="min"))
    tm.append(fields.downsample_image(tm[-1], reduce="min"))
    se.append(down_channels_last(se[-1][None])[0] * sm[-1][..., None])
    te.append(down_channels_last(te[-1][None])[0] * tm[-1][..., None])
    sdp.append(fields.downsample_image(sdp[-1], reduce="max"))
    tdp.append(fields.downsample_image(tdp[-1], reduce="max"))
    init.append(fields.downsample_field(init[-1]))
  field = init[-1]
  for k in range(levels, -1, -1):
    if k < levels:
      field = init[k] + fields.upsample_field(field - init[k + 1])
    cfg = config if (k == 0 and config is not None) else encoding_finetune(k)
    field = finetuner.finetune(se[k], te[k], field, src_mask=sm[k] > 0, tgt_mask=tm[k] > 0,
                               src_defects=sdp[k] > 0, tgt_defects=tdp[k] > 0, config=cfg)
  return field


# ----------------------------------------------------------------------------------------------
# Weights: compact npz of the nnx state + JSON config
# ----------------------------------------------------------------------------------------------

def save_weights(model: Pyramid, path) -> pathlib.Path:
  """Writes `<path>.npz` (parameters, float32) and `<path>.json` (PyramidConfig); returns the npz path.

  Both files are written to temporary names first and renamed, so nothing is left half-written.
  """
  return nnx_weights.save(model, path, nnx_weights.config_to_dict(model.cfg))


def load_weights(path) -> Pyramid:
  """Builds a `Pyramid` from `<path>.json` and fills its parameters from `<path>.npz`."""
  return nnx_weights.load(path, lambda d: Pyramid(pyramid_config_from_dict(d), rngs=nnx.Rngs(0)))


def pretrained(name: str = DEFAULT_WEIGHTS) -> Pyramid:
  """The default SEAMLeSS pyramid shipped in `jaxalign/models/weights/<name>.{npz,json}`.

  See `jaxalign/models/weights/README.md` for the training data and the command that reproduces it.
  """
  path = WEIGHTS_DIR / name
  if not path.with_suffix(".npz").is_file():
    raise InputError(f"no shipped weights named {name!r} in {WEIGHTS_DIR}")
  return load_weights(path)


# The defect/tissue detector UNet lives in its own module (it is trained and shipped separately);
# it is part of the model family users reach through `jaxalign.models.seamless`.
from jaxalign.models.detector import UNet, DetectorConfig, detect, masks_for_alignment  # noqa: E402,F401
from jaxalign.models.detector import pretrained as pretrained_detector  # noqa: E402,F401
