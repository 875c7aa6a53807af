"""Input validation of every `jaxalign` command, run as a user runs it (`python -m jaxalign <cmd>`).

Each bad input must give exit status 2, exactly one stderr line `jaxalign <cmd>: error: ...` naming
the problem, no traceback, and no output written. The subprocesses of all cases run concurrently
once per module (they are mostly interpreter start-up and imports) to keep the file fast.
"""

import concurrent.futures
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxalign.volume import store

REPO = pathlib.Path(__file__).resolve().parents[1]
RES = (40.0, 4.0, 4.0)
SHAPE = (3, 64, 64)
TIMEOUT_S = 120


def _make_inputs(d: pathlib.Path) -> dict[str, str]:
  rng = np.random.default_rng(0)
  p = {}

  def image(name, shape=SHAPE, res=RES, data=None):
    v = store.create_volume(str(d / name), shape, "float32", res)
    v.write(rng.uniform(0.1, 1, shape).astype(np.float32) if data is None else data)
    p[name] = str(d / name)
    return v

  def field(name, shape=SHAPE, res=RES):
    v = store.create_volume(str(d / name), shape + (2,), "float32", res, kind="field")
    v.write(np.zeros(shape + (2,), np.float32))
    p[name] = str(d / name)
    return v

  image("img")
  image("img_res8", res=(40.0, 8.0, 8.0))
  image("img_small", shape=(3, 32, 64))
  image("zeros", data=np.zeros(SHAPE, np.float32))
  nan_img = image("img_nan")
  # io refuses to write NaN, so go around it with plain tensorstore (as a foreign tool could)
  bad = np.ones(SHAPE, np.float32)
  bad[1, 5, 5] = np.nan
  nan_img.array(0).write(bad).result()
  field("fld")
  field("fld_small", shape=(3, 32, 64))
  field("fld_res8", res=(40.0, 8.0, 8.0))
  nan_fld = field("fld_nan")
  f = np.zeros(SHAPE + (2,), np.float32)
  f[2, 10, 10, 0] = np.nan
  nan_fld.array(0).write(f).result()
  # PNG folders: sections of two sizes; a colour section
  (d / "png_sizes").mkdir()
  Image.fromarray(np.full((32, 32), 100, np.uint8)).save(d / "png_sizes" / "000.png")
  Image.fromarray(np.full((32, 40), 100, np.uint8)).save(d / "png_sizes" / "001.png")
  (d / "png_rgb").mkdir()
  Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(d / "png_rgb" / "000.png")
  p["png_sizes"], p["png_rgb"] = str(d / "png_sizes"), str(d / "png_rgb")
  (d / "not_a_demo").mkdir()
  (d / "not_a_demo" / "keep.txt").write_text("user data")
  p["not_a_demo"] = str(d / "not_a_demo")
  return p


