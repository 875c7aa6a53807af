"""`jaxalign view --output=DIR [--raw=VOL] [--aligned=VOL] [--field=VOL]`: look at volumes in neuroglancer.

Copies the given jaxalign volumes (any format, every MIP level) to neuroglancer_precomputed under
DIR/raw, DIR/aligned and DIR/field, writes DIR/state.json, and prints a neuroglancer state and a
link to https://neuroglancer-demo.appspot.com whose layers read `precomputed://http://HOST:PORT/<name>`.
Neuroglancer fetches from the browser, so DIR must be served over http with CORS headers:

    jaxalign view --serve --output=DIR --port=8000        (or: npx http-server DIR -p 8000 --cors)

The field layer shows |field| (px) through a shader. All inputs are checked (present, readable,
same Z/H/W and resolution, finite fields, non-empty) before anything is written; the output is
built in a staging folder and moved into place at the end.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import pathlib
import shutil
import sys
import urllib.parse

import numpy as np
from absl import flags
from tqdm.auto import tqdm

from jaxalign.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "folder for the neuroglancer_precomputed copies and state.json")
flags.DEFINE_string("raw", None, "raw (unaligned) image volume")
flags.DEFINE_string("aligned", None, "aligned image volume")
flags.DEFINE_string("field", None, "field volume [Z, H, W, 2] (px, (dy, dx))")
flags.DEFINE_string("host", "localhost", "host name the layers' URLs use")
flags.DEFINE_integer("port", 8000, "port the layers' URLs use (and --serve listens on)")
flags.DEFINE_boolean("serve", False, "serve --output over http with CORS headers (blocks; Ctrl-C stops)")
flags.DEFINE_boolean("progress", True, "show progress bars")
flags.DEFINE_boolean("overwrite", False, "replace an existing --output written by jaxalign view")

NEUROGLANCER_APP = "https://neuroglancer-demo.appspot.com"
STATE_FILE = "state.json"
LAYERS = ("raw", "aligned", "field")
# Field layer shader: grey level = |field| / scale (px); scale adjustable in the layer panel.
FIELD_SHADER = """#uicontrol float scale slider(min=0.5, max=50, default=10)
void main() {
  float dy = getDataValue(0);
  float dx = getDataValue(1);
  emitGrayscale(clamp(length(vec2(dy, dx)) / scale, 0.0, 1.0));
}
"""
# neuroglancer coordinate spaces are in metres; volumes carry nm.
NM_PER_M = 1e9


def _open_inputs(paths: dict[str, str]):
  """Opens and cross-checks the input volumes; returns name -> Volume."""
  from jaxalign import io
  vols = {}
  for name, path in paths.items():
    if not os.path.exists(path) and "://" not in path:
      raise InputError(f"--{name}: missing path {path}")
    vol = io.open_volume(path)
    want_field = name == "field"
    if vol.is_field != want_field:
      raise InputError(f"--{name}: {path} holds a {vol.kind} volume, expected "
                       f"{'a field' if want_field else 'an image'} volume")
    shape = vol.shape(0)
    if 0 in shape:
      raise InputError(f"--{name}: {path} is empty (shape {shape})")
    if want_field:
      # fields are checked whole before anything is written (no half-copied output on bad input)
      for level in range(vol.levels):
        for z in range(shape[0]):
          if not np.all(np.isfinite(vol.read(z, level))):
            raise InputError(f"--field: {path} has NaN or Inf values in section {z} (level {level})")
    else:
      # the coarsest level is small and has data wherever level 0 has (mean pyramid)
      top = vol.levels - 1
      if not np.any(vol.read(None, top)):
        raise InputError(f"--{name}: {path} is empty (every pixel is 0 = no data)")
    vols[name] = vol
  ref_name = next(iter(vols))
  ref = vols[ref_name]
  for name, vol in vols.items():
    if vol.shape(0)[:3] != ref.shape(0)[:3]:
      raise InputError(f"--{name} shape {vol.shape(0)[:3]} does not match --{ref_name} shape {ref.shape(0)[:3]}")
    if not np.allclose(vol.resolution, ref.resolution):
      raise InputError(f"--{name} resolution {vol.resolution} nm does not match --{ref_name} "
                       f"resolution {ref.resolution} nm")
  return vols


def _copy(vol, dst: pathlib.Path, progress: bool) -> None:
  """Copies every level of `vol` to a neuroglancer_precomputed volume at `dst`, section by section."""
  from jaxalign import io
  shape = vol.shape(0)
  out = io.create_volume(str(dst), shape, vol.dtype, vol.resolution, format="neuroglancer_precomputed",
                         levels=vol.levels, kind=vol.kind)
  for level in range(vol.levels):
    for z in tqdm(range(shape[0]), desc=f"{dst.name} level {level}", unit="section", disable=not progress,
                  leave=False):
      out.write(vol.read(z, level), z, level)


def neuroglancer_state(names, shape, resolution, base_url: str) -> dict:
  """A neuroglancer viewer state showing the precomputed layers `names` served at `base_url`.

  Args:
    names: layer names among "raw", "aligned", "field" (also the folder names under base_url).
    shape: `[Z, H, W]` of level 0.
    resolution: nm per pixel (z, y, x).
    base_url: e.g. "http://localhost:8000".
  Returns:
    JSON-able dict (neuroglancer state).
  """
  z, h, w = shape[:3]
  layers = []
  for name in names:
    layer = {"type": "image", "name": name, "source": f"precomputed://{base_url}/{name}"}
    if name == "field":
      layer.update(shader=FIELD_SHADER, channelDimensions={"c^": [1, ""]}, visible=False)
    layers.append(layer)
  return {
    "dimensions": {"x": [resolution[2] / NM_PER_M, "m"], "y": [resolution[1] / NM_PER_M, "m"],
                   "z": [resolution[0] / NM_PER_M, "m"]},
    "position": [w / 2, h / 2, z / 2],
    "crossSectionScale": max(1.0, max(h, w) / 512),
    "layers": layers,
    "selectedLayer": {"layer": names[-1] if "field" not in names[-1:] else names[0], "visible": True},
    "layout": "4panel",
  }


def neuroglancer_link(state: dict) -> str:
  """The neuroglancer-demo URL that opens `state`."""
  return f"{NEUROGLANCER_APP}/#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")


class _CORSHandler(http.server.SimpleHTTPRequestHandler):
  """Static files with the CORS header neuroglancer's browser fetches need."""

  def end_headers(self):
    self.send_header("Access-Control-Allow-Origin", "*")
    super().end_headers()


