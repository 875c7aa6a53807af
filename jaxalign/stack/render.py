"""Render an aligned stack: every section pulled through its field (DESIGN.md §3 step 6)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import errors
from jaxalign.ops.fields import warp

# Sections warped per jitted call; the last batch is padded so one compile serves a whole stack.
DEFAULT_RENDER_BATCH = 8


@functools.partial(jax.jit, static_argnames=("mode",))
def _render_batch(sections: jax.Array, fields: jax.Array, fill, mode: str) -> jax.Array:
  return jax.vmap(lambda s, f: warp(s, f, mode=mode, fill=fill))(sections, fields)


def render(sections, fields, *, mode: str = "bilinear", fill: float = 0.0,
           batch_size: int = DEFAULT_RENDER_BATCH) -> jax.Array:
  """Warps each section by its field.

  Args:
    sections: `[Z, H, W]` images (0 = no data).
    fields: `[Z, H, W, 2]` float32, pixels, (dy, dx), pull semantics (e.g. from `align_stack`).
    mode: "bilinear" or "nearest" (use "nearest" for label/mask stacks).
    fill: value outside a section (0 = no data).
    batch_size: sections per jitted call (memory bound; the last batch is padded).
  Returns:
    `[Z, H, W]` float32 aligned stack, `out[z] = warp(sections[z], fields[z])`.
  Raises:
    InputError: bad shapes, dtypes, NaN/Inf, or mismatched section/field shapes.
  """
  sec = errors.check_image(sections, "sections", ndim=3, allow_empty=True)
  fld = errors.check_field(fields, "fields", shape=sec.shape[1:])
  if fld.shape[:-1] != sec.shape:
    raise errors.InputError(f"fields shape {fld.shape} does not match sections shape {sec.shape} + (2,)")
  if mode not in ("bilinear", "nearest"):
    raise errors.InputError(f"render mode must be 'bilinear' or 'nearest', got {mode!r}")
  if batch_size < 1:
    raise errors.InputError(f"batch_size must be >= 1, got {batch_size}")
  z = sec.shape[0]
  b = min(batch_size, z)
  out = []
  for i in range(0, z, b):
    idx = np.arange(i, i + b).clip(max=z - 1)
    res = _render_batch(jnp.asarray(sec[idx]), jnp.asarray(fld[idx]), jnp.float32(fill), mode)
    out.append(res[: min(b, z - i)])
  return jnp.concatenate(out)
