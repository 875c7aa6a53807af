"""Batches sharded over local devices (jaxalign.volume.sharding).

The 8-device case runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 so
this test process keeps its single CPU device. References: SciPy float64 `map_coordinates`
(independent of jaxalign's warp) and the same items computed on one device.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_batch(n=13, h=24, w=20, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.random((n, h, w)).astype(np.float32)
  fields = (rng.normal(size=(n, h, w, 2)) * 2.0).astype(np.float32)
  return images, fields


def scipy_warp(images, fields):
  from scipy.ndimage import map_coordinates
  n, h, w = images.shape
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  return np.stack([map_coordinates(images[i].astype(np.float64),
                                   [yy + fields[i, ..., 0], xx + fields[i, ..., 1]],
                                   order=1, mode="grid-constant", cval=0.0) for i in range(n)])


def test_sharded_map_one_device_pads_and_matches_scipy():
  from jaxalign.volume import sharding
  from jaxalign.ops.fields import warp
  images, fields = make_batch()
  out = sharding.sharded_map(warp, images, fields, batch_size=4)  # 13 items -> 4 calls, last padded
  assert out.shape == images.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, scipy_warp(images, fields), atol=2e-5)
  np.testing.assert_array_equal(sharding.pad_batch(np.arange(3), 5), [0, 1, 2, 2, 2])
  assert sharding.padded_size(13, 8) == 16 and sharding.padded_size(0, 8) == 8


SCRIPT = textwrap.dedent("""
  import json, sys
  import numpy as np, jax
  sys.path.insert(0, {repo!r})
  from tests.test_sharding import make_batch
  from jaxalign.volume import sharding
  from jaxalign.ops.fields import warp
  images, fields = make_batch()
  mesh8 = sharding.local_mesh()
  mesh1 = sharding.local_mesh(jax.local_devices()[:1])
  out8 = sharding.sharded_map(warp, images, fields, mesh=mesh8)              # 13 -> padded to 16
  out8b = sharding.sharded_map(warp, images, fields, mesh=mesh8, batch_size=5)  # 2 calls of 8
  out1 = sharding.sharded_map(warp, images, fields, mesh=mesh1)
  padded = [sharding.shard_batch(sharding.pad_batch(a, 16), mesh8) for a in (images, fields)]
  res = sharding.sharded_fn(warp, mesh8)(*padded)
  np.save({out!r}, np.stack([out8, out8b, out1]))
  print(json.dumps(dict(devices=len(jax.local_devices()), out_devices=len(res.sharding.device_set),
                        shard_rows=sorted({{s.data.shape[0] for s in res.addressable_shards}}))))
""")


def test_eight_cpu_devices_identical_to_one_device(tmp_path):
  out = str(tmp_path / "out.npy")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO), out=out)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info == {"devices": 8, "out_devices": 8, "shard_rows": [2]}
  out8, out8b, out1 = np.load(out)
  np.testing.assert_array_equal(out8, out1)
  np.testing.assert_array_equal(out8b, out1)
  images, fields = make_batch()
  np.testing.assert_allclose(out8, scipy_warp(images, fields), atol=2e-5)


def test_bad_batches_raise():
  from jaxalign.volume import sharding
  from jaxalign.errors import InputError
  from jaxalign.ops.fields import warp
  with pytest.raises(InputError, match="leading axis"):
    sharding.sharded_map(warp, np.zeros((3, 4, 4)), np.zeros((2, 4, 4, 2)))
  with pytest.raises(InputError, match="cannot pad"):
    sharding.pad_batch(np.zeros((5, 2)), 4)
