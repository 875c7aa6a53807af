"""Defect (crack, fold) and tissue detection: a small flax NNX UNet, chunked inference, masks.

Paper: Popovych et al., Nat. Commun. 2024, Methods "Image preprocessing" / "Semantic segmentation":
cracks and folds are found by a convolutional net at ~64-96 nm, tissue vs resin by another; defect
masks are max-pooled and tissue masks min-pooled to coarser MIPs, masked pixels are zeroed before
alignment and the elastic term is dropped on defects. Here one UNet predicts all three per-pixel
probabilities (channels `CLASSES` = crack, fold, tissue; sigmoid outputs).

* `UNet`: images `[B, H, W]` float32 in [0, 1] (0 = no data) -> logits `[B, H, W, 3]`; H and W must
  be multiples of `2 ** (len(channels) - 1)` (`detect` pads).
* `detect(image, model)`: any-size section `[H, W]` -> dict of float32 probability maps `[H, W]`
  (`crack`, `fold`, `tissue`), computed in overlapping chunks (`jaxalign.volume.chunking`) of a fixed
  shape (one compilation), blended across the overlaps.
* `masks_for_alignment(probs)`: probabilities -> `defects` bool (crack | fold, thresholded and
  dilated) for `align_pair` / `align_block` (`src_defects=` / `defects=`), optionally resampled to the
  alignment MIP (defects by max, tissue by min, DESIGN.md §1); `tissue_mask(probs)` likewise.
* `pretrained()` loads the detector shipped in `jaxalign/models/weights/detector/` (README there gives the
  data and the command that reproduces it); `save_weights` / `load_weights` use the same compact
  npz + JSON format as the SEAMLeSS pyramid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jaxalign.volume import chunking
from jaxalign.ops import fields
from jaxalign.models import nnx_weights
from jaxalign.errors import InputError, check_image
from jaxalign.ops.preprocess import dilate, erode

CLASSES = ("crack", "fold", "tissue")
DEFECT_CLASSES = ("crack", "fold")
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights" / "detector"
DEFAULT_WEIGHTS = "detector"


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """UNet architecture and the resolution it was trained for.

  Attributes:
    channels: feature width of each UNet level, finest first; the net downsamples
      `len(channels) - 1` times (2x max-pool each), so inputs are padded to multiples of
      `2 ** (len(channels) - 1)`.
    convs: 3x3 convolutions per level (encoder and decoder).
    nm_per_px: nominal resolution (nm/px) of the sections it was trained on; informational, it is
      what `jaxalign detect --nm` compares against to pick a MIP.
  """
  channels: tuple[int, ...] = (16, 24, 32, 48)
  convs: int = 2
  nm_per_px: float = 64.0

  def __post_init__(self):
    if len(self.channels) < 1 or any(int(c) < 1 for c in self.channels):
      raise InputError(f"DetectorConfig.channels must be positive widths, got {self.channels}")
    if self.convs < 1:
      raise InputError(f"DetectorConfig.convs must be >= 1, got {self.convs}")

  @property
  def multiple(self) -> int:
    """Spatial sizes must be multiples of this (pixels)."""
    return 2 ** (len(self.channels) - 1)


@dataclasses.dataclass(frozen=True)
class DetectConfig:
  """Chunked inference settings.

  Attributes:
    chunk: chunk edge (pixels of the detection MIP); fixed, so one compilation serves any section.
    overlap: overlap margin (pixels); at least the UNet's useful context, so blended seams vanish.
    batch: chunks per vmapped call (the last batch is padded, not recompiled).
  """
  chunk: int = 256
  overlap: int = 32
  batch: int = 4


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """How probabilities become alignment masks.

  Attributes:
    defect_threshold: crack/fold probability above which a pixel is a defect.
    dilation: defects are grown by this many pixels (square), so the torn tissue right next to a
      crack or fold edge, which the net tends to under-segment, is also excluded.
    fold_opening: radius (px) of a morphological opening of the fold mask before dilation: fold
      detections narrower than `2 fold_opening + 1` px are dropped. 0 (default) keeps all; on real
      sections with many dark organelles, a radius matched to the narrowest fold worth masking
      removes most false positives (see docs/benchmarks/detector.md for the trade-off).
    tissue_threshold: tissue probability above which a pixel is tissue.
  """
  defect_threshold: float = 0.5
  dilation: int = 2
  fold_opening: int = 0
  tissue_threshold: float = 0.5

  def __post_init__(self):
    for name in ("defect_threshold", "tissue_threshold"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise InputError(f"MaskConfig.{name}={getattr(self, name)} must lie in [0, 1]")
    if self.dilation < 0 or self.fold_opening < 0:
      raise InputError(f"MaskConfig: dilation and fold_opening must be >= 0, got {self.dilation}, {self.fold_opening}")


# ----------------------------------------------------------------------------------------------
# Network


class _ConvStack(nnx.Module):
  """`convs` 3x3 conv + ReLU layers, channels-last `[B, H, W, C_in]` -> `[B, H, W, C_out]`."""

  def __init__(self, c_in: int, c_out: int, convs: int, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Conv(c_in if i == 0 else c_out, c_out, (3, 3), padding="SAME", rngs=rngs)
                            for i in range(convs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.layers:
      x = jax.nn.relu(conv(x))
    return x


def _pool(x: jax.Array) -> jax.Array:
  """2x2 max-pool of `[B, H, W, C]` -> `[B, H/2, W/2, C]`."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _up(x: jax.Array) -> jax.Array:
  """Nearest 2x upsampling of `[B, H, W, C]` -> `[B, 2H, 2W, C]`."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _input_features(images: jax.Array) -> jax.Array:
  """`[B, H, W]` intensities in [0, 1] -> `[B, H, W, 2]`: centred intensity and a no-data flag.

  Raw intensities (not per-chunk normalised) are kept on purpose: resin is bright and flat and
  folds are dark, and a per-chunk normalisation would wash out exactly those cues.
  """
  return jnp.stack([2.0 * images - 1.0, (images == 0).astype(images.dtype)], axis=-1)


class UNet(nnx.Module):
  """Per-pixel crack / fold / tissue logits.

  Call: `images [B, H, W]` float32 in [0, 1] (0 = no data), H and W multiples of `cfg.multiple`
  -> logits `[B, H, W, 3]` float32 (channel order `CLASSES`; apply a sigmoid for probabilities).
  """

  def __init__(self, cfg: DetectorConfig = DetectorConfig(), *, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    ch = tuple(int(c) for c in cfg.channels)
    self.down = nnx.List([_ConvStack(2 if i == 0 else ch[i - 1], ch[i], cfg.convs, rngs=rngs)
                          for i in range(len(ch))])
    self.up = nnx.List([_ConvStack(ch[i + 1] + ch[i], ch[i], cfg.convs, rngs=rngs)
                        for i in range(len(ch) - 1)])
    self.head = nnx.Conv(ch[0], len(CLASSES), (1, 1), rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    m = self.cfg.multiple
    if images.ndim != 3 or images.shape[1] % m or images.shape[2] % m:
      raise InputError(f"UNet input must be [B, H, W] with H, W multiples of {m}, got {images.shape}")
    x = _input_features(images.astype(jnp.float32))
    skips = []
    for i, block in enumerate(self.down):
      if i > 0:
        x = _pool(x)
      x = block(x)
      skips.append(x)
    for i in reversed(range(len(self.up))):
      x = self.up[i](jnp.concatenate([_up(x), skips[i]], axis=-1))
    return self.head(x)


def init_model(cfg: DetectorConfig = DetectorConfig(), seed: int = 0) -> UNet:
  """A freshly initialised `UNet` whose parameters are drawn on the host (for quick experiments).

  Same distribution as flax's default (`UNet(cfg, rngs=...)`): kernels LeCun-normal truncated at
  2 sigma, biases zero, but not the same numbers. Built abstractly (`nnx.eval_shape`) and filled from
  a NumPy generator, so it compiles nothing: flax's eager per-shape truncated-normal initialisers
  cost ~30 s on a loaded 2-core CPU. Training (`train_detector.train`) uses the flax initialiser.
  """
  model = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  leaves = []
  for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = tuple(v.get_value().shape if hasattr(v, "get_value") else v.value.shape)
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      # LeCun normal, truncated at 2 sigma; 0.8796 is the std of a unit normal truncated there
      draw = rng.standard_normal(int(np.prod(shape)) * 2)
      draw = draw[np.abs(draw) < 2.0][:int(np.prod(shape))].reshape(shape)
      arr = draw / 0.87962566103423978 / np.sqrt(fan_in)
    else:
      arr = np.zeros(shape)
    leaves.append((path, v.replace(jnp.asarray(arr, jnp.float32))))
  nnx.update(model, nnx.from_flat_state(leaves))
  return model


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(graphdef, state, images: jax.Array) -> jax.Array:
  """Jitted forward pass: `[B, h, w]` -> sigmoid probabilities `[B, h, w, 3]`."""
  return jax.nn.sigmoid(nnx.merge(graphdef, state)(images))


def predict(model: UNet, images) -> jax.Array:
  """Probabilities `[B, H, W, 3]` for a batch `[B, H, W]` whose sizes are multiples of `model.cfg.multiple`."""
  graphdef, state = nnx.split(model)
  return _probabilities(graphdef, state, jnp.asarray(images, jnp.float32))


# ----------------------------------------------------------------------------------------------
# Inference on whole sections


def as_unit_image(image, name: str = "image") -> np.ndarray:
  """Checks a section `[H, W]` and scales it to float32 in [0, 1] (integers by their dtype's max).

  Raises:
    InputError: not 2-D, empty, NaN/Inf, all zero, or float values outside [0, 1].
  """
  arr = np.asarray(image)
  checked = check_image(arr, name)
  if np.issubdtype(arr.dtype, np.integer):
    return checked / np.float32(np.iinfo(arr.dtype).max)
  if checked.min() < 0 or checked.max() > 1:
    raise InputError(f"{name}: float intensities must lie in [0, 1] (0 = no data), got "
                     f"[{checked.min():.3g}, {checked.max():.3g}]")
  return checked


def detect(image, model: UNet | None = None, config: DetectConfig = DetectConfig(), *,
           progress: bool = False) -> dict[str, np.ndarray]:
  """Crack / fold / tissue probabilities of one section, chunk by chunk.

  Args:
    image: `[H, W]` section at the detector's resolution (see `DetectorConfig.nm_per_px`); uint8 /
      uint16 (scaled by the dtype max) or float in [0, 1]; 0 = no data.
    model: a `UNet`; default `pretrained()`.
    config: chunking (`DetectConfig`).
    progress: tqdm bar over chunks.
  Returns:
    dict `{"crack", "fold", "tissue"}` of float32 `[H, W]` probabilities in [0, 1].
  Raises:
    InputError: bad image (see `as_unit_image`) or a chunk size that is not a multiple of the net's.
  """
  img = as_unit_image(image)
  model = model if model is not None else pretrained()
  m = model.cfg.multiple
  if config.chunk % m or config.chunk <= 2 * config.overlap:
    raise InputError(f"DetectConfig.chunk={config.chunk} must be a multiple of {m} and > 2 * overlap")
  h, w = img.shape
  # Pad small sections up to one chunk (0 = no data, which the net has seen at section borders).
  ph, pw = max(h, config.chunk), max(w, config.chunk)
  padded = np.pad(img, ((0, ph - h), (0, pw - w)))
  graphdef, state = nnx.split(model)
  specs = chunking.split((ph, pw), config.chunk, config.overlap)
  acc = chunking.Assembler((ph, pw), "blend")
  from tqdm import tqdm
  bar = tqdm(total=len(specs), desc="detect", unit="chunk", disable=not progress)
  for b0 in range(0, len(specs), config.batch):
    group = specs[b0:b0 + config.batch]
    tiles = [chunking.read_chunk(padded, s) for s in group]
    tiles += [tiles[-1]] * (config.batch - len(group))  # one compiled shape for every batch
    probs = np.asarray(_probabilities(graphdef, state, jnp.asarray(np.stack(tiles))))
    for spec, p in zip(group, probs):
      acc.add(p, spec)
    bar.update(len(group))
  bar.close()
  out = acc.result()[:h, :w]
  return {name: np.ascontiguousarray(out[..., i]) for i, name in enumerate(CLASSES)}


# ----------------------------------------------------------------------------------------------
# Volumes


# (output name, volume kind): kinds decide the pyramid reduction (defects by max, tissue by min).
VOLUME_OUTPUTS = (("crack", "defect"), ("fold", "defect"), ("tissue", "tissue"), ("defects", "defect"))
# Default pyramid depth of the outputs: stop before a level would be smaller than this (px).
MIN_PYRAMID_EDGE = 64
DONE_DIR = "_done"


def pick_mip(resolution_yx: float, nm: float) -> int:
  """MIP level whose pixel size is closest (log scale) to `nm`, for level-0 pixels of `resolution_yx` nm."""
  from jaxalign.ops.fields import level_nearest
  return level_nearest(resolution_yx, max(nm, 1e-6))


def _read_section(vol, z: int, mip: int) -> np.ndarray:
  """Section z at MIP `mip` in [0, 1]: read if the level exists, else 2x2-mean from the coarsest stored one."""
  have = min(mip, vol.levels - 1)
  x = np.asarray(vol.read(z, have))
  scale = float(np.iinfo(x.dtype).max) if np.issubdtype(x.dtype, np.integer) else 1.0
  x = jnp.asarray(x, jnp.float32) / scale
  for _ in range(mip - have):
    x = jnp.pad(x, ((0, x.shape[0] % 2), (0, x.shape[1] % 2)), mode="edge")
    x = fields.downsample_image(x, reduce="mean")
  return np.asarray(x)


def detect_volume(src, dst: str, *, model: UNet | None = None, mip: int | None = None, nm: float | None = None,
                  levels: int | None = None, z: tuple[int, int] | None = None,
                  config: DetectConfig = DetectConfig(), mask_config: MaskConfig = MaskConfig(),
                  format: str = "zarr3", overwrite: bool = False, progress: bool = True) -> dict:
  """Detects cracks, folds and tissue in an image volume and writes mask volumes with pyramids.

  Writes `DST/crack`, `DST/fold` (uint8 probability x 255, kind "defect", pyramid by max),
  `DST/tissue` (uint8 probability x 255, kind "tissue", pyramid by min) and `DST/defects` (uint8
  0/1 from `masks_for_alignment`, kind "defect"). Level 0 of the outputs is SRC's MIP `mip`.
  Section by section (each in overlapping chunks): a section's four volumes and their pyramid
  levels are written, then the marker `DST/_done/<z>`; marked sections are skipped unless
  `overwrite`, so an interrupted run is simply repeated.

  Args:
    src: image `jaxalign.volume.store.Volume` or its URL.
    dst: output folder / URL prefix.
    model: detector (default `pretrained()`).
    mip: MIP of SRC to run on; default `pick_mip(resolution, nm)`. A level SRC lacks is computed by
      2x2 means from the coarsest stored one.
    nm: target nm/px for the default `mip` (default `model.cfg.nm_per_px`).
    levels: MIP levels of the outputs (default: down to ~`MIN_PYRAMID_EDGE` px).
    z: optional (start, stop) section range.
    config, mask_config: chunked inference and `DST/defects` settings.
    format: "zarr3", "n5" or "neuroglancer_precomputed".
  Returns:
    dict with mip, resolution (z, y, x nm), shape, levels, done, skipped, seconds, outputs (name -> URL).
  Raises:
    InputError: not an image volume, bad mip / levels / range / chunking.
  """
  import os
  import time

  from tqdm import tqdm

  from jaxalign.volume import store
  from jaxalign.volume.pyramid import build_pyramid
  vol = store.open_volume(src) if isinstance(src, str) else src
  if vol.is_field or vol.kind != "image":
    raise InputError(f"{vol.url} is a {vol.kind} volume; detection needs an image volume")
  model = model if model is not None else pretrained()
  nm = model.cfg.nm_per_px if nm is None else float(nm)
  if nm <= 0:
    raise InputError(f"nm must be positive, got {nm}")
  mip = pick_mip(vol.resolution[1], nm) if mip is None else int(mip)
  if mip < 0:
    raise InputError(f"mip must be >= 0, got {mip}")
  shape = store.level_shape(vol.shape(0), mip)
  if min(shape[1:]) < 8:
    raise InputError(f"MIP {mip} of {vol.url} is only {shape[1]}x{shape[2]} px")
  z0, z1 = (0, shape[0]) if z is None else (int(z[0]), int(z[1]))
  if not 0 <= z0 < z1 <= shape[0]:
    raise InputError(f"section range [{z0}, {z1}) is outside the volume's {shape[0]} sections")
  if levels is None:
    levels = 1
    while min(shape[1:]) >> levels >= MIN_PYRAMID_EDGE:
      levels += 1
  if levels < 1 or min(shape[1:]) >> (levels - 1) == 0:
    raise InputError(f"levels={levels} does not fit {shape[1]}x{shape[2]} px sections")
  if config.chunk % model.cfg.multiple or config.chunk <= 2 * config.overlap:
    raise InputError(f"chunk={config.chunk} must be a multiple of {model.cfg.multiple} and > 2 * overlap")
  dst = dst.rstrip("/")
  res = store.level_resolution(vol.resolution, mip)
  outs = {name: store.create_volume(f"{dst}/{name}", shape, "uint8", res, format=format, levels=levels, kind=kind)
          for name, kind in VOLUME_OUTPUTS}
  done_dir = None if "://" in dst else os.path.join(dst, DONE_DIR)
  if done_dir:
    os.makedirs(done_dir, exist_ok=True)
  t0 = time.time()
  done = skipped = 0
  for zz in tqdm(range(z0, z1), desc="detect", unit="section", disable=not progress):
    marker = os.path.join(done_dir, str(zz)) if done_dir else None
    if marker and os.path.exists(marker) and not overwrite:
      skipped += 1
      continue
    img = _read_section(vol, zz, mip)
    probs = (detect(img, model, config) if np.any(img)
             else {n: np.zeros(img.shape, np.float32) for n in CLASSES})
    defects = masks_for_alignment(probs, mask_config)
    data = {n: np.rint(np.clip(probs[n], 0, 1) * 255).astype(np.uint8) for n in CLASSES}
    data["defects"] = defects.astype(np.uint8)
    for name, _ in VOLUME_OUTPUTS:
      outs[name].write(data[name], zz, 0)
      build_pyramid(outs[name], levels, z=zz, progress=False)
    if marker:
      with open(marker, "w") as fh:
        fh.write(json.dumps({"defect_fraction": float(defects.mean()),
                             "tissue_fraction": float((probs["tissue"] > mask_config.tissue_threshold).mean())}))
    done += 1
  dt = time.time() - t0
  logging.info("detect_volume %s -> %s: %d sections in %.1f s (%d skipped)", vol.url, dst, done, dt, skipped)
  return dict(mip=mip, resolution=res, shape=shape, levels=levels, done=done, skipped=skipped, seconds=dt,
              outputs={name: f"{dst}/{name}" for name, _ in VOLUME_OUTPUTS})


# ----------------------------------------------------------------------------------------------
# Masks for alignment


def resample_mask(mask, from_mip: int, to_mip: int, reduce: str) -> np.ndarray:
  """Moves a mask `[H, W]` between MIP levels (DESIGN.md §1).

  Coarser: repeated 2x2 `reduce` ("max" for defects, "min" for tissue), with an odd last row /
  column replicated (as `jaxalign.volume.store` does). Finer: each pixel repeated 2x2 per level.
  Returns a float32 `[H', W']` array (same values as the input, resampled).
  """
  if reduce not in ("max", "min"):
    raise InputError(f"reduce must be 'max' or 'min', got {reduce!r}")
  x = jnp.asarray(mask, jnp.float32)
  for _ in range(max(to_mip - from_mip, 0)):
    x = jnp.pad(x, ((0, x.shape[0] % 2), (0, x.shape[1] % 2)), mode="edge")
    x = fields.downsample_image(x, reduce=reduce)
  for _ in range(max(from_mip - to_mip, 0)):
    x = jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)
  return np.asarray(x)


def _check_probs(probs: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
  if not isinstance(probs, Mapping):
    raise InputError(f"probabilities must be a dict with keys {list(names)} (the output of detect), "
                     f"got {type(probs).__name__}")
  out = []
  for n in names:
    if n not in probs:
      raise InputError(f"probabilities: missing {n!r} (have {sorted(probs)})")
    a = np.asarray(probs[n], np.float32)
    if a.ndim != 2 or (out and a.shape != out[0].shape):
      raise InputError(f"probabilities[{n!r}]: expected one [H, W] shape, got {a.shape}")
    if not np.all(np.isfinite(a)):
      raise InputError(f"probabilities[{n!r}]: contains NaN or Inf")
    out.append(a)
  return out


def masks_for_alignment(probs: Mapping[str, np.ndarray], config: MaskConfig = MaskConfig(), *,
                        from_mip: int = 0, to_mip: int | None = None,
                        shape: Sequence[int] | None = None) -> np.ndarray:
  """Turns detector probabilities into the `defects` mask the aligners take.

  Args:
    probs: dict from `detect` with `crack` and `fold` `[H, W]` probabilities at MIP `from_mip`.
    config: thresholds and dilation (pixels of `from_mip`).
    from_mip, to_mip: MIP of the probabilities and of the alignment (default: same). Going coarser
      max-pools the mask, going finer repeats pixels.
    shape: optional `(H', W')` to crop the resampled mask to (a MIP-0 section whose size is not a
      multiple of 2**from_mip).
  Returns:
    `[H', W']` bool, True on cracks/folds: pass as `align_pair(..., src_defects=...)` /
    `align_block(..., defects=...)` (the aligner zeroes those pixels and frees the elastic term there).
  """
  crack, fold = _check_probs(probs, DEFECT_CLASSES)
  fold_mask = jnp.asarray(fold > config.defect_threshold)
  if config.fold_opening:
    fold_mask = dilate(erode(fold_mask, config.fold_opening), config.fold_opening)
  raw = jnp.asarray(crack > config.defect_threshold) | fold_mask
  mask = np.asarray(dilate(raw, config.dilation))
  if to_mip is not None and to_mip != from_mip:
    mask = resample_mask(mask, from_mip, to_mip, "max") > 0.5
  if shape is not None:
    mask = _fit(mask, shape, False)
  return mask


def tissue_mask(probs: Mapping[str, np.ndarray], config: MaskConfig = MaskConfig(), *,
                from_mip: int = 0, to_mip: int | None = None,
                shape: Sequence[int] | None = None) -> np.ndarray:
  """`[H', W']` bool tissue mask (True = tissue, False = resin / no data), resampled by min."""
  (tissue,) = _check_probs(probs, ("tissue",))
  mask = tissue > config.tissue_threshold
  if to_mip is not None and to_mip != from_mip:
    mask = resample_mask(mask, from_mip, to_mip, "min") > 0.5
  if shape is not None:
    mask = _fit(mask, shape, False)
  return mask


def _fit(mask: np.ndarray, shape: Sequence[int], fill: bool) -> np.ndarray:
  """Crops / pads (with `fill`) a mask to `shape`."""
  h, w = int(shape[0]), int(shape[1])
  out = np.full((h, w), fill, bool)
  hh, ww = min(h, mask.shape[0]), min(w, mask.shape[1])
  out[:hh, :ww] = mask[:hh, :ww]
  return out


# ----------------------------------------------------------------------------------------------
# Weights: compact npz of the nnx parameters + JSON config (same format as models.save_weights)


def config_from_dict(d: dict) -> DetectorConfig:
  try:
    return DetectorConfig(channels=tuple(int(c) for c in d["channels"]), convs=int(d["convs"]),
                          nm_per_px=float(d.get("nm_per_px", DetectorConfig.nm_per_px)))
  except (KeyError, TypeError, ValueError) as e:
    raise InputError(f"detector config: {e!r}") from None


def save_weights(model: UNet, path, meta: dict | None = None) -> pathlib.Path:
  """Writes `<path>.npz` (float32 parameters) and `<path>.json` (config + `meta`); returns the npz path.

  Both are written to temporary names and renamed, so nothing is left half-written.
  """
  return nnx_weights.save(model, path, {**nnx_weights.config_to_dict(model.cfg), "meta": meta or {}})


def load_weights(path) -> UNet:
  """Builds a `UNet` from `<path>.json` and fills its parameters from `<path>.npz`."""
  # abstract init (shapes only): the random initialisers never run, so loading compiles nothing
  return nnx_weights.load(path, lambda d: nnx.eval_shape(lambda: UNet(config_from_dict(d), rngs=nnx.Rngs(0))),
                          what="detector weights")


@functools.lru_cache(maxsize=4)
def _pretrained_cached(name: str) -> UNet:
  path = WEIGHTS_DIR / name
  if not path.with_suffix(".npz").is_file():
    raise InputError(f"no shipped detector weights named {name!r} in {WEIGHTS_DIR}")
  logging.info("loading detector weights %s", path)
  return load_weights(path)


def pretrained(name: str = DEFAULT_WEIGHTS) -> UNet:
  """The detector shipped in `jaxalign/models/weights/detector/<name>.{npz,json}` (see the README there)."""
  return _pretrained_cached(name)
