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
  "warp": "jaxalign.fields",
  "compose": "jaxalign.fields",
  "invert": "jaxalign.fields",
  "identity": "jaxalign.fields",
  "from_affine": "jaxalign.fields",
  "downsample_field": "jaxalign.fields",
  "upsample_field": "jaxalign.fields",
  "downsample_image": "jaxalign.fields",
  "upsample_image": "jaxalign.fields",
  "pyramid": "jaxalign.fields",
  "gaussian_blur": "jaxalign.fields",
  "blur_field": "jaxalign.fields",
  "median_filter_field": "jaxalign.fields",
  "elastic_energy": "jaxalign.losses",
  "elastic_loss": "jaxalign.losses",
  "masked_mean": "jaxalign.losses",
  "masked_mse": "jaxalign.losses",
  "vector_vote": "jaxalign.voting",
  "vote_weights": "jaxalign.voting",
  "decay_field": "jaxalign.decay",
  "remove_drift": "jaxalign.drift",
  "DriftConfig": "jaxalign.drift",
  "refine_to_neighbours": "jaxalign.refine",
  "RefineConfig": "jaxalign.refine",
  "cpc": "jaxalign.metrics",
  "low_cpc_fraction": "jaxalign.metrics",
  "deformation": "jaxalign.metrics",
  "area_change": "jaxalign.metrics",
  "normalize": "jaxalign.preprocess",
  "InputError": "jaxalign.errors",
  # volumes and chunked processing
  "create_volume": "jaxalign.io",
  "open_volume": "jaxalign.io",
  "import_stack": "jaxalign.io",
  "export_stack": "jaxalign.io",
  "build_pyramid": "jaxalign.io",
  "map_chunks": "jaxalign.chunking",
  "preprocess_section": "jaxalign.preprocess",
  # ground truth and evaluation
  "distort_stack": "jaxalign.groundtruth",
  "DistortionConfig": "jaxalign.groundtruth",
  "evaluate": "jaxalign.evaluation",
  "block_match": "jaxalign.blockmatch",
  "BlockMatchConfig": "jaxalign.blockmatch",
  # defect and tissue detection
  "detect": "jaxalign.detector",
  "masks_for_alignment": "jaxalign.detector",
  # alignment
  "align_pair": "jaxalign.pair",
  "PairConfig": "jaxalign.pair",
  "align_pairs": "jaxalign.pair",
  "FinetuneConfig": "jaxalign.finetuner",
  "finetune": "jaxalign.finetuner",
  "finetune_batch": "jaxalign.finetuner",
  "align_block": "jaxalign.block",
  "BlockConfig": "jaxalign.block",
  "align_stack": "jaxalign.stack",
  "StackConfig": "jaxalign.stack",
  "render": "jaxalign.render",
  # volumes end to end
  "align_volume": "jaxalign.pipeline",
  "render_volume": "jaxalign.pipeline",
  "VolumeConfig": "jaxalign.pipeline",
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
