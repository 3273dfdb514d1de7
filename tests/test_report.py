"""The gradient-flow report: the seed's numbers, verdicts, no trace left, outputs, losses, rendering."""

import contextlib
import io
import json
import math
import re
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import SEED_SIZES, ImprovedResidualNetwork, print_gradients, vgg_style_cnn

import resify
from resify.errors import ResifyError
from resify.report import LayerFlow

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def mlp(depth, width, act):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers)


def _printed_gradients(model, x):
    """What the seed's print_gradients prints: {parameter name: '0.001234'}."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_gradients(model, x)
    found = re.findall(r"^(\S+): gradient mean = (\d+\.\d{6})$", out.getvalue(), flags=re.M)
    assert found, out.getvalue()
    return dict(found)


# ---------------------------------------------------------------------------------------------
# the seed's complete working example


@pytest.mark.parametrize("use_shortcut", [False, True])
def test_mean_abs_grad_is_what_print_gradients_prints(use_shortcut):
    torch.manual_seed(123)
    # the seed's usage example, in its order: both models, then the input
    model_without_residual = ImprovedResidualNetwork(SEED_SIZES, use_shortcut=False)
    model_with_residual = ImprovedResidualNetwork(SEED_SIZES, use_shortcut=True)
    x = torch.randn(10, 128)
    model = model_with_residual if use_shortcut else model_without_residual
    flow = resify.gradient_flow(model, x)
    printed = _printed_gradients(model, x)
    ours = {f"{r.name}.weight": f"{r.mean_abs_grad:.6f}" for r in flow.layers}
    assert ours == printed
    expected = [f"layers.{i}.0" for i in range(5)]
    if use_shortcut:  # the hand-written projections are the model's own layers, called after each layer
        expected = [n for i in range(5) for n in (f"layers.{i}.0", f"projections.{i}")]
    assert [r.name for r in flow.layers] == expected
    assert [r.depth for r in flow.layers] == list(range(len(expected)))
    assert not any(r.added for r in flow.layers) and {r.kind for r in flow.layers} == {"Linear"}


def test_converted_seed_network_lists_projections_and_gates_in_forward_order():
    torch.manual_seed(0)
    x = torch.randn(10, 128)
    converted = resify.apply(ImprovedResidualNetwork(SEED_SIZES, False), x, gate="rezero")
    flow = resify.gradient_flow(converted, x)
    names = [r.name for r in flow.layers]
    assert names[:4] == ["layers.0.0", "layers.0.resify.0.proj", "layers.0.resify.0.alpha", "layers.1.0"]
    assert len(names) == 15
    gate = flow.layer("layers.0.resify.0.alpha")
    assert gate.kind == "Gate" and gate.added and gate.shape == (1,) and gate.input_grad_norm is None
    assert gate.mean_abs_grad > 0 and gate.grad_to_weight is None  # the gate's value is 0
    assert not flow.layer("layers.0.0").added and flow.layer("layers.0.resify.0.proj").added
    # behind a gate at zero the branch gets no weight gradient, but the flow reaches the first layer
    assert flow.layer("layers.0.0").mean_abs_grad == 0 and flow.layer("layers.0.0").input_grad_norm > 0
    printed = _printed_gradients(converted, x)  # the seed's figure for the added layers too
    for r in flow.layers:
        if r.kind != "Gate":
            assert f"{r.mean_abs_grad:.6f}" == printed[f"{r.name}.weight"], r.name
    with pytest.raises(ResifyError, match="no layer named 'nope'"):
        flow.layer("nope")


def test_gates_follow_their_site_in_a_converted_model_inside_another():
    """No GraphModule: each gate is placed by the applied plan, after its site's last layer to run."""
    torch.manual_seed(0)
    x = torch.randn(10, 128)
    converted = resify.apply(ImprovedResidualNetwork(SEED_SIZES, False), x, gate="rezero")
    assert not isinstance(converted, torch.fx.GraphModule)
    wrapper = nn.Sequential(converted, nn.Linear(1, 2))
    names = [r.name for r in resify.gradient_flow(wrapper, x).layers]
    for i in range(5):
        site = [f"0.layers.{i}.0", f"0.layers.{i}.resify.0.proj", f"0.layers.{i}.resify.0.alpha"]
        assert names[3 * i : 3 * i + 3] == site
    assert names[-1] == "1"


