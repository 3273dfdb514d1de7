"""The modules a converted model is made of (resify/rewriting/modules.py): a Shortcut's reset_parameters gives the
documented initial values, and a DualGraphModule runs the graph of its mode, computing what the original
does in each mode, through train()/eval() and through pickle, deepcopy and torch.save."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resify
from resify.rewriting.modules import GATE_PARAMETERS, DualGraphModule, Shortcut


def test_gate_parameters_name_each_gate_kind():
    assert GATE_PARAMETERS == {"rezero": "alpha", "layerscale": "gamma"}


def _filled_shortcut(gate_init):
    """A Shortcut holding every parameter kind, all set to values away from their initial ones."""
    s = Shortcut(gate_init)
    s.alpha = nn.Parameter(torch.full((1,), 7.0))
    s.gamma = nn.Parameter(torch.full((6,), -3.0))
    s.beta = nn.Parameter(torch.full((1,), 5.0))
    s.proj = nn.Linear(4, 6)
    return s


@pytest.mark.parametrize("gate_init,gate", [(None, 0.0), (0.25, 0.25), (1e-4, 1e-4), (-2.0, -2.0)])
def test_reset_parameters_puts_gates_at_gate_init_and_beta_at_zero(gate_init, gate):
    s = _filled_shortcut(gate_init)
    proj = s.proj.weight.detach().clone()
    s.reset_parameters()
    assert s.alpha.tolist() == [pytest.approx(gate)]
    assert s.gamma.tolist() == [pytest.approx(gate)] * 6
    assert s.beta.tolist() == [0.0]
    assert torch.equal(s.proj.weight, proj)  # children reset themselves
    assert all(p.requires_grad for p in s.parameters())


def test_reset_parameters_without_parameters_does_nothing():
    s = Shortcut(0.5)
    s.reset_parameters()
    assert list(s.parameters()) == []


@pytest.mark.parametrize("gate_init,text", [(None, "Shortcut()"), (0.25, "Shortcut(gate_init=0.25)")])
def test_shortcut_repr_shows_gate_init(gate_init, text):
    assert repr(Shortcut(gate_init)) == text


@pytest.mark.parametrize(
    "policy,expected",
    [
        ({"gate": "rezero"}, {"alpha": 0.0}),
        ({"gate": "layerscale", "gate_init": 0.3}, {"gamma": 0.3}),
        ({"preserve_output": True}, {"beta": 0.0}),
        ({"preserve_output": True, "gate": "rezero"}, {"alpha": 1.0, "beta": 0.0}),
    ],
)
def test_the_shortcuts_of_a_converted_model_reset_to_their_initial_values(policy, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    converted = resify.apply(model, torch.randn(3, 8), **policy)
    shortcuts = [m for m in converted.modules() if isinstance(m, Shortcut)]
    assert len(shortcuts) == 2

    def values():
        return [{k: getattr(s, k).tolist() for k in expected} for s in shortcuts]

    initial = [{k: pytest.approx([v] * getattr(s, k).numel()) for k, v in expected.items()} for s in shortcuts]
    assert values() == initial
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(0.5)
    assert values() != initial
    for s in shortcuts:
        s.reset_parameters()
    assert values() == initial


def test_a_model_converted_on_meta_gets_its_gates_back_from_reset_parameters():
    """The meta-device workflow: build on meta, apply, to_empty, reset_parameters on every module."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    converted = resify.apply(model, torch.randn(3, 8, device="meta"), gate="layerscale", gate_init=0.3)
    converted.to_empty(device="cpu")
    for m in converted.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    gammas = {n: p.tolist() for n, p in converted.named_parameters() if n.startswith("resify.")}
    assert gammas == {"resify.0.gamma": [pytest.approx(0.3)] * 8, "resify.2.gamma": [pytest.approx(0.3)] * 8}


# ---------------------------------------------------------------------------------------------
# DualGraphModule


class Halves(nn.Module):
    """Halves the first layer's output in training only: a forward that reads ``self.training``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.training:
            h = h * 0.5
        return self.fc3(F.relu(self.fc2(h)))


def reference(model, x, alpha, training):
    """What resify's rezero shortcuts around fc1 and fc2 compute, written by hand (fc3 has no activation)."""
    h = alpha * F.relu(model.fc1(x)) + x
    if training:
        h = h * 0.5
    h = alpha * F.relu(model.fc2(h)) + h
    return model.fc3(h)


