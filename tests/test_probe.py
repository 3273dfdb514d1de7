"""resify.report.probe: which modules are layers, and the hooks that record one forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resify
from resify.errors import ResifyError
from resify.report.figures import Sink, combine
from resify.report.probe import (
    Probe,
    as_leaf,
    find_layers,
    first_tensor,
    gate_parameters,
    is_added,
    is_measuring,
    layer_modules,
    measuring,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def test_measuring_marks_the_thread_and_nests():
    assert not is_measuring()
    with measuring():
        assert is_measuring()
        with measuring():
            assert is_measuring()
        assert is_measuring()  # the outer one still holds
    assert not is_measuring()
    with pytest.raises(KeyError), measuring():
        raise KeyError
    assert not is_measuring()  # put back after an error too


@pytest.mark.parametrize(
    "name,added", [("resify.0.proj", True), ("layers.0.resify.0.alpha", True), ("resify_net.0", False), ("a", False)]
)
def test_is_added(name, added):
    assert is_added(name) is added


def test_layers_are_modules_with_a_weight_of_two_or_more_dimensions():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Conv1d(1, 1, 1), nn.Embedding(5, 3))
    assert list(layer_modules(model)) == ["0", "3", "4"]  # norms' 1-D weights are not layers
    layers, gates, weights = find_layers(model)
    assert list(layers) == ["0", "3", "4"] and gates == {} and weights["0"] is model[0].weight


def test_find_layers_refuses_a_model_without_any():
    with pytest.raises(ResifyError, match=r"^Sequential has no parametric layer \(a module with a weight of 2 or more"):
        find_layers(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_gate_parameters_of_a_converted_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    converted = resify.apply(model, torch.randn(2, 4), gate="rezero")
    gates = gate_parameters(converted)
    assert gates and all(is_added(n) and n.endswith(".alpha") for n in gates)
    assert all(gates[n] is converted.get_parameter(n) for n in gates)
    layers, found, weights = find_layers(converted)
    assert found == gates and all(weights[n] is gates[n] for n in gates)
    assert gate_parameters(model) == {}


def test_as_leaf():
    x = torch.ones(2, requires_grad=True) * 2  # not a leaf
    leaf = as_leaf(x)
    assert leaf.is_leaf and leaf.requires_grad and torch.equal(leaf, x)
    ids = as_leaf(torch.tensor([1, 2]))
    assert not ids.requires_grad  # integers take no gradient
    assert as_leaf(3) == 3 and as_leaf(None) is None


def test_first_tensor():
    a, b = torch.zeros(1), torch.ones(1)
    assert first_tensor(a) is a
    assert first_tensor((1, [None, {"k": b}], a)) is b
    assert first_tensor({"x": 1, "y": (a,)}) is a
    assert first_tensor((1, "s", [])) is None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(self.b(h) + h)


def _reference(model, x):
    """By autograd: each layer's input gradient norm, weight mean |grad|, output RMS."""
    inputs, outputs = {}, {}
    hooks = []
    for name in ("a", "b", "c"):

        def hook(m, args, out, name=name):
            args[0].retain_grad()
            inputs[name], outputs[name] = args[0], out.detach()

        hooks.append(getattr(model, name).register_forward_hook(hook))
    x = x.clone().requires_grad_()
    out = model(x)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    for h in hooks:
        h.remove()
    ref = {
        n: {
            "input": inputs[n].grad.norm().item(),
            "mean_abs": getattr(model, n).weight.grad.abs().mean().item(),
            "grad_norm": getattr(model, n).weight.grad.norm().item(),
            "rms": outputs[n].pow(2).mean().sqrt().item(),
            "weight": getattr(model, n).weight.norm().item(),
        }
        for n in ("a", "b", "c")
    }
    model.zero_grad(set_to_none=True)
    return ref


@pytest.mark.parametrize("keep_grads", [False, True])
def test_a_probe_records_what_autograd_gives(keep_grads):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(5, 4)
    ref = _reference(model, x)
    layers, _, weights = find_layers(model)
    sink = Sink()
    probe = Probe(layers, weights, sink, keep_grads=keep_grads)
    with probe.recording():
        out = model(as_leaf(x))
        loss = F.mse_loss(out, torch.zeros_like(out))
        if keep_grads:  # a watch: the user's own backward
            loss.backward()
        else:  # gradient_flow's: only the gradients it reads
            probe.backward(loss)
    probe.finish()
    probe.add_weight_norms()
    figures = combine(sink.resolve(), batches=1)
    assert probe.called == {"a": 0, "b": 1, "c": 2}
    for n in ("a", "b", "c"):
        for k, v in ref[n].items():
            assert figures[n][k] == pytest.approx(v, rel=1e-5), (n, k)
    # gradient_flow's probe drops each weight gradient once read; a watch's leaves it to the optimizer
    assert all((p.grad is not None) is keep_grads for p in (model.a.weight, model.b.weight, model.c.weight))


