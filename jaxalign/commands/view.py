"""`jaxalign view --output=DIR [--raw=VOL] [--aligned=VOL] [--field=VOL] [--serve]`: look at volumes in neuroglancer.

Copies the given jaxalign volumes (any format, every MIP level) to neuroglancer_precomputed under
DIR/raw, DIR/aligned and DIR/field, writes DIR/state.json, and prints a neuroglancer state and a
link to https://neuroglancer-demo.appspot.com whose layers read `precomputed://http://HOST:PORT/<name>`.

`--serve` (after writing, or alone on an existing DIR) serves a *local* neuroglancer client over the
written layers, from one port, and prints its URL (`http://HOST:PORT/v/jaxalign/`): no internet is
needed, so it works on a cluster node (ssh -L PORT:localhost:PORT NODE, then open the URL on your
machine). The client is the one bundled with the `neuroglancer` Python package, an optional extra:

    pip install "jaxalign[view]"
    jaxalign view --serve --output=DIR --port=8000

`--serve --nolocal_client` serves only DIR's files with CORS headers, for the public web app's link
(equivalently: npx http-server DIR -p 8000 --cors); it needs no extra.

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
import socket
import sys
import threading
import time
import urllib.parse

import numpy as np
from absl import flags
from tqdm.auto import tqdm

from jaxalign.errors import InputError
from jaxalign.volume.store import neuroglancer_dimensions

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "folder for the neuroglancer_precomputed copies and state.json")
flags.DEFINE_string("raw", None, "raw (unaligned) image volume")
flags.DEFINE_string("aligned", None, "aligned image volume")
flags.DEFINE_string("field", None, "field volume [Z, H, W, 2] (px, (dy, dx))")
flags.DEFINE_string("host", "localhost", "host name the layers' URLs (and the served viewer's URL) use")
flags.DEFINE_integer("port", 8000, "port the layers' URLs use and --serve listens on "
                     "(--serve alone: 0 = any free port)")
flags.DEFINE_boolean("serve", False, "serve a local neuroglancer client over --output and print its URL "
                     "(works offline; needs pip install \"jaxalign[view]\"; blocks, Ctrl-C stops)")
flags.DEFINE_boolean("local_client", True, "with --serve: serve the bundled neuroglancer client too; "
                     "--nolocal_client serves only the data with CORS headers, for the public web app's link")
flags.DEFINE_string("bind_address", "127.0.0.1", "address --serve listens on (0.0.0.0: every interface; then "
                    "pass --host=<this machine's name>)")
flags.DEFINE_boolean("progress", True, "show progress bars")
flags.DEFINE_boolean("overwrite", False, "replace an existing --output written by jaxalign view")

NEUROGLANCER_APP = "https://neuroglancer-demo.appspot.com"
VIEW_EXTRA = 'pip install "jaxalign[view]"'
# Fixed viewer token: the served URL (http://HOST:PORT/v/jaxalign/) stays the same across restarts.
VIEWER_TOKEN = "jaxalign"
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


def _open_inputs(paths: dict[str, str]):
  """Opens and cross-checks the input volumes; returns name -> Volume."""
  from jaxalign.volume import store
  vols = {}
  for name, path in paths.items():
    if not os.path.exists(path) and "://" not in path:
      raise InputError(f"--{name}: missing path {path}")
    vol = store.open_volume(path)
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
  from jaxalign.volume import store
  shape = vol.shape(0)
  out = store.create_volume(str(dst), shape, vol.dtype, vol.resolution, format="neuroglancer_precomputed",
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
    "dimensions": neuroglancer_dimensions(resolution),
    "position": [w / 2, h / 2, z / 2],
    "crossSectionScale": max(1.0, max(h, w) / 512),
    "layers": layers,
    "selectedLayer": {"layer": names[-1] if "field" not in names[-1:] else names[0], "visible": True},
    "layout": "4panel",
  }


def neuroglancer_link(state: dict) -> str:
  """The neuroglancer-demo URL that opens `state`."""
  return f"{NEUROGLANCER_APP}/#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")


def served_state(folder: str, base_url: str) -> dict:
  """The state in `folder`/state.json with its layers read from `base_url`/<layer name>.

  Raises InputError when `folder` was not written by `jaxalign view`.
  """
  path = pathlib.Path(folder) / STATE_FILE
  if not path.is_file():
    raise InputError(f"--output {folder} holds no {STATE_FILE} written by jaxalign view; write it first: "
                     f"jaxalign view --output={folder} --raw=... [--aligned=... --field=...]")
  try:
    state = json.loads(path.read_text())
    for layer in state["layers"]:
      layer["source"] = f"precomputed://{base_url}/{layer['name']}"
  except (ValueError, KeyError, TypeError) as e:
    raise InputError(f"--output {folder}: unreadable {STATE_FILE} ({e})") from e
  return state


class _CORSHandler(http.server.SimpleHTTPRequestHandler):
  """Static files with the CORS header neuroglancer's browser fetches need."""

  def end_headers(self):
    self.send_header("Access-Control-Allow-Origin", "*")
    super().end_headers()

  def log_message(self, format, *args):  # noqa: A002 - keep the terminal for the URL, not access logs
    pass


