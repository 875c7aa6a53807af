"""Shared fixtures: real EM data from ../shared/data/em (never copied into the project)."""

import os
import pathlib

import numpy as np
import pytest

# Commands run by the tests (in process or as subprocesses) keep no compilation cache on disk: the
# suite stays hermetic (tests/test_compile_cache.py turns it on in its own processes).
os.environ.setdefault("JAXALIGN_COMPILATION_CACHE", "off")
# The same XLA codegen as the command line (most of the suite's time is compiling).
from jaxalign import compile_cache  # noqa: E402
from jaxalign.bench.evaluation import em_data_dir  # noqa: E402

compile_cache.quick_cpu_compile()

EM_DATA = em_data_dir()  # `$JAXALIGN_EM_DATA`, else ../shared/data/em


def em_stack_path(name: str) -> pathlib.Path:
  """Path of a shared stack folder; skips the test with a clear reason when absent."""
  p = EM_DATA / name
  if not p.is_dir():
    pytest.skip(f"shared EM data {p} not present (tests read ../shared/data/em; set JAXALIGN_EM_DATA)")
  return p


def load_sections(name: str, indices, crop: int | None = None) -> np.ndarray:
  """Loads sections `indices` of a shared stack as float32 [Z, H, W] in [0, 1], optionally centre-cropped."""
  from PIL import Image
  folder = em_stack_path(name)
  out = []
  for i in indices:
    img = np.asarray(Image.open(folder / f"{i:03d}.png"), dtype=np.float32) / 255.0
    if crop is not None:
      h, w = img.shape
      y0, x0 = (h - crop) // 2, (w - crop) // 2
      img = img[y0:y0 + crop, x0:x0 + crop]
    out.append(img)
  return np.stack(out)


@pytest.fixture
def em_section():
  """One real ssTEM section (ISBI 2012 #0), float32 [512, 512] in [0, 1]."""
  return load_sections("isbi2012_train", [0])[0]
