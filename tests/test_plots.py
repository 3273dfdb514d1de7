"""The report as a figure (resify/views/plots.py): real PNG and SVG files, other formats refused."""

import pytest

from resify.errors import ResifyError
from resify.views.plots import plot_flows

# ---------------------------------------------------------------------------------------------
# plots


@pytest.mark.parametrize("suffix,magic", [("png", b"\x89PNG\r\n\x1a\n"), ("svg", b"<?xml")])
def test_plot_flows_writes_the_file(seed_reports, tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sub" / f"flow.{suffix}"
    flows = [("before", seed_reports["before"]), ("after", seed_reports["after"])]
    assert plot_flows(flows, str(path), "seed: before and after") == path
    data = path.read_bytes()
    assert data.startswith(magic) and len(data) > 5000
    if suffix == "svg":
        assert b"<svg" in data


def test_plot_flows_refuses_other_formats(seed_reports, tmp_path):
    with pytest.raises(ResifyError, match=r"plot\(\) writes \.png or \.svg files, found 'flow\.pdf'; pass e\.g\."):
        plot_flows([("", seed_reports["after"])], tmp_path / "flow.pdf", "x")
    assert not (tmp_path / "flow.pdf").exists()
