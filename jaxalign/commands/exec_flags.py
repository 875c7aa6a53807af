"""Executor flags shared by `jaxalign align` and `jaxalign render` (only one is imported per run)."""

from __future__ import annotations

from absl import flags

from jaxalign import compile_cache
from jaxalign.volume import distributed as jd


def define() -> None:
  flags.DEFINE_enum("executor", "inline", list(jd.EXECUTORS),
                    "where tasks run: this process, local worker processes, or Dask distributed")
  flags.DEFINE_integer("workers", None, "worker processes (processes / Dask LocalCluster; default: CPU count)")
  flags.DEFINE_string("scheduler", None, "Dask scheduler address (e.g. tcp://host:8786); default: a LocalCluster")
  flags.DEFINE_boolean("progress", True, "show progress bars")
  flags.DEFINE_string("compilation_cache", "",
                      "JAX persistent compilation cache folder shared by this process and all workers, "
                      "for every jitted function (workers load what the first compile produced instead "
                      "of compiling again; output stays bitwise identical)")


def executor() -> jd.Executor:
  f = flags.FLAGS
  if f.scheduler and f.executor != "dask":
    from jaxalign.errors import InputError
    raise InputError("--scheduler needs --executor=dask")
  if f.workers is not None and f.workers < 1:
    from jaxalign.errors import InputError
    raise InputError(f"--workers must be >= 1, got {f.workers}")
  if f.compilation_cache:
    compile_cache.enable(f.compilation_cache, min_compile_seconds=0)
  return jd.make_executor(f.executor, f.workers, f.scheduler)


def summary(what: str, stats: jd.RunStats, ex: jd.Executor, seconds: float) -> str:
  return (f"{what}: {stats.executed} task(s) run, {stats.skipped} already done (skipped), "
          f"{stats.batches} barrier(s), executor {ex.name} x{ex.workers}, {seconds:.1f} s")
