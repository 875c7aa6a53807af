"""The aligner protocols: the call signatures through which aligners plug into pair, block, stack,
volume and benchmark code, as `typing.Protocol`s. Any function or object with the signature fits
(nothing to inherit or register); they name what the code expects and type-check it.

Fields follow the design conventions: `[..., H, W, 2]` float32, pixels, (dy, dx), pull semantics on
the target's grid, so `warp(src, field) ≈ tgt`. Images are `[H, W]` (batched `[B, H, W]`), 0 = no
data; defect masks are bool of the same shape, True at cracks and folds (no data, the field may tear).
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

Array = Any  # a jax.Array or NumPy array (implementations take both)


class PairAligner(Protocol):
  """The team's pluggable pair aligner: one pair in, its field out.

  `aligner(src [H, W], tgt [H, W], *, init_field=None [H, W, 2], src_defects=None [H, W] bool,
  tgt_defects=None [H, W] bool) -> [H, W, 2]` with `warp(src, field) ≈ tgt`; `init_field` (None =
  identity) is where to start from. Implemented by `jaxalign.models.seamless.Pyramid`,
  `jaxalign.align.blockmatch.block_match` and `jaxalign.bench.evaluation.identity_aligner`; taken as
  `model` by `jaxalign.align.pair.align_pair` / `align_pairs` (and, through them, by the block, stack
  and volume code) and by `jaxalign.bench.evaluation.evaluate`. Implementations may take further
  keyword arguments with defaults.
  """

  def __call__(self, src: Array, tgt: Array, *, init_field: Array | None = None, src_defects: Array | None = None,
               tgt_defects: Array | None = None) -> jax.Array: ...


class BatchedPairAligner(Protocol):
  """A batch of pairs in, their fields out: the aligner of block and stack alignment.

  `aligner(srcs [B, H, W], tgts [B, H, W], *, src_defects [B, H, W] bool, tgt_defects [B, H, W] bool,
  init_fields [B, H, W, 2]) -> [B, H, W, 2]` with `warp(srcs[b], out[b]) ≈ tgts[b]` (None for a mask:
  no defects; for `init_fields`: identity). `jaxalign.stack.block.default_aligner` binds
  `jaxalign.align.pair.align_pairs` to a pair model and config in this protocol; `BlockConfig.aligner`,
  `jaxalign.stack.refine` and `jaxalign.volume.chunked` take one.
  """

  def __call__(self, srcs: Array, tgts: Array, *, src_defects: Array | None = None,
               tgt_defects: Array | None = None, init_fields: Array | None = None) -> jax.Array: ...


class StackAligner(Protocol):
  """A whole stack in, the fields aligning it into section 0's frame out (benchmark stack cases).

  `aligner(sections [Z, H, W], *, defects=None [Z, H, W] bool) -> [Z, H, W, 2]` (field 0 the identity);
  `jaxalign.bench.evaluation.evaluate(..., stack_aligner=True)` takes one.
  """

  def __call__(self, sections: Array, *, defects: Array | None = None) -> jax.Array: ...
