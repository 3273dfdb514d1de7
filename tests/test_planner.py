"""The plan stage: policies, groups, patterns, reasons, printing and dict conversion."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import ImprovedResidualNetwork, vgg_style_cnn

import resify
from resify.constants import PLAN_SCHEMA_VERSION


def test_plan_prints_a_table_and_converts_to_json():
    plan = resify.plan(ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False), torch.randn(10, 128))
    text = str(plan)
    assert "layers.0.0" in text and "Linear(128, 64)" in text and "[10, 128] -> [10, 64]" in text
    assert "total: 5 shortcut(s) (5 projection)" in text
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["schema_version"] == PLAN_SCHEMA_VERSION == 4
    assert [s["kind"] for s in d["sites"]] == ["projection"] * 5
    assert d["sites"][0]["in_shape"] == [10, 128] and d["sites"][0]["added_params"] == 128 * 64 + 64
    assert d["sites"][0]["shortcut"] == {
        "form": "projection",
        "op": "linear",
        "channels": [128, 64],
        "dims": 0,
        "stride": [],
        "pool": False,
        "pool_last": False,
        "norm": None,
        "groups": 1,
        "upsample": False,
    }
    assert d["policy"]["shortcut"] == "auto"
    assert resify.Plan.from_dict(d) == plan


# A plan of schema version 1 (resify 0.1.0 before Skipped.code and the typed shortcut), as its
# to_dict wrote it for a conv -> BN -> ReLU -> max-pool stage and a head that is skipped.
_PLAN_V1 = {
    "schema_version": 1,
    "model_class": "Sequential",
    "tracer": "symbolic",
    "policy": {
        "shortcut": "auto",
        "group": 1,
        "include": [],
        "exclude": [],
        "gate": None,
        "gate_init": None,
        "leaf_modules": [],
        "preserve_output": False,
        "dense_max_growth": None,
    },
    "n_layers": 2,
    "params_before": 1000,
    "added_params": 112,
    "sites": [
        {
            "kind": "projection",
            "start": "0",
            "end": "0",
            "layers": ["0"],
            "in_shape": [2, 3, 8, 8],
            "out_shape": [2, 16, 4, 4],
            "gate": None,
            "gate_init": None,
            "added_params": 80,
            "projection": "BatchNorm2d",
            "anchor": "_0",
            "exit": "_3",
            "name": "0",
            "stride": [],
            "pool": True,
            "pool_last": True,
            "norm": "BatchNorm2d",
            "channels": [3, 16],
            "channel_dim": 1,
            "preserve_output": False,
            "consumer": None,
            "extra_channels": 0,
        },
        {
            "kind": "projection",
            "start": "4",
            "end": "4",
            "layers": ["4"],
            "in_shape": [2, 16, 4, 4],
            "out_shape": [2, 16, 2, 2],
            "gate": None,
            "gate_init": None,
            "added_params": 0,
            "projection": "AvgPool2d(→out)",
            "anchor": "_4",
            "exit": "_6",
            "name": "4",
            "stride": [],
            "pool": True,
            "pool_last": False,
            "norm": None,
            "channels": [16, 16],
            "channel_dim": 1,
            "preserve_output": False,
            "consumer": None,
            "extra_channels": 0,
        },
    ],
    "skipped": [{"start": "8", "end": "8", "reason": "the span is linear (no activation, norm or pool): ..."}],
    "existing": [],
    "notes": [],
}


def test_a_plan_of_schema_version_1_is_still_read():
    plan = resify.Plan.from_dict(_PLAN_V1)
    assert [s.projection for s in plan.sites] == ["Conv2d(3, 16, 1) + BatchNorm2d + AvgPool2d(→out)", "AvgPool2d(→out)"]
    assert [s.kind for s in plan.sites] == ["projection", "projection"]
    assert plan.skipped[0].code == "unrecorded" and plan.skipped[0].reason.startswith("the span is linear")
    assert plan.added_params == 80 and plan.to_dict()["schema_version"] == PLAN_SCHEMA_VERSION
    assert plan.policy.gate is None and all(s.gate_reason is None for s in plan.sites)  # given, not chosen
    with pytest.raises(resify.PlanError, match=f"schema_version {PLAN_SCHEMA_VERSION} or older, found 99"):
        resify.Plan.from_dict({**_PLAN_V1, "schema_version": 99})


def test_plan_is_frozen():
    plan = resify.plan(ImprovedResidualNetwork([8, 8], False))
    with pytest.raises(AttributeError):
        plan.sites = ()  # type: ignore[misc]


def test_group_spans_several_layers():
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.ReLU())])
    plan = resify.plan(model, torch.randn(2, 16), group=2)
    assert [(s.start, s.end) for s in plan.sites] == [("0", "2"), ("4", "6"), ("8", "10")]
    assert all(len(s.layers) == 2 for s in plan.sites)
    plan3 = resify.plan(model, torch.randn(2, 16), group=4)
    assert [(s.start, s.end) for s in plan3.sites] == [("0", "6")]
    assert plan3.skipped[-1].reason == "only 2 layer(s) left for group=4"
    assert plan3.skipped[-1].code == "group_remainder"
    x = torch.randn(3, 16)
    converted = resify.apply(model, x, group=2)
    ref = x
    for i in range(0, 12, 4):
        ref = ref + model[i + 3](model[i + 2](model[i + 1](model[i](ref))))
    torch.testing.assert_close(converted(x), ref)


def test_include_and_exclude_patterns():
    model = vgg_style_cnn()
    x = torch.randn(2, 3, 16, 16)
    plan = resify.plan(model, x, exclude=["2*"])
    assert "22" not in [s.start for s in plan.sites]
    assert any(s.start == "22" and "excluded by pattern '2*'" in s.reason for s in plan.skipped)
    assert {s.code for s in plan.skipped} == {"excluded"}
    plan = resify.plan(model, x, include="1?")
    assert [s.start for s in plan.sites] == ["10", "13", "17"]
    assert any("not matched by include" in s.reason for s in plan.skipped)


def test_flatten_inside_a_group_is_a_rank_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    plan = resify.plan(model, torch.randn(2, 3, 8, 8), group=2)
    assert plan.sites == ()
    assert "rank change [2, 3, 8, 8] -> [2, 10]" in plan.skipped[0].reason
    assert plan.skipped[0].code == "rank_change"


def test_valid_convolution_gets_a_shortcut_pooled_to_the_branch_size_at_run_time():
    """10x10 -> 8x8 follows no stride: the shortcut average-pools to the branch's size, at every size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    converted = resify.apply(model, torch.randn(2, 3, 10, 10), gate=None).eval()
    plan = resify.applied_plan(converted)
    assert [(s.start, s.projection) for s in plan.sites] == [("0", "AvgPool2d(→out) + Conv2d(3, 8, 1)"), ("2", None)]
    w = converted.get_submodule("resify.0.proj").weight
    for x in (torch.randn(2, 3, 10, 10), torch.randn(3, 3, 13, 7)):  # and another size and batch
        h = model[1](model[0](x))
        h = h + F.conv2d(F.adaptive_avg_pool2d(x, h.shape[2:]), w)
        torch.testing.assert_close(converted(x), model[2](h) + h, rtol=1e-5, atol=1e-6)


