"""The architecture diagram (resify/views/diagram.py): one row per layer in forward order, one arc per new and
per existing shortcut, coloured by kind, with tooltips; checked on the parsed SVG."""

import re
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from reference import ImprovedResidualNetwork

import resify
from resify.views.diagram import COLOURS, architecture_svg, layer_order

SVG = "{http://www.w3.org/2000/svg}"
try:
    import torchvision
except ImportError:  # a test extra
    torchvision = None


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML: it also opens as a .svg file on its own
    assert root.tag == f"{SVG}svg" and "resify-diagram" in root.get("class", "")
    return root


def arcs(root: ET.Element, kind: str) -> list[tuple[ET.Element, str]]:
    """(path, tooltip) of the arcs whose class has ``kind`` ("site" or "existing")."""
    found = []
    for group in root.iter(f"{SVG}g"):
        path = group.find(f"{SVG}path")
        if group.get("class") == "shortcut" and path is not None and kind in path.get("class", "").split():
            found.append((path, group.findtext(f"{SVG}title")))
    return found


def rows(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.get("class", "").split()[:1] == ["layer"]]


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )


def _models():
    yield "seed", lambda: ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False), (10, 128)
    if torchvision is not None:
        yield "resnet18", lambda: torchvision.models.resnet18(weights=None).eval(), (1, 3, 224, 224)
        yield "densenet121", lambda: torchvision.models.densenet121(weights=None).eval(), (1, 3, 224, 224)


@pytest.mark.parametrize("name, build, shape", list(_models()), ids=[m[0] for m in _models()])
def test_one_arc_per_new_site_and_per_existing_shortcut(name, build, shape):
    torch.manual_seed(0)
    plan = resify.plan(build(), torch.randn(*shape))
    root = parse(architecture_svg(plan))
    new, old = arcs(root, "site"), arcs(root, "existing")
    assert (len(new), len(old)) == (len(plan.sites), len(plan.existing))
    assert len(new) + len(old) == sum("arc" in p.get("class", "").split() for p in root.iter(f"{SVG}path"))
    assert [tip.splitlines()[0] for _, tip in new] == [
        f"new shortcut '{s.name}' ({s.kind}{'' if s.projection is None else ': ' + s.projection})" for s in plan.sites
    ]
    assert [tip.splitlines()[0].split(" at ")[1] for _, tip in old] == [
        f"'{e.node}' ({e.bypass} bypass)" for e in plan.existing
    ]
    assert [r.get("data-name") for r in rows(root)] == list(plan.layers) and len(plan.layers) == plan.n_layers


def _ys(path: ET.Element) -> tuple[float, float]:
    ys = [float(v) for v in re.findall(r"[\d.]+,([\d.]+)", path.get("d"))]
    return min(ys), max(ys)


def test_an_arc_runs_from_its_first_layer_to_its_last_and_nested_arcs_move_outwards():
    pytest.importorskip("torchvision")
    plan = resify.plan(torchvision.models.densenet121(weights=None).eval(), torch.randn(1, 3, 224, 224))
    root = parse(architecture_svg(plan))
    tops = {r.get("data-name"): float(r.find(f"{SVG}rect").get("y")) for r in rows(root)}
    height = float(rows(root)[0].find(f"{SVG}rect").get("height"))
    for (path, _), e in zip(arcs(root, "existing"), plan.existing):
        inside = [tops[n] for n in e.layers if n in tops]
        y1, y2 = _ys(path)
        assert min(inside) <= y1 <= min(inside) + height and max(inside) <= y2 <= max(inside) + height
    # the concatenations of one dense block nest: each contains the one before, so it reaches further out
    block = [p for p, tip in arcs(root, "existing") if "features.denseblock1." in tip]
    reach = [min(float(x) for x in re.findall(r"([\d.]+),[\d.]+", p.get("d"))) for p in block]
    assert len(block) == 6 and reach == sorted(reach, reverse=True) and len(set(reach)) == 6