class _ClientAndLayers:
  """What neuroglancer's server answers under /v/<token>/: the written layers and state.json from
  `folder` under their own names (`raw/info`, `raw/0/0-64_0-64_0-1`, ...), everything else from the
  client bundled with the package (index.html, *.js, *.wasm)."""

  def __init__(self, client, folder: pathlib.Path):
    self.client = client
    self.folder = folder

  def get(self, name: str, query: str):
    if name.split("/", 1)[0] in LAYERS or name == STATE_FILE:
      path = (self.folder / name).resolve()
      if self.folder not in path.parents or not path.is_file():
        # neuroglancer's server answers 404; the client reads a missing chunk as no data
        raise ValueError(f"no file {name} in {self.folder}")
      kind = "application/json" if name.endswith(("/info", ".json")) else "application/octet-stream"
      return path.read_bytes(), kind
    return self.client.get(name, query)


def _import_neuroglancer():
  try:
    import neuroglancer
    import neuroglancer.server
    import neuroglancer.static
  except ImportError as e:
    raise InputError(f"--serve needs the neuroglancer package (its bundled client is the offline viewer): "
                     f"{VIEW_EXTRA}; or pass --nolocal_client to serve only the data ({e})") from e
  return neuroglancer


def _port_in_use(port: int, e: OSError) -> InputError:
  return InputError(f"--port {port} cannot be opened ({e.strerror or e}); pick another "
                    "(serving an existing --output: --port=0 takes any free one)")


class ViewerServer:
  """A running `jaxalign view` server (from `start_local_viewer` / `start_data_server`).

  Attributes:
    url: what to open in a browser: the local neuroglancer client with the layers loaded, or (data
      only) the public web app's link to the served layers.
    data_url: base URL of the layers (`data_url + "/raw/info"`).
    state: the neuroglancer state shown.
  """

  def __init__(self, url: str, data_url: str, state: dict, stop, keep=None):
    self.url, self.data_url, self.state = url, data_url, state
    self._stop, self._keep = stop, keep  # keep: the neuroglancer Viewer (its server holds it weakly)

  def stop(self) -> None:
    """Stops serving (idempotent)."""
    if self._stop is not None:
      self._stop()
      self._stop = self._keep = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def start_local_viewer(folder: str, port: int = 8000, *, host: str = "localhost",
                       bind_address: str = "127.0.0.1") -> ViewerServer:
  """Serves the neuroglancer client bundled with the `neuroglancer` package and the layers written
  in `folder` from one port, in a background thread; returns at once.

  The viewer opens at `http://host:port/v/jaxalign/` with `folder`'s state.json (layers read from
  the same server, so nothing leaves the machine). One viewer per process: a running neuroglancer
  server of this process is restarted.

  Args:
    folder: a `jaxalign view` output folder (state.json, raw/, aligned/, field/).
    port: port to listen on; 0 picks a free one (see `.url`).
    host: host name in the URLs (the browser's name for this machine).
    bind_address: interface to listen on ("127.0.0.1": this machine only; "0.0.0.0": every one).
  Returns:
    ViewerServer; `.stop()` ends it.
  Raises:
    InputError: the neuroglancer package is missing (names the `view` extra), `folder` holds no
      state.json, or the port cannot be opened.
  """
  ng = _import_neuroglancer()
  root = pathlib.Path(folder).resolve()
  served_state(str(root), "")  # checks the folder before anything starts
  if ng.server.is_server_running():
    ng.stop()
  ng.set_server_bind_address(bind_address, bind_port=port)
  ng.set_static_content_source(source=_ClientAndLayers(ng.static.get_default_static_content_source(), root))
  try:
    viewer = ng.Viewer(token=VIEWER_TOKEN)
  except OSError as e:
    raise _port_in_use(port, e) from e
  actual_port = urllib.parse.urlsplit(viewer.get_viewer_url()).port
  url = f"http://{host}:{actual_port}/v/{VIEWER_TOKEN}/"
  state = served_state(str(root), url.rstrip("/"))
  viewer.set_state(ng.ViewerState(state))
  return ViewerServer(url, url.rstrip("/"), state, ng.stop, keep=viewer)


