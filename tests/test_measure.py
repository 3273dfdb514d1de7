"""resify.report.measure: ``gradient_flow`` (its inputs, batches, losses and refusals) and ``build_flow``."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resify
from resify.errors import ResifyError
from resify.report.facts import ModelFacts
from resify.report.measure import _ancestors, _batch_inputs, _loss, _order, _output_tensors, build_flow, gradient_flow
from resify.tracing.inputs import derive_example_input

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def test_ancestors_nearest_first():
    assert _ancestors("a.b.c") == ["a.b", "a"] and _ancestors("a") == []


def test_output_tensors_are_the_floating_ones_at_any_depth():
    a, b, c = torch.zeros(1), torch.ones(2), torch.ones(3, dtype=torch.float64)
    found = _output_tensors({"x": a, "y": [torch.arange(3), (b, None)], "z": {"w": c}, "s": "text"})
    assert len(found) == 3 and all(f is t for f, t in zip(found, (a, b, c)))
    assert _output_tensors(torch.arange(3)) == [] and _output_tensors(7) == []


def test_the_default_loss_is_the_mean_square_of_each_output_summed():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([3.0, 4.0, 5.0])
    assert _loss((a, b), None, None).item() == pytest.approx((1 + 4) / 2 + (9 + 16 + 25) / 3)
    assert _loss(a, lambda out: out.sum().reshape(1, 1), None).shape == ()  # a one-element loss_fn is a scalar
    with pytest.raises(ResifyError, match="target= needs a model with one output tensor, found 2"):
        _loss((a, b), None, torch.zeros(1, 2))
    with pytest.raises(ResifyError, match=r"loss_fn must return a scalar tensor, found float"):
        _loss(a, lambda out: 1.0, None)


def test_batch_inputs_are_the_example_then_seeded_draws_of_its_shapes_and_dtypes():
    x = torch.randn(3, 4, requires_grad=True) * 1  # not a leaf
    ids = torch.tensor([[2, 5], [3, 4]])
    mask = torch.tensor([True, False])
    batches = list(_batch_inputs((x, ids, mask, "keep"), 3, seed=11))
    assert len(batches) == 3
    first = batches[0]
    assert first[0].is_leaf and first[0].requires_grad and torch.equal(first[0], x)
    assert first[1] is not ids and torch.equal(first[1], ids) and first[3] == "keep"
    g = torch.Generator().manual_seed(11)
    for b in batches[1:]:  # the draws, in order, from one generator seeded with the seed
        assert torch.equal(b[0], torch.randn(3, 4, generator=g)) and b[0].requires_grad
        assert torch.equal(b[1], torch.randint(2, 6, (2, 2), generator=g)) and b[1].dtype == torch.int64
        assert torch.equal(b[2], torch.randint(0, 2, (2,), generator=g).bool())
        assert b[3] == "keep"
        assert int(b[1].min()) >= 2 and int(b[1].max()) <= 5


def _fig(mean, gnorm, weight, inp=None, rms=None):
    return {"mean_abs": mean, "grad_norm": gnorm, "weight": weight, "input": inp, "rms": rms}


def test_build_flow_makes_one_record_per_layer_in_call_order():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    layers = {"0": model[0], "1": model[1], "2": model[2]}
    weights = {n: m.weight for n, m in layers.items()}
    figures = {
        "0": _fig(0.5, 2.0, 4.0, inp=1.0, rms=3.0),
        "1": _fig(0.25, 1.0, 0.0, inp=2.0),  # a zero weight: no grad_to_weight
        "2": _fig(0.125, 3.0, 6.0, inp=4.0),
        "loss": 0.75,
    }
    called = {"2": 0, "0": 1, "1": 2}  # called in another order than registered
    flow = build_flow(model, layers, {}, weights, called, figures, facts=ModelFacts(), loss="mse to zeros")
    assert [r.name for r in flow.layers] == ["2", "0", "1"] and [r.depth for r in flow.layers] == [0, 1, 2]
    r = flow.layer("0")
    assert (r.kind, r.shape, r.added, r.mean_abs_grad, r.grad_norm) == ("Linear", (3, 2), False, 0.5, 2.0)
    assert r.grad_to_weight == 0.5 and r.input_grad_norm == 1.0 and r.activation_rms == 3.0
    assert flow.layer("1").grad_to_weight is None and flow.layer("2").grad_to_weight == 0.5
    assert flow.loss_value == 0.75 and flow.model_class == "Sequential" and flow.loss == "mse to zeros"
    assert flow.first_to_last == 2.0  # '2' (4.0) first, '1' (2.0) last
    no_loss = build_flow(model, layers, {}, weights, called, {"0": figures["0"]}, facts=ModelFacts(), loss="x")
    assert math.isnan(no_loss.loss_value)


def test_order_puts_an_uncalled_layer_with_a_gradient_after_its_owner_and_drops_one_without():
    owner, inner, late, idle = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    layers = {"first": nn.Linear(2, 2), "owner": owner, "owner.inner": inner, "idle": idle, "late": late}
    called = {"first": 0, "owner": 1}
    order = _order(nn.Module(), layers, {}, called, got_grad={"owner.inner", "late"})
    assert order == ["first", "owner", "owner.inner", "late"]  # 'late': no called owner, last; 'idle': neither


def test_a_linear_first_model_gets_its_derived_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    assert gradient_flow(model) == gradient_flow(model, derive_example_input(model))


def test_example_kwargs_reach_the_forward():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, mask=None):
            return self.fc(x) * mask

    torch.manual_seed(0)
    model, x = Masked(), torch.randn(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    flow = gradient_flow(model, x, example_kwargs={"mask": mask})
    out = model(x, mask=mask)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    assert flow.layer("fc").mean_abs_grad == pytest.approx(model.fc.weight.grad.abs().mean().item(), rel=1e-6)
    with pytest.raises(ResifyError, match=r"Masked failed on the example input \(\[2, 3\]\): TypeError: "):
        gradient_flow(model, x)  # without the mask
    with pytest.raises(ResifyError, match="example_input holds no tensor"):
        gradient_flow(model, [3])


# moved from test_report.py: any module, any output, any loss


class TwoHeads(nn.Module):
    """Not a GraphModule: layers registered in one order and called in another, several outputs."""

    def __init__(self, as_dict):
        super().__init__()
        self.as_dict = as_dict
        self.head_b = nn.Linear(8, 2)
        self.head_a = nn.Linear(8, 3)
        self.body = nn.Linear(6, 8)

    def forward(self, x):
        h = torch.relu(self.body(x))
        a, b = self.head_a(h), self.head_b(h)
        if self.as_dict:
            return {"a": a, "b": b, "ids": torch.arange(3)}  # a non-float output is left out
        return a, b


@pytest.mark.parametrize("as_dict", [False, True])
def test_several_outputs_sum_the_default_loss(as_dict):
    torch.manual_seed(0)
    model = TwoHeads(as_dict)
    x = torch.randn(5, 6)
    flow = resify.gradient_flow(model, x)
    assert [r.name for r in flow.layers] == ["body", "head_a", "head_b"]  # call order, not registration
    h = torch.relu(model.body(x))
    a, b = model.head_a(h), model.head_b(h)
    loss = F.mse_loss(a, torch.zeros_like(a)) + F.mse_loss(b, torch.zeros_like(b))
    loss.backward()
    assert flow.loss_value == pytest.approx(loss.item())
    for r in flow.layers:
        assert r.mean_abs_grad == pytest.approx(model.get_submodule(r.name).weight.grad.abs().mean().item())
    # body's output feeds both heads: their inputs are one tensor, with one gradient
    assert flow.layer("head_a").input_grad_norm == flow.layer("head_b").input_grad_norm


def test_loss_fn_and_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    classes = torch.tensor([0, 2, 1, 1, 0])
    values = torch.randn(5, 3)
    cases = [
        (dict(loss_fn=lambda out: out.sum()), lambda out: out.sum(), "loss_fn"),
        (dict(target=classes), lambda out: F.cross_entropy(out, classes), "cross-entropy to target"),
        (dict(target=values), lambda out: F.mse_loss(out, values), "mse to target"),
    ]
    for kwargs, reference, name in cases:
        flow = resify.gradient_flow(model, x, **kwargs)
        model.zero_grad()
        loss = reference(model(x))
        loss.backward()
        assert flow.loss == name
        assert flow.loss_value == pytest.approx(loss.item(), rel=1e-6)
        assert flow.layers[0].mean_abs_grad == pytest.approx(model[0].weight.grad.abs().mean().item(), rel=1e-6)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_fn=lambda out: out), r"loss_fn must return a scalar tensor, found \(5, 3\)"),
        (dict(loss_fn=lambda out: 1.0, target=torch.zeros(5)), "either loss_fn= or target="),
        (dict(target=torch.zeros(4, 7)), r"the target \(4, 7\) .* does not fit the output \(5, 3\)"),
        (dict(target=torch.zeros(4, dtype=torch.long)), r"the target \(4,\) \(torch.int64\) does not fit"),
        (dict(batches=0), "batches must be a positive integer"),
    ],
)
def test_bad_arguments_raise_resify_errors(kwargs, match):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ResifyError, match=match):
        resify.gradient_flow(model, torch.randn(5, 6), **kwargs)


def test_a_model_that_fails_or_cannot_learn_is_refused():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ResifyError, match=r"Sequential failed on the example input \(\[5, 7\]\): RuntimeError: "):
        resify.gradient_flow(model, torch.randn(5, 7))
    assert not any(m._forward_hooks for m in model.modules())  # cleaned up after the failure too
    assert all(p.grad is None for p in model.parameters()) and model.training
    model.requires_grad_(False)  # frozen: the flow still shows, through the input's gradients
    frozen = resify.gradient_flow(model, torch.randn(5, 6))
    assert frozen.layers[0].mean_abs_grad is None and frozen.layers[0].input_grad_norm > 0
    tokens = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).requires_grad_(False)
    with pytest.raises(ResifyError, match="does not depend on any parameter that requires grad"):
        resify.gradient_flow(tokens, torch.randint(0, 10, (3, 5)))


def test_models_without_layers_or_float_output_are_refused():
    with pytest.raises(ResifyError, match="has no parametric layer"):
        resify.gradient_flow(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(ResifyError, match="holds no floating-point tensor"):
        resify.gradient_flow(_ArgmaxNet(), torch.randn(2, 3))


class _ArgmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x).argmax(-1)