# name -> (command, args with {input} placeholders and {out} = a fresh output path, expected words)
CASES = {
  # align SRC DST
  "align_missing_path": ("align", ["{tmp}/nonexistent", "{out}"], ["missing", "nonexistent"]),
  "align_wrong_dtype_field_as_image": ("align", ["{fld}", "{out}"], ["field"]),
  "align_empty_volume": ("align", ["{zeros}", "{out}"], ["no data"]),
  "align_nan_in_image": ("align", ["{img_nan}", "{out}"], ["nan"]),
  "align_bad_drift_sigma": ("align", ["{img}", "{out}", "--drift_sigma=-1"], ["sigma"]),
  "align_bad_neighbour_refine": ("align", ["{img}", "{out}", "--neighbour_refine=-1"], ["neighbour_refine"]),
  "align_bad_finest_nm": ("align", ["{img}", "{out}", "--finest_nm=-1"], ["finest_nm"]),
  "align_bad_max_displacement": ("align", ["{img}", "{out}", "--max_displacement_nm=0"], ["max_displacement_nm"]),
  # render SRC FIELDS DST
  "render_missing_path": ("render", ["{img}", "{tmp}/nonexistent", "{out}"], ["missing", "nonexistent"]),
  "render_mismatched_shapes": ("render", ["{img}", "{fld_small}", "{out}"], ["(3, 32, 64)", "match"]),
  "render_mismatched_resolution": ("render", ["{img}", "{fld_res8}", "{out}"], ["resolution"]),
  "render_nan_in_field": ("render", ["{img}", "{fld_nan}", "{out}"], ["nan"]),
  "render_wrong_dtype_image_as_field": ("render", ["{img}", "{img}", "{out}"], ["field"]),
  # import SRC DST
  "import_missing_path": ("import", ["{tmp}/nonexistent", "{out}", "--resolution=40,4,4"], ["missing"]),
  "import_mismatched_shapes": ("import", ["{png_sizes}", "{out}", "--resolution=40,4,4"], ["(32, 40)", "differs"]),
  "import_wrong_dtype_colour": ("import", ["{png_rgb}", "{out}", "--resolution=40,4,4"], ["grayscale"]),
  "import_bad_resolution": ("import", ["{png_sizes}", "{out}", "--resolution=40,4"], ["resolution"]),
}



@pytest.fixture(scope="module")
def results(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli")
  inputs = _make_inputs(d)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

  def run(name):
    cmd, args, _ = CASES[name]
    out = d / f"out_{name}"
    argv = [a.format(out=out, tmp=d, **inputs) for a in args]
    before = sorted(p.name for p in d.iterdir())
    r = subprocess.run([sys.executable, "-m", "jaxalign", cmd, *argv], capture_output=True, text=True,
                       timeout=TIMEOUT_S, env=env, cwd=REPO)
    return r, out, before

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {name: pool.submit(run, name) for name in CASES}
    res = {name: f.result() for name, f in futures.items()}
  res["_inputs"] = inputs
  return res


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(results, name):
  cmd, _, words = CASES[name]
  r, out, _ = results[name]
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert "Traceback" not in r.stderr, r.stderr
  assert r.returncode == 2, (r.returncode, r.stderr)
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"jaxalign {cmd}: error: "), lines[0]
  for w in words:
    assert w.lower() in lines[0].lower(), (w, lines[0])
  # nothing written: no output path, no staging folders next to it
  assert not out.exists(), f"{out} was created"
  assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_existing_non_demo_folder_untouched(results):
  folder = pathlib.Path(results["_inputs"]["not_a_demo"])
  assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
  assert (folder / "keep.txt").read_text() == "user data"


def test_help_lists_commands():
  r = subprocess.run([sys.executable, "-m", "jaxalign", "--help"], capture_output=True, text=True,
                     timeout=TIMEOUT_S, cwd=REPO)
  assert r.returncode == 0
  for cmd in ("demo", "align", "render", "view", "import"):
    assert f"  {cmd} " in r.stdout


@pytest.mark.parametrize("how", ["--help", "--helpfull"])
def test_every_command_answers_help(how):
  # Issue 20: `jaxalign <command> --help` / `--helpfull` exit 0 and list that command's flags.
  from jaxalign.cli import COMMANDS
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))

  def one(cmd):
    return cmd, subprocess.run([sys.executable, "-m", "jaxalign", cmd, how], capture_output=True, text=True,
                               timeout=TIMEOUT_S, env=env, cwd=REPO)

  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = list(pool.map(one, COMMANDS))
  for cmd, r in results:
    assert r.returncode == 0, (cmd, r.stderr[-2000:])
    assert f"jaxalign {cmd} --helpfull" in r.stdout, (cmd, r.stdout[:500])
    own = [ln for ln in r.stdout.splitlines() if ln.startswith("jaxalign.") and ln.endswith(":")]
    assert own, (cmd, r.stdout[:800])  # the command's own flags are listed, with defaults
    assert "(default:" in r.stdout
    if how == "--helpfull":
      assert "--helpfull" in r.stdout  # absl's own flags are in the full list