@pytest.mark.parametrize(
    "policy, expected",
    [
        ({}, ["projection", "pooled", "projection", "identity"]),
        ({"shortcut": "dense"}, ["dense", "dense", "dense"]),
    ],
)
def test_arcs_are_coloured_by_kind(policy, expected):
    plan = resify.plan(small_cnn(), torch.randn(2, 3, 16, 16), **policy)
    svg = architecture_svg(plan)
    found = [path.get("class").split()[2] for path, _ in arcs(parse(svg), "site")]
    assert found == expected
    # the colours are attributes, not a style sheet: a viewer that strips <style> still shows them
    assert [path.get("stroke") for path, _ in arcs(parse(svg), "site")] == [COLOURS[k] for k in expected]
    assert "<style" not in svg


@pytest.mark.parametrize(
    "policy, knob", [({"gate": "rezero"}, "α"), ({"gate": "layerscale"}, "γ"), ({"preserve_output": True}, "β")]
)
def test_a_gate_or_beta_is_a_knob_on_its_arc(policy, knob):
    plan = resify.plan(small_cnn(), torch.randn(2, 3, 16, 16), **policy)
    root = parse(architecture_svg(plan))
    group = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "knobs")
    knobs = [t.text for t in group.iter(f"{SVG}text")]
    assert knobs == [knob] * len(plan.sites)
    if "gate" in policy:
        assert all(f"gate {policy['gate']} (starts at" in tip for _, tip in arcs(root, "site"))


def test_skipped_candidates_are_marked_with_their_reason():
    plan = resify.plan(small_cnn(), torch.randn(2, 3, 16, 16))
    root = parse(architecture_svg(plan))
    marks = [g.findtext(f"{SVG}title") for g in root.iter(f"{SVG}g") if g.get("class", "").startswith("skip")]
    assert marks == [f"skipped {s.start} [{s.code}]: {s.reason}" for s in plan.skipped] and marks
    tips = {r.get("data-name"): r.findtext(f"{SVG}title") for r in rows(root)}
    assert tips["0"].splitlines() == ["0", "[2, 3, 16, 16] → [2, 8, 16, 16]"]  # name and shapes


def test_a_1000_layer_mlp_is_one_legible_row_per_layer():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(1000)])
    plan = resify.plan(model, torch.randn(2, 16), gate="rezero")
    svg = architecture_svg(plan)
    root = parse(svg)
    found = rows(root)
    assert [r.findtext(f"{SVG}text") for r in found] == [f"{i}.0" for i in range(1000)]
    ys = [float(r.find(f"{SVG}rect").get("y")) for r in found]
    assert all(b - a == ys[1] - ys[0] >= 20 for a, b in zip(ys, ys[1:]))  # no row squeezed: the page scrolls
    assert len(arcs(root, "site")) == 1000 and len(svg) < 700_000


def test_names_are_escaped_and_long_ones_shortened_from_the_start():
    plan = resify.plan(small_cnn(), torch.randn(2, 3, 16, 16))
    long_name = "encoder." * 10 + "<b>&fc"
    odd = replace(plan, model_class="<script>x</script>", layers=(long_name, *plan.layers[1:]))
    svg = architecture_svg(odd)
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    root = parse(svg)
    first = rows(root)[0]
    assert first.get("data-name") == long_name and first.findtext(f"{SVG}title").startswith(long_name)
    shown = first.findtext(f"{SVG}text")
    assert shown.startswith("…") and shown.endswith("<b>&fc") and len(shown) <= 48


def test_a_plan_read_from_json_without_its_layer_order_is_still_drawn():
    plan = resify.plan(small_cnn(), torch.randn(2, 3, 16, 16))
    doc = plan.to_dict()
    assert doc["layers"] == list(plan.layers)
    assert resify.Plan.from_dict(doc).layers == plan.layers
    del doc["layers"]  # written by a resify that did not record it
    old = resify.Plan.from_dict(doc)
    assert old.layers == () and layer_order(old) == list(plan.layers)  # a Sequential: sites, then skips, in order
    assert len(arcs(parse(architecture_svg(old)), "site")) == len(plan.sites)
