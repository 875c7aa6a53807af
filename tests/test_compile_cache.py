"""The persistent compilation cache the command line turns on (jaxalign.compile_cache).

Each case runs a fresh interpreter (JAX's cache configuration is process-wide) and counts JAX's own
cache events: a second process compiling the same program must hit the cache, and `off` must leave
no cache at all.
"""

import os
import subprocess
import sys

from jaxalign import compile_cache

SCRIPT = """
import jax, jax.numpy as jnp
from jaxalign import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
print("dir", compile_cache.enable(min_compile_seconds=0))
jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(3)).block_until_ready()
print("hits", sum(e.endswith("cache_hits") for e in events), "misses", sum(e.endswith("cache_misses") for e in events))
"""


def _run(env_value, home):
  env = dict(os.environ, **{compile_cache.ENV: env_value, "XDG_CACHE_HOME": str(home)})
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True).stdout
  words = out.split()
  return words[1], int(words[words.index("hits") + 1]), int(words[words.index("misses") + 1])


def test_second_process_hits_the_cache(tmp_path):
  folder = tmp_path / "xla"
  where, hits, misses = _run(str(folder), tmp_path / "home")
  assert where == str(folder) and hits == 0 and misses >= 1
  assert any(folder.iterdir())
  _, hits, misses = _run(str(folder), tmp_path / "home")
  assert hits >= 1 and misses == 0


def test_off_and_default_folder(tmp_path):
  where, hits, _ = _run("off", tmp_path / "home")
  assert where == "None" and hits == 0 and not (tmp_path / "home").exists()
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "home"))
  env.pop(compile_cache.ENV, None)
  out = subprocess.run([sys.executable, "-c", "from jaxalign import compile_cache; print(compile_cache.enable())"],
                       env=env, capture_output=True, text=True, check=True).stdout.strip()
  assert out == str(tmp_path / "home" / "jaxalign" / "xla")


def _flags_after(xla_flags, jaxlib_version, monkeypatch):
  import jaxlib
  monkeypatch.setattr(jaxlib, "__version__", jaxlib_version)
  if xla_flags is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", xla_flags)
  applied = compile_cache.quick_cpu_compile()
  return applied, os.environ.get("XLA_FLAGS")


def test_quick_cpu_compile_flags(monkeypatch):
  first, last = compile_cache.CPU_XLA_FLAGS_JAXLIB
  known = f"{last[0]}.{last[1]}.1"
  applied, flags = _flags_after(None, known, monkeypatch)
  assert applied and flags.split() == list(compile_cache.CPU_XLA_FLAGS)
  # Idempotent, and other flags the user set are kept.
  applied, flags = _flags_after("--xla_dump_to=/tmp/x " + " ".join(compile_cache.CPU_XLA_FLAGS), known, monkeypatch)
  assert flags.split() == ["--xla_dump_to=/tmp/x", *compile_cache.CPU_XLA_FLAGS]
  # The user's own choice for the same option wins.
  option = compile_cache.CPU_XLA_FLAGS[0].split("=")[0]
  applied, flags = _flags_after(f"{option}=true", known, monkeypatch)
  assert flags == f"{option}=true"
  # A jaxlib where the flags were not measured (XLA aborts on unknown flags) is left alone.
  applied, flags = _flags_after(None, f"{last[0]}.{last[1] + 1}.0", monkeypatch)
  assert not applied and flags is None
  applied, flags = _flags_after(None, f"{first[0]}.{first[1] - 1}.9", monkeypatch)
  assert not applied and flags is None


def test_quick_cpu_compile_flags_are_known_to_this_jaxlib():
  # XLA aborts the whole process on an unknown flag: a fresh interpreter must compile and run with them.
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  script = ("from jaxalign import compile_cache; import os, jax, jax.numpy as jnp;"
            "print(compile_cache.quick_cpu_compile(), os.environ.get('XLA_FLAGS'));"
            "print(float(jax.jit(lambda x: jnp.sum(jnp.sin(x)))(jnp.zeros(4))))")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "0.0"
