"""`jaxalign view`: neuroglancer_precomputed copies, the neuroglancer state/link, and `--serve`: the local
neuroglancer client (offline viewer) checked over http and rendered in headless Chromium."""

import base64
import fcntl
import io as io_bytes
import json
import os
import queue
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import PIL.Image
import pytest
import tensorstore as ts

from jaxalign.volume import store
from jaxalign.commands import view
from jaxalign.errors import InputError

RES = (40.0, 6.0, 4.0)
DISK_RES = (40.0, 4.0, 4.0)


@pytest.fixture
def volumes(tmp_path):
  rng = np.random.default_rng(1)
  img = rng.uniform(0.1, 1, (3, 40, 48)).astype(np.float32)
  fld = rng.normal(0, 3, (3, 40, 48, 2)).astype(np.float32)
  store.create_volume(str(tmp_path / "raw"), img.shape, "float32", RES).write(img)
  store.create_volume(str(tmp_path / "fld"), fld.shape, "float32", RES, kind="field").write(fld)
  return tmp_path, img, fld


def test_view_writes_precomputed_and_state(volumes):
  d, img, fld = volumes
  out = d / "ng"
  state = view.write_view(str(out), {"raw": str(d / "raw"), "field": str(d / "fld")}, port=8123, progress=False)
  # read back with plain tensorstore (no jaxalign): precomputed is [x, y, z, channel]
  raw = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/raw"}).result().read().result()
  np.testing.assert_array_equal(raw[..., 0].transpose(2, 1, 0), img)
  f = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{out}/field"}).result().read().result()
  np.testing.assert_array_equal(f.transpose(2, 1, 0, 3), fld)
  info = json.loads((out / "raw" / "info").read_text())
  assert info["scales"][0]["resolution"] == [4.0, 6.0, 40.0]
  assert json.loads((out / view.STATE_FILE).read_text()) == state
  assert [ly["source"] for ly in state["layers"]] == ["precomputed://http://localhost:8123/raw",
                                                        "precomputed://http://localhost:8123/field"]
  assert state["dimensions"] == {"x": [4e-9, "m"], "y": [6e-9, "m"], "z": [4e-8, "m"]}
  assert state["position"] == [24.0, 20.0, 1.5]
  link = view.neuroglancer_link(state)
  assert link.startswith(view.NEUROGLANCER_APP + "/#!")
  assert json.loads(urllib.parse.unquote(link.split("#!", 1)[1])) == state


def test_view_refuses_to_clobber_foreign_folder(volumes):
  d, _, _ = volumes
  (d / "mine").mkdir()
  (d / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(InputError, match="not written by jaxalign view"):
    view.write_view(str(d / "mine"), {"raw": str(d / "raw")}, progress=False)
  assert [p.name for p in (d / "mine").iterdir()] == ["notes.txt"]


# ---- serving: the local neuroglancer client (offline viewer) and the data-only server ----

def _disk_volume(d, name="disk", z=3, size=128, radius=28):
  """A dark (0.1) volume with a bright (1.0) disk in the middle of every section, isotropic in y/x
  (so round on screen); returns its path."""
  yy, xx = np.mgrid[:size, :size]
  disk = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2, 1.0, 0.1).astype(np.float32)
  path = str(d / name)
  store.create_volume(path, (z, size, size), "float32", DISK_RES).write(np.stack([disk] * z))
  return path


def _get(url):
  with urllib.request.urlopen(url, timeout=10) as r:
    return r.read(), dict(r.headers)


def test_serve_without_view_extra_names_it(volumes, monkeypatch):
  d, _, _ = volumes
  view.write_view(str(d / "ng"), {"raw": str(d / "raw")}, progress=False)
  monkeypatch.setitem(sys.modules, "neuroglancer", None)  # import neuroglancer -> ImportError
  with pytest.raises(InputError, match=r'pip install "jaxalign\[view\]".*--nolocal_client'):
    view.start_local_viewer(str(d / "ng"), 0)