def test_gradient_flow_makes_only_the_gradients_it_reads():
    """No bias or norm gradient is computed: the user's hooks on those never run, their gradients stay as
    they were, and every figure is still autograd's (an in-place op after a layer took its input too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x = torch.randn(5, 6)
    ran = []
    hooks = [
        model[0].bias.register_hook(lambda g: ran.append("bias")),
        model[1].weight.register_post_accumulate_grad_hook(lambda p: ran.append("norm")),
    ]
    kept = torch.full_like(model[3].bias, 7.0)
    model[3].bias.grad = kept
    flow = resify.gradient_flow(model, x)
    assert ran == [] and model[3].bias.grad is kept and model[0].bias.grad is None
    for h in hooks:
        h.remove()
    model[3].bias.grad = None
    inputs, outputs = {}, {}

    def keep(name):
        def hook(m, args, out):
            args[0].retain_grad()
            inputs[name], outputs[name] = args[0], out.detach().clone()

        return hook

    handles = [model[i].register_forward_hook(keep(str(i))) for i in (0, 3)]
    out = model(x.clone().requires_grad_())
    F.mse_loss(out, torch.zeros_like(out)).backward()
    for h in handles:
        h.remove()
    for name in ("0", "3"):
        rec, weight = flow.layer(name), model.get_submodule(name).weight
        assert rec.input_grad_norm == pytest.approx(inputs[name].grad.norm().item(), rel=1e-5), name
        assert rec.grad_norm == pytest.approx(weight.grad.norm().item(), rel=1e-5), name
        assert rec.mean_abs_grad == pytest.approx(weight.grad.abs().mean().item(), rel=1e-5), name
        assert rec.activation_rms == pytest.approx(outputs[name].pow(2).mean().sqrt().item(), rel=1e-5), name


class _InPlace(nn.Module):
    """``c`` takes the tensor ``b`` took, changed in place in between (``b`` is frozen: it saves no input)."""

    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.requires_grad_(False)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        h = h.mul_(2) if self.in_place else h * 2
        return self.c(h) + y


@pytest.mark.parametrize("keep_grads", [False, True])
def test_a_tensor_changed_in_place_is_another_layer_input(keep_grads):
    # the same object, another value: before, `c` was given `b`'s input gradient (1.23 for 0.49)
    def input_norms(in_place):
        torch.manual_seed(0)
        model = _InPlace(in_place)
        layers, _, weights = find_layers(model)
        probe = Probe(layers, weights, Sink(), keep_grads=keep_grads)
        with probe.recording():
            loss = model(as_leaf(torch.randn(3, 4))).square().mean()
            loss.backward() if keep_grads else probe.backward(loss)
        probe.finish()
        figures = combine(probe.sink.resolve(), batches=1)
        return [figures[n]["input"] for n in "abc"]

    changed, twin = input_norms(True), input_norms(False)
    assert changed == pytest.approx(twin, rel=1e-6) and changed[1] != pytest.approx(changed[2], rel=0.1)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_figures_of_the_model_without_it(use_reentrant):
    """The recompute inside the backward is not measured again (reentrant checkpointing counted the
    first layer's input gradient twice, √2 too large), and reentrant checkpointing, which refuses a
    backward with inputs=, gets the whole backward."""
    from styles import CheckpointedMLP

    x = torch.randn(4, 8)
    torch.manual_seed(0)
    plain = resify.gradient_flow(CheckpointedMLP(None), x)
    torch.manual_seed(0)
    model = CheckpointedMLP(use_reentrant)
    flow = resify.gradient_flow(model, x)
    assert [r.name for r in flow.layers] == [r.name for r in plain.layers]
    for a, b in zip(flow.layers, plain.layers):
        for f in ("input_grad_norm", "grad_norm", "mean_abs_grad", "activation_rms", "activation_similarity"):
            assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-6), (a.name, f)
    assert all(p.grad is None for p in model.parameters())


def test_detach_leaves_no_hook_and_a_probe_can_be_attached_again():
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(5, 4)
    layers, _, weights = find_layers(model)
    probe = Probe(layers, weights, keep_grads=True)
    for _ in range(2):
        sink = Sink()
        probe.attach(sink)
        model(as_leaf(x)).sum().backward()
        probe.detach()
        probe.finish()
        assert probe.called == {"a": 0, "b": 1, "c": 2} and sink.resolve()
    assert all(not m._forward_hooks for m in model.modules())
    assert all(not getattr(p, "_backward_hooks", None) for p in model.parameters())
    before = len(sink.resolve())
    model(x).sum().backward()  # no probe: nothing more recorded
    assert len(sink.resolve()) == before


def test_layers_that_take_one_tensor_share_its_input_gradient():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.p, self.q = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.p(x) * 2 + self.q(x)

    torch.manual_seed(0)
    model, x = Two(), as_leaf(torch.randn(4, 3))
    layers, _, weights = find_layers(model)
    sink = Sink()
    with Probe(layers, weights, sink).recording():
        model(x).pow(2).sum().backward()
    figures = combine(sink.resolve(), batches=1)
    assert figures["p"]["input"] == figures["q"]["input"] == pytest.approx(x.grad.norm().item(), rel=1e-6)


def test_small_tensors_measured_together_give_each_ones_figures_to_the_bit():
    from resify.report.figures import BATCH_NUMEL, figures_of

    torch.manual_seed(0)
    tensors = [torch.randn(8, 16) for _ in range(4)] + [
        torch.randn(3),
        torch.randn(BATCH_NUMEL + 1),
        torch.zeros(8, 16),
    ]
    names = [(f"t{i}",) for i in range(len(tensors))]
    probe = Probe({}, {}, Sink())
    probe._measure(tensors, names, "grad")
    got = dict(probe.sink.resolve())
    for (name,), t in zip(names, tensors):
        mean, norm = figures_of(t, True)  # one at a time
        assert got[("mean_abs", name, 0)] == mean and got[("grad_norm", name, 0)] == norm, name
        assert norm == pytest.approx(t.double().norm().item(), rel=1e-6)


def test_a_large_weight_is_normed_once_in_its_gradient_hook_and_tied_names_share_it():
    from resify.report.figures import BATCH_NUMEL

    torch.manual_seed(0)
    big, small = nn.Linear(80, 80), nn.Linear(8, 8)  # 6,400 > BATCH_NUMEL elements, and 64
    assert big.weight.numel() > BATCH_NUMEL >= small.weight.numel()
    model = nn.Sequential(big, nn.ReLU(), nn.Linear(80, 8), small)
    layers, _, weights = find_layers(model)
    weights = {**weights, "tied": big.weight}  # one parameter under a second name
    probe = Probe(layers, weights, Sink())
    for _ in range(2):  # two batches: the hook fires twice, the norm is taken once
        with probe.recording():
            out = model(torch.randn(4, 80))
            out.square().mean().backward()
        probe.batch += 1
    taken = [k for k, _ in probe.sink.resolve() if k[0] == "weight"]
    assert taken.count(("weight", "0")) == taken.count(("weight", "tied")) == 1
    assert ("weight", "3") not in taken  # a small weight: measured with the rest, below
    probe.add_weight_norms()
    figures = combine(probe.sink.resolve(), batches=2)
    for name, w in weights.items():
        assert figures[name]["weight"] == pytest.approx(w.double().norm().item(), rel=1e-6), name
    assert [k for k, _ in probe.sink.resolve() if k[0] == "weight"].count(("weight", "0")) == 1
    assert all(p.grad is None for p in model.parameters() if p.dim() >= 2)  # read and dropped


def test_a_gradient_that_a_hook_of_the_users_kept_is_not_overwritten():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 80), nn.Linear(80, 4))
    kept = []
    handle = model[0].weight.register_post_accumulate_grad_hook(lambda p: kept.append(p.grad))
    layers, _, weights = find_layers(model)
    probe = Probe(layers, weights, Sink())
    with probe.recording():
        model(torch.randn(4, 80)).square().mean().backward()
    handle.remove()
    assert len(kept) == 1 and (kept[0] < 0).any()  # the gradient itself, not its absolute values


@pytest.mark.parametrize("keep_grads", [False, True])
def test_a_sparse_embedding_gradient_is_measured_as_its_dense_twin(keep_grads):
    def figures(sparse):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(50, 8, sparse=sparse), nn.Linear(8, 4))
        layers, _, weights = find_layers(model)
        probe = Probe(layers, weights, Sink(), keep_grads=keep_grads)
        with probe.recording():
            model(torch.tensor([[1, 2, 2, 7]])).square().mean().backward()
        probe.finish()
        grad = model[0].weight.grad
        return combine(probe.sink.resolve(), batches=1)["0"], grad

    (dense, dense_grad), (sparse, sparse_grad) = figures(False), figures(True)
    assert sparse["mean_abs"] == pytest.approx(dense["mean_abs"], rel=1e-6)
    assert sparse["grad_norm"] == pytest.approx(dense["grad_norm"], rel=1e-6)
    if keep_grads:  # a watch leaves the gradient to the optimizer as it was
        torch.testing.assert_close(sparse_grad.to_dense(), dense_grad)
