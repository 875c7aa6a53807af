"""HTML + PNG alignment reports (jaxalign.bench.report)."""

import re

import numpy as np
import pytest
from PIL import Image

from jaxalign.ops import metrics
from jaxalign.errors import InputError
from jaxalign.bench.report import FIGURES, ReportData, format_table, write_report


def _data(z=5, h=48, w=40):
  rng = np.random.default_rng(0)
  img = rng.uniform(0.1, 1.0, (z, h, w)).astype(np.float32)
  fields = rng.normal(0, 2, (z, h, w, 2)).astype(np.float32)
  cpc = rng.uniform(-0.2, 1, (z - 1, 3, 2))
  cpc[0, 0, 0] = np.nan
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  wave = np.stack([1.5 * np.sin(xx / 5.0), np.cos(yy / 6.0)], -1)
  smooth = np.stack([wave * k for k in np.linspace(0, 1, z)]).astype(np.float32)
  return ReportData(
      title="test <report>",
      images={"distorted": img, "aligned": img[::-1].copy()},
      fields=fields, gt_fields=fields + 0.5, valid=np.ones((z, h, w), bool),
      cpc_maps={"distorted": cpc, "aligned": cpc},
      per_section={"EPE median (px)": {"unaligned": np.arange(z, dtype=float), "aligned": np.full(z, np.nan)}},
      summary=[{"stack": "aligned", "EPE median (px)": 0.25}, {"stack": "unaligned", "EPE median (px)": 3.5}],
      notes=["command: jaxalign demo"],
      deformation={"fields": metrics.deformation(smooth, resolution_nm=(40.0, 25.0, 25.0)),
                   "residual": metrics.deformation(0.3 * smooth, sigma_px=0)},
      resolution_nm=(40.0, 25.0, 25.0))


def test_report_writes_html_and_referenced_pngs(tmp_path):
  page = write_report(tmp_path / "rep", _data())
  assert page == tmp_path / "rep" / "index.html"
  text = page.read_text()
  srcs = re.findall(r'<img src="([^"]+)"', text)
  assert sorted(srcs) == sorted(FIGURES)
  for name in srcs:
    png = tmp_path / "rep" / name
    with Image.open(png) as im:
      assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
      # a real figure, not a blank canvas
      assert np.asarray(im.convert("L")).std() > 5
  # the title is escaped, the summary numbers are in the table
  assert "test &lt;report&gt;" in text and "<td>3.5</td>" in text and "<td>0.25</td>" in text
  # no temporary files left behind
  assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(FIGURES + ("index.html",))


def test_report_deformation_table_and_band(tmp_path):
  d = _data()
  text = write_report(tmp_path, d).read_text()
  # per-section p1/p99 of every series, section by section, then the stack's
  for name in ("fields", "residual"):
    assert f"<th>{name} p1</th>" in text and f"<th>{name} p99</th>" in text
  fields = d.deformation["fields"]
  worst = fields.worst
  assert worst == 4  # the largest amplitude
  assert f"<td>{fields.low[worst]:.3f}</td><td>{fields.high[worst]:.3f}</td>" in text and "<td>stack</td>" in text
  # 100 nm at 25 nm/px: sigma 4 px, said in the caption with its physical scale
  assert "smoothed at 100 nm (4 px at 25 nm/px)" in text and "[0.9, 1.1]" in text


def test_report_deformation_series_must_match(tmp_path):
  d = _data()
  d.deformation = dict(d.deformation, other=metrics.deformation(np.zeros((2, 8, 8, 2), np.float32), sigma_px=0))
  with pytest.raises(InputError, match="deformation"):
    write_report(tmp_path / "rep", d)
  assert not (tmp_path / "rep").exists()


def test_report_only_draws_given_parts(tmp_path):
  d = ReportData(title="t", per_section={"low-CPC %": {"a": [1.0, 2.0]}})
  text = write_report(tmp_path, d).read_text()
  assert re.findall(r'<img src="([^"]+)"', text) == ["per_section.png"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["index.html", "per_section.png"]


def test_report_bad_input_writes_nothing(tmp_path):
  d = _data()
  d.gt_fields = d.gt_fields[:, :10]
  with pytest.raises(InputError, match="gt_fields"):
    write_report(tmp_path / "rep", d)
  assert not (tmp_path / "rep").exists()


def test_format_table():
  rows = [{"stack": "aligned", "EPE": 0.123456, "n": 3}, {"stack": "unaligned", "EPE": float("nan"), "n": 12}]
  expected = ("stack        EPE   n\n"
              "---------  -----  --\n"
              "aligned    0.123   3\n"
              "unaligned      -  12")
  assert format_table(rows) == expected