def test_input_grad_norm_and_activation_rms_match_autograd():
    torch.manual_seed(0)
    model = mlp(4, 16, nn.Tanh)
    x = torch.randn(5, 16)
    flow = resify.gradient_flow(model, x)
    # independently: keep every layer's input and output, backpropagate, read the gradients
    h = x.clone().requires_grad_()
    inputs, outputs = [], []
    for i in range(0, 8, 2):
        h.retain_grad()
        inputs.append(h)
        out = model[i](h)
        outputs.append(out.detach())
        h = model[i + 1](out)
    F.mse_loss(h, torch.zeros_like(h)).backward()
    for rec, t, o in zip(flow.layers, inputs, outputs):
        assert rec.input_grad_norm == pytest.approx(t.grad.norm().item(), rel=1e-5)
        assert rec.activation_rms == pytest.approx(o.pow(2).mean().sqrt().item(), rel=1e-5)
        w = model.get_submodule(rec.name).weight
        assert rec.grad_to_weight == pytest.approx(rec.grad_norm / w.norm().item(), rel=1e-6)
    assert flow.loss == "mse to zeros" and flow.loss_value == pytest.approx(h.pow(2).mean().item())


# ---------------------------------------------------------------------------------------------
# verdicts


def test_deep_sigmoid_mlp_vanishes_and_shortcuts_give_the_first_layer_100x_more():
    torch.manual_seed(0)
    model = mlp(30, 32, nn.Sigmoid)
    x = torch.randn(8, 32)
    before = resify.gradient_flow(model, x)
    assert before.verdict == "vanishing" and before.layers[0].verdict == "vanishing"
    assert 0 < before.layers[0].input_grad_norm < 1e-20  # tiny, yet not lost to float32 underflow
    assert "shortcut='auto'" in before.recommendation
    after = resify.gradient_flow(resify.apply(model, x, gate=None), x)
    assert after.verdict == "healthy" and after.recommendation is None
    assert after.layers[0].mean_abs_grad >= 100 * before.layers[0].mean_abs_grad > 0
    c = resify.compare(before, after)
    assert c.first_layer_ratio >= 100
    m = re.fullmatch(r"first layer: (\S+)× more gradient; verdict vanishing → healthy", c.headline)
    assert m, c.headline
    assert float(m.group(1).replace(",", "")) == pytest.approx(c.first_layer_ratio, rel=0.1)


def test_deep_relu_mlp_explodes_with_plain_shortcuts_and_is_healthy_with_rezero():
    torch.manual_seed(0)
    model = mlp(100, 64, nn.ReLU)  # default init
    x = torch.randn(8, 64)
    plain = resify.gradient_flow(model, x)
    assert plain.verdict == "vanishing"
    assert "gate='rezero'" in plain.recommendation and "100 layers" in plain.recommendation  # >= DEEP_LAYERS
    ungated = resify.gradient_flow(resify.apply(model, x, gate=None), x)
    assert ungated.verdict == "exploding"
    assert ungated.first_to_last > 1e6  # measured: about 1e9, far past the 1e3 bound
    assert all(math.isfinite(r.grad_norm) for r in ungated.layers)  # ~1e19: past float32 sums of squares
    assert "gate='rezero'" in ungated.recommendation
    gated = resify.gradient_flow(resify.apply(model, x, gate="rezero"), x)
    assert gated.verdict == "healthy" and gated.recommendation is None
    assert gated.first_to_last == pytest.approx(1.0, rel=1e-4)  # the identity at alpha = 0
    assert {r.verdict for r in gated.layers} == {"healthy"}
    c = resify.compare(ungated, gated)
    assert c.headline.endswith("verdict exploding → healthy")
    assert len(c.added) == 100 and {r.kind for r in c.added} == {"Gate"}  # ungated has no added layer


# ---------------------------------------------------------------------------------------------
# the rules behind the figures: resify's layers are not the model's, first_layer_ratio


