"""Kernel benchmark: warp, compose, vector_vote (n = 3), elastic_loss + gradient.

Measures jaxalign on the current JAX backend and, in the same run on the same inputs,
`scipy.ndimage.map_coordinates(order=1)` and `torch.nn.functional.grid_sample` (warp), and
torchfields-style voting in torch (vote). Prints Mpx/s and ratios; on a GPU also the fraction of
the measured device-to-device copy bandwidth reached by warp.

  python experiments/bench_kernels.py --sizes=1024,2048,4096 --repeats=5
"""

from __future__ import annotations

import itertools
import json
import platform
import time

from absl import app, flags, logging
import numpy as np

import jax
import jax.numpy as jnp

import jaxalign as ja

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["1024", "2048", "4096"], "square section sizes (px)")
flags.DEFINE_integer("repeats", 5, "timed repetitions (best is reported)")
flags.DEFINE_bool("scipy", True, "time scipy.ndimage.map_coordinates (skipped above --scipy_max)")
flags.DEFINE_integer("scipy_max", 4096, "largest size timed with scipy")
flags.DEFINE_bool("torch", True, "time torch grid_sample (CPU torch unless CUDA torch is present)")
flags.DEFINE_string("json_out", "", "optional path for machine-readable results")


def best_time(fn, repeats: int) -> float:
  """Best wall time (s) of `repeats` calls; `fn` must block until its result is ready."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def jax_time(fn, args, repeats):
  """Compile once (excluded), then best-of-repeats of the compiled call."""
  jax.block_until_ready(fn(*args))
  return best_time(lambda: jax.block_until_ready(fn(*args)), repeats)


def copy_bandwidth(n_bytes_array, repeats):
  """Device-to-device copy bandwidth (bytes/s) measured with a jitted x + 0 over the array."""
  copy = jax.jit(lambda x: x + 0)
  t = jax_time(copy, (n_bytes_array,), repeats)
  return 2 * n_bytes_array.nbytes / t


def make_inputs(size, rng):
  img = rng.random((size, size), dtype=np.float32)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  field = np.stack([3.0 * np.sin(2 * np.pi * xx / 257.0), 3.0 * np.cos(2 * np.pi * yy / 311.0)], -1)
  field = field.astype(np.float32)
  return img, field


def torch_grid_sample_fn(img, field):
  import torch
  h, w = img.shape
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  timg = torch.from_numpy(img)[None, None].to(dev)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  # align_corners=True maps -1..1 onto pixel centres 0..n-1, matching our integer-centre convention.
  gx = 2 * (xx + field[..., 1]) / (w - 1) - 1
  gy = 2 * (yy + field[..., 0]) / (h - 1) - 1
  grid = torch.from_numpy(np.stack([gx, gy], -1))[None].to(dev)

  def run():
    out = torch.nn.functional.grid_sample(timg, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if dev == "cuda":
      torch.cuda.synchronize()
    return out
  return run


def torch_vote_fn(fields, temperature):
  """torchfields' vote formula in torch (softmin over minimal-majority subsets), for a speed peer."""
  import torch
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  f = torch.from_numpy(fields).to(dev)
  n = f.shape[0]
  subsets = list(itertools.combinations(range(n), n // 2 + 1))

  def run():
    dists = []
    for s in subsets:
      pairs = list(itertools.combinations(s, 2))
      dists.append(torch.stack([(f[i] - f[j]).norm(dim=-1) for i, j in pairs]).mean(0))
    w = torch.softmax(-torch.stack(dists) / temperature, dim=0)
    out = torch.zeros_like(f[0])
    for ws, s in zip(w, subsets):
      out += ws[..., None] * f[list(s)].mean(0)
    if dev == "cuda":
      torch.cuda.synchronize()
    return out
  return run


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  logging.info("backend %s, device %s, jax %s", backend, device, jax.__version__)
  rows = []
  grad_elastic = jax.jit(jax.value_and_grad(lambda f: ja.elastic_loss(f)))
  for size in map(int, FLAGS.sizes):
    img, field = make_inputs(size, rng)
    mpx = size * size / 1e6
    j_img, j_field = jnp.asarray(img), jnp.asarray(field)
    fields3 = jnp.stack([j_field, j_field + 0.5, j_field - 40.0])
    r = {"size": size, "backend": backend, "device": device}
    r["warp_s"] = jax_time(ja.warp, (j_img, j_field), FLAGS.repeats)
    r["compose_s"] = jax_time(ja.compose, (j_field, j_field), FLAGS.repeats)
    r["vote3_s"] = jax_time(lambda f: ja.vector_vote(f, blur_sigma=0.0), (fields3,), FLAGS.repeats)
    r["elastic_grad_s"] = jax_time(grad_elastic, (j_field,), FLAGS.repeats)
    if FLAGS.scipy and size <= FLAGS.scipy_max:
      from scipy import ndimage
      yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
      coords = np.stack([yy + field[..., 0], xx + field[..., 1]])
      r["scipy_warp_s"] = best_time(lambda: ndimage.map_coordinates(img, coords, order=1, mode="grid-constant"),
                                    max(1, FLAGS.repeats // 2))
    if FLAGS.torch:
      try:
        run = torch_grid_sample_fn(img, field)
        run()
        r["torch_warp_s"] = best_time(run, FLAGS.repeats)
        vrun = torch_vote_fn(np.asarray(fields3), 5.7)
        vrun()
        r["torch_vote3_s"] = best_time(vrun, FLAGS.repeats)
      except ImportError:
        logging.warning("torch not installed: pip install '.[bench]'")
    if backend == "gpu":
      bw = copy_bandwidth(j_img, FLAGS.repeats)
      # warp moves at least the field (8 B/px) in and the image (4 B/px) in and out.
      r["warp_bandwidth_fraction"] = (16 * size * size / r["warp_s"]) / bw
    rows.append(r)
    line = (f"{size:5d}²  warp {mpx / r['warp_s']:8.1f} Mpx/s  compose {mpx / r['compose_s']:8.1f}  "
            f"vote(n=3) {mpx / r['vote3_s']:8.1f}  elastic+grad {mpx / r['elastic_grad_s']:8.1f}")
    if "torch_warp_s" in r:
      line += f"  | warp vs torch grid_sample {r['torch_warp_s'] / r['warp_s']:5.2f}x"
      line += f"  vote vs torch {r['torch_vote3_s'] / r['vote3_s']:5.2f}x"
    if "scipy_warp_s" in r:
      line += f"  warp vs scipy {r['scipy_warp_s'] / r['warp_s']:6.1f}x"
    if "warp_bandwidth_fraction" in r:
      line += f"  warp {100 * r['warp_bandwidth_fraction']:.0f}% of copy bandwidth"
    print(line, flush=True)
  print(f"# machine: {platform.processor() or platform.machine()}, backend {backend} ({device}), jax {jax.__version__}")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
