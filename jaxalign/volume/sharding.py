"""Batches of chunks or section pairs sharded over all local devices (several GPUs of one machine).

A per-item JAX function `fn(*items)` is vmapped and wrapped in `jax.shard_map` over a 1-d device
mesh: each device runs the vmapped function on its own slice of the batch with no cross-device
communication, so every item's result is the one a single device computes for it. Batches are
padded (by repeating the last item, never with zeros that could hit a degenerate path such as the
normalisation of an empty chunk) to a multiple of the device count, and, with `batch_size`, to one
fixed size so the sharded function compiles once for a whole volume.

Typical use::

  from jaxalign.volume import sharding
  fields = sharding.sharded_map(lambda s, t: align_chunk(s, t), src_chunks, tgt_chunks, batch_size=16)

On CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=8` gives 8 devices for testing.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxalign.errors import InputError

BATCH_AXIS = "batch"


def local_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = BATCH_AXIS) -> Mesh:
  """A 1-d mesh over `devices` (default: all local devices of the default backend)."""
  devs = list(devices) if devices is not None else jax.local_devices()
  if not devs:
    raise InputError("no devices to shard over")
  return Mesh(np.array(devs), (axis_name,))


def padded_size(n: int, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(1, math.ceil(n / multiple)) * multiple


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  """Pads `x [n, ...]` to `[size, ...]` along axis 0 by repeating the last item."""
  x = np.asarray(x)
  n = x.shape[0]
  if n == size:
    return x
  if n == 0 or n > size:
    raise InputError(f"cannot pad a batch of {n} items to {size}")
  return np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a `[B, ...]` array with B split over the mesh's batch axis."""
  return NamedSharding(mesh, P(mesh.axis_names[0], *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh) -> jax.Array:
  """Places `x [B, ...]` (B a multiple of the device count) split over the mesh."""
  x = np.asarray(x)
  if x.shape[0] % mesh.size:
    raise InputError(f"batch of {x.shape[0]} is not a multiple of the {mesh.size} devices; pad it first")
  return jax.device_put(x, batch_sharding(mesh, x.ndim))


@functools.lru_cache(maxsize=64)
def sharded_fn(fn: Callable, mesh: Mesh) -> Callable:
  """jit(shard_map(vmap(fn))): each device maps `fn` over its slice of every `[B, ...]` argument.

  Cached per (fn, mesh) so that repeated calls reuse the compilation (one per input shape).
  """
  axis = mesh.axis_names[0]
  # check_vma=False: fn is arbitrary per-item user code; its outputs are per-item by construction.
  inner = jax.shard_map(jax.vmap(fn), mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False)
  return jax.jit(inner)


def sharded_map(fn: Callable, *batched, mesh: Mesh | None = None, batch_size: int | None = None):
  """`[fn(*items) for items in zip(*batched)]` as a sharded, vmapped computation.

  Args:
    fn: per-item JAX function of arrays (a module-level or otherwise long-lived function, so the
      compilation cache keyed on it is reused); returns an array or a tuple of arrays.
    *batched: arrays `[n, ...]` sharing n (e.g. src chunks `[n, h, w]`, tgt chunks `[n, h, w]`).
    mesh: device mesh (default: all local devices).
    batch_size: items per sharded call, rounded up to a multiple of the device count; the last call
      is padded to the same size (one compilation). Default: all n items in one call.
  Returns:
    NumPy outputs `[n, ...]` (same pytree structure as fn's output).
  """
  if not batched:
    raise InputError("sharded_map needs at least one batched array")
  arrays = [np.asarray(a) for a in batched]
  n = arrays[0].shape[0]
  if n == 0 or any(a.shape[0] != n for a in arrays):
    raise InputError(f"batched arrays must share a non-empty leading axis, got {[a.shape for a in arrays]}")
  mesh = mesh or local_mesh()
  size = padded_size(batch_size or n, mesh.size)
  run = sharded_fn(fn, mesh)
  outs = []
  for b0 in range(0, n, size):
    group = [pad_batch(a[b0:b0 + size], size) for a in arrays]
    res = run(*[shard_batch(g, mesh) for g in group])
    take = min(size, n - b0)
    outs.append(jax.tree.map(lambda r: np.asarray(r)[:take], res))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)
