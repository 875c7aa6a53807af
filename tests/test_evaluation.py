"""Benchmark metrics vs hand-computed values; case building, saving and loading."""

import numpy as np
import pytest

from jaxalign.bench import evaluation as ev, groundtruth as gt_mod
from jaxalign.errors import InputError
from jaxalign.ops import metrics
from tests.conftest import em_stack_path, load_sections

CROP = 128


def test_epe_stats_hand_computed():
  s = ev.epe_stats(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), threshold=2.0)
  assert s["median"] == 2.0
  assert s["p95"] == pytest.approx(3.8)  # linear interpolation: 0.95 * 4
  assert s["p99"] == pytest.approx(3.96)
  assert s["frac_over"] == pytest.approx(0.4)  # 3 and 4 are above 2 px
  assert s["n"] == 5
  assert np.isnan(ev.epe_stats(np.zeros(0))["median"])
  e = ev.endpoint_errors(np.full((2, 2, 2), [3.0, 4.0], np.float32), np.zeros((2, 2, 2), np.float32))
  np.testing.assert_allclose(e, 5.0)


def test_low_cpc_counts_and_cpc_map():
  maps = [np.array([[0.1, 0.9], [np.nan, 0.3]]), np.array([[0.2, np.nan]])]
  assert metrics.low_cpc_counts(maps, threshold=0.25) == (2, 4)
  assert metrics.low_cpc_fraction(maps, threshold=0.25) == 0.5
  assert np.isnan(metrics.low_cpc_fraction([np.full((2, 2), np.nan)]))
  stack = np.array([[[0.1, 0.9]], [[np.nan, np.nan]], [[0.2, 0.1]]])  # per section: 1/2, unscored, 2/2
  np.testing.assert_array_equal(metrics.low_cpc_fraction(stack, axis=(1, 2)), [0.5, np.nan, 1.0])
  rng = np.random.default_rng(0)
  a = rng.uniform(0.1, 1, (64, 64)).astype(np.float32)
  b = (a + 0.3 * rng.uniform(0.1, 1, (64, 64))).astype(np.float32)
  got = ev.cpc_map(a, b, level=1, chunk=16)
  # reference: 2x2 mean downsampling, then Pearson r per 16x16 chunk, in float64
  da = a.astype(np.float64).reshape(32, 2, 32, 2).mean((1, 3))
  db = b.astype(np.float64).reshape(32, 2, 32, 2).mean((1, 3))
  want = np.array([[np.corrcoef(da[i:i + 16, j:j + 16].ravel(), db[i:i + 16, j:j + 16].ravel())[0, 1]
                    for j in (0, 16)] for i in (0, 16)])
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def case():
  em_stack_path("flyem_medulla_fibsem")
  cfg = gt_mod.DistortionConfig(seed=4, crack_probability=1.0, fold_probability=0.0, blank_probability=0.0)
  return ev.shared_case("neighbour", "flyem_medulla_fibsem", num=3, crop=CROP, seed=4,
                        config=cfg)


def test_neighbour_case_layout(case):
  stack = load_sections("flyem_medulla_fibsem", [0, 4, 8], crop=CROP)
  assert case.kind == "neighbour" and len(case) == 2
  np.testing.assert_array_equal(case.tgt, stack[:2])  # targets: original z-1, every 4th slice
  np.testing.assert_array_equal(case.reference, stack[1:])
  assert case.meta["resolution_nm"] == [40.0, 10.0, 10.0]
  assert case.src_defects.any()  # cracks are handed to aligners as defects