X = torch.randn(4, 8)


@pytest.fixture
def halves():
    torch.manual_seed(0)
    model = Halves()
    return model, resify.apply(model, torch.randn(4, 8), gate="rezero", gate_init=0.5, graph_module=True)


def test_train_and_eval_switch_the_graph(halves):
    model, converted = halves
    assert isinstance(converted, DualGraphModule)
    assert converted.training and converted.graph is converted.train_graph
    assert "0.5" in converted.code
    assert converted.eval() is converted
    assert not converted.training and converted.graph is converted.eval_graph
    assert "0.5" not in converted.code
    assert not any(m.training for m in converted.modules())
    converted.train()
    assert converted.graph is converted.train_graph and all(m.training for m in converted.modules())
    assert converted.train(False).graph is converted.eval_graph


def test_each_mode_computes_what_the_reference_computes(halves):
    model, converted = halves
    with torch.no_grad():
        train_out = converted.train()(X)
        eval_out = converted.eval()(X)
        torch.testing.assert_close(train_out, reference(model, X, 0.5, True), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(eval_out, reference(model, X, 0.5, False), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(train_out, eval_out)


def test_with_preserve_output_each_mode_equals_the_original_exactly():
    torch.manual_seed(0)
    model = Halves()
    converted = resify.apply(model, X, preserve_output=True, graph_module=True)
    assert isinstance(converted, DualGraphModule)
    with torch.no_grad():
        for mode in (True, False, True):
            assert torch.equal(converted.train(mode)(X), model.train(mode)(X))
        assert not torch.equal(model.train()(X), model.eval()(X))


def _pickled(m, tmp_path):
    return pickle.loads(pickle.dumps(m))


def _deep_copied(m, tmp_path):
    return copy.deepcopy(m)


def _saved(m, tmp_path):
    torch.save(m, tmp_path / "m.pt")
    return torch.load(tmp_path / "m.pt", weights_only=False)


def _saved_to_buffer(m, tmp_path):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "pickle": _pickled,
    "deepcopy": _deep_copied,
    "torch.save": _saved,
    "torch.save to a buffer": _saved_to_buffer,
}


@pytest.mark.parametrize("mode", [True, False], ids=["copied in train mode", "copied in eval mode"])
@pytest.mark.parametrize("how", COPIES.values(), ids=COPIES.keys())
def test_a_copy_keeps_both_graphs_and_its_mode(halves, how, mode, tmp_path):
    model, converted = halves
    converted.train(mode)
    other = how(converted, tmp_path)
    assert isinstance(other, DualGraphModule)
    assert other.training == mode
    assert [other.get_submodule(n).training for n in ("fc1", "fc2", "fc3")] == [mode] * 3
    with torch.no_grad():
        for m in (True, False):
            assert torch.equal(other.train(m)(X), converted.train(m)(X))
            torch.testing.assert_close(other(X), reference(model, X, 0.5, m), rtol=1e-6, atol=1e-6)
    assert [n for n, _ in other.named_parameters()] == [n for n, _ in converted.named_parameters()]
    with torch.no_grad():  # the copy owns its parameters
        other.get_parameter("resify.fc1.alpha").fill_(2.0)
    assert converted.get_parameter("resify.fc1.alpha").item() == 0.5


def test_a_shallow_copy_shares_the_modules_and_keeps_both_graphs(halves):
    _, converted = halves
    other = copy.copy(converted)
    assert isinstance(other, DualGraphModule)
    assert other.get_parameter("resify.fc1.alpha") is converted.get_parameter("resify.fc1.alpha")
    with torch.no_grad():
        for m in (True, False):
            assert torch.equal(other.train(m)(X), converted.train(m)(X))


@pytest.mark.parametrize("how", COPIES.values(), ids=COPIES.keys())
def test_a_copy_keeps_every_submodules_class_and_mode(halves, how, tmp_path):
    _, converted = halves
    converted.eval()
    other = how(converted, tmp_path)
    kinds = [(n, type(m).__name__, m.training) for n, m in converted.named_modules() if n]
    assert [(n, type(m).__name__, m.training) for n, m in other.named_modules() if n] == kinds