def _flow_of(*records, **facts):
    """``judge`` on LayerFlows given as (name, kind, added, input_grad_norm, mean_abs_grad)."""
    from resify.report.facts import ModelFacts
    from resify.report.verdicts import judge

    layers = tuple(
        LayerFlow(name, kind, i, added, (2, 2) if kind != "Gate" else (1,), mean, mean, None, flow, 1.0)
        for i, (name, kind, added, flow, mean) in enumerate(records)
    )
    return judge(layers, facts=ModelFacts(**facts), model_class="M", loss="mse to zeros", loss_value=1.0)


def test_resifys_added_layers_are_left_out_of_first_and_last():
    """Added ones first and last with flows far outside the bounds: the model's own layers decide."""
    flow = _flow_of(
        ("resify.0.proj", "Linear", True, 1e-6, 1.0),  # would make first/last 1e-10: vanishing
        ("a", "Linear", False, 2.0, 1.0),
        ("a.resify.0.alpha", "Gate", True, None, 1.0),
        ("b", "Linear", False, 4.0, 1.0),
        ("b.resify.0.proj", "Linear", True, 1e4, 1.0),  # would make it 2e-4, and every own layer vanishing
    )
    assert flow.first_to_last == 0.5 and flow.verdict == "healthy" and "from 'a' to 'b'" in flow.reason
    assert [r.verdict for r in flow.layers] == ["vanishing", "healthy", "healthy", "healthy", "exploding"]
    only_added = _flow_of(("a", "Linear", False, 1.0, 1.0), ("a.resify.0.proj", "Linear", True, 1e-9, 1.0))
    assert only_added.first_to_last == 1.0 and only_added.verdict == "healthy"


def test_first_to_last_of_a_converted_model_is_its_own_first_and_last_layers_input_gradient():
    torch.manual_seed(0)
    x = torch.randn(10, 128)
    converted = resify.apply(ImprovedResidualNetwork(SEED_SIZES, False), x, gate=None)
    flow = resify.gradient_flow(converted, x)
    assert flow.layers[-1].added and flow.layers[-1].name == "layers.4.resify.0.proj"
    inputs = {}

    def keep(name):
        def hook(module, args):
            args[0].retain_grad()
            inputs.setdefault(name, args[0])

        return hook

    handles = [converted.get_submodule(n).register_forward_pre_hook(keep(n)) for n in ("layers.0.0", "layers.4.0")]
    x_leaf = x.clone().requires_grad_()
    out = converted(x_leaf)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    for h in handles:
        h.remove()
    converted.zero_grad(set_to_none=True)
    reference = inputs["layers.0.0"].grad.norm().item() / inputs["layers.4.0"].grad.norm().item()
    assert flow.first_to_last == pytest.approx(reference, rel=1e-5)


