"""gate='auto' (``resify.planning.gating``): which gate each site gets, why, and what the converted model computes.

Each case is a network whose branches an expert would gate (un-normalised and deep, or louder than
their shortcuts) or leave ungated (normalised, shallow, small); the plan must say which rule chose
each site's gate, print it, and write it; the converted model must compute what the chosen gates
say, and keep its output's scale at initialisation near the original's.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from reference import assert_every_parameter_has_grad

import resify
from resify.constants import AUTO_GROWTH, AUTO_OUTWEIGHS, AUTO_SHRINK, DEEP_LAYERS
from resify.planning.sites import Plan


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """One torch thread: small matrices, and measured figures that do not move with the thread count."""


def plain_mlp(depth: int, width: int = 32, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``depth`` blocks of Linear + activation at PyTorch's default init: each adds ~1/6 of its input's scale."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), act()) for _ in range(depth)])


def plain_cnn(depth: int, width: int = 8, he: bool = False) -> nn.Sequential:
    """``depth`` 3×3 conv + ReLU blocks without a norm (``he``: He-initialised, as torchvision's VGG is)."""
    blocks = [nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(depth)]
    model = nn.Sequential(*blocks)
    if he:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return model


def bn_cnn(depth: int = 12, width: int = 8) -> nn.Sequential:
    """conv 3×3 → BatchNorm → ReLU blocks (a VGG-BN stage without its pools)."""
    return nn.Sequential(
        *[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()) for _ in range(depth)]
    )


class PostNorm(nn.Module):
    """A skipless post-norm sub-layer stack, ``x = LN(W2·relu(W1·x))``, on a small embedding: each
    normalised branch is louder than the embedding it would be added to."""

    def __init__(self, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width), nn.LayerNorm(width))
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x