def serve(folder: str, port: int) -> None:
  """Serves `folder` on `port` with CORS headers until interrupted."""
  if not os.path.isdir(folder):
    raise InputError(f"--output: missing folder {folder} to serve")
  handler = functools.partial(_CORSHandler, directory=folder)
  with http.server.ThreadingHTTPServer(("", port), handler) as httpd:
    sys.stdout.write(f"serving {folder} at http://localhost:{port} (Ctrl-C stops)\n")
    sys.stdout.flush()
    try:
      httpd.serve_forever()
    except KeyboardInterrupt:
      pass


def write_view(output: str, paths: dict[str, str], *, host: str = "localhost", port: int = 8000,
               overwrite: bool = False, progress: bool = True) -> dict:
  """Writes the precomputed copies and state.json into `output`; returns the state."""
  paths = {k: v for k, v in paths.items() if v}
  if not paths:
    raise InputError("give at least one of --raw, --aligned, --field")
  out = pathlib.Path(output).resolve()
  if out.exists():
    if not out.is_dir():
      raise InputError(f"--output {out} is an existing file")
    if any(out.iterdir()):
      if not (out / STATE_FILE).is_file():
        raise InputError(f"--output {out} is a non-empty folder not written by jaxalign view")
      if not overwrite:
        raise InputError(f"--output {out} exists; pass --overwrite to replace it")
  vols = _open_inputs(paths)
  names = [n for n in LAYERS if n in vols]
  ref = vols[names[0]]
  state = neuroglancer_state(names, ref.shape(0), ref.resolution, f"http://{host}:{port}")
  out.parent.mkdir(parents=True, exist_ok=True)
  stage = out.parent / f".{out.name}.partial-{os.getpid()}"
  shutil.rmtree(stage, ignore_errors=True)
  try:
    stage.mkdir()
    for name in names:
      _copy(vols[name], stage / name, progress)
    (stage / STATE_FILE).write_text(json.dumps(state, indent=1))
    if out.exists():
      shutil.rmtree(out)
    os.replace(stage, out)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return state


def main(argv):
  if len(argv) > 1:
    raise InputError(f"view takes no positional arguments, got {argv[1:]} (use --raw/--aligned/--field)")
  if not FLAGS.output:
    raise InputError("--output is required")
  if not 0 < FLAGS.port < 65536:
    raise InputError(f"--port must be in 1..65535, got {FLAGS.port}")
  paths = {"raw": FLAGS.raw, "aligned": FLAGS.aligned, "field": FLAGS.field}
  if FLAGS.serve and not any(paths.values()):
    serve(FLAGS.output, FLAGS.port)
    return 0
  state = write_view(FLAGS.output, paths, host=FLAGS.host, port=FLAGS.port, overwrite=FLAGS.overwrite,
                     progress=FLAGS.progress)
  out = pathlib.Path(FLAGS.output).resolve()
  sys.stdout.write(json.dumps(state, indent=1) + "\n\n"
                   f"state: {out / STATE_FILE}\n"
                   f"1. serve the folder (CORS needed): jaxalign view --serve --output={out} --port={FLAGS.port}\n"
                   f"   or: npx http-server {out} -p {FLAGS.port} --cors\n"
                   f"2. open: {neuroglancer_link(state)}\n")
  if FLAGS.serve:
    serve(str(out), FLAGS.port)
  return 0