def test_first_layer_ratio_is_the_first_shared_layers_mean_abs_grad_after_over_before():
    from resify.report.verdicts import compare

    before = _flow_of(
        ("g.alpha", "Gate", True, None, 5.0), ("a", "Linear", False, 1.0, 2.0), ("b", "Linear", False, 1.0, 1.0)
    )
    after = _flow_of(
        ("resify.0.proj", "Linear", True, 1.0, 100.0),  # only after: not shared
        ("g.alpha", "Gate", True, None, 50.0),  # shared, but a gate
        ("a", "Linear", False, 1.0, 6.0),
        ("b", "Linear", False, 1.0, 1.0),
    )
    c = compare(before, after)
    assert c.first_layer_ratio == 3.0 and c.headline.startswith("first layer: 3.0× more gradient")
    # and on a real model: the first layer's mean |grad| after ÷ before, by autograd
    torch.manual_seed(0)
    model, x = ImprovedResidualNetwork(SEED_SIZES, False), torch.randn(10, 128)
    converted = resify.apply(model, x, gate=None)
    c = resify.compare(resify.gradient_flow(model, x), resify.gradient_flow(converted, x))
    grads = []
    for m in (model, converted):
        out = m(x)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        grads.append(m.layers[0][0].weight.grad.abs().mean().item())
        m.zero_grad(set_to_none=True)
    assert c.first_layer_ratio == pytest.approx(grads[1] / grads[0], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# a gated net at its initial gate, and advice that fits the model


def plain_cnn(depth=30, width=16):
    """``depth`` plain 3×3 convolutions (ReLU, three max-pools, channels doubling), a linear head."""
    layers, channels = [], 3
    for i in range(depth):
        out = width * 2 ** (i * 4 // depth)
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
        if i % (depth // 4) == depth // 4 - 1 and i < depth - 1:
            layers.append(nn.MaxPool2d(2))
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def test_a_31_layer_cnn_at_its_initial_rezero_gate_is_judged_through_its_gates():
    torch.manual_seed(0)
    model, x = plain_cnn(), torch.randn(8, 3, 32, 32)
    converted = resify.apply(model, x, gate="rezero")
    flow = resify.gradient_flow(converted, x)
    own = [r for r in flow.layers if not r.added]
    gates = [r for r in flow.layers if r.kind == "Gate"]
    assert len(own) == 31 and len(gates) == 30 and all(r.mean_abs_grad > 0 for r in gates)
    # through the shortcuts alone (projections, pooling) the first layer gets ~1/400 of the last one's
    assert flow.first_to_last < 1e-2
    assert flow.verdict == "healthy" and flow.recommendation is None, flow.summary()
    assert flow.reason.startswith("every branch gate is 0 (as at initialisation) and all 30 get gradient")
    assert "vanishing" not in {r.verdict for r in flow.layers}
    with torch.no_grad():  # once the gates move, the usual rules again
        for g in gates:
            converted.get_parameter(g.name).fill_(0.1)
    assert "every branch gate is 0" not in resify.gradient_flow(converted, x).reason


def test_a_gate_at_zero_that_gets_no_gradient_is_vanishing():
    records = [("a", "Linear", False, 1.0, 0.0), ("a.resify.0.alpha", "Gate", True, None, 0.0)]
    records += [("b", "Linear", False, 1.0, 0.0), ("b.resify.0.alpha", "Gate", True, None, 1.0)]
    flow = _flow_of(*records, gates_at_zero=True)
    assert flow.verdict == "vanishing" and "'a.resify.0.alpha' gets no gradient" in flow.reason
    assert flow.recommendation is None  # every branch starts at zero already: nothing of resify's to add
    healthy = _flow_of(*records[2:], ("c", "Linear", False, 1e3, 0.0), gates_at_zero=True)
    assert healthy.verdict == "healthy" and healthy.first_to_last == 1e-3  # not 'vanishing': gates at zero


def test_advice_never_recommends_what_the_model_has():
    from resify.report.facts import ModelFacts, model_facts
    from resify.report.probe import find_layers
    from resify.report.verdicts import advice, recommend

    torch.manual_seed(0)
    model, x = mlp(6, 16, nn.ReLU), torch.randn(8, 16)
    vanishing = _flow_of(("0", "Linear", False, 1e-4, 1.0), ("10", "Linear", False, 1.0, 1.0)).layers
    assert recommend("vanishing", vanishing) == f"try shortcut='auto': resify.apply(model, shortcut='auto') {_EVERY}"
    for kwargs, expected in [
        # identity shortcuts around every layer, no gate: neither shortcut='auto' nor group=1, the gate is new
        ({"gate": None}, "try gate='rezero': resify.apply(model, gate='rezero') starts every branch at zero"),
        ({"gate": None, "group": 2}, "try shortcut='auto', group=1: resify.apply(model, shortcut='auto', group=1)"),
        ({"gate": "rezero"}, None),  # everything the advice would add, it has
        ({"gate": "rezero", "gate_init": 0.5}, None),  # a gate at 0.5: not told gate='rezero' again
    ]:
        converted = resify.apply(model, x, **kwargs)
        facts = model_facts(converted, find_layers(converted)[1])
        assert facts.plan is resify.applied_plan(converted) and facts.shortcuts
        found = recommend("vanishing", vanishing, facts)
        assert found == expected if expected is None else found.startswith(expected), (kwargs, found)
        for a in advice("vanishing", vanishing, facts):
            assert a.unused(facts.plan.policy, facts.plan.sites), (kwargs, a)
    bn_eval = ModelFacts(batch_norm_eval=True, normalised=True)
    assert recommend("exploding", vanishing, bn_eval).startswith("if it is untrained, measure it in train mode")
    collapse = advice("collapsing", vanishing, ModelFacts(normalised=True))
    assert [a.settings for a in collapse] == [(("gate", "rezero"),)]  # not normalisation: it has some


# ---------------------------------------------------------------------------------------------
# no trace left


def _state(model):
    return {
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (
                dict(m._forward_hooks),
                dict(m._forward_hooks_with_kwargs),
                dict(m._forward_pre_hooks),
                dict(m._backward_hooks),
                dict(m._backward_pre_hooks),
            )
            for n, m in model.named_modules()
        },
        "param_hooks": {
            n: (dict(p._backward_hooks or {}), dict(p._post_accumulate_grad_hooks or {}))
            for n, p in model.named_parameters()
        },
    }


class _FreezesItself(nn.Linear):
    """A layer whose forward switches it to eval mode (as "freeze after warm-up" code does)."""

    def forward(self, x):
        self.eval()
        return super().forward(x)


@pytest.mark.parametrize("batches", [1, 3])
def test_leaves_no_trace(batches):
    torch.manual_seed(0)
    model = nn.Sequential(vgg_style_cnn(), nn.Dropout(0.5), _FreezesItself(10, 4))
    x = torch.randn(4, 3, 16, 16)
    model(x).sum().backward()
    model[2].train()
    model[0][0].weight.grad = None  # some gradients present, some None
    model[0][1].train(False)  # mixed modes
    model[0][0].register_forward_hook(lambda m, i, o: None)
    before = _state(model)
    rng = torch.get_rng_state()
    with torch.no_grad():  # the report enables gradients for itself
        flow = resify.gradient_flow(model, x, batches=batches)
    after = _state(model)
    assert flow.layers[0].mean_abs_grad > 0
    assert torch.equal(torch.get_rng_state(), rng)
    for n, g in before["grads"].items():
        assert after["grads"][n] is g, n  # the very same tensor, or None
        if g is not None:
            assert torch.equal(g, before["grad_values"][n]), n
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), n  # BatchNorm statistics are put back
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["param_hooks"] == before["param_hooks"]
    assert x.grad is None and not x.requires_grad


def test_dropout_is_seeded_so_reports_repeat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8)).train()
    x = torch.randn(4, 8)
    a = resify.gradient_flow(model, x, seed=1)
    torch.rand(3)  # the global state moves on; the report does not depend on it
    assert resify.gradient_flow(model, x, seed=1) == a
    assert resify.gradient_flow(model, x, seed=2) != a