class LSTMStack(nn.Module):
    def __init__(self, depth: int = 3, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.lstms = nn.ModuleList(nn.LSTM(width, width, batch_first=True) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for lstm in self.lstms:
            x, _ = lstm(x)
        return x


def _gates(plan: Plan) -> list[tuple[str | None, str]]:
    return [(s.gate, s.gate_reason.rule if s.gate_reason else "-") for s in plan.sites]


CASES = {
    # (build, example, the gate every site gets, the rules that choose it)
    "deep plain MLP": (lambda: plain_mlp(DEEP_LAYERS + 8), lambda: torch.randn(64, 32), "rezero", {"compounds"}),
    # 8 Tanh layers grow the signal little a site (bounded, ~1.2×): no gate; 8 ReLU layers compound at
    # over AUTO_RATE a site (the 16-layer MLPs of the digits benchmark train as well or better gated)
    "shallow plain MLP": (lambda: plain_mlp(8, act=nn.Tanh), lambda: torch.randn(64, 32), None, {"shallow"}),
    "shallow ReLU MLP": (lambda: plain_mlp(8), lambda: torch.randn(64, 32), "rezero", {"compounds"}),
    "deep plain CNN": (lambda: plain_cnn(DEEP_LAYERS + 2), lambda: torch.randn(8, 8, 8, 8), "rezero", {"compounds"}),
    # a He-initialised branch doubles the signal (or more, once the signal has a mean): 6 layers compound
    "He-initialised plain CNN": (
        lambda: plain_cnn(6, he=True),
        lambda: torch.randn(8, 8, 8, 8),
        "rezero",
        {"compounds", "outweighs"},
    ),
    "BatchNorm CNN": (lambda: bn_cnn(12), lambda: torch.randn(8, 8, 8, 8), None, {"normalised"}),
    "post-norm stack": (lambda: PostNorm(4), lambda: 0.3 * torch.randn(32, 6, 4), "rezero", {"outweighs"}),
    "LSTM stack": (lambda: LSTMStack(3), lambda: torch.randn(32, 6, 4), None, {"shallow"}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_auto_gate_follows_the_branch_and_the_measured_signal(case):
    build, example, gate, rules = CASES[case]
    torch.manual_seed(0)
    model, x = build().train(), example()
    plan = resify.plan(model, x)
    assert plan.policy.gate == "auto" and plan.sites
    assert {g for g, _ in _gates(plan)} == {gate} and {r for _, r in _gates(plan)} == rules
    for s in plan.sites:
        assert s.gate_init == (0.0 if gate else None)
        assert s.added_params == (1 if gate else 0) + (s.shortcut.params if hasattr(s.shortcut, "params") else 0)


def test_the_figures_behind_each_rule():
    torch.manual_seed(0)
    deep = resify.plan(plain_mlp(DEEP_LAYERS + 8), torch.randn(64, 32))
    reason = deep.sites[0].gate_reason
    assert reason.branch == "plain" and reason.ends == "ReLU" and reason.sites == len(deep.sites)
    assert reason.layers == DEEP_LAYERS + 8 and reason.value > AUTO_GROWTH * 100  # compounds far past the limit
    shallow = resify.plan(plain_mlp(8), torch.randn(64, 32)).sites[0].gate_reason
    assert shallow.value > 1 and shallow.layers == 8 < DEEP_LAYERS
    he = resify.plan(plain_cnn(6, he=True), torch.randn(8, 8, 8, 8)).sites
    assert all(s.gate_reason.value > AUTO_OUTWEIGHS for s in he)
    bn = resify.plan(bn_cnn(12).train(), torch.randn(8, 8, 8, 8)).sites
    assert all(s.gate_reason.branch == "norm" and s.gate_reason.ends == "BatchNorm2d" for s in bn)
    assert all(1 < s.gate_reason.value <= AUTO_OUTWEIGHS for s in bn)
    post = resify.plan(PostNorm(4), 0.3 * torch.randn(32, 6, 4)).sites
    assert post[0].gate_reason.ends == "LayerNorm" and post[0].gate_reason.value > AUTO_OUTWEIGHS


def test_a_batchnorm_in_eval_mode_does_not_count_as_a_norm():
    """Running statistics (0, 1) at initialisation: the branch's scale follows its input's."""
    torch.manual_seed(0)
    plan = resify.plan(bn_cnn(12).eval(), torch.randn(8, 8, 8, 8))
    assert {s.gate_reason.branch for s in plan.sites} == {"plain"}


def test_the_plan_says_why_in_print_and_json():
    torch.manual_seed(0)
    plan = resify.plan(plain_mlp(DEEP_LAYERS + 8), torch.randn(64, 32))
    text = " ".join(str(plan).split())  # the paragraphs are wrapped at 100 columns
    assert "gates chosen (gate='auto'): rezero at 40 sites" in text
    assert "rezero at 0.0, 1.0, 2.0, … (40 in all): no norm ends the branch (ReLU): ungated, the shortcuts" in text
    assert "would compound, scaling the signal's mean square by" in text
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["policy"]["gate"] == "auto"
    assert d["sites"][0]["gate"] == "rezero" and d["sites"][0]["gate_reason"]["rule"] == "compounds"
    back = Plan.from_dict(d)
    assert back == plan and back.policy.gate == "auto"
    assert back.sites[0].gate_reason == plan.sites[0].gate_reason


def test_a_plan_without_gate_reasons_still_reads():
    """An older plan (or a given gate) has no gate_reason: the field defaults to None."""
    torch.manual_seed(0)
    d = resify.plan(plain_mlp(4), torch.randn(8, 32), gate=None).to_dict()
    assert all(s["gate_reason"] is None for s in d["sites"])
    for s in d["sites"]:
        del s["gate_reason"]
    assert all(s.gate_reason is None for s in Plan.from_dict(d).sites)


@pytest.mark.parametrize("kwargs", [{}, {"gate": "auto"}])
def test_auto_is_the_default_and_can_be_asked_for(kwargs):
    torch.manual_seed(0)
    model, x = plain_mlp(DEEP_LAYERS + 8), torch.randn(64, 32)
    assert resify.Policy().gate == "auto"
    assert _gates(resify.plan(model, x, **kwargs)) == [("rezero", "compounds")] * (DEEP_LAYERS + 8)


def test_gate_init_sets_where_the_chosen_gates_start():
    torch.manual_seed(0)
    plan = resify.plan(plain_mlp(DEEP_LAYERS + 8), torch.randn(64, 32), gate_init=0.1)
    assert {(s.gate, s.gate_init) for s in plan.sites} == {("rezero", 0.1)}


@pytest.mark.parametrize("gate", [None, "rezero", "layerscale"])
def test_a_given_gate_is_built_as_given(gate):
    torch.manual_seed(0)
    plan = resify.plan(plain_mlp(DEEP_LAYERS + 8), torch.randn(64, 32), gate=gate)
    assert {(s.gate, s.gate_reason) for s in plan.sites} == {(gate, None)}


def test_the_converted_model_computes_what_the_gates_say():
    """Every gate at 0 around identity shortcuts: the deep MLP starts as the identity; every
    parameter gets a gradient (the branches' through the gates, the gates' own)."""
    torch.manual_seed(0)
    model, x = plain_mlp(DEEP_LAYERS + 8), torch.randn(64, 32)
    new = resify.apply(model, x)
    torch.testing.assert_close(new(x), x)
    new(x).square().sum().backward()
    assert_every_parameter_has_grad(new)
    assert all(p.grad.abs().sum() > 0 for n, p in new.named_parameters() if n.endswith("alpha"))


def test_dense_and_preserve_output_get_no_gate():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    dense = resify.plan(plain_mlp(DEEP_LAYERS + 8), x, shortcut="dense")
    assert dense.sites and {(s.gate, s.gate_reason.rule) for s in dense.sites} == {(None, "dense")}
    kept = resify.plan(plain_mlp(DEEP_LAYERS + 8), x, preserve_output=True)
    assert {(s.gate, s.gate_reason.rule, s.preserve_output) for s in kept.sites} == {(None, "preserve_output", True)}
    model = plain_mlp(4)
    torch.testing.assert_close(resify.apply(model, x[:4], preserve_output=True)(x), model(x))


def test_on_the_meta_device_the_branches_decide_alone():
    with torch.device("meta"):
        deep, shallow, bn = plain_mlp(DEEP_LAYERS + 8), plain_mlp(8), bn_cnn(DEEP_LAYERS + 2)
    for model, x, gate in [
        (deep, torch.randn(64, 32, device="meta"), "rezero"),
        (shallow, torch.randn(64, 32, device="meta"), None),
        (bn, torch.randn(8, 8, 8, 8, device="meta"), None),
    ]:
        plan = resify.plan(model, x)
        assert {(s.gate, s.gate_reason.rule) for s in plan.sites} == {(gate, "unmeasured")}
        assert "the model is on the meta device" in plan.sites[0].gate_reason.text


def test_measuring_leaves_the_model_and_the_random_state_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(bn_cnn(4), nn.Dropout(0.5), plain_cnn(2)).train()
    x = torch.randn(8, 8, 8, 8)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    resify.plan(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items()) and model.training


def test_the_same_model_gets_the_same_plan():
    torch.manual_seed(0)
    model, x = nn.Sequential(bn_cnn(4), nn.Dropout(0.5), plain_cnn(4, he=True)).train(), torch.randn(8, 8, 8, 8)
    assert resify.plan(model, x) == resify.plan(model, x)


def test_vgg11_keeps_its_output_scale_at_initialisation():
    """torchvision's VGG-11 (He-initialised, no norm) in train mode, as the first step sees it: ungated,
    its logits grow ~40×; with the default gates they stay within 4× of the original's either way (the
    gates beside its pooled projections and its slice start where the logits keep the original's
    scale, rule 4: at 0 they would start 4× smaller in std at 224×224)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None).train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    stds = []
    for m in (model, resify.apply(model, x), resify.apply(model, x, gate=None)):
        torch.manual_seed(1)  # the same dropout masks
        with torch.no_grad():
            stds.append(m(x).std().item())
    original, default, ungated = stds
    assert original / 4 <= default <= 4 * original, stds
    assert ungated > 4 * original, stds  # what the gates prevent


def small_vgg(widths: tuple[int, ...] = (16, 32, 64, 128)) -> nn.Sequential:
    """VGG in small: He-initialised 3×3 conv → ReLU → 2×2 max-pool stages, the channels widening, on
    32×32 images; every stage's shortcut is a pooled 1×1 projection."""
    layers: list[nn.Module] = []
    c = 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 4, 10))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def _output_std(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return model(x).std().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gates_beside_shrinking_shortcuts_start_where_the_output_keeps_its_scale(seed):
    """Rule 4, on what shrank SqueezeNet's and VGG-11's logits 21× and 4×: each stage's branch outweighs
    its pooled projection (rule 1), which carries a fraction of its input's mean square (a fresh 1×1
    conv about 1/3, the average pool of an uncorrelated map 1/4). Gated at 0, the stages would hand
    the signal from one shrinking shortcut to the next, bypassing the ReLUs and max-pools that keep
    the original's scale: the logits would start more than 4× smaller in std. The gates start instead
    at the one α at which the output keeps the original's mean square."""
    torch.manual_seed(seed)
    model, x = small_vgg().train(), torch.randn(8, 3, 32, 32)
    plan = resify.plan(model, x)
    assert plan.sites and all(s.kind == "projection" and s.gate == "rezero" for s in plan.sites)
    reasons = [s.gate_reason for s in plan.sites]
    assert {r.rule for r in reasons} == {"outweighs"}
    (start,) = {s.gate_init for s in plan.sites}  # one start for them all
    assert 0 < start <= 1 and all(r.start == start and r.shrunk < 1 / AUTO_SHRINK for r in reasons)
    assert f"the gate starts at {start:g}" in str(plan) and f"{start:g} keeps it" in str(plan)
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan

    original = _output_std(model, x)
    at_zero = _output_std(resify.apply(model, x, gate="rezero"), x)  # every gate at 0: the shrink
    assert at_zero < original / 4
    default = _output_std(resify.apply(model, x), x)
    assert original / 4 < default < 4 * original


def test_rule_4_leaves_identity_shortcuts_and_a_given_start_alone():
    """Gates beside identities stay at 0 (the He-initialised plain CNN: no shortcut shrinks its
    input), and a given gate_init is where every chosen gate starts."""
    torch.manual_seed(0)
    he = resify.plan(plain_cnn(6, he=True), torch.randn(8, 8, 8, 8))
    assert {(s.gate, s.gate_init) for s in he.sites} == {("rezero", 0.0)}
    assert all(s.gate_reason.start is None for s in he.sites)
    given = resify.plan(small_vgg(), torch.randn(8, 3, 32, 32), gate_init=0.0)
    assert {(s.gate, s.gate_init) for s in given.sites} == {("rezero", 0.0)}
    assert all(s.gate_reason.start is None for s in given.sites)
