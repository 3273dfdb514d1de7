"""resify.report.records: LayerFlow, GradientFlow, LayerChange, FlowComparison and their JSON."""

import json
import math

import pytest

from resify.constants import REPORT_SCHEMA_VERSION
from resify.errors import ResifyError
from resify.report.records import FlowComparison, GradientFlow, LayerChange, LayerFlow


def layer(name="a", *, mean=1.0, gnorm=2.0, inp=3.0, rms=4.0, sim=None, kind="Linear", added=False, depth=0):
    return LayerFlow(name, kind, depth, added, (3, 2), mean, gnorm, 0.5, inp, rms, activation_similarity=sim)


def report(*layers, verdict="healthy", recommendation=None):
    return GradientFlow("Net", tuple(layers), verdict, "why", recommendation, 0.5, "mse to zeros", 0.25)


def test_flow_is_the_input_gradient_else_the_weight_gradient():
    assert layer(inp=3.0, gnorm=2.0).flow == 3.0
    assert layer(inp=None, gnorm=2.0).flow == 2.0
    assert layer(inp=0.0, gnorm=2.0).flow == 0.0  # a measured 0 is a figure, not a gap
    assert layer(inp=None, gnorm=None).flow is None


def test_layer_flow_round_trips_non_finite_and_missing_figures():
    rec = layer(mean=math.inf, gnorm=-math.inf, inp=None, rms=math.nan, sim=0.5)
    d = json.loads(json.dumps(rec.to_dict(), allow_nan=False))
    assert d["mean_abs_grad"] == "inf" and d["grad_norm"] == "-inf" and d["activation_rms"] == "nan"
    assert d["input_grad_norm"] is None and d["shape"] == [3, 2]
    back = LayerFlow.from_dict(d)
    assert back.mean_abs_grad == math.inf and back.grad_norm == -math.inf and math.isnan(back.activation_rms)
    assert back.input_grad_norm is None and back.shape == (3, 2) and back.activation_similarity == 0.5
    assert back.name == rec.name and back.verdict == "healthy"


def test_a_schema_1_layer_has_no_similarity_and_a_bad_verdict_is_refused():
    d = layer().to_dict()
    del d["activation_similarity"]
    assert LayerFlow.from_dict(d).activation_similarity is None
    with pytest.raises(ResifyError, match=r"expected a verdict among healthy, .*, found 'fine'; re-create the report"):
        LayerFlow.from_dict({**d, "verdict": "fine"})


def test_layer_lookup_names_some_layers_when_it_fails():
    flow = report(*(layer(f"l{i}") for i in range(10)))
    assert flow.layer("l3").name == "l3"
    with pytest.raises(ResifyError, match=r"^no layer named 'x' in this report; expected one of l0, l1, .*, l7, …$"):
        flow.layer("x")
    with pytest.raises(ResifyError, match=r"expected one of a$"):
        report(layer("a")).layer("x")


def test_summary():
    assert report(layer()).summary() == "healthy: why"
    assert report(layer(), verdict="vanishing", recommendation="try x").summary() == "vanishing: why; try x"


def test_gradient_flow_json_round_trips_and_carries_the_thresholds():
    flow = report(layer("a"), layer("b", inp=math.inf))
    d = json.loads(flow.to_json())
    assert d["schema_version"] == REPORT_SCHEMA_VERSION and d["kind"] == "resify.gradient_flow"
    assert d["thresholds"]["vanishing_ratio"] == 1e-2 and d["thresholds"]["exploding_ratio"] == 1e3
    assert GradientFlow.from_json(flow.to_json()) == flow
    assert GradientFlow.from_json(flow.to_json(indent=None)) == flow


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", r"expected a resify report in JSON, found invalid JSON \("),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"kind": "resify.flow_comparison", "schema_version": 2}', "expected a 'resify.gradient_flow' report"),
        (
            '{"kind": "resify.gradient_flow"}',
            "schema_version 1 to 2, found kind='resify.gradient_flow' schema_version=None",
        ),
        ('{"kind": "resify.gradient_flow", "schema_version": "2"}', "schema_version='2'"),
        ('{"kind": "resify.gradient_flow", "schema_version": true}', "schema_version=True"),  # not version 1
        ('{"kind": "resify.gradient_flow", "schema_version": 3}', "found 3: it was written by a newer resify"),
    ],
)
def test_from_json_refuses_what_it_cannot_read(text, message):
    with pytest.raises(ResifyError, match=message):
        GradientFlow.from_json(text)


def test_layer_change_ratios_are_after_over_before():
    before = layer("a", mean=2.0, inp=4.0, rms=0.5)
    after = layer("a", mean=6.0, inp=1.0, rms=0.0)
    c = LayerChange(before, after)
    assert (c.name, c.ratio, c.input_ratio, c.activation_ratio) == ("a", 3.0, 0.25, 0.0)
    # undefined where either is missing or before is 0
    c = LayerChange(layer(mean=0.0, inp=None, rms=None), layer(mean=1.0, inp=1.0, rms=1.0))
    assert (c.ratio, c.input_ratio, c.activation_ratio) == (None, None, None)
    d = LayerChange(before, after).to_dict()
    assert d["ratio"] == 3.0 and d["input_ratio"] == 0.25 and d["kind"] == "Linear"


def _comparison(before_layers, after_layers):
    before, after = report(*before_layers), report(*after_layers)
    by_name = {r.name: r for r in after.layers}
    return FlowComparison(
        before=before,
        after=after,
        layers=tuple(LayerChange(r, by_name[r.name]) for r in before.layers if r.name in by_name),
        added=tuple(r for r in after.layers if r.name not in {b.name for b in before.layers}),
        removed=tuple(r.name for r in before.layers if r.name not in by_name),
        headline="first layer: 2× more gradient",
        first_layer_ratio=2.0,
    )


def test_the_output_change_is_the_last_own_layer_with_both_activation_figures():
    c = _comparison(
        [layer("a", rms=1.0), layer("b", rms=2.0), layer("c", rms=None), layer("g", kind="Gate", rms=1.0)],
        [layer("a", rms=3.0), layer("b", rms=5.0), layer("c", rms=7.0), layer("g", kind="Gate", rms=100.0)],
    )
    assert c.output_change.name == "b" and c.output_ratio == 2.5  # 'c' was not measured before, 'g' is a gate
    assert _comparison([layer("a", rms=None)], [layer("a")]).output_ratio is None


def test_comparison_json_round_trips():
    c = _comparison(
        [layer("a"), layer("old")], [layer("a", mean=2.0), layer("a.resify.0.proj", added=True, inp=math.inf)]
    )
    d = json.loads(c.to_json())
    assert d["kind"] == "resify.flow_comparison" and d["output_layer"] == "a" and d["output_ratio"] == 1.0
    assert d["added"] == ["a.resify.0.proj"] and d["removed"] == ["old"] and d["first_layer_ratio"] == 2.0
    back = FlowComparison.from_json(c.to_json())
    assert back == c and back.after.layer("a.resify.0.proj").input_grad_norm == math.inf
    with pytest.raises(ResifyError, match="expected a 'resify.flow_comparison' report"):
        FlowComparison.from_json(c.before.to_json())
