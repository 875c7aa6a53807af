"""Compact shipped weights for flax NNX models: `<path>.npz` (float32 parameters keyed by their
state path) beside `<path>.json` (the model's config). Used by the SEAMLeSS pyramid and the defect
detector; training checkpoints use orbax instead (jaxalign.models.train_pyramid)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.errors import InputError


def config_to_dict(cfg) -> dict:
  """A (nested) frozen dataclass config -> plain JSON-able dict (tuples become lists): the one
  serialiser of model and training configs; each config's `*_from_dict` validates on the way back."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _value(v):
  return v.get_value() if hasattr(v, "get_value") else v.value


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  """`{"a/b/kernel": array}` of every `nnx.Param` of `model`."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(k) for k in path): np.asarray(_value(v)) for path, v in flat}


def save(model: nnx.Module, path, config: dict) -> pathlib.Path:
  """Writes `<path>.npz` and `<path>.json` (`config`); returns the npz path.

  Both files go to temporary names first and are renamed, so nothing is left half-written.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp_npz = path.with_name(path.name + ".tmp.npz")
  tmp_json = path.with_name(path.name + ".tmp.json")
  np.savez_compressed(tmp_npz, **flat_params(model))
  tmp_json.write_text(json.dumps(config, indent=1))
  tmp_npz.replace(path.with_suffix(".npz"))
  tmp_json.replace(path.with_suffix(".json"))
  return path.with_suffix(".npz")


def load(path, build: Callable[[dict], nnx.Module], what: str = "weights") -> nnx.Module:
  """Builds a model with `build(config_dict)` from `<path>.json` and fills it from `<path>.npz`.

  Args:
    path: weights path without suffix.
    build: makes the (possibly abstract, `nnx.eval_shape`) model from the JSON config.
    what: how error messages name these weights.
  Raises:
    InputError: a file is missing, the JSON is malformed, or parameters are missing, extra or of
      the wrong shape.
  """
  path = pathlib.Path(path)
  npz, cfg_path = path.with_suffix(".npz"), path.with_suffix(".json")
  if not npz.is_file() or not cfg_path.is_file():
    raise InputError(f"{what} {path}: need both {npz.name} and {cfg_path.name}")
  try:
    config = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise InputError(f"{what} config {cfg_path}: not valid JSON ({e})") from None
  model = build(config)
  with np.load(npz) as data:
    stored = dict(data)
  leaves = []
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = "/".join(str(k) for k in p)
    if key not in stored:
      raise InputError(f"{what} {npz}: missing parameter {key}")
    arr = stored.pop(key)
    if arr.shape != _value(v).shape:
      raise InputError(f"{what} {npz}: parameter {key} has shape {arr.shape}, model expects {_value(v).shape}")
    leaves.append((p, v.replace(jnp.asarray(arr, jnp.float32))))
  if stored:
    raise InputError(f"{what} {npz}: unexpected parameters {sorted(stored)[:5]}")
  nnx.update(model, nnx.from_flat_state(leaves))
  return model
