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