def test_serve_cli_without_view_extra_fails_before_writing(volumes):
  """Without the neuroglancer package, `view --serve` exits 2 with one line naming the extra, before
  copying anything."""
  d, _, _ = volumes
  fake = d / "fake_site"
  (fake / "neuroglancer").mkdir(parents=True)
  (fake / "neuroglancer" / "__init__.py").write_text('raise ImportError("No module named neuroglancer")\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake)] + sys.path))
  r = subprocess.run([sys.executable, "-m", "jaxalign", "view", "--serve", f"--output={d / 'ng'}",
                      f"--raw={d / 'raw'}"], capture_output=True, text=True, env=env, timeout=120)
  assert r.returncode == 2, r.stderr
  assert r.stderr.count("\n") == 1 and 'pip install "jaxalign[view]"' in r.stderr, r.stderr
  assert not (d / "ng").exists()


def test_serve_refuses_folder_without_state(tmp_path):
  (tmp_path / "x").mkdir()
  with pytest.raises(InputError, match="no state.json written by jaxalign view"):
    view.start_data_server(str(tmp_path / "x"), 0)


def test_data_server_serves_layers_with_cors(volumes):
  """--serve --nolocal_client (no extra needed): the folder's files with CORS, and the public link."""
  d, _, _ = volumes
  out = d / "ng"
  view.write_view(str(out), {"raw": str(d / "raw"), "field": str(d / "fld")}, progress=False)
  with view.start_data_server(str(out), 0) as server:
    body, headers = _get(server.data_url + "/raw/info")
    assert json.loads(body) == json.loads((out / "raw" / "info").read_text())
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert [ly["source"] for ly in server.state["layers"]] == [f"precomputed://{server.data_url}/raw",
                                                                 f"precomputed://{server.data_url}/field"]
    assert server.url.startswith(view.NEUROGLANCER_APP + "/#!")


def test_serve_cli_serves_local_client_and_layers(volumes):
  """`jaxalign view --serve --port=0` prints a local URL that serves the bundled client's index.html
  and the written layers (info files, a chunk) over http: nothing from the internet."""
  pytest.importorskip("neuroglancer", reason='the view extra is not installed (pip install "jaxalign[view]")')
  d, _, _ = volumes
  out = d / "ng"
  view.write_view(str(out), {"raw": str(d / "raw"), "field": str(d / "fld")}, progress=False)
  proc = subprocess.Popen([sys.executable, "-m", "jaxalign", "view", "--serve", f"--output={out}", "--port=0"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
  try:
    url, seen, deadline = None, [], time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
      try:
        seen.append(lines.get(timeout=1))
      except queue.Empty:
        assert proc.poll() is None, "".join(seen)
        continue
      m = re.search(r"local client.*: (http://\S+/v/jaxalign/)", seen[-1])
      url = m and m.group(1)
    assert url, "no URL printed:\n" + "".join(seen)
    page, headers = _get(url)
    assert b"<title>neuroglancer</title>" in page and headers["Content-Type"] == "text/html"
    for name in ("raw", "field"):
      body, _ = _get(url + f"{name}/info")
      assert json.loads(body) == json.loads((out / name / "info").read_text())
    chunk = next(p for p in (out / "raw").rglob("*") if p.is_file() and p.name != "info")
    assert _get(url + chunk.relative_to(out).as_posix())[0] == chunk.read_bytes()
    with pytest.raises(urllib.error.HTTPError, match="404"):
      _get(url + "raw/no-such-chunk")
  finally:
    proc.terminate()
    proc.wait(30)


def _find_chromium():
  for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


class _Chromium:
  """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: the
  browser reads commands on fd 3 and answers on fd 4, NUL-terminated JSON); no extra Python package.
  WebGL (neuroglancer) renders in software through SwiftShader."""

  def __init__(self, binary, profile, width, height):
    to_chrome_r, self._to_chrome = os.pipe()
    self._from_chrome, from_chrome_w = os.pipe()
    # high, close-on-exec copies, moved onto 3 and 4 in the child only (no clash with the parent's fds)
    hi_r, hi_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w))
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--use-gl=swiftshader",
            "--enable-unsafe-swiftshader", "--disable-dev-shm-usage", "--no-first-run", "--mute-audio",
            "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "about:blank"]
    self.proc = subprocess.Popen(args, preexec_fn=lambda: (os.dup2(hi_r, 3), os.dup2(hi_w, 4)), close_fds=False,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(hi_r)
    os.close(hi_w)
    self._buf, self._id = b"", 0
    try:
      page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
      self._session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
      # the viewport, not the window, sets the layout the panel fractions below assume
      self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                deviceScaleFactor=1, mobile=False)
    except BaseException:
      self.close()
      raise

  def call(self, method, session=False, timeout=30, **params):
    self._id += 1
    msg = {"id": self._id, "method": method, "params": params}
    if session:
      msg["sessionId"] = self._session
    os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
    deadline = time.monotonic() + timeout
    while True:
      while b"\0" not in self._buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
          raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
        data = os.read(self._from_chrome, 1 << 20)
        if not data:
          raise RuntimeError(f"chromium exited (status {self.proc.poll()}) during {method}")
        self._buf += data
      raw, self._buf = self._buf.split(b"\0", 1)
      reply = json.loads(raw)
      if reply.get("id") == self._id:  # anything else is an event
        if "error" in reply:
          raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

  def screenshot(self) -> np.ndarray:
    png = base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"])
    return np.asarray(PIL.Image.open(io_bytes.BytesIO(png)).convert("RGB"))

  def close(self):
    try:
      if self.proc.poll() is None:
        self.call("Browser.close", timeout=5)
    except (OSError, RuntimeError, TimeoutError):
      pass
    try:
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    os.close(self._to_chrome)
    os.close(self._from_chrome)


def _xy_panel(shot):
  """The 4panel layout's top-left (xy cross-section) panel: left of the layer side panel, below the
  top bars (fractions of the 1000 x 700 viewport, with margin)."""
  h, w, _ = shot.shape
  return shot[int(0.08 * h):int(0.5 * h), :int(0.34 * w)]


def _disk_in(panel):
  """Finds the rendered disk in an RGB panel; returns (white fraction, diameter px, bbox fill, disk
  grey, ring grey) of the largest white component, or None when there is no white component."""
  import scipy.ndimage as ndi
  grey = panel.astype(np.float32).mean(-1)
  white = panel.min(-1) > 200  # white, not the yellow bounds box nor the red/green axes
  white = ndi.binary_closing(white, iterations=2)  # the 1-px axis lines cross the disk; close them
  labels, n = ndi.label(white)
  if n == 0:
    return None
  sizes = ndi.sum(white, labels, range(1, n + 1))
  blob = labels == 1 + int(np.argmax(sizes))
  ys, xs = np.nonzero(blob)
  height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
  cy, cx = ys.mean(), xs.mean()
  radius = (height + width) / 4
  yy, xx = np.mgrid[:panel.shape[0], :panel.shape[1]]
  dist = np.hypot(yy - cy, xx - cx)
  ring = (dist > 1.3 * radius) & (dist < 1.8 * radius)
  return (white.mean(), (height + width) / 2, blob.sum() / (height * width), float(np.median(grey[blob])),
          float(np.median(grey[ring])), height / width)


def _disk_rendered(shot) -> bool:
  found = _disk_in(_xy_panel(shot))
  if found is None:
    return False
  _, diameter, fill, disk_grey, ring_grey, aspect = found
  # a disk (area / bbox = pi/4), bright on the data's dark background, larger than text
  return diameter > 30 and 0.65 < fill < 0.9 and 0.8 < aspect < 1.25 and disk_grey > 200 and ring_grey < 80


def test_local_viewer_renders_image_in_headless_chromium(tmp_path):
  """The served local client, opened in headless Chromium (software WebGL), renders the image layer:
  the xy panel is not blank and shows the volume's bright disk on its dark background."""
  pytest.importorskip("neuroglancer", reason='the view extra is not installed (pip install "jaxalign[view]")')
  pytest.importorskip("scipy")
  binary = _find_chromium()
  if binary is None:
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium; or set $CHROMIUM)")
  raw = _disk_volume(tmp_path)
  fld = str(tmp_path / "fld")
  store.create_volume(fld, (3, 128, 128, 2), "float32", DISK_RES, kind="field").write(
      np.ones((3, 128, 128, 2), np.float32))
  out = tmp_path / "ng"
  view.write_view(str(out), {"raw": raw, "field": fld}, progress=False)
  t0 = time.monotonic()
  with view.start_local_viewer(str(out), 0) as server:
    assert re.fullmatch(r"http://localhost:\d+/v/jaxalign/", server.url)
    assert [ly["source"] for ly in server.state["layers"]] == [f"precomputed://{server.data_url}/raw",
                                                                 f"precomputed://{server.data_url}/field"]
    browser = _Chromium(binary, tmp_path / "profile", 1000, 700)
    try:
      browser.call("Page.navigate", session=True, url=server.url)
      deadline = time.monotonic() + 30
      while True:  # the client loads, fetches the layers, renders: poll until the disk shows
        time.sleep(0.5)
        shot = browser.screenshot()
        if _disk_rendered(shot) or time.monotonic() > deadline:
          break
    finally:
      browser.close()
  png = tmp_path / "view.png"
  PIL.Image.fromarray(shot).save(png)
  if os.environ.get("JAXALIGN_VIEW_SCREENSHOT"):  # keep it to look at
    shutil.copy(png, os.environ["JAXALIGN_VIEW_SCREENSHOT"])
  panel = _xy_panel(shot)
  assert panel.std() > 20, f"blank viewer panel (std {panel.std():.1f}); screenshot {png}"
  found = _disk_in(panel)
  assert found is not None and _disk_rendered(shot), f"no disk in the xy panel {found}; screenshot {png}"
  print(f"rendered in {time.monotonic() - t0:.1f} s: disk {found}")
