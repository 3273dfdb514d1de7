"""resify.report.history: StepFlow, FlowHistory (series, table, JSON) and the verdict timeline."""

import json
import math

import pytest

from resify.errors import ResifyError
from resify.report import GradientFlow, LayerFlow
from resify.report.history import (
    FIELDS,
    LOSS_SEEN,
    FlowHistory,
    StepFlow,
    VerdictChange,
    VerdictTimeline,
    _ranges,
)


def layer(name, flow, verdict="healthy", kind="Linear", added=False):
    return LayerFlow(name, kind, 0, added, (2, 2), 0.5, flow, 0.25, flow, 2.0, verdict=verdict)


def step(i, verdict="healthy", layers=None, gates=None, overflow=False, recommendation=None):
    layers = layers or (layer("a", 1.0), layer("b", 1.0))
    flow = GradientFlow("Net", tuple(layers), verdict, f"why {i}", recommendation, None, LOSS_SEEN, 1.0)
    return StepFlow(i, flow, gates or {}, scale=2.0**i, overflow=overflow)


def history(*records, label="Net"):
    return FlowHistory("Net", label, 5, tuple(records))


@pytest.mark.parametrize(
    "positions,text", [((3,), "3"), ((2, 3, 4, 9), "2–4, 9"), ((0, 2, 4), "0, 2, 4"), ((1, 2, 5, 6, 7), "1–2, 5–7")]
)
def test_ranges(positions, text):
    assert _ranges(positions) == text


def test_the_timeline_keeps_the_first_step_of_each_verdict_and_the_layers_that_carry_it():
    vanishing = (
        layer("a", 1e-4, "vanishing"),
        layer("g", None, kind="Gate", added=True),
        layer("b", 1e-3, "vanishing"),
    )
    vanishing += (layer("c", 1.0), layer("d", 1e-3, "vanishing"), layer("e", 1.0))
    h = history(
        step(0),
        step(5),
        step(10, "vanishing", vanishing, recommendation="try this"),
        step(15, "vanishing", vanishing),
        step(20, "exploding", overflow=True),  # left out: the scaler skips it
        step(25),
    )
    t = h.verdicts
    assert t.steps == (0, 5, 10, 15, 25) and t.verdicts == ("healthy",) * 2 + ("vanishing",) * 2 + ("healthy",)
    assert t.skipped == (20,) and t.last == "healthy"
    assert [(c.step, c.verdict, c.before) for c in t.changes] == [
        (0, "healthy", None),
        (10, "vanishing", "healthy"),
        (25, "healthy", "vanishing"),
    ]
    change = t.changes[1]
    # the own layers' positions (the gate is not one of them): a 0, b 1, d 3
    assert change.positions == (0, 1, 3) and change.layers == ("a", "b", "d")
    assert str(change) == "from step 10: vanishing in 3 layers, 0–1, 3 ('a' … 'd'); why 10; try this"
    assert str(t.changes[0]) == "from step 0: healthy; why 0"
    assert t.summary().splitlines()[-1] == "left out: 1 step(s) whose gradients overflowed under the GradScaler"
    assert [t.at(s) for s in (-1, 0, 9, 10, 24, 25, 1000)] == [None, "healthy", "healthy", "vanishing"] + [
        "vanishing",
        "healthy",
        "healthy",
    ]


def test_one_layer_is_named_alone():
    c = VerdictChange(3, "exploding", "healthy", "grew", (4,), ("x",))
    assert str(c) == "from step 3: exploding in 1 layer, 4 ('x'); grew"


def test_an_empty_timeline():
    t = VerdictTimeline((), (), ())
    assert t.summary() == "no step recorded" and str(t) == t.summary() and t.last is None and t.at(5) is None
    h = history()
    assert h.summary() == "Net: 0 record(s) every 5 backward(s), no step\nno step recorded"


def test_summary_names_the_label_and_the_steps():
    assert history(step(0), step(5), label="run").summary().splitlines()[0] == (
        "run (Net): 2 record(s) every 5 backward(s), steps 0–5"
    )
    assert history(step(7)).summary().splitlines()[0] == "Net: 1 record(s) every 5 backward(s), step 7"


def test_series_and_layers():
    h = history(step(0, layers=(layer("a", 1.0), layer("b", 2.0))), step(5, layers=(layer("b", 3.0), layer("c", 4.0))))
    assert h.layers == ("a", "b", "c") and h.steps == (0, 5)
    assert h.series("b") == [2.0, 3.0] and h.series("a") == [1.0, None]
    assert h.series("c", "grad_to_weight") == [None, 0.25]
    with pytest.raises(ResifyError, match=r"expected a figure among mean_abs_grad, .*, found 'flow'"):
        h.series("a", "flow")


def test_to_dict_is_one_row_per_step_and_layer_with_the_mean_gate_value():
    gate = layer("a.resify.0.gamma", None, kind="Gate", added=True)
    h = history(step(0, layers=(layer("a", 1.0), gate), gates={gate.name: (1.0, 2.0, 6.0)}), step(5, overflow=True))
    d = h.to_dict()
    assert list(d) == ["step", "layer", "kind", "depth", "added", *FIELDS, "verdict", "step_verdict", "scale"] + [
        "overflow",
        "gate_value",
    ]
    assert {len(v) for v in d.values()} == {4}
    assert d["step"] == [0, 0, 5, 5] and d["layer"] == ["a", gate.name, "a", "b"]
    assert d["gate_value"] == [None, 3.0, None, None]  # (1 + 2 + 6) / 3
    assert d["scale"] == [1.0, 1.0, 32.0, 32.0] and d["overflow"] == [False, False, True, True]
    assert d["mean_abs_grad"] == [0.5] * 4 and d["activation_rms"] == [2.0] * 4


def test_to_json_writes_non_finite_numbers_as_strings_and_every_gate_value():
    gate = "a.resify.0.alpha"
    h = history(step(0, layers=(layer("a", math.inf), layer("b", math.nan)), gates={gate: (0.0,)}), step(5, gates={}))
    doc = json.loads(h.to_json())
    assert doc["schema_version"] == 2  # as docs/watch.md says (to_json's docstring still says 1)
    assert doc["kind"] == "resify.watch" and doc["label"] == "Net" and doc["every"] == 5
    assert doc["steps"] == [0, 5] and doc["verdicts"] == ["healthy", "healthy"]
    assert doc["table"]["input_grad_norm"] == ["inf", "nan", 1.0, 1.0]
    assert doc["gates"] == {gate: [[0.0], []]}
    assert json.loads(h.to_json(indent=2)) == doc
