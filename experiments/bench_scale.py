"""Scale benchmarks (issue 7): executor throughput, memory per worker on 8192^2 sections, FAFB projection.

  python experiments/bench_scale.py --mode=throughput   # align_volume, processes x1 vs x2 (+ inline)
  python experiments/bench_scale.py --mode=memory       # peak RSS: chunked vs whole-section, 8192^2
  python experiments/bench_scale.py --mode=stages       # peak RSS: chunked stitch / decay stages, 4096^2 and 8192^2
  python experiments/bench_scale.py --mode=projection   # per-chunk pair cost -> FAFB-scale cost
  python experiments/bench_scale.py --mode=seams        # chunked vs whole-section block alignment (ISBI)

Every figure is measured in this run; ratios compare against a peer measured in the same run.
Results are printed as Markdown (copied into docs/benchmarks/scale.md).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
from absl import app, flags, logging

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Workers (spawned processes, Dask LocalCluster) import task functions by module name.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "all", ["all", "throughput", "memory", "stages", "projection", "seams"], "which benchmark")
flags.DEFINE_list("stage_sizes", ["4096", "8192"], "stages: section edges, px (chunked at all, whole at <= whole_max)")
flags.DEFINE_integer("whole_max", 4096, "stages: largest section also run whole (memory ~ 10x the field)")
flags.DEFINE_integer("stage_chunk", 1024, "stages: chunk edge, px")
flags.DEFINE_list("stage_names", ["decay", "stitch", "block"], "stages: which stages to measure")
flags.DEFINE_string("figure", str(REPO / "docs" / "benchmarks" / "scale_seams.png"), "seams: figure path")
flags.DEFINE_integer("sections", 16, "throughput: sections in the test volume")
flags.DEFINE_integer("size", 192, "throughput: section edge, px")
flags.DEFINE_integer("block_size", 8, "throughput: sections per block")
flags.DEFINE_enum("aligner", "finetuner", ["finetuner", "blockmatch", "fft"],
                  "throughput: default pair aligner, or the FFT translation stand-in of the tests "
                  "(measures the pipeline's own overhead)")
flags.DEFINE_boolean("compilation_cache", False, "throughput: share a JAX persistent compilation cache")
flags.DEFINE_integer("big", 8192, "memory: section edge, px")
flags.DEFINE_list("chunks", ["512", "1024", "2048"], "memory: chunk sizes to measure")
flags.DEFINE_integer("pair_chunk", 256, "projection: pair chunk edge, px, timed with the default finetuner")
flags.DEFINE_integer("repeat", 3, "projection: timed repetitions (median)")
flags.DEFINE_string("workdir", None, "scratch folder (default: a temporary one)")
flags.DEFINE_integer("seam_chunk", 256, "seams: chunk window edge, px")
flags.DEFINE_integer("seam_overlap", 32, "seams: chunk context margin, px")
flags.DEFINE_integer("seam_coarse", 2, "seams: re-centring estimate 2^this coarser")
flags.DEFINE_integer("seam_sections", 4, "seams: sections (section 0 + known distortions of it)")
flags.DEFINE_float("seam_step", 12.0, "seams: y translation per section, px (x: -0.75 of it)")

# FAFB (Zheng et al. 2018; paper Table/DESIGN.md §4): 7,052 sections aligned; ~106 TB of 4 nm
# images over ~7,000 sections -> ~1.5e10 px per section at 4 nm, i.e. ~2.4e8 px at 32 nm (the
# finest level of the v15 fine alignment).
FAFB_SECTIONS = 7052
FAFB_PX_PER_SECTION_32NM = 106e12 / 7062 / 64
PAPER_GPU_HOURS = 240 * 128  # 240 h on 128 A100s
FAFB_BLOCK, FAFB_OVERLAP, FAFB_VOTING = 25, 3, 3


def _rss_script(body: str) -> str:
  return textwrap.dedent(f"""
    import sys, json, time
    sys.path.insert(0, {str(REPO)!r})
    def peak_mib():
      for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
          return int(line.split()[1]) / 1024
    t0 = time.time()
  """) + textwrap.dedent(body) + textwrap.dedent("""
    print(json.dumps(dict(peak_mib=peak_mib(), seconds=time.time() - t0)))
  """)


def _run_child(code: str) -> dict:
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- throughput


def _block_config():
  from jaxalign.stack.block import BlockConfig
  from jaxalign.align.pair import PairConfig
  from tests.references import phase_aligner
  return {"finetuner": BlockConfig(pair=PairConfig()),
          "blockmatch": BlockConfig(pair=PairConfig(init="blockmatch")),  # NCC init, then finetuner
          "fft": BlockConfig(aligner=phase_aligner)}[FLAGS.aligner]


def throughput(work: pathlib.Path) -> None:
  from jaxalign import compile_cache
  from jaxalign.volume import distributed as jd, pipeline, store
  from jaxalign.stack.chain import StackConfig
  from tests.references import random_shifts, texture_stack
  sections = texture_stack(random_shifts(FLAGS.sections, limit=6), size=FLAGS.size)
  src = str(work / "src")
  store.create_volume(src, sections.shape, "float32", (40, 4, 4)).write(sections)
  block = _block_config()
  config = pipeline.VolumeConfig(block_size=FLAGS.block_size, overlap=2, pyramid_levels=2,
                                 stack=StackConfig(block=block))
  # With --compilation_cache, every process (inline included) goes through one persistent cache, so
  # workers load compiled functions instead of compiling them again; "fields == inline" checks that
  # this changes no bit. The first inline run includes compilation and is reported separately.
  if FLAGS.compilation_cache:
    compile_cache.enable(work / "xla_cache", min_compile_seconds=0)
  rows = []
  for i, (kind, workers) in enumerate((("inline", 1), ("inline", 1), ("processes", 1), ("processes", 2),
                                       ("dask", 2))):
    dst = str(work / f"dst_{i}_{kind}_{workers}")
    stats = jd.RunStats()
    t0 = time.perf_counter()
    with jd.make_executor(kind, workers) as ex:
      pipeline.align_volume(src, dst, config, executor=ex, progress=False, stats=stats)
    wall = time.perf_counter() - t0
    recs = jd.CompletionRecords(dst)
    task_s = sum(r.get("seconds", 0.0) for k in recs.keys() if isinstance(r := recs.get(k), dict))
    fields = store.open_volume(dst + "/fields").read()
    rows.append((kind, workers, wall, task_s, stats.executed, fields))
    logging.info("%s x%d: %.1f s", kind, workers, wall)
  rows[0] = ("inline (cold: compiles)",) + rows[0][1:]
  base = rows[2][2]
  print(f"\n### Throughput: align_volume, {FLAGS.sections} sections of {FLAGS.size}^2, blocks of "
        f"{FLAGS.block_size} (overlap 2), voting distance 3, aligner: {FLAGS.aligner}\n")
  print("| executor | workers | wall s | sections/s | vs processes x1 | sum of task s | tasks | fields == inline |")
  print("|---|---|---|---|---|---|---|---|")
  for kind, workers, wall, task_s, n, fields in rows:
    same = bool(np.array_equal(fields, rows[0][5]))
    print(f"| {kind} | {workers} | {wall:.1f} | {FLAGS.sections / wall:.3f} | {base / wall:.2f}x | {task_s:.1f} | "
          f"{n} | {same} |")


# ----------------------------------------------------------------------------------- memory


def memory(work: pathlib.Path) -> None:
  from jaxalign.volume import store
  n = FLAGS.big
  src, fld = str(work / "big_src"), str(work / "big_field")
  t0 = time.perf_counter()
  vol = store.create_volume(src, (1, n, n), "uint8", (40, 4, 4))
  fvol = store.create_volume(fld, (1, n, n, 2), "float32", (40, 4, 4))
  rng = np.random.default_rng(0)
  step = 1024
  for y in range(0, n, step):  # written in strips so this process never holds the whole section
    yy, xx = np.mgrid[y:y + step, 0:n].astype(np.float32)
    vol.write(rng.integers(1, 255, (step, n), dtype=np.uint8), 0, 0, ((y, y + step), (0, n)))
    f = np.stack([300 + 20 * np.sin(yy / 500), -250 + 20 * np.cos(xx / 700)], -1).astype(np.float32)
    fvol.write(f, 0, 0, ((y, y + step), (0, n)))
  logging.info("memory: wrote %d^2 inputs in %.1f s", n, time.perf_counter() - t0)
  baseline = _run_child(_rss_script(f"""
    import jax, jax.numpy as jnp
    from jaxalign.volume import chunked, store
    from jaxalign.ops import fields
    store.open_volume({src!r}); store.open_volume({fld!r})
    fields.warp(jnp.zeros((64, 64)), jnp.zeros((64, 64, 2))).block_until_ready()
  """))
  rows = [("imports + open volumes (baseline)", None, baseline)]
  for c in [int(c) for c in FLAGS.chunks]:
    out = str(work / f"out_{c}")
    res = _run_child(_rss_script(f"""
      from jaxalign.volume import chunked, store
      src, fld = store.open_volume({src!r}), store.open_volume({fld!r})
      out = store.create_volume({out!r}, (1, {n}, {n}), 'uint8', (40, 4, 4))
      import numpy as np
      cfg = chunked.ChunkConfig(chunk={c}, overlap=0, render_margin=32, batch=1)
      chunked.render_chunked(chunked.VolumeSource(src, 0), chunked.VolumeSource(fld, 0), config=cfg,
                             sink=lambda core, a: out.write(np.clip(np.rint(a), 0, 255).astype(np.uint8), 0, 0, core))
    """))
    rows.append((f"chunked render, chunk {c}", c, res))
  out = str(work / "out_whole")
  res = _run_child(_rss_script(f"""
    import numpy as np, jax.numpy as jnp
    from jaxalign.volume import store
    from jaxalign.stack.render import render
    src, fld = store.open_volume({src!r}), store.open_volume({fld!r})
    out = store.create_volume({out!r}, (1, {n}, {n}), 'uint8', (40, 4, 4))
    a = np.asarray(render(src.read(0)[None].astype(np.float32), fld.read(0)[None], batch_size=1))[0]
    out.write(np.clip(np.rint(a), 0, 255).astype(np.uint8), 0)
  """))
  rows.append(("whole-section render (ja.render)", n, res))
  # Correctness of the streamed output against the whole-section one (same run).
  whole = store.open_volume(out).read(0).astype(np.int16)
  diffs = {c: int(np.abs(store.open_volume(str(work / f"out_{c}")).read(0).astype(np.int16) - whole).max())
           for c in [int(c) for c in FLAGS.chunks]}
  section_mib = n * n * (1 + 8) / 2 ** 20
  print(f"\n### Peak memory per worker: rendering one {n}^2 section (uint8 image + float32 field "
        f"= {section_mib:.0f} MiB of input), displacements ~300 px\n")
  print("| what | chunk px | peak RSS MiB | above baseline MiB | wall s | max |diff| vs whole (grey levels) |")
  print("|---|---|---|---|---|---|")
  for name, c, r in rows:
    above = r["peak_mib"] - baseline["peak_mib"]
    d = diffs.get(c, "-") if c != n else 0
    print(f"| {name} | {c or '-'} | {r['peak_mib']:.0f} | {above:.0f} | {r['seconds']:.1f} | {d} |")


# ----------------------------------------------------------------------------------- stages


STITCH_T = (37, -45)  # closed-form stitch translation of the `stages` benchmark, px
BLOCK_D = (23, -31)  # closed-form block field of section 1 (a shifted copy of section 0), px


def _smooth_field(y0: int, y1: int, n: int, ty: float, tx: float, amp: float, phase: float) -> np.ndarray:
  """Rows [y0, y1) of a smooth field `[rows, n, 2]` (translation + slow sines), float32."""
  yy, xx = np.mgrid[y0:y1, 0:n].astype(np.float32)
  return np.stack([ty + amp * np.sin(yy / 900 + phase) * np.cos(xx / 1300),
                   tx + amp * np.cos(yy / 1100 - phase) + 0.5 * amp * np.sin(xx / 700)], -1)


def stages(work: pathlib.Path) -> None:
  """Peak memory of one worker for the block, stitch and section (composition with decay) stages on
  n^2 sections, chunked vs whole, with correctness against the whole-section result (decay) or a
  closed form (block: section 1 is section 0 shifted by BLOCK_D; stitch: block N+1 fields
  next(q) = prev(q - T) - T, so the stitch field is T)."""
  from jaxalign.volume import store
  rng = np.random.default_rng(0)
  rows = []
  for n in [int(v) for v in FLAGS.stage_sizes]:
    d = work / f"stages_{n}"
    bf = store.create_volume(str(d / "block"), (1, n, n, 2), "float32", (40, 4, 4), kind="field")
    st = store.create_volume(str(d / "stitches"), (2, n, n, 2), "float32", (40, 4, 4), kind="field")
    sec = store.create_volume(str(d / "sections"), (2, n, n), "uint8", (40, 4, 4))
    prev = store.create_volume(str(d / "prev"), (2, n, n, 2), "float32", (40, 4, 4), kind="field")
    nxt = store.create_volume(str(d / "next"), (2, n, n, 2), "float32", (40, 4, 4), kind="field")
    from scipy import ndimage
    for y in range(0, n, 1024):  # in strips: this process never holds a whole section
      y1 = min(y + 1024, n)
      bf.write(_smooth_field(y, y1, n, 5.0, -7.0, 4.0, 0.3), 0, 0, ((y, y1), (0, n)))
      st.write(_smooth_field(y, y1, n, 37.0, -45.0, 3.0, 1.0), 0, 0, ((y, y1), (0, n)))
      st.write(_smooth_field(y, y1, n, -22.0, 18.0, 2.0, 2.0), 1, 0, ((y, y1), (0, n)))
      for i in range(2):
        tex = ndimage.gaussian_filter(rng.standard_normal((y1 - y, n)), 1.5)
        sec.write(np.clip(128 + 40 * tex / tex.std(), 1, 255).astype(np.uint8), i, 0, ((y, y1), (0, n)))
        prev.write(_smooth_field(y, y1, n, 8.0 + 3 * i, -6.0, 2.5, float(i)), i, 0, ((y, y1), (0, n)))
        # next(q) = prev(q - T) - T in closed form (the prev formula evaluated at shifted rows/cols)
        f = _smooth_field(y - STITCH_T[0], y1 - STITCH_T[0], n + abs(STITCH_T[1]), 8.0 + 3 * i, -6.0, 2.5, float(i))
        xs = np.arange(n) - STITCH_T[1]  # columns q_x - T_x >= 0 here (T_x < 0)
        nxt.write(f[:, xs] - np.array(STITCH_T, np.float32), i, 0, ((y, y1), (0, n)))
    blk = store.create_volume(str(d / "blk_sections"), (2, n, n), "uint8", (40, 4, 4))
    for y in range(0, n, 1024):  # section 1 (r) = section 0 (r - BLOCK_D): its block field is BLOCK_D
      y1 = min(y + 1024, n)
      blk.write(sec.read(0, 0, ((y, y1), (0, n))), 0, 0, ((y, y1), (0, n)))
      src = sec.read(0, 0, ((max(0, y - BLOCK_D[0]), max(0, min(n, y1 - BLOCK_D[0]))), (0, n)))
      strip = np.zeros((y1 - y, n), np.uint8)
      r0 = max(0, y - BLOCK_D[0]) - (y - BLOCK_D[0])
      cols = np.arange(n) - BLOCK_D[1]
      ok = (cols >= 0) & (cols < n)
      strip[r0:r0 + src.shape[0]][:, ok] = src[:, cols[ok]]
      blk.write(strip, 1, 0, ((y, y1), (0, n)))
    c = FLAGS.stage_chunk
    head = f"""
      import numpy as np
      from jaxalign.volume import store
      from jaxalign.volume.chunked import ChunkConfig, VolumeSource, compose_with_decay_chunked, stitch_field_chunked
      from jaxalign.stack.block import BlockConfig
      from tests.references import phase_aligner
      d = {str(d)!r}
      bf, st = store.open_volume(d + '/block'), store.open_volume(d + '/stitches')
      sec, prev, nxt = store.open_volume(d + '/sections'), store.open_volume(d + '/prev'), store.open_volume(d + '/next')
      cfg = ChunkConfig(chunk={c}, overlap=64, coarse_levels=3)
      bc = BlockConfig(aligner=phase_aligner)
      blk = store.open_volume(d + '/blk_sections')
    """
    runs = {
      "block chunked": f"""
        from jaxalign.volume.chunked import align_block_chunked
        out = store.create_volume(d + '/block_chunked', (2, {n}, {n}, 2), 'float32', (40, 4, 4), kind='field')
        align_block_chunked([VolumeSource(blk, i) for i in range(2)], voting_distance=1, config=cfg, block_config=bc,
                            sink=lambda z, core, f: out.write(f, z, 0, core))
      """,
      "decay chunked": f"""
        out = store.create_volume(d + '/decay_chunked', (1, {n}, {n}, 2), 'float32', (40, 4, 4), kind='field')
        compose_with_decay_chunked(VolumeSource(bf, 0), [VolumeSource(st, 0), VolumeSource(st, 1)], [5.0, 30.0],
                                   config=cfg, sink=lambda core, f: out.write(f, 0, 0, core))
      """,
      "stitch chunked": f"""
        out = store.create_volume(d + '/stitch_chunked', (1, {n}, {n}, 2), 'float32', (40, 4, 4), kind='field')
        stitch_field_chunked([VolumeSource(sec, i) for i in range(2)], [VolumeSource(prev, i) for i in range(2)],
                             [VolumeSource(nxt, i) for i in range(2)], config=cfg, block_config=bc,
                             sink=lambda core, f: out.write(f, 0, 0, core))
      """}
    if n <= FLAGS.whole_max:
      runs["block whole"] = f"""
        from jaxalign.stack.chain import BlockPlan, align_block_task
        out = store.create_volume(d + '/block_whole', (2, {n}, {n}, 2), 'float32', (40, 4, 4), kind='field')
        out.write(np.asarray(align_block_task(blk.read().astype(np.float32), BlockPlan(0, 0, 2, 0, 0, 2),
                                              voting_distance=1, config=bc)), slice(0, 2))
      """
      runs["decay whole"] = f"""
        import jax.numpy as jnp
        from jaxalign.stack.chain import compose_with_decay
        out = store.create_volume(d + '/decay_whole', (1, {n}, {n}, 2), 'float32', (40, 4, 4), kind='field')
        out.write(np.asarray(compose_with_decay(jnp.asarray(bf.read(0)), jnp.asarray(st.read()),
                  jnp.asarray([5.0, 30.0], jnp.float32), decay_distance=100.0, blur_rate=0.2)), 0)
      """
      runs["stitch whole"] = f"""
        from jaxalign.stack.chain import stitch_field
        out = store.create_volume(d + '/stitch_whole', (1, {n}, {n}, 2), 'float32', (40, 4, 4), kind='field')
        out.write(np.asarray(stitch_field(sec.read().astype(np.float32), prev.read(), nxt.read(), config=bc)), 0)
      """
    runs = {k: v for k, v in runs.items() if k.split()[0] in FLAGS.stage_names}
    for name, body in runs.items():
      r = _run_child(_rss_script(textwrap.dedent(head) + textwrap.dedent(body)))
      logging.info("stages %d %s: %s", n, name, r)
      rows.append((n, name, r))
    err = {}
    for y in range(0, n, 1024):  # compared in strips too (away from the rows/columns section 1 lacks)
      box = ((y, min(y + 1024, n)), (0, n))
      inner = (slice(max(0, BLOCK_D[0] + 64 - y), None), slice(64, n - abs(BLOCK_D[1]) - 64))
      for kind in ("block chunked", "block whole"):
        if kind in runs:
          f = store.open_volume(str(d / kind.replace(" ", "_"))).read(1, 0, box)[inner]
          err[kind] = max(err.get(kind, 0.0), float(np.abs(f - np.array(BLOCK_D)).max(initial=0.0)))
      if "stitch" not in FLAGS.stage_names:
        continue
      t = store.open_volume(str(d / "stitch_chunked")).read(0, 0, box)
      err["stitch chunked"] = max(err.get("stitch chunked", 0.0), float(np.abs(t - np.array(STITCH_T)).max()))
      if n <= FLAGS.whole_max and "decay" in FLAGS.stage_names:
        a = store.open_volume(str(d / "decay_chunked")).read(0, 0, box)
        b = store.open_volume(str(d / "decay_whole")).read(0, 0, box)
        err["decay chunked"] = max(err.get("decay chunked", 0.0), float(np.abs(a - b).max()))
        t = store.open_volume(str(d / "stitch_whole")).read(0, 0, box)
        err["stitch whole"] = max(err.get("stitch whole", 0.0), float(np.abs(t - np.array(STITCH_T)).max()))
    rows[-len(runs):] = [(n, name, dict(r, err=err.get(name))) for n, name, r in rows[-len(runs):]]
  base = _run_child(_rss_script("""
    import jax, jax.numpy as jnp
    from jaxalign.volume import chunked, store
    from jaxalign.stack import chain
    from jaxalign.ops import fields
    fields.warp(jnp.zeros((64, 64)), jnp.zeros((64, 64, 2))).block_until_ready()
  """))
  print(f"\n### Peak memory per worker: block, stitch and section (composition with decay) stages, chunk "
        f"{FLAGS.stage_chunk} px, overlap 64\n")
  print(f"Baseline (imports + one tiny warp): {base['peak_mib']:.0f} MiB.\n")
  print("| section px | stage | peak RSS MiB | above baseline MiB | wall s | max error px |")
  print("|---|---|---|---|---|---|")
  for n, name, r in rows:
    e = r.get("err")
    print(f"| {n} | {name} | {r['peak_mib']:.0f} | {r['peak_mib'] - base['peak_mib']:.0f} | {r['seconds']:.1f} | "
          f"{'-' if e is None else f'{e:.2e}'} |")
  print("\nmax error: decay chunked vs decay whole (same section); stitch vs the closed-form T = "
        f"{STITCH_T} px; block: section 1's field vs the closed form {BLOCK_D} px, 64 px from the border "
        "where section 1 has data (FFT stand-in aligner, exact for integer shifts).")


# ----------------------------------------------------------------------------------- projection


def projection(work: pathlib.Path) -> None:
  import jax
  from jaxalign.align.pair import PairConfig, align_pair
  from tests.references import texture_stack
  c = FLAGS.pair_chunk
  secs = texture_stack(np.array([[0, 0], [3, -2]]), size=c)
  b = 1
  t0 = time.perf_counter()
  jax.block_until_ready(align_pair(secs[1], secs[0], config=PairConfig()))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(FLAGS.repeat):
    src = secs[1] * (1.0 + 1e-3 * (i + 1))  # new inputs each time: nothing can be reused
    t0 = time.perf_counter()
    jax.block_until_ready(align_pair(src, secs[0], config=PairConfig()))
    times.append(time.perf_counter() - t0)
  per_pair = float(np.median(times)) / b
  per_px = per_pair / (c * c)
  # Chunks overlap: each core of (chunk - 2 overlap)^2 costs a whole chunk. At FAFB scale chunks of
  # 1024 px with 64 px overlap -> (1024 / 896)^2 = 1.31 overhead.
  chunk_overhead = (1024 / 896) ** 2
  # Each interface (every block_size - overlap sections) aligns its `overlap` shared sections once more.
  stitch_per_section = FAFB_OVERLAP / (FAFB_BLOCK - FAFB_OVERLAP)
  pairs = FAFB_SECTIONS * (FAFB_VOTING + stitch_per_section)
  # The measured align_pair time already includes its coarser MIP levels (5 levels: 32..512 nm).
  px = pairs * FAFB_PX_PER_SECTION_32NM * chunk_overhead
  core_hours = px * per_px / 3600
  print("\n### FAFB-scale projection from the measured per-chunk cost\n")
  print(f"Measured: `align_pair` (default PairConfig: Online Field Finetuner, no model), one pair "
        f"of {c}^2 px on this 2-core CPU: {per_pair:.2f} s per pair = {per_px * 1e6:.2f} us/px "
        f"(median of {FLAGS.repeat}; compile + first run {compile_s:.1f} s).\n")
  print("| quantity | value |")
  print("|---|---|")
  print(f"| sections | {FAFB_SECTIONS} |")
  print(f"| px per section at 32 nm (106 TB / 7,062 sections at 4 nm, / 64) | {FAFB_PX_PER_SECTION_32NM:.2e} |")
  print(f"| pair alignments (voting {FAFB_VOTING} + stitches, blocks {FAFB_BLOCK}/{FAFB_OVERLAP}) | {pairs:.0f} |")
  print(f"| px aligned at 32 nm incl. chunk overlap x{chunk_overhead:.2f} (coarser levels are inside the per-px cost) | {px:.2e} |")
  print(f"| projected cost on this CPU | {core_hours:.3g} 2-core-machine hours = {core_hours / 24 / 365:.1f} machine-years |")
  print(f"| paper (FAFB v15, SEAMLeSS + finetuner on GPUs) | 240 h x 128 A100 = {PAPER_GPU_HOURS} GPU-hours |")
  print(f"| ratio projected / paper (CPU machine-hours vs A100-hours) | {core_hours / PAPER_GPU_HOURS:.1f}x |")


# ----------------------------------------------------------------------------------- seams


def seams(work: pathlib.Path) -> None:
  """Chunked vs whole-section block alignment of real ssTEM sections with a large known distortion."""
  import jax.numpy as jnp
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from PIL import Image
  from jaxalign.stack.block import align_block
  from jaxalign.volume.chunked import ChunkConfig, align_block_chunked
  from jaxalign.ops.fields import warp
  folder = REPO / ".." / "shared" / "data" / "em" / "isbi2012_train"
  if not folder.is_dir():
    logging.warning("seams: %s absent, skipped", folder)
    return
  z, n = FLAGS.seam_sections, 512
  raw = np.asarray(Image.open(folder / "000.png"), np.float32) / 255.0
  yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
  # Known distortions of one section (so the exact answer is known): translations of tens of px
  # (larger than the chunk overlap) plus a 3 px smooth warp. Aligning section i back needs invert(g_i).
  from jaxalign.ops.fields import invert
  gs = [np.zeros((n, n, 2), np.float32)] + [
      np.stack([FLAGS.seam_step * i + 3 * np.sin(xx / 90 + i), -0.75 * FLAGS.seam_step * i + 3 * np.cos(yy / 70 - i)],
               -1) for i in range(1, z)]
  sections = np.stack([np.asarray(warp(jnp.asarray(raw), jnp.asarray(g))) for g in gs])  # 0 outside = no data
  truth = np.stack([np.asarray(invert(jnp.asarray(g))) for g in gs])
  cfg = ChunkConfig(chunk=FLAGS.seam_chunk, overlap=FLAGS.seam_overlap, coarse_levels=FLAGS.seam_coarse)
  t0 = time.perf_counter()
  block = _block_config()
  # The whole-section answer does not depend on the chunk flags: kept in --workdir across runs.
  cached = work / f"seams_whole_{FLAGS.aligner}_{z}_{FLAGS.seam_step:g}.npy"
  if FLAGS.workdir and cached.exists():
    whole = np.load(cached)
  else:
    whole = np.asarray(align_block(sections, voting_distance=3, config=block, progress=False))
    np.save(cached, whole)
  t_whole = time.perf_counter() - t0
  t0 = time.perf_counter()
  chunked = align_block_chunked(sections, voting_distance=3, config=cfg, block_config=block)
  t_chunk = time.perf_counter() - t0
  from jaxalign.volume.chunking import split
  specs = split((n, n), cfg.chunk, cfg.overlap)
  seam = np.zeros((n, n), bool)
  for s_ in specs:
    for sl, ax in ((s_.core[0], 0), (s_.core[1], 1)):
      for b in (sl.start, sl.stop):
        if 0 < b < n:
          idx = [slice(None), slice(None)]
          idx[ax] = slice(max(b - 8, 0), b + 8)
          seam[tuple(idx)] = True
  diff = np.linalg.norm(chunked - whole, axis=-1)[1:]
  valid = np.stack([np.asarray(warp(jnp.asarray((sections[i] != 0).astype(np.float32)), jnp.asarray(truth[i])))
                    for i in range(z)])[1:] > 0.99  # pixels whose true source lies inside the section
  epe_w = np.linalg.norm(whole - truth, axis=-1)[1:]
  epe_c = np.linalg.norm(chunked - truth, axis=-1)[1:]
  far_m, near_m = valid & ~seam[None], valid & seam[None]
  print(f"\n### Chunked vs whole-section block alignment (ISBI 2012 section 0 and {z - 1} known distortions "
        f"of it, 512^2, translations up to {FLAGS.seam_step * (z - 1):g} px + 3 px smooth warp; chunks {cfg.chunk} px, "
        f"overlap {cfg.overlap}, re-centring at 1/{2 ** cfg.coarse_levels})\n")
  print("| pixels (sections 1-, true source inside) | EPE whole median / p95 / p99 px | EPE chunked median / p95 / "
        "p99 px | chunked - whole median / p95 / p99 px | share of chunked - whole > 0.5 px |")
  print("|---|---|---|---|---|")

  def stats(a, m):
    return " / ".join(f"{np.percentile(a[m], q):.3f}" for q in (50, 95, 99))

  for name, m in (("> 8 px from a chunk seam", far_m), ("within 8 px of a seam", near_m)):
    print(f"| {name} | {stats(epe_w, m)} | {stats(epe_c, m)} | {stats(diff, m)} | {np.mean(diff[m] > 0.5):.3f} |")
  good = valid & (epe_w < 1.0)
  print(f"\nWhere the whole-section alignment converged (EPE < 1 px, {good.mean():.1%} of pixels), chunked - whole: "
        f"median / p95 / p99 {stats(diff, good & ~seam[None])} px away from seams, "
        f"{stats(diff, good & seam[None])} px near them.")
  print(f"\nAligner: {FLAGS.aligner}.")
  print(f"\nTime: whole {t_whole:.0f} s, chunked {t_chunk:.0f} s ({len(specs)} chunks; includes compilation).")
  fig, ax = plt.subplots(1, 3, figsize=(15, 5))
  ren = np.asarray(warp(jnp.asarray(sections[-1]), jnp.asarray(chunked[-1])))
  ax[0].imshow(ren, cmap="gray")
  ax[0].set_title("section 3 rendered with chunked fields (core borders red)")
  for s_ in specs:
    ax[0].axhline(s_.core[0].start, color="r", lw=0.5)
    ax[0].axvline(s_.core[1].start, color="r", lw=0.5)
  im = ax[1].imshow(diff[-1], cmap="magma", vmin=0, vmax=max(0.5, float(np.percentile(diff, 99.9))))
  ax[1].set_title("|field chunked - whole|, px (section 3)")
  fig.colorbar(im, ax=ax[1], fraction=0.046)
  im = ax[2].imshow(ren - np.asarray(warp(jnp.asarray(sections[-1]), jnp.asarray(whole[-1]))), cmap="coolwarm",
                    vmin=-0.2, vmax=0.2)
  ax[2].set_title("rendered chunked - whole")
  fig.colorbar(im, ax=ax[2], fraction=0.046)
  for a in ax:
    a.set_axis_off()
  fig.tight_layout()
  fig.savefig(FLAGS.figure, dpi=80)
  print(f"\nFigure: {FLAGS.figure}")


def main(argv):
  del argv
  print(f"Machine: {os.cpu_count()}-core CPU VM, no GPU; 1-min load average at start "
        f"{os.getloadavg()[0]:.1f} (the VM is shared, so absolute times are noisy).")
  work = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
  work.mkdir(parents=True, exist_ok=True)
  try:
    if FLAGS.mode in ("all", "throughput"):
      throughput(work)
    if FLAGS.mode in ("all", "memory"):
      memory(work)
    if FLAGS.mode in ("all", "stages"):
      stages(work)
    if FLAGS.mode in ("all", "projection"):
      projection(work)
    if FLAGS.mode in ("all", "seams"):
      seams(work)
  finally:
    if FLAGS.workdir is None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
