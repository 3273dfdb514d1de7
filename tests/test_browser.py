"""The HTML views in a real browser: headless Chromium (.ci/setup.sh installs Debian's) loads each page
with no console error and draws one arc per new site and per existing shortcut.

The 1,000-layer MLP's page size and load time are printed (``pytest tests/test_browser.py -rP``
shows them); the size is asserted (under 2 MB), the time is not: timings belong in benchmarks.
"""

import time

import pytest
import torch
import torch.nn as nn
from browser import chromium, probe
from reference import ImprovedResidualNetwork

import resify
from resify.views.html import report_page

pytestmark = pytest.mark.skipif(
    chromium() is None,
    reason="no chromium to test the HTML in: .ci/setup.sh installs Debian's (apt-get install chromium), "
    "or set RESIFY_CHROMIUM to a Chrome or Chromium binary",
)
MAX_PAGE = 2_000_000  # bytes


def _info(model, converted):
    plan = resify.applied_plan(converted)
    return {
        "class": type(model).__name__,
        "source": "tests/test_browser.py",
        "parameters_after": sum(p.numel() for p in converted.parameters()),
        "example_input": [spec["shape"] for spec in converted.__dict__["resify_example"]],
        "layers": plan.n_layers,
    }


def _page(model, x, tmp_path, name, **policy):
    converted = resify.apply(model, x, **policy)
    flow = resify.compare(resify.gradient_flow(model, x), resify.gradient_flow(converted, x))
    plan = resify.applied_plan(converted)
    path = tmp_path / f"{name}.html"
    path.write_text(report_page(_info(model, converted), plan, flow), encoding="utf-8")
    return path, plan


def _loads_cleanly(seen):
    assert seen.errors == () and seen.console == (), (seen.errors, seen.console)
    assert seen.drawn_arcs == seen.arcs and seen.diagram[0] > 0 and seen.diagram[1] > 0


def test_the_seed_networks_report_page_loads_and_draws_its_five_shortcuts(tmp_path):
    torch.manual_seed(123)
    page, plan = _page(ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False), torch.randn(10, 128), tmp_path, "seed")
    seen = probe(page)
    _loads_cleanly(seen)
    assert (seen.site_arcs, seen.existing_arcs) == (len(plan.sites), len(plan.existing)) == (5, 0)


def test_a_resnet_page_draws_its_existing_shortcuts_too(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    plan = resify.plan(torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 224, 224))
    page = tmp_path / "resnet18.html"
    page.write_text(plan.to_html(), encoding="utf-8")
    seen = probe(page)
    _loads_cleanly(seen)
    assert (seen.site_arcs, seen.existing_arcs) == (len(plan.sites), len(plan.existing)) and plan.existing


def test_the_notebook_views_render_in_an_output_cell(tmp_path):
    """The fragments Jupyter puts into a page of its own: each one's style scoped to itself."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)])
    x = torch.randn(4, 8)
    converted = resify.apply(model, x, gate="rezero")
    plan = resify.applied_plan(converted)
    comparison = resify.compare(resify.gradient_flow(model, x), resify.gradient_flow(converted, x))
    cells = "\n".join(f'<div class="output">{r._repr_html_()}</div>' for r in (plan, comparison, comparison.after))
    page = tmp_path / "notebook.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{cells}</body></html>")
    seen = probe(page)
    _loads_cleanly(seen)
    assert seen.site_arcs == len(plan.sites) == 5  # not around the last layer: its Tanh bounds the output


def test_a_1000_layer_mlp_page_stays_small_and_loads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(1000)])
    start = time.perf_counter()
    page, plan = _page(model, torch.randn(8, 64), tmp_path, "mlp1000", gate="rezero")
    built = time.perf_counter() - start
    size = page.stat().st_size
    seen = probe(page)
    print(
        f"\n1,000-layer MLP page: {size:,} bytes ({size / 1e6:.2f} MB); browser load event at {seen.load_ms:.0f} ms, "
        f"laid out at {seen.ready_ms:.0f} ms after navigation start; chromium run {seen.wall_s:.2f} s with start-up; "
        f"conversion, report and page {built:.1f} s"
    )
    _loads_cleanly(seen)
    assert seen.site_arcs == len(plan.sites) == 1000
    assert size < MAX_PAGE