def test_batches_average_the_example_and_seeded_random_batches():
    torch.manual_seed(0)
    model = mlp(3, 8, nn.GELU)
    x = torch.randn(4, 8)
    flow = resify.gradient_flow(model, x, batches=3, seed=7)
    g = torch.Generator().manual_seed(7)
    xs = [x, torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)]
    per_batch = []
    for xb in xs:
        model.zero_grad()
        out = model(xb)
        F.mse_loss(out, torch.zeros_like(out)).backward()
        per_batch.append(model[0].weight.grad.abs().mean().item())
    model.zero_grad()
    assert flow.batches == 3
    assert flow.layers[0].mean_abs_grad == pytest.approx(sum(per_batch) / 3, rel=1e-6)
    assert resify.gradient_flow(model, x, batches=1).layers[0].mean_abs_grad == pytest.approx(per_batch[0])


# ---------------------------------------------------------------------------------------------
# any module, any output, any loss


class _LearnedQuery(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(2, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.query) + x


def test_a_layer_fed_by_a_parameter_gets_no_lasting_hook():
    torch.manual_seed(0)
    model = _LearnedQuery()
    x = torch.randn(2, 3)
    flow = resify.gradient_flow(model, x)
    assert not model.query._backward_hooks and model.query.grad is None  # no hook, no gradient left
    out = model(x)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    assert flow.layer("fc").input_grad_norm == pytest.approx(model.query.grad.norm().item())


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.attn(h, h, h)
        return self.head(a)


def test_a_layer_whose_weight_its_parent_uses_follows_it_and_is_not_the_reference():
    torch.manual_seed(0)
    flow = resify.gradient_flow(_Attention(), torch.randn(2, 5, 8))
    # attention is a layer (its in_proj_weight); out_proj is never called: it comes right after it
    assert [r.name for r in flow.layers] == ["emb", "attn", "attn.out_proj", "head"]
    assert flow.layer("attn").kind == "MultiheadAttention" and flow.layer("attn").shape == (48, 16)
    out_proj = flow.layer("attn.out_proj")
    assert out_proj.mean_abs_grad > 0 and out_proj.input_grad_norm is None
    assert flow.first_to_last == pytest.approx(flow.layer("emb").input_grad_norm / flow.layer("head").input_grad_norm)
    assert "NonDynamicall…" in flow.to_text()


def test_integer_inputs_fall_back_to_the_weight_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 4))
    tokens = torch.randint(0, 20, (3, 5))
    flow = resify.gradient_flow(model, tokens, batches=2)
    emb = flow.layer("0")
    assert emb.kind == "Embedding" and emb.input_grad_norm is None and emb.flow == emb.grad_norm > 0
    assert flow.layer("1").input_grad_norm > 0
    # the first/last rule reads input gradients, which only the Linear has: it is judged against itself
    assert (flow.verdict, flow.first_to_last) == ("healthy", 1.0) and "from '1' to '1'" in flow.reason