def test_score_fields_hand_computed(case):
  # exact field: zero error everywhere; the gt field's CPC is what the method gets
  row = ev.score_fields(case.gt, case)
  assert row["epe_median"] == 0.0 and row["epe_frac_over"] == 0.0
  assert row["low_cpc"] == row["low_cpc_gt"]
  # a constant (0.3, 0.4) px offset: every EPE is exactly 0.5 px
  row = ev.score_fields(case.gt + np.array([0.3, 0.4], np.float32), case)
  assert row["epe_median"] == pytest.approx(0.5, abs=1e-5)
  assert row["epe_p99"] == pytest.approx(0.5, abs=1e-5)
  assert row["epe_n"] == int(case.valid.sum())
  near = case.valid & (case.disc_distance <= 20.0)
  assert 0 < row["near_n"] == int(near.sum())
  # identity: EPE is |gt| itself, pooled over valid pixels
  row = ev.evaluate(ev.identity_aligner, case, name="identity", progress=False)
  mag = np.linalg.norm(case.gt, axis=-1)[case.valid]
  assert row["epe_median"] == pytest.approx(np.median(mag), rel=1e-5)
  assert row["epe_frac_over"] == pytest.approx(np.mean(mag > 2.0))
  assert row["method"] == "identity" and row["pairs"] == 2
  with pytest.raises(InputError, match="shape"):
    ev.score_fields(case.gt[:1], case)
  assert "| identity | neighbour |" in ev.format_table([row])


def test_save_load_round_trip(case, tmp_path):
  d = ev.save_case(case, tmp_path / "case")
  back = ev.load_case(d)
  for name in ev.ARRAY_NAMES:
    np.testing.assert_array_equal(getattr(back, name), getattr(case, name))
  assert back.kind == case.kind and back.meta["stack"] == "flyem_medulla_fibsem"
  with pytest.raises(InputError, match="not a ground-truth case"):
    ev.load_case(tmp_path / "nowhere")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "x.txt").write_text("x")
  with pytest.raises(InputError, match="refusing"):
    ev.save_case(case, tmp_path / "other")
  assert (tmp_path / "other" / "x.txt").exists()
  with pytest.raises(InputError, match="kind"):
    ev.make_case("sideways", np.ones((2, 16, 16), np.float32))


def _cli(*args, cwd):
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", "jaxalign", "eval", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=300)


def test_eval_command(tmp_path):
  from jaxalign.volume import store
  stack = load_sections("flyem_medulla_fibsem", [0, 4, 8], crop=CROP)
  case = ev.make_case("stack", stack, config=gt_mod.DistortionConfig(seed=1, blank_probability=0.0),
                      meta=dict(stack="flyem", resolution_nm=[40.0, 10.0, 10.0]))
  case_dir = ev.save_case(case, tmp_path / "case")
  vol = ev.write_distorted_volume(case, str(tmp_path / "distorted"))
  fvol = store.create_volume(str(tmp_path / "gtfields"), case.gt.shape, np.float32, [40.0, 10.0, 10.0], kind="field")
  fvol.write(case.gt)
  r = _cli(vol, f"--ground_truth={case_dir}", f"--fields={tmp_path / 'gtfields'}", "--chunk=16",
           f"--output={tmp_path / 'out'}", "--noprogress", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  assert (tmp_path / "out" / "cpc_maps.png").stat().st_size > 1000
  import json
  summary = json.loads((tmp_path / "out" / "eval.json").read_text())
  assert summary["epe"]["epe_median"] == 0.0  # the ground-truth fields themselves
  assert summary["low_cpc"] == summary["low_cpc_distorted"]  # VOLUME is the distorted input here
  assert len(summary["low_cpc_per_pair"]) == 2
  # bad input: exit status 2 and one line naming the problem, nothing written
  r = _cli(str(tmp_path / "missing"), f"--output={tmp_path / 'out2'}", cwd=tmp_path)
  assert r.returncode == 2 and "missing path" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("shift", [(1.3, -2.6), (-0.45, 0.8), (2.75, 0.1)])
def test_content_shift_recovers_known_translation(shift):
  # Two crops of one larger image, one displaced by a sub-pixel shift: fixed(r) = moving(r + s).
  from scipy import ndimage
  rng = np.random.default_rng(0)
  big = ndimage.gaussian_filter(rng.random((192, 224)), 2)
  shifted = ndimage.shift(big, (-shift[0], -shift[1]), order=3)
  moving, fixed = big[32:160, 32:192], shifted[32:160, 32:192]
  np.testing.assert_allclose(ev.content_shift(moving, fixed), shift, atol=0.1)
