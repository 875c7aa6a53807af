"""I/O throughput: jaxalign volumes (zarr3 / N5 / precomputed via tensorstore) vs NumPy .npy files.

Writes and reads the same stack section by section (the access pattern of the pipeline) and reports
sections/s, the ratio to NumPy's per-section `.npy` save/load measured in the same run, and bytes on disk.
Data: the shared ISBI 2012 stack (30 x 512^2 uint8), tiled `--repeat` times along z.

  python experiments/bench_io.py --repeat=4 --trials=3 --out=docs/benchmarks/io.md
"""

from __future__ import annotations

import os
import pathlib
import shutil
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from jaxalign.volume import store
from jaxalign.volume.pyramid import build_pyramid

FLAGS = flags.FLAGS
flags.DEFINE_string("data", str(pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "em" /
                                "isbi2012_train"), "folder of PNG sections")
flags.DEFINE_integer("repeat", 4, "tile the stack this many times along z")
flags.DEFINE_integer("trials", 3, "timed repetitions (median reported)")
flags.DEFINE_integer("levels", 4, "MIP levels for the pyramid timing")
flags.DEFINE_string("workdir", None, "scratch folder (default: a temp dir)")
flags.DEFINE_string("out", None, "write the markdown table here")


def _load_stack(folder: str, repeat: int) -> np.ndarray:
  from PIL import Image
  files = sorted(p for p in pathlib.Path(folder).iterdir() if p.suffix == ".png")
  if not files:
    raise app.UsageError(f"no PNG sections in {folder}")
  stack = np.stack([np.asarray(Image.open(p)) for p in files])
  return np.concatenate([stack] * repeat)


def _du(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def _npy(stack: np.ndarray, root: str):
  d = os.path.join(root, "npy")
  shutil.rmtree(d, ignore_errors=True)
  os.makedirs(d)
  t0 = time.perf_counter()
  for z, s in enumerate(stack):
    np.save(os.path.join(d, f"{z:05d}.npy"), s)
  tw = time.perf_counter() - t0
  t0 = time.perf_counter()
  back = np.stack([np.load(os.path.join(d, f"{z:05d}.npy")) for z in range(len(stack))])
  tr = time.perf_counter() - t0
  assert np.array_equal(back, stack)
  return tw, tr, _du(d)


def _volume(stack: np.ndarray, root: str, fmt: str, sync: bool = True):
  url = os.path.join(root, fmt + ("" if sync else "_nosync"))
  shutil.rmtree(url, ignore_errors=True)
  config = store.IOConfig(file_sync=sync)
  t0 = time.perf_counter()
  vol = store.create_volume(url, stack.shape, stack.dtype, (50, 4, 4), format=fmt, config=config)
  inflight = []
  for z, s in enumerate(stack):  # per section, writes overlapped through futures
    inflight.append(vol.write(s, z, wait=False))
    if len(inflight) >= store.DEFAULT_CONFIG.inflight:
      inflight.pop(0).result()
  for f in inflight:
    f.result()
  tw = time.perf_counter() - t0
  t0 = time.perf_counter()
  vol = store.open_volume(url, config)
  futs = [vol.read_async(z) for z in range(len(stack))]
  back = np.stack([f.result() for f in futs])
  tr = time.perf_counter() - t0
  assert np.array_equal(back, stack)
  return tw, tr, _du(url)


def _pyramid(root: str, fmt: str, levels: int) -> float:
  url = os.path.join(root, fmt)
  t0 = time.perf_counter()
  build_pyramid(store.open_volume(url), levels, progress=False)
  return time.perf_counter() - t0


def main(argv):
  del argv
  stack = _load_stack(FLAGS.data, FLAGS.repeat)
  n = len(stack)
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_io_")
  methods = [("numpy .npy per section", lambda: _npy(stack, root))] + \
            [(f"jaxalign {fmt}", (lambda f=fmt: _volume(stack, root, f))) for fmt in store.FORMATS] + \
            [(f"jaxalign {fmt}, file_sync=False", (lambda f=fmt: _volume(stack, root, f, False)))
             for fmt in store.FORMATS]
  for _, fn in methods:
    fn()  # warm-up (imports, first tensorstore context)
  runs: dict[str, list] = {name: [] for name, _ in methods}
  for _ in range(FLAGS.trials):  # round robin, so a burst of load on a shared machine hits every method
    for name, fn in methods:
      runs[name].append(fn())
  rows = {}
  for name, rs in runs.items():
    rows[name] = (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[-1][2])
    logging.info("%s: write %.3fs read %.3fs", name, rows[name][0], rows[name][1])
  _pyramid(root, "zarr3", FLAGS.levels)  # warm-up: jit compile
  tp = statistics.median(_pyramid(root, "zarr3", FLAGS.levels) for _ in range(FLAGS.trials))
  base_w, base_r, base_b = rows["numpy .npy per section"]
  lines = [
      f"Stack: ISBI 2012 train, {n} sections of {stack.shape[1]}x{stack.shape[2]} uint8 "
      f"({stack.nbytes / 2**20:.1f} MiB), section-by-section write then read, median of {FLAGS.trials} round-robin trials.",
      "",
      "| storage | write sections/s | read sections/s | write vs .npy | read vs .npy | bytes on disk vs raw |",
      "|---|---|---|---|---|---|",
  ]
  for name, (tw, tr, nbytes) in rows.items():
    lines.append(f"| {name} | {n / tw:.0f} | {n / tr:.0f} | {base_w / tw:.2f}x | {base_r / tr:.2f}x | "
                 f"{nbytes / stack.nbytes:.2f} |")
  lines += ["", f"Pyramid (zarr3, levels 1-{FLAGS.levels - 1} from level 0, tiles of "
            f"{store.DEFAULT_CONFIG.pyramid_tile} px, JAX 2x2 mean): {tp:.2f} s = {n / tp:.0f} sections/s."]
  load = os.getloadavg()[0]
  lines += ["", f"1-min load average at the end of the run: {load:.1f} on {os.cpu_count()} cores "
            "(other jobs shared the machine; treat ratios as +-2x)." if load > (os.cpu_count() or 1) else
            f"1-min load average at the end of the run: {load:.1f} on {os.cpu_count()} cores."]
  table = "\n".join(lines)
  print(table)
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(
        "# I/O throughput\n\nMachine: 2-core CPU VM, no GPU; local disk (files land in the page cache, so these are "
        "codec + bookkeeping costs, not disk bandwidth).\n\nCommand: `python experiments/bench_io.py "
        f"--repeat={FLAGS.repeat} --trials={FLAGS.trials} --levels={FLAGS.levels} --out={FLAGS.out}`\n\n"
        + table + "\n\nzarr3 and N5 chunks are (1, 512, 512) zstd level 3; precomputed is raw. `file_sync=True` (the default, tensorstore's default) fsyncs each chunk "
        "file before renaming it into place; NumPy does not fsync, so the `file_sync=False` rows are the like-for-like "
        "comparison. Ratios > 1 mean "
        "faster than NumPy `.npy` save/load of the same sections (one file per section) in the same run.\n")
  if not FLAGS.workdir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
