"""resify.views.history_plot: a watch history's relative flows and its heatmap figure (``plot_histories``)."""

import math

import pytest

from resify.errors import ResifyError
from resify.report import GradientFlow, LayerFlow
from resify.report.history import FlowHistory, StepFlow
from resify.views.history_plot import _edges, _level, plot_histories, relative_flows


def layer(name, flow, kind="Linear", added=False):
    return LayerFlow(name, kind, 0, added, (2, 2), 1.0, flow, 1.0, flow, 1.0)


def step(i, *layers, verdict="healthy", gates=None, overflow=False):
    flow = GradientFlow("M", tuple(layers), verdict, "why", None, None, "training loss", 1.0)
    return StepFlow(i, flow, gates or {}, overflow=overflow)


def history(*records, label="M"):
    return FlowHistory("M", label, 10, tuple(records))


def test_relative_flows_are_each_layers_flow_over_the_last_at_each_step():
    h = history(
        step(0, layer("a", 1.0), layer("g", 9.0, kind="Gate", added=True), layer("b", 4.0)),
        step(10, layer("a", 3.0), layer("p", 7.0, added=True), layer("b", 2.0)),
        step(20, layer("b", 5.0), layer("c", 10.0)),  # 'a' absent; a new layer last
    )
    names, rows = relative_flows(h)
    assert names == ["a", "b", "c"]  # the model's own layers, in order of first appearance
    assert rows == [[0.25, 1.5, None], [1.0, 1.0, 0.5], [None, None, 1.0]]


def test_a_step_without_a_last_flow_gives_none():
    h = history(step(0, layer("a", 1.0), layer("b", 0.0)), step(1, layer("a", None), layer("b", None)))
    names, rows = relative_flows(h)
    # step 0: the last own layer's flow is 0 (no ratio); step 1: no layer has a flow
    assert rows == [[None, None], [None, None]]


@pytest.mark.parametrize(
    "v,level", [(None, None), (0.0, -7.0), (-1.0, -7.0), (100.0, 2.0), (1e-3, -3.0), (math.inf, 9.0), (math.nan, 9.0)]
)
def test_level(v, level):
    found = _level(v, -7.0, 9.0)
    assert math.isnan(found) if level is None else found == pytest.approx(level)


@pytest.mark.parametrize(
    "steps,edges",
    [([5], [4.5, 5.5]), ([0, 10, 20], [-5, 5, 15, 25]), ([0, 10, 40], [-5, 5, 25, 55]), ([3, 4], [2.5, 3.5, 4.5])],
)
def test_edges_are_halfway_between_steps(steps, edges):
    assert _edges(steps) == edges


def test_plot_refuses_other_formats_and_empty_histories(tmp_path):
    h = history(step(0, layer("a", 1.0)))
    with pytest.raises(ResifyError, match=r"^plot\(\) writes .png or .svg files, found 'flow.pdf'; pass e.g."):
        plot_histories([h], tmp_path / "flow.pdf", "t")
    with pytest.raises(ResifyError, match="needs at least one recorded step"):
        plot_histories([h, history()], tmp_path / "flow.png", "t")
    with pytest.raises(ResifyError, match="needs at least one recorded step"):
        plot_histories([], tmp_path / "flow.png", "t")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix,magic", [("png", b"\x89PNG\r\n\x1a\n"), ("svg", b"<?xml")])
def test_plot_writes_the_file_with_gates_overflow_and_gaps(tmp_path, suffix, magic):
    pytest.importorskip("matplotlib")
    gate = "a.resify.0.alpha"
    h = history(
        step(0, layer("a", 1.0), layer("b", 1.0), gates={gate: (0.0,)}),
        step(1, layer("a", 1e-3), layer("b", 1.0), verdict="vanishing", gates={gate: (0.1,)}),
        step(2, layer("a", math.inf), layer("b", 1.0), verdict="exploding", overflow=True),
        step(3, layer("b", 1.0), verdict="healthy", gates={gate: (0.2,)}),
    )
    path = plot_histories([h, history(step(0, layer("x", 1.0)), label="other")], tmp_path / "sub" / f"f.{suffix}", "t")
    assert path == tmp_path / "sub" / f"f.{suffix}"
    assert path.read_bytes().startswith(magic)
    if suffix == "svg":  # the legend names what the figure holds (matplotlib writes the texts as comments)
        text = path.read_text()
        for said in ("vanishing", "skipped (GradScaler overflow)", "not measured", "gate value", "1 gate(s)"):
            assert said in text, said


def test_each_step_is_divided_by_the_verdicts_last_layer():
    """The heatmap, the charts and the verdict read one last layer: the last with an input gradient."""
    h = history(step(0, layer("a", 2.0), layer("b", 1.0)), step(1, layer("a", 2.0), layer("b", None)))
    names, rows = relative_flows(h)
    assert names == ["a", "b"]
    # step 1: 'b' has no input gradient, so 'a' is the last layer the verdict judges
    assert [r.flow.last_flow for r in h.records] == [1.0, 2.0]
    assert rows == [[2.0, 1.0], [1.0, None]]
    zero = history(step(0, layer("a", 2.0), layer("b", 0.0)))  # a last flow of 0: no ratio
    assert relative_flows(zero)[1] == [[None], [None]]