def _records(n, added=False, gate=False):
    """n layers of a model, each followed by an added projection and/or a gate when asked."""
    out = []
    for i in range(n):
        out.append(LayerFlow(f"l{i}", "Linear", len(out), False, (2, 2), 1.0, 1.0, 1.0, 1.0, 1.0))
        if added:
            out.append(LayerFlow(f"l{i}.proj", "Linear", len(out), True, (2, 2), 1.0, 1.0, 1.0, 1.0, 1.0))
        if gate:
            out.append(LayerFlow(f"l{i}.alpha", "Gate", len(out), True, (1,), 1.0, 1.0, None, None, None))
    return tuple(out)


_EVERY = "adds a shortcut around every layer"
RECOMMENDATIONS = {
    "plain, vanishing": (
        "vanishing",
        _records(3),
        f"try shortcut='auto': resify.apply(model, shortcut='auto') {_EVERY}",
    ),
    "plain and deep, vanishing": (
        "vanishing",
        _records(32),
        f"try gate='rezero': resify.apply(model, gate='rezero') {_EVERY} and starts each branch at zero, which "
        "trains 32 layers in series more reliably than ungated shortcuts",
    ),
    "shortcuts, vanishing": (
        "vanishing",
        _records(3, added=True),
        "try shortcut='auto', group=1: resify.apply(model, shortcut='auto', group=1) gives every layer, "
        "not only some, a shortcut",
    ),
    "plain, exploding": (
        "exploding",
        _records(3),
        "try gate='rezero': resify.apply(model, gate='rezero') starts every branch at zero",
    ),
    "gated, exploding": (
        "exploding",
        _records(3, added=True, gate=True),
        "try gate='rezero', gate_init=0.0: resify.apply(model, gate='rezero', gate_init=0.0) starts every branch at zero",
    ),
    "healthy": ("healthy", _records(3), None),
}


@pytest.mark.parametrize("verdict,records,expected", RECOMMENDATIONS.values(), ids=RECOMMENDATIONS.keys())
def test_the_recommendation_is_the_first_advice_in_python(verdict, records, expected):
    from resify.report.verdicts import advice, recommend

    assert recommend(verdict, records) == expected
    found = advice(verdict, records)
    assert (found[0].python() if found else None) == expected
    for a in found:  # every keyword a policy keyword, every value one it accepts
        resify.Policy.from_kwargs(**dict(a.settings))


# ---------------------------------------------------------------------------------------------
# rendering


@pytest.fixture(scope="module")
def seed_comparison(seed_network):
    model, x = seed_network(0)
    return resify.compare(
        resify.gradient_flow(model, x), resify.gradient_flow(resify.apply(model, x, gate="rezero"), x)
    )


