"""resify.report.facts: what a measured model has (its applied plans, norms, BatchNorm mode, gates at zero)."""

import pytest
import torch
from reference import SEED_SIZES, ImprovedResidualNetwork
from torch import nn

import resify
from resify.report.facts import ModelFacts, applied_plans, gates_at_zero, is_branch_gate, model_facts
from resify.report.probe import find_layers


@pytest.mark.parametrize(
    "name,branch",
    [
        ("layers.0.resify.0.alpha", True),  # rezero's α
        ("resify.3.gamma", True),  # layerscale's γ
        ("layers.0.resify.0.beta", False),  # β scales the shortcut
        ("alpha", True),
        ("layers.0.alphabet", False),  # the parameter's own name, not a prefix of it
        ("gamma.weight", False),
    ],
)
def test_is_branch_gate(name, branch):
    assert is_branch_gate(name) is branch


@pytest.mark.parametrize(
    "values,expected",
    [
        ({}, False),  # no gate at all
        ({"a.beta": [0.0]}, False),  # only a shortcut's gate
        ({"a.alpha": [0.0], "b.gamma": torch.zeros(4)}, True),
        ({"a.alpha": [0.0], "b.gamma": torch.tensor([0.0, 1e-30])}, False),  # one channel moved
        ({"a.alpha": [0.0], "a.beta": [1.0]}, True),  # β at 1 does not count
        ({"a.alpha": (-0.0,)}, True),
        ({"a.alpha": torch.zeros(2, requires_grad=True)}, True),
    ],
)
def test_gates_at_zero(values, expected):
    assert gates_at_zero(values) is expected


def test_facts_of_a_plain_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    facts = model_facts(model, {})
    assert facts == ModelFacts() and facts.plan is None and not facts.shortcuts
    assert applied_plans(model) == ()


class _RMSNorm(nn.Module):  # by its class name, as LlamaRMSNorm, T5LayerNorm
    def forward(self, x):
        return x


class _Normalizer(nn.Module):  # not a norm by name: "Norm" must end the name (or be followed by 1d/2d/3d)
    def forward(self, x):
        return x


class MyNorm2d(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "layer,normalised",
    [
        (nn.BatchNorm1d(4), True),
        (nn.LayerNorm(4), True),
        (nn.GroupNorm(2, 4), True),
        (nn.InstanceNorm1d(4), True),
        (_RMSNorm(), True),
        (MyNorm2d(), True),
        (_Normalizer(), False),
        (nn.Dropout(), False),
    ],
)
def test_normalised_by_class_or_by_name(layer, normalised):
    model = nn.Sequential(nn.Linear(4, 4), layer)
    assert model_facts(model, {}).normalised is normalised


def test_batch_norm_eval_is_running_statistics_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert not model_facts(model, {}).batch_norm_eval
    assert model_facts(model.eval(), {}).batch_norm_eval
    stateless = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    assert not model_facts(stateless, {}).batch_norm_eval  # it normalises by the batch in eval mode too
    assert model_facts(stateless, {}).normalised


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    x = torch.randn(4, 128)
    return resify.apply(ImprovedResidualNetwork(SEED_SIZES, use_shortcut=False), x, gate="rezero"), x


def test_facts_of_a_converted_model(converted):
    model, _ = converted
    gates = find_layers(model)[1]
    assert gates and all(n.endswith(".alpha") for n in gates)
    facts = model_facts(model, gates)
    assert facts.plan is resify.applied_plan(model) and facts.shortcuts and facts.gates_at_zero
    assert facts.plans == ((("", facts.plan),)) == applied_plans(model)
    assert not facts.normalised  # (resify's own modules would not count)
    moved = {n: torch.full_like(g, 0.5) if i == 0 else g for i, (n, g) in enumerate(gates.items())}
    assert not model_facts(model, moved).gates_at_zero


def test_a_converted_submodule_is_found_under_its_prefix(converted):
    model, _ = converted
    outer = nn.Sequential(nn.Identity(), model)
    plans = applied_plans(outer)
    assert [prefix for prefix, _ in plans] == ["1"] and plans[0][1] is resify.applied_plan(model)
    assert model_facts(outer, {}).plans == plans and model_facts(outer, {}).plan is plans[0][1]


def test_a_plan_without_sites_is_not_shortcuts(converted):
    none = resify.plan(ImprovedResidualNetwork([8, 8, 8], use_shortcut=True), torch.randn(2, 8))
    assert not none.sites  # every span inside the model's own shortcuts
    assert not ModelFacts(plans=(("", none),)).shortcuts
    some = resify.applied_plan(converted[0])
    assert ModelFacts(plans=(("", none), ("x", some))).shortcuts
    assert ModelFacts(plans=(("", none), ("x", some))).plan is none  # the outermost
