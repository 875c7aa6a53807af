"""MIP pyramids of volumes: `build_pyramid` computes level k from level k-1 in tiles (images by 2x2
mean, defect masks by max, tissue masks by min, fields by mean x 0.5). The volume store and its level
layout are in `jaxalign.volume.store`."""

from __future__ import annotations

import numpy as np
from absl import logging

from jaxalign.errors import InputError
from jaxalign.volume.store import DEFAULT_CONFIG, PYRAMID_REDUCE, IOConfig, Volume, add_levels, open_volume

# ----------------------------------------------------------------------------------------------
# Pyramid


def _tile_starts(n: int, step: int) -> list[int]:
  return list(range(0, n, step))


def build_pyramid(volume: Volume | str, levels: int, kind: str | None = None, *, z=None,
                  config: IOConfig = DEFAULT_CONFIG, progress: bool = True) -> Volume:
  """Computes MIP levels 1 .. levels-1, each from the previous one, and returns the volume.

  Images by 2x2 mean, defect masks by 2x2 max, tissue masks by 2x2 min, fields by 2x2 mean x 0.5
  (`jaxalign.ops.fields.downsample_image` / `downsample_field`). Integer images are rounded to the
  nearest integer. An odd last row/column is reduced with a replicated copy of itself (level k has
  ceil(H / 2^k) rows). Work runs in tiles of `config.pyramid_tile` px (same shape every call, so one
  compilation per level) with reads prefetched and writes overlapped through tensorstore futures.

  Args:
    volume: a Volume or its URL.
    levels: total number of levels wanted (>= 1; 1 = nothing to do).
    kind: "image", "defect", "tissue" or "field"; default from the volume's kind (a generic "mask"
      volume must say "defect" or "tissue").
    z: optional section or contiguous range (as in `Volume.read`) to update; default all sections.
      Sections are independent, so workers can build the pyramid of disjoint z ranges in parallel.
  """
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from jaxalign.ops import fields

  vol = open_volume(volume, config) if isinstance(volume, str) else volume
  if not isinstance(levels, (int, np.integer)) or levels < 1:
    raise InputError(f"levels must be a positive integer, got {levels!r}")
  kind = kind or vol.kind
  if kind not in PYRAMID_REDUCE:
    raise InputError(f"pyramid kind must be one of {', '.join(PYRAMID_REDUCE)} for a {vol.kind} volume, got {kind!r}")
  if (kind == "field") != vol.is_field:
    raise InputError(f"pyramid kind {kind!r} does not fit a {vol.kind} volume")
  h0, w0 = vol.shape(0)[1:3]
  if levels > 1 and (h0 >> (levels - 1) == 0 or w0 >> (levels - 1) == 0):
    raise InputError(f"{levels} levels would shrink a {h0}x{w0} section below one pixel")
  (zsel, _, _), _ = vol._index(z, 0, None)
  vol = add_levels(vol, levels, config)
  if kind == "field":
    down = jax.jit(lambda x: fields.downsample_field(x.astype(jnp.float32)))
  else:
    reduce = PYRAMID_REDUCE[kind]
    down = jax.jit(lambda x: fields.downsample_image(x.astype(jnp.float32), reduce=reduce))
  integer = np.issubdtype(vol.dtype, np.integer)
  for k in range(1, levels):
    _, hf, wf = vol.shape(k - 1)[:3]
    _, cy, cx = vol.chunks(k)
    # whole coarse chunks per tile, so no two tiles (or workers) ever write the same chunk
    ty = min(max(config.pyramid_tile // (2 * cy), 1) * 2 * cy, hf + hf % 2)
    tx = min(max(config.pyramid_tile // (2 * cx), 1) * 2 * cx, wf + wf % 2)
    tiles = [(zz, y, x) for zz in range(zsel.start, zsel.stop) for y in _tile_starts(hf, ty)
             for x in _tile_starts(wf, tx)]
    nb = config.pyramid_batch
    batches = [tiles[i:i + nb] for i in range(0, len(tiles), nb)]

    def fetch(batch, k=k, hf=hf, wf=wf, ty=ty, tx=tx):
      return [vol.read_async(zz, k - 1, ((y, min(y + ty, hf)), (x, min(x + tx, wf)))) for zz, y, x in batch]

    pending_writes: list = []
    bar = tqdm(total=len(tiles), desc=f"pyramid level {k}", disable=not progress, unit="tile")
    nxt = fetch(batches[0])
    for bi, batch in enumerate(batches):
      reads, nxt = nxt, (fetch(batches[bi + 1]) if bi + 1 < len(batches) else None)
      stack = np.zeros((nb, ty, tx) + ((2,) if vol.is_field else ()), dtype=vol.dtype)
      for i, fut in enumerate(reads):
        a = fut.result()
        pad = [(0, ty - a.shape[0]), (0, tx - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        stack[i] = np.pad(a, pad, mode="edge")  # replicate: an odd border pixel averages with itself
      for i in range(len(batch), nb):  # pad the last batch instead of recompiling
        stack[i] = stack[0]
      out = np.asarray(down(stack))
      if integer:
        out = np.clip(np.rint(out), 0, np.iinfo(vol.dtype).max)
      out = out.astype(vol.dtype)
      for f in pending_writes:
        f.result()
      pending_writes = []
      hc, wc = vol.shape(k)[1:3]
      for i, (zz, y, x) in enumerate(batch):
        y0, x0 = y // 2, x // 2
        y1, x1 = min(y0 + ty // 2, hc), min(x0 + tx // 2, wc)
        pending_writes.append(vol.write(out[i, :y1 - y0, :x1 - x0], zz, k, ((y0, y1), (x0, x1)), wait=False))
      bar.update(len(batch))
    for f in pending_writes:
      f.result()
    bar.close()
    logging.info("%s: level %d %s written", vol.url, k, vol.shape(k))
  return vol