def test_text_tables_fit_100_columns(seed_comparison):
    c = seed_comparison
    for text in (c.after.to_text(), c.to_text(), str(c.before)):
        assert max(len(line) for line in text.splitlines()) <= 100
    text = c.after.to_text()
    assert "verdict: " in text and "+layers.0.resify.0.proj" in text and "Gate" in text and "act sim" in text
    table = text.splitlines()[text.splitlines().index("") + 1 :]
    assert table[0].split()[:3] == ["#", "layer", "kind"] and len(table) == 2 + 15 + 1
    ctext = c.to_text()
    assert c.headline in ctext and "added by resify (10):" in ctext
    assert re.search(r"^layers\.0\.0\s+Linear\s+\S+\s+0\s+0×", ctext, flags=re.M)
    narrow = c.after.to_text(width=90)  # figures the verdict does not rest on go before the names are cut
    assert max(len(line) for line in narrow.splitlines()) <= 90 and "‖g‖/‖w‖" not in narrow
    assert "+layers.0.resify.0.proj " in narrow
    narrower = c.after.to_text(width=60)  # then long names lose their start to fit
    assert max(len(line) for line in narrower.splitlines()) <= 60 and re.search(r"\+…\S*\.0\.proj ", narrower)


def test_markdown(seed_comparison):
    md = seed_comparison.after.to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 15 and "**Verdict: " in md
    assert all(line.count(" | ") == 9 for line in rows)
    cmd = seed_comparison.to_markdown()
    assert f"**{seed_comparison.headline}**" in cmd and "`layers.4.resify.0.alpha`" in cmd
    assert "- output scale: activation RMS of 'layers.4.0' " in cmd


def test_json_round_trips_with_a_schema_version(seed_comparison):
    c = seed_comparison
    d = json.loads(c.after.to_json())
    assert d["schema_version"] == 2 and d["kind"] == "resify.gradient_flow"
    assert set(d["layers"][0]) >= {
        "name",
        "kind",
        "depth",
        "mean_abs_grad",
        "grad_norm",
        "grad_to_weight",
        "input_grad_norm",
        "activation_rms",
        "activation_similarity",
        "added",
        "verdict",
    }
    assert {"activation_growth", "output_similarity"} <= set(d) and d["thresholds"]["collapse_similarity"] == 0.9999
    assert resify.GradientFlow.from_json(c.after.to_json()) == c.after
    assert resify.FlowComparison.from_json(c.to_json()) == c
    cd = json.loads(c.to_json())
    assert cd["schema_version"] == 2 and cd["headline"] == c.headline and len(cd["added"]) == 10
    assert (cd["output_layer"], cd["output_ratio"]) == ("layers.4.0", c.output_ratio)
    # infinities survive as strings, never as invalid JSON
    bad = LayerFlow("x", "Linear", 0, False, (2, 2), math.inf, math.nan, None, 1.0, 1.0, "exploding")
    assert LayerFlow.from_dict(json.loads(json.dumps(bad.to_dict(), allow_nan=False))).mean_abs_grad == math.inf
    with pytest.raises(ResifyError, match="of schema_version 2 or older, found 99: .* upgrade resify"):
        resify.GradientFlow.from_json(json.dumps({**d, "schema_version": 99}))
    with pytest.raises(
        ResifyError, match="of schema_version 1 to 2, found kind='resify.gradient_flow' schema_version=0"
    ):
        resify.GradientFlow.from_json(json.dumps({**d, "schema_version": 0}))


def _as_schema_1(d):
    """A report as resify wrote it before schema 2: no similarity, growth or output figures."""
    d = {
        k: v
        for k, v in d.items()
        if k not in ("activation_growth", "output_similarity", "output_layer", "output_ratio")
    }
    if "layers" in d and isinstance(d["layers"], list) and d["layers"] and isinstance(d["layers"][0], dict):
        d["layers"] = [{k: v for k, v in r.items() if k != "activation_similarity"} for r in d["layers"]]
    for side in ("before", "after"):
        if side in d:
            d[side] = _as_schema_1(d[side])
    return {**d, "schema_version": 1}


def test_a_report_of_schema_1_still_reads_back(seed_comparison):
    c = seed_comparison
    old = resify.FlowComparison.from_json(json.dumps(_as_schema_1(json.loads(c.to_json()))))
    assert old.headline == c.headline and old.after.verdict == c.after.verdict
    assert [r.name for r in old.after.layers] == [r.name for r in c.after.layers]
    assert all(r.activation_similarity is None for r in old.after.layers) and old.after.activation_growth is None
    assert old.output_ratio == c.output_ratio  # derived from the layers' RMS, which schema 1 has


