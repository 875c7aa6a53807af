"""Learned models: SEAMLeSS pyramids (`seamless`; `jaxalign.models.pretrained()` loads the shipped
default), their training (`train_data`, `train_pyramid`, `train_encoder`, `train_flags`), the defect
and tissue detector (`detector`, `train_detector`) and the NNX weight files (`nnx_weights`). Shipped
weights live in `jaxalign/models/weights/`.

The public names of `jaxalign.models.seamless` (`pretrained`, `Pyramid`, `load_weights`, ...) are also
reachable here, resolved lazily so importing a sibling module does not load the SEAMLeSS networks.
"""

from __future__ import annotations

import importlib


# submodules: `from jaxalign.models import detector` must import the submodule, not load seamless
_SUBMODULES = {"seamless", "detector", "nnx_weights", "train_data", "train_pyramid", "train_encoder", "train_flags",
               "train_detector"}


def __getattr__(name: str):
  if name.startswith("_") or name in _SUBMODULES:
    raise AttributeError(f"module 'jaxalign.models.seamless' has no attribute {name!r}")
  seamless = importlib.import_module("jaxalign.models.seamless")
  try:
    return getattr(seamless, name)
  except AttributeError:
    raise AttributeError(f"module 'jaxalign.models.seamless' has no attribute {name!r}") from None