def test_branches_are_not_single_entry_single_exit():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(8, 8)
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return self.a(h) * self.b(h)

    plan = resify.plan(TwoHeads(), torch.randn(2, 8))
    assert [s.start for s in plan.sites] == ["trunk"]
    reasons = {s.start: s.reason for s in plan.skipped}
    assert "also used by" in reasons["a"] and "single-entry single-exit" in reasons["a"]


def test_functional_layers_are_found():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 16) * 0.1)
            self.w2 = nn.Parameter(torch.randn(8, 16) * 0.1)

        def forward(self, x):
            x = torch.tanh(nn.functional.linear(x, self.w1))
            return nn.functional.linear(x, self.w2)

    x = torch.randn(2, 16)
    model = Functional()
    converted = resify.apply(model, x)
    plan = resify.applied_plan(converted)
    assert [(s.start, s.kind) for s in plan.sites] == [("w1", "identity")]
    # w2 is found too: a bare head that changes the shape, so it is skipped with the reason
    assert [(s.start, s.code) for s in plan.skipped] == [("w2", "linear_span")]
    assert converted(x).shape == (2, 8)


@pytest.mark.parametrize(
    "head, expected",
    [
        (lambda: nn.Linear(32, 10), "skipped"),  # logits: linear
        (lambda: nn.Sequential(nn.Dropout(0.1), nn.Linear(32, 10)), "skipped"),  # dropout is no nonlinearity
        (lambda: nn.Sequential(nn.Linear(32, 10), nn.Dropout(0.1)), "skipped"),
        (lambda: nn.Sequential(nn.Linear(32, 10), nn.GELU()), "projection"),
        (lambda: nn.Sequential(nn.Linear(32, 10), nn.LayerNorm(10)), "projection"),
        (lambda: nn.Sequential(nn.Linear(32, 10), nn.Softshrink()), "projection"),  # any elementwise activation
        (lambda: nn.Sequential(nn.Linear(32, 10), nn.RReLU()), "projection"),
        (lambda: nn.Linear(32, 32), "identity"),  # same shape: x + W·x is kept
    ],
)
def test_a_projection_is_only_put_beside_a_span_with_a_nonlinearity(head, expected):
    """W·x + P·x = (W + P)·x: beside a purely linear span a projection adds parameters, nothing else."""
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), head())
    plan = resify.plan(model, torch.randn(4, 32))
    head_start = [layer for layer in ("2", "2.0", "2.1") if any(x.start == layer for x in (*plan.sites, *plan.skipped))]
    assert len(head_start) == 1
    site = next((x for x in plan.sites if x.start == head_start[0]), None)
    if expected == "skipped":
        assert site is None
        (reason,) = [x.reason for x in plan.skipped if x.start == head_start[0]]
        assert reason == "the span is linear (no activation, norm or pool): a projection would add one more linear map"
    else:
        assert site is not None and site.kind == expected
    # the first layer (Linear + ReLU, same shape) always gets its identity shortcut
    assert plan.sites[0].start == "0" and plan.sites[0].kind == "identity"