def test_plot_png_and_svg(seed_comparison, tmp_path):
    pytest.importorskip("matplotlib")
    png = seed_comparison.plot(tmp_path / "flow.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = seed_comparison.after.plot(tmp_path / "sub" / "flow.svg")
    assert b"<svg" in svg.read_bytes()[:500]
    with pytest.raises(ResifyError, match=r"\.png or \.svg.*'flow\.jpg'"):
        seed_comparison.plot(tmp_path / "flow.jpg")


def test_plot_without_matplotlib_says_how_to_install(seed_comparison, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib… raises ImportError
    with pytest.raises(ResifyError, match=r"pip install 'resify\[plot\]'"):
        seed_comparison.plot(tmp_path / "flow.png")
    assert not (tmp_path / "flow.png").exists()


# ---------------------------------------------------------------------------------------------
# DDP over gloo, 2 processes: a report mid-training measures this rank and leaves DDP as it was


def _ddp_report_worker(rank, world, path, out):
    import copy

    import torch.distributed as dist
    from test_interop import _finish, _init

    _init(rank, world, path)
    try:
        torch.manual_seed(0)  # the same weights on both ranks; different data per rank
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1 + rank)
        reports, references = [], []
        for _ in range(3):
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            reports.append(resify.gradient_flow(ddp, x, target=y).to_json())
            references.append(resify.gradient_flow(copy.deepcopy(model), x, target=y).to_json())
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()  # (it raised here: a reduction left pending)
            opt.step()
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.save({"reports": reports, "references": references, "params": params}, f"{out}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
def test_a_report_on_a_ddp_model_mid_training_is_this_ranks_and_training_goes_on(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "state")
    mp.spawn(_ddp_report_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for rank, r in enumerate(ranks):
        for report, reference in zip(r["reports"], r["references"]):
            got, ref = resify.GradientFlow.from_json(report), resify.GradientFlow.from_json(reference)
            assert [x.name for x in got.layers] == ["module." + x.name for x in ref.layers], rank
            for a, b in zip(got.layers, ref.layers):
                assert a.input_grad_norm == pytest.approx(b.input_grad_norm, rel=1e-6), (rank, a.name)
                assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6), (rank, a.name)
    first = [json.loads(r["reports"][0])["layers"][0]["input_grad_norm"] for r in ranks]
    assert first[0] != first[1]  # each rank its own batch, not the all-reduced gradient
    for k in ranks[0]["params"]:  # and DDP still keeps the ranks equal
        torch.testing.assert_close(ranks[0]["params"][k], ranks[1]["params"][k], rtol=0, atol=0, msg=k)


def _fsdp2_report_worker(rank, world, path, out):
    import torch.distributed as dist
    from test_interop import _finish, _init
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, path)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        x = torch.randn(4, 8)
        reference = resify.gradient_flow(model, x).to_json()
        fully_shard(model)
        torch.save({"report": resify.gradient_flow(model, x).to_json(), "reference": reference}, f"{out}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def test_a_report_on_an_fsdp2_model_has_its_weight_gradients(tmp_path):
    # its weights are DTensors whose gradients FSDP's own hooks move: naming them as the backward's
    # inputs left every weight figure None, so such a model gets the whole backward
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    fsdp = pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6")
    import torch.multiprocessing as mp

    out = str(tmp_path / "state")
    mp.spawn(_fsdp2_report_worker, args=(1, str(tmp_path / "rendezvous"), out), nprocs=1, join=True)
    r = torch.load(f"{out}.0")
    got, ref = resify.GradientFlow.from_json(r["report"]), resify.GradientFlow.from_json(r["reference"])
    assert [a.name for a in got.layers] == [b.name for b in ref.layers]
    for a, b in zip(got.layers, ref.layers):
        for f in ("mean_abs_grad", "grad_norm", "grad_to_weight", "input_grad_norm", "activation_rms"):
            assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-6), (a.name, f)
