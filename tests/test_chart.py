"""resify.views.chart: the gradient-flow chart as inline SVG (``flow_chart_svg``)."""

import re
import xml.etree.ElementTree as ET

import pytest

from resify.report import GradientFlow, LayerFlow
from resify.views.chart import SERIES_COLOURS, flow_chart_svg

SVG = "{http://www.w3.org/2000/svg}"


def layer(name, flow, kind="Linear", added=False, depth=0):
    """A layer whose flow (input-gradient norm, and weight-gradient norm too) is ``flow``."""
    return LayerFlow(name, kind, depth, added, (2, 2), 1.0, flow, 1.0, flow, 1.0)


def report(*layers, verdict="healthy"):
    return GradientFlow("M", tuple(layers), verdict, "why", None, None, "mse to zeros", 1.0)


def parse(svg):
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    assert root.tag == f"{SVG}svg" and root.get("class") == "resify-chart"
    return root


def test_points_are_flow_over_the_last_layers_on_a_log_scale():
    # flows ÷ the last: 1e-3, 1e-1, 1 -> decades from 1e-4 (one below min(1e-3, 1e-2/10)) to 1e5 (one above 1e3*10)
    svg = flow_chart_svg([("", report(layer("a", 2e-3), layer("b", 2e-1), layer("c", 2.0)))])
    root = parse(svg)
    # by hand: left 58, plot width 640-58-16 = 566; top 30, bottom 24 + round(1 * 3.9) = 28 -> height 242;
    # y(v) = 30 + 242 * (5 - log10 v) / 9
    (line,) = root.iter(f"{SVG}polyline")
    assert line.get("points") == "58.0,245.1 341.0,191.3 624.0,164.4"
    assert line.get("stroke") == SERIES_COLOURS[""]
    tips = [c.find(f"{SVG}title").text for c in root.iter(f"{SVG}circle")]
    assert tips == ["a: 1.00e-03", "b: 1.00e-01", "c: 1.00e+00"]
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end" and t.get("transform") is None]
    assert ticks == ["1e-4", "1e-2", "1", "1e2", "1e4"]  # 9 decades: every second one (ceil(9 / 8))
    assert "healthy" in [t.text for t in root.iter(f"{SVG}text")]  # the legend: the verdict


def test_the_bands_sit_at_the_verdict_thresholds():
    root = parse(flow_chart_svg([("", report(layer("a", 1.0), layer("b", 1.0)))]))
    # decades -4 .. 5 again (the bands' own margins): y(1e3) = 30 + 242*2/9 = 83.8, y(1e-2) = 30 + 242*7/9 = 218.2
    rects = {r.find(f"{SVG}title").text: r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None}
    exploding, vanishing = rects["exploding band (> 1000)"], rects["vanishing band (< 0.01)"]
    assert (exploding.get("y"), exploding.get("height")) == ("30", "53.8")
    assert (vanishing.get("y"), vanishing.get("height")) == ("218.2", "53.8")


def test_a_zero_is_a_triangle_on_the_bottom_and_a_missing_figure_a_gap():
    root = parse(
        flow_chart_svg(
            [("", report(layer("a", 1.0), layer("b", 0.0), layer("c", 1.0), layer("d", None), layer("e", 1.0)))]
        )
    )
    assert not list(root.iter(f"{SVG}polyline"))  # every run is one point long: no line
    (path,) = root.iter(f"{SVG}path")
    assert path.find(f"{SVG}title").text == "1 layer(s) at 0 (underflow): b"
    assert len(list(root.iter(f"{SVG}circle"))) == 3  # a, c, e


def test_added_layers_and_gates_are_not_on_the_axis():
    flow = report(
        layer("a", 1.0),
        layer("a.resify.0.proj", 5.0, added=True),
        layer("a.resify.0.alpha", None, kind="Gate", added=True),
        layer("b", 1.0),
    )
    root = parse(flow_chart_svg([("", flow)]))
    labels = [t.text for t in root.iter(f"{SVG}text") if (t.get("transform") or "").startswith("translate")]
    assert labels == ["a", "b"]


def test_two_series_share_one_axis_with_their_colours_and_labels():
    before = report(layer("a", 1e-3), layer("b", 1.0), verdict="vanishing")
    after = report(layer("a", 0.5), layer("b", 1.0), layer("c", 1.0))
    root = parse(flow_chart_svg([("before", before), ("after", after)]))
    lines = list(root.iter(f"{SVG}polyline"))
    assert [line.get("stroke") for line in lines] == [SERIES_COLOURS["before"], SERIES_COLOURS["after"]]
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "before: vanishing" in texts and "after: healthy" in texts
    tips = {c.find(f"{SVG}title").text for c in root.iter(f"{SVG}circle")}
    assert {"before: a: 1.00e-03", "after: c: 1.00e+00"} <= tips


def test_names_and_labels_are_escaped():
    svg = flow_chart_svg([("x<&>", report(layer("a<b>&c", 1.0), layer("d", 1.0)))])
    root = parse(svg)
    assert "a<b>&c" in [t.text for t in root.iter(f"{SVG}text")]
    assert "<b>" not in svg


def test_many_layers_are_numbered_and_past_150_drawn_without_markers():
    many = report(*(layer(f"layers.{i}", 1.0 + i) for i in range(20)))
    root = parse(flow_chart_svg([("", many)]))
    assert not [t for t in root.iter(f"{SVG}text") if (t.get("transform") or "").startswith("translate")]
    numbers = [t.text for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "middle"]
    assert numbers[:-1] == ["0", "3", "6", "9", "12", "15", "18", "19"]
    assert numbers[-1] == "depth (the model's layers in forward order)"
    assert len(list(root.iter(f"{SVG}circle"))) == 20
    huge = report(*(layer(f"l{i}", 1.0) for i in range(151)))
    root = parse(flow_chart_svg([("", huge)]))
    assert not list(root.iter(f"{SVG}circle")) and len(list(root.iter(f"{SVG}polyline"))) == 1


@pytest.mark.parametrize("width,height", [(640, 300), (400, 200)])
def test_the_size_is_the_one_asked_for(width, height):
    root = parse(flow_chart_svg([("", report(layer("a", 1.0)))], width=width, height=height))
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == (
        str(width),
        str(height),
        f"0 0 {width} {height}",
    )
    # a single layer sits in the middle of the plot
    (circle,) = root.iter(f"{SVG}circle")
    assert float(circle.get("cx")) == pytest.approx(58 + (width - 74) / 2, abs=0.05)
    assert re.fullmatch(r"\d+\.\d", circle.get("cy"))