def test_non_float_input_is_skipped():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x):
            return self.conv(x.float())

    plan = resify.plan(Embed(), torch.ones(2, 4, 5, dtype=torch.long))
    assert plan.sites[0].in_shape == (2, 4, 5)  # the cast is before the layer: its input is float


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"shortcut": "sideways"}, "shortcut must be one of 'auto', 'identity'"),
        ({"gate": "sigmoid"}, "gate must be one of"),
        ({"group": 0}, "group must be a positive integer"),
        ({"group": 1.5}, "group must be a positive integer"),
        ({"gate": None, "gate_init": 0.1}, "gate_init needs a gate"),
        ({"shorcut": "auto"}, "unknown policy keyword"),
    ],
)
def test_bad_policies_raise_plan_errors(kwargs, match):
    with pytest.raises(resify.PlanError, match=match):
        resify.plan(ImprovedResidualNetwork([8, 8], False), **kwargs)


def test_plan_table_fits_its_width_and_cuts_shortcut_labels_at_their_end():
    from reference import vgg_style_cnn

    from resify.views.plan_table import plan_text

    plan = resify.plan(vgg_style_cnn(), torch.randn(2, 3, 32, 32), gate=None)
    for width in (80, 100):
        lines = plan_text(plan, width=width).splitlines()
        assert max(map(len, lines)) <= width
        table = lines[lines.index(next(x for x in lines if x.startswith("span"))) :]
        table = table[: table.index("")]
        assert len(table) == 2 + len(plan.sites) and max(map(len, table)) <= width
    row = next(line for line in plan_text(plan, width=80).splitlines() if line.startswith("6 "))
    assert "Conv2d(16, 32, 1) + Ba…" in row and row.endswith(" 576")  # the label is cut at its end
