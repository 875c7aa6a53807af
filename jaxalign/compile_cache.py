"""JAX's persistent compilation cache, so that a second run of the same shapes does not compile again.

Compiling the pair aligner's coarse-to-fine program takes 10-30 s on a 2-core CPU, often more than
aligning a small stack. JAX can keep compiled programs on disk (`jax_compilation_cache_dir`).

* The command line turns it on for every command (`enable()` with no folder): in
  `$JAXALIGN_COMPILATION_CACHE` (a folder, or `off`), else `$XDG_CACHE_HOME/jaxalign/xla`
  (`~/.cache/jaxalign/xla`), for programs that took at least `MIN_COMPILE_SECONDS` to compile.
* `jaxalign align/render --compilation_cache=DIR` (`enable(DIR, min_compile_seconds=0)`) puts *every*
  jitted function through a folder shared with all workers, so N workers do not compile the same
  functions N times and each executes the program the first compile produced.
* `quick_cpu_compile()` (also called by the command line first) turns off XLA's CPU fusion emitters,
  which compile our programs about 40 % slower for the same run time.
* Library users call `enable()` / `quick_cpu_compile()` themselves: importing jaxalign never changes
  JAX's configuration.

`enable()` also exports JAX's own variables (`env()`), so processes the run starts afterwards
(spawned workers, Dask LocalCluster workers) use the same cache; remote Dask workers need the same
variables and a shared folder.
"""

from __future__ import annotations

import os
import pathlib

from absl import logging

ENV = "JAXALIGN_COMPILATION_CACHE"
OFF = ("off", "0", "none", "")
# Programs that compile faster than this (s) are not worth a disk entry (JAX's own default is 1 s).
MIN_COMPILE_SECONDS = 0.5


# XLA flags for CPU runs. The fusion emitters (XLA's CPU default in recent jaxlibs) compile the
# finetuner's loss and gradient programs ~40 % slower than the classic emitters, with the same run time.
# Measured on 2 cores, first call / compiled call: an 8-section ISBI stack 29.7 / 5.2 s -> 20.9 / 5.0 s;
# the DOLW7 fold pair's pair program compiles in 10.5 s instead of 17 s.
CPU_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
# XLA aborts the process on a flag it does not know, so they are set only on the jaxlib versions
# where they were measured: [first, last] (major, minor).
CPU_XLA_FLAGS_JAXLIB = ((0, 10), (0, 10))


def quick_cpu_compile() -> bool:
  """Adds `CPU_XLA_FLAGS` to `$XLA_FLAGS` (leaving any the user set for the same options); returns
  whether they apply. Takes effect only if called before JAX's first computation in this process, and
  in processes started afterwards (they inherit the environment). GPU/TPU programs are unaffected."""
  import jaxlib  # deferred: version check only, no backend is started
  version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
  first, last = CPU_XLA_FLAGS_JAXLIB
  if not first <= version <= last:
    return False
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return True


def default_dir() -> pathlib.Path:
  """`$XDG_CACHE_HOME/jaxalign/xla`, else `~/.cache/jaxalign/xla`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "jaxalign" / "xla"


def env(path: str | os.PathLike, *, min_compile_seconds: float = MIN_COMPILE_SECONDS) -> dict[str, str]:
  """JAX's environment variables that turn its persistent cache on at `path` in any process started
  with them (programs that took at least `min_compile_seconds` to compile; 0 = every program)."""
  out = {"JAX_COMPILATION_CACHE_DIR": str(path),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(float(min_compile_seconds))}
  if min_compile_seconds <= 0:
    out["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  return out


def enable(path: str | os.PathLike | None = None, *,
           min_compile_seconds: float = MIN_COMPILE_SECONDS) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache here and in processes started afterwards; returns
  its folder, or None when it is turned off.

  Args:
    path: the cache folder; None = `$JAXALIGN_COMPILATION_CACHE` (where `off` disables it), else
      `default_dir()`.
    min_compile_seconds: only programs that took at least this long (s) to compile are stored
      (0 = every program, of any size).
  """
  import jax  # deferred: the command line decides before JAX is configured
  if path is None:
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() in OFF:
      return None
    path = value or default_dir()
  folder = pathlib.Path(path).expanduser().absolute()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    # A read-only home is no reason to stop a run: it only compiles as before.
    logging.warning("compilation cache disabled: cannot create %s (%s)", folder, e)
    return None
  variables = env(folder, min_compile_seconds=min_compile_seconds)
  os.environ.update(variables)
  os.environ[ENV] = str(folder)
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" in variables:
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return folder
