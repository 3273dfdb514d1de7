"""What shortcuts cost: the cost rule, the max_added budget, the grouped and parameter-free forms,
and identities before a trailing pool. Outputs are checked against hand-written references."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import ImprovedResidualNetwork

import resify
from resify.constants import MIN_BUDGET


def _every_parameter_gets_a_gradient(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def _depthwise_block() -> nn.Module:
    """MobileNet's depthwise stage: a stride-2 depthwise conv, then a pointwise one."""
    return nn.Sequential(
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    )


def test_a_projection_beside_a_depthwise_conv_is_grouped_like_it():
    torch.manual_seed(0)
    model = _depthwise_block().eval()
    x = torch.randn(2, 32, 9, 9)
    plan = resify.plan(model, x)
    by_start = {s.start: s for s in plan.sites}
    assert by_start["0"].projection == "Conv2d(32, 32, 1, stride=2, groups=32) + BatchNorm2d"
    assert by_start["0"].added_params == 32 + 2 * 32  # 32 weights (one per group) and the norm's
    assert by_start["3"].projection == "Conv2d(32, 64, 1) + BatchNorm2d"  # equal to the span's cost: kept
    converted = resify.apply(model, x).eval()
    proj = converted.get_submodule("resify.0.proj")
    assert proj.groups == 32 and proj.weight.shape == (32, 1, 1, 1)
    assert converted(torch.randn(1, 32, 12, 12)).shape == model(torch.randn(1, 32, 12, 12)).shape
    _every_parameter_gets_a_gradient(converted.train(), x)


def test_a_dense_projection_past_the_cost_rule_is_skipped_or_made_parameter_free():
    model, x = _depthwise_block().eval(), torch.randn(2, 32, 9, 9)
    learned_only = resify.plan(model, x, projection="conv")
    (skip,) = [s for s in learned_only.skipped if s.start == "0"]
    assert skip.code == "projection_cost"
    assert "Conv2d(32, 32, 1, stride=2) + BatchNorm2d projection of 1,088 parameters" in skip.reason
    assert "the span's own 352" in skip.reason and "projection_cost=None" in skip.reason
    forced = resify.plan(model, x, projection="conv", projection_cost=None)
    assert [s.start for s in forced.sites] == ["0", "3"] and forced.sites[0].added_params == 1088
    free = resify.plan(model, x, projection="auto", projection_cost=0.1)  # the grouped one fails it too
    assert free.sites[0].projection == "stride 2"  # the channels hold: every 2nd pixel of x
    assert free.sites[0].added_params == 0
    assert any("'0': a parameter-free shortcut" in note and "projection_cost=None" in note for note in free.notes)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    "max_added, learned",
    [
        (None, {"0": "Linear(512, 1024)", "4": "Linear(1024, 256)"}),
        (0.5, {"0": "Linear(512, 1024)", "4": "Linear(1024, 256)"}),  # 525,312 + 262,400 within 920,000
        (0.3, {"4": "Linear(1024, 256)"}),  # the cheaper one per bridged layer first; the other does not fit
        (0.1, {}),  # 184,000: neither
    ],
)
def test_the_budget_takes_the_cheapest_projections_first(max_added, learned):
    model, x = _mlp(), torch.randn(4, 512)
    params = sum(p.numel() for p in model.parameters())
    plan = resify.plan(model, x, max_added=max_added, projection="conv")
    assert {s.start: s.projection for s in plan.sites if s.kind == "projection"} == learned
    over = {s.start for s in plan.skipped if s.code == "over_budget"}
    assert over == {"0", "4"} - set(learned)
    if max_added is not None:
        assert plan.added_params <= max(max_added * params, MIN_BUDGET)
    assert {s.start: s.kind for s in plan.sites}["2"] == "identity"  # free: always kept


def test_with_projection_auto_what_the_budget_leaves_out_becomes_parameter_free():
    model, x = _mlp(), torch.randn(4, 512)
    plan = resify.plan(model, x)  # the defaults: projection='auto', max_added=0.1
    assert {s.start: s.projection for s in plan.sites} == {
        "0": "zero-pad features 512→1024",
        "2": None,
        "4": "slice features 1024→256",
    }
    assert plan.added_params == 0 and not [s for s in plan.skipped if s.code == "over_budget"]
    assert len(plan.notes) == 2 and all("max_added=None" in note for note in plan.notes)
    assert "525,312 parameters" in plan.notes[0] and "\nnote: '0': a parameter-free shortcut" in str(plan)


def test_parameter_free_shortcuts_compute_option_a():
    """x zero-padded to more features, sliced to fewer; a strided conv's input kept every 2nd pixel."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4), nn.ReLU())
    x = torch.randn(3, 6)
    converted = resify.apply(mlp, x, projection="pad")
    h = F.relu(mlp[0](x)) + F.pad(x, (0, 4))
    expected = F.relu(mlp[2](h)) + h[:, :4]
    torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)

    cnn = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
    plan = resify.plan(cnn, torch.randn(1, 4, 8, 8), projection="pad")
    assert plan.sites[0].projection == "zero-pad channels 4→8, stride 2" and plan.added_params == 0
    converted = resify.apply(cnn, torch.randn(1, 4, 8, 8), projection="pad")
    for shape in [(1, 4, 8, 8), (2, 4, 7, 9)]:  # odd sizes: ceil(n / 2) outputs, every 2nd input kept
        xi = torch.randn(shape)
        expected = F.relu(cnn[0](xi)) + F.pad(xi[:, :, ::2, ::2], (0, 0, 0, 0, 0, 4))
        torch.testing.assert_close(converted(xi), expected, rtol=1e-6, atol=1e-6)


def test_an_identity_goes_before_a_trailing_pool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(2, 8, 10, 10)
    plan = resify.plan(model, x, shortcut="identity")
    (site,) = plan.sites
    assert (site.kind, site.out_shape, site.added_params) == ("identity", (2, 8, 10, 10), 0)
    converted = resify.apply(model, x, shortcut="identity").eval()
    for xi in (x, torch.randn(1, 8, 7, 7)):
        expected = model[3](model[2](model[1](model[0](xi))) + xi)
        torch.testing.assert_close(converted(xi), expected, rtol=1e-6, atol=1e-6)


def test_the_seed_network_keeps_all_its_projections_under_the_default_budget():
    plan = resify.plan(ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False), torch.randn(10, 128))
    assert [s.projection for s in plan.sites] == [
        "Linear(128, 64)", "Linear(64, 32)", "Linear(32, 16)", "Linear(16, 8)", "Linear(8, 1)"
    ]  # fmt: skip
    assert plan.added_params == 11_009 < MIN_BUDGET and plan.notes == ()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_added": -0.1}, "max_added must be a non-negative number or None"),
        ({"projection_cost": float("inf")}, "projection_cost must be a non-negative number or None"),
        ({"projection": "zeros"}, "projection must be one of 'auto', 'conv', 'pad', found 'zeros'"),
    ],
)
def test_bad_cost_keywords_are_refused(kwargs, match):
    with pytest.raises(resify.PlanError, match=match):
        resify.plan(_mlp(), torch.randn(2, 512), **kwargs)
