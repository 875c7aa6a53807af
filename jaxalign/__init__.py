"""jaxalign: precise, petascale alignment of serial-section EM stacks in JAX.

Public surface (see ../shared/DESIGN.md §2)::

  import jaxalign as ja
  ja.warp, ja.compose, ja.invert, ja.identity, ja.from_affine, ja.downsample_field, ja.upsample_field,
  ja.pyramid, ja.elastic_energy, ja.elastic_loss, ja.vector_vote, ja.decay_field, ja.remove_drift,
  ja.refine_to_neighbours, ja.cpc,
  ja.align_pair, ja.align_block, ja.align_stack, ja.render

Names are resolved lazily so `import jaxalign` stays fast and a command only pays for what it uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> defining module
_EXPORTS = {
  # kernels
  "warp": "jaxalign.ops.fields",
  "compose": "jaxalign.ops.fields",
  "invert": "jaxalign.ops.fields",
  "identity": "jaxalign.ops.fields",
  "from_affine": "jaxalign.ops.fields",
  "downsample_field": "jaxalign.ops.fields",
  "upsample_field": "jaxalign.ops.fields",
  "downsample_image": "jaxalign.ops.fields",
  "upsample_image": "jaxalign.ops.fields",
  "pyramid": "jaxalign.ops.fields",
  "gaussian_blur": "jaxalign.ops.fields",
  "blur_field": "jaxalign.ops.fields",
  "median_filter_field": "jaxalign.ops.fields",
  "elastic_energy": "jaxalign.ops.losses",
  "elastic_loss": "jaxalign.ops.losses",
  "masked_mean": "jaxalign.ops.losses",
  "masked_mse": "jaxalign.ops.losses",
  "vector_vote": "jaxalign.ops.voting",
  "vote_weights": "jaxalign.ops.voting",
  "decay_field": "jaxalign.ops.decay",
  "remove_drift": "jaxalign.stack.drift",
  "DriftConfig": "jaxalign.stack.drift",
  "refine_to_neighbours": "jaxalign.stack.refine",
  "RefineConfig": "jaxalign.stack.refine",
  "cpc": "jaxalign.ops.metrics",
  "low_cpc_fraction": "jaxalign.ops.metrics",
  "deformation": "jaxalign.ops.metrics",
  "area_change": "jaxalign.ops.metrics",
  "normalize": "jaxalign.ops.preprocess",
  "InputError": "jaxalign.errors",
  # volumes and chunked processing
  "create_volume": "jaxalign.volume.store",
  "open_volume": "jaxalign.volume.store",
  "import_stack": "jaxalign.volume.images",
  "export_stack": "jaxalign.volume.images",
  "build_pyramid": "jaxalign.volume.pyramid",
  "map_chunks": "jaxalign.volume.chunking",
  "preprocess_section": "jaxalign.ops.preprocess",
  # ground truth and evaluation
  "distort_stack": "jaxalign.bench.groundtruth",
  "DistortionConfig": "jaxalign.bench.groundtruth",
  "evaluate": "jaxalign.bench.evaluation",
  "block_match": "jaxalign.align.blockmatch",
  "BlockMatchConfig": "jaxalign.align.blockmatch",
  # defect and tissue detection
  "detect": "jaxalign.models.detector",
  "masks_for_alignment": "jaxalign.models.detector",
  # alignment
  "align_pair": "jaxalign.align.pair",
  "PairConfig": "jaxalign.align.pair",
  "align_pairs": "jaxalign.align.pair",
  "FinetuneConfig": "jaxalign.align.finetuner",
  "finetune": "jaxalign.align.finetuner",
  "finetune_batch": "jaxalign.align.finetuner",
  "align_block": "jaxalign.stack.block",
  "BlockConfig": "jaxalign.stack.block",
  "align_stack": "jaxalign.stack.chain",
  "StackConfig": "jaxalign.stack.chain",
  "render": "jaxalign.stack.render",
  # volumes end to end
  "align_volume": "jaxalign.volume.pipeline",
  "render_volume": "jaxalign.volume.pipeline",
  "VolumeConfig": "jaxalign.volume.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module 'jaxalign' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
