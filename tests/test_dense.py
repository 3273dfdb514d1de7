"""shortcut='dense': DenseNet-style concatenation that keeps the model's function at conversion."""

import pytest
import torch
import torch.nn as nn
from reference import ImprovedResidualNetwork, assert_every_parameter_has_grad, vgg_style_cnn

import resify


def ln_mlp():
    return nn.Sequential(
        nn.Linear(20, 32),
        nn.LayerNorm(32),
        nn.GELU(),
        nn.Linear(32, 32),
        nn.LayerNorm(32),
        nn.GELU(),
        nn.Linear(32, 16),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Linear(16, 4),
    )


CASES = {
    "seed": (lambda: ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False), (10, 128)),
    "layernorm_mlp": (ln_mlp, (8, 20)),
    "vgg_cnn": (vgg_style_cnn, (4, 3, 32, 32)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_keeps_outputs_and_every_new_path_trains(case):
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    converted = resify.apply(model, x, shortcut="dense")
    plan = resify.applied_plan(converted)
    assert plan.sites and all(s.kind == "dense" for s in plan.sites)
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    n_before = sum(p.numel() for p in model.parameters())
    n_after = sum(p.numel() for p in converted.parameters())
    assert n_after == n_before + plan.added_params > n_before
    # one SGD step: most parameter tensors move, the widened layers' new columns too
    converted.train()
    before = {n: p.detach().clone() for n, p in converted.named_parameters()}
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(x).square().mean().backward()
    assert_every_parameter_has_grad(converted)
    opt.step()
    moved = [n for n, p in converted.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) >= 0.8 * len(before), (len(moved), len(before))
    for site in plan.sites:
        w = converted.get_submodule(site.shortcut.consumer).weight
        new_cols = w[:, : site.shortcut.extra_channels]
        assert new_cols.abs().sum() > 0, f"{site.shortcut.consumer}'s new inputs did not train"


def test_dense_plan_shows_consumer_growth_and_skips_with_reasons():
    plan = resify.plan(ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False), torch.randn(2, 128), shortcut="dense")
    # DenseNet-style: each consumer receives every earlier feature map
    assert [(s.shortcut.consumer, s.shortcut.extra_channels) for s in plan.sites] == [
        ("layers.1.0", 128),
        ("layers.2.0", 192),
        ("layers.3.0", 224),
        ("layers.4.0", 240),
    ]
    assert plan.sites[0].added_params == 128 * 32
    assert plan.skipped[0].reason == "the span's output is the model's output: there is no layer to widen"
    assert "widens layers.1.0 by 128" in str(plan)

    bounded = resify.plan(
        ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False),
        torch.randn(2, 128),
        shortcut="dense",
        dense_max_growth=150,
    )
    assert [s.shortcut.extra_channels for s in bounded.sites] == [128, 32, 48]
    assert "more than dense_max_growth=150" in bounded.skipped[0].reason


def test_dense_pools_the_shortcut_where_the_span_downsamples():
    plan = resify.plan(vgg_style_cnn(), torch.randn(2, 3, 32, 32), shortcut="dense")
    by_start = {s.start: s for s in plan.sites}
    assert by_start["6"].shortcut.pool and "avg-pooled to the output size" in by_start["6"].projection
    assert "'21' (Flatten)" in {s.start: s.reason for s in plan.skipped}["17"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"shortcut": "dense", "gate": "rezero"}, "does not combine with shortcut='dense'"),
        ({"dense_max_growth": 10}, "dense_max_growth needs shortcut='dense'"),
    ],
)
def test_dense_policy_errors(kwargs, match):
    with pytest.raises(resify.PlanError, match=match):
        resify.plan(ImprovedResidualNetwork([8, 8], False), **kwargs)