def start_data_server(folder: str, port: int = 8000, *, host: str = "localhost",
                      bind_address: str = "127.0.0.1") -> ViewerServer:
  """Serves `folder`'s files with CORS headers (no client) in a background thread; `.url` is the
  public web app's link to them (needs internet in the browser). Same arguments as `start_local_viewer`."""
  root = pathlib.Path(folder).resolve()
  served_state(str(root), "")
  handler = functools.partial(_CORSHandler, directory=str(root))
  try:
    httpd = http.server.ThreadingHTTPServer((bind_address, port), handler)
  except OSError as e:
    raise _port_in_use(port, e) from e
  data_url = f"http://{host}:{httpd.server_address[1]}"
  state = served_state(str(root), data_url)
  thread = threading.Thread(target=httpd.serve_forever, name="jaxalign-view", daemon=True)
  thread.start()

  def stop():
    httpd.shutdown()
    httpd.server_close()
    thread.join()

  return ViewerServer(neuroglancer_link(state), data_url, state, stop)


def serve(folder: str, port: int = 8000, *, host: str = "localhost", bind_address: str = "127.0.0.1",
          local_client: bool = True) -> None:
  """Serves `folder` (see `start_local_viewer` / `start_data_server`), prints the URL to open, and
  blocks until interrupted (Ctrl-C)."""
  if not os.path.isdir(folder):
    raise InputError(f"--output: missing folder {folder} to serve")
  start = start_local_viewer if local_client else start_data_server
  server = start(folder, port, host=host, bind_address=bind_address)
  port = urllib.parse.urlsplit(server.data_url).port
  names = ", ".join(layer["name"] for layer in server.state["layers"])
  if local_client:
    lines = [f"neuroglancer (local client, works offline): {server.url}",
             f"layers {names} from {pathlib.Path(folder).resolve()}"]
  else:
    lines = [f"serving {pathlib.Path(folder).resolve()} at {server.data_url} (layers {names})",
             f"open (public web app, needs internet): {server.url}"]
  if bind_address in ("127.0.0.1", "localhost", "::1"):
    lines.append(f"from another machine: ssh -L {port}:localhost:{port} {socket.gethostname()}, "
                 "then open the same URL there (same port: the layers' URLs name it)")
  lines.append("Ctrl-C stops")
  sys.stdout.write("\n".join(lines) + "\n")
  sys.stdout.flush()
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    server.stop()


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
  paths = {"raw": FLAGS.raw, "aligned": FLAGS.aligned, "field": FLAGS.field}
  writing = any(paths.values())
  lowest_port = 0 if FLAGS.serve and not writing else 1  # 0 (any free port) would be baked into state.json
  if not lowest_port <= FLAGS.port < 65536:
    raise InputError(f"--port must be in 1..65535 (0 = any free port, only with --serve alone), got {FLAGS.port}")
  serve_args = dict(host=FLAGS.host, bind_address=FLAGS.bind_address, local_client=FLAGS.local_client)
  if FLAGS.serve and FLAGS.local_client:
    _import_neuroglancer()  # a missing extra is reported before minutes of copying, not after
  if FLAGS.serve and not writing:
    serve(FLAGS.output, FLAGS.port, **serve_args)
    return 0
  state = write_view(FLAGS.output, paths, host=FLAGS.host, port=FLAGS.port, overwrite=FLAGS.overwrite,
                     progress=FLAGS.progress)
  out = pathlib.Path(FLAGS.output).resolve()
  sys.stdout.write(json.dumps(state, indent=1) + "\n\n"
                   f"state: {out / STATE_FILE}\n"
                   f"offline viewer (local neuroglancer client; {VIEW_EXTRA}):\n"
                   f"   jaxalign view --serve --output={out} --port={FLAGS.port}\n"
                   f"or the public web app (needs internet in the browser):\n"
                   f"1. serve the folder (CORS needed): jaxalign view --serve --nolocal_client --output={out} "
                   f"--port={FLAGS.port}\n"
                   f"   or: npx http-server {out} -p {FLAGS.port} --cors\n"
                   f"2. open: {neuroglancer_link(state)}\n")
  sys.stdout.flush()
  if FLAGS.serve:
    serve(str(out), FLAGS.port, **serve_args)
  return 0
