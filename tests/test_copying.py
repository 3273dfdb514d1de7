"""The structural copy (resify/tracing/copying.py): new modules and containers over the user's tensors, and
the user's model untouched by apply."""

import collections

import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

import resify
from resify.tracing.copying import own_containers, structural_copy


class Block(nn.Module):
    """Holds what a forward or a library puts on a module: a cache dict, a call log, nested lists."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.cache = {}
        self.calls = []
        self.nested = {"scales": [torch.ones(4)], "names": {"a"}}
        self.ordered = collections.OrderedDict(first=1)

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.fc1.weight * 2
        self.calls.append(key)
        return self.fc2(torch.relu(x @ self.cache[key])) * self.nested["scales"][0]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.blocks = nn.Sequential(self.shared, nn.ReLU(), Block())  # registered under two names
        self.head = nn.Linear(4, 4)
        self.head.weight = self.shared.weight  # a tied weight

    def forward(self, x):
        return self.head(self.blocks(x))


def _snapshot(model):
    """Everything apply must leave as it was: tensors (by identity and value), grads, flags, hooks,
    attribute dicts."""
    return {
        "tensors": {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {k: (p.grad, None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: (m._forward_hooks, dict(m._forward_hooks)) for k, m in model.named_modules()},
        "attributes": {k: sorted(vars(m)) for k, m in model.named_modules()},
        "classes": {k: type(m) for k, m in model.named_modules()},
    }


def test_apply_leaves_the_users_model_exactly_as_it_was():
    torch.manual_seed(0)
    model = Tied().train()
    model.blocks[2].eval()  # a mixed mode, kept as it is
    model.head.register_forward_hook(lambda m, i, o: None)
    model(torch.randn(2, 4)).sum().backward()  # grads the user has, and a filled cache
    model.shared.bias.requires_grad_(False)
    block = model.blocks[2]
    cache, calls = dict(block.cache), list(block.calls)
    before = _snapshot(model)

    converted = resify.apply(model, torch.randn(3, 4), gate="rezero")
    converted(torch.randn(3, 4)).sum().backward()  # and using the result changes nothing either

    after = _snapshot(model)
    for k, (tensor, value) in before["tensors"].items():
        assert after["tensors"][k][0] is tensor and torch.equal(tensor, value), k
    for k, (grad, value) in before["grads"].items():
        assert after["grads"][k][0] is grad, k
        assert grad is None or torch.equal(grad, value), k
    for key in ("requires_grad", "training", "attributes", "classes"):
        assert after[key] == before[key], key
    for k, (hooks, content) in before["hooks"].items():
        assert after["hooks"][k][0] is hooks and dict(hooks) == content, k
    assert block.cache.keys() == cache.keys() and block.calls == calls  # no tracer proxy reached them
    assert model.blocks[0] is model.shared and model.head.weight is model.shared.weight


def test_a_module_registered_twice_is_copied_once_and_tied_tensors_stay_the_users():
    model = Tied()
    copied = structural_copy(model)
    assert copied.shared is copied.blocks[0] and copied.shared is not model.shared
    assert copied.head.weight is copied.shared.weight is model.shared.weight  # tensors shared, not copied
    originals = dict(model.named_modules(remove_duplicate=False))
    for name, m in copied.named_modules(remove_duplicate=False):
        assert type(m) is type(originals[name]) and m is not originals[name], name
    assert list(copied.state_dict()) == list(model.state_dict())


def test_no_container_of_the_copy_is_one_of_the_users():
    model = Block()
    model.register_forward_hook(lambda m, i, o: None)
    model.register_buffer("steps", torch.zeros(1), persistent=False)
    copied = structural_copy(model)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks"):
        assert getattr(copied, key) is not getattr(model, key), key
        assert getattr(copied, key) == getattr(model, key) or key == "_modules", key
    assert copied.cache is not model.cache and copied.calls is not model.calls
    assert copied.nested is not model.nested and copied.nested["scales"] is not model.nested["scales"]
    assert copied.nested["names"] is not model.nested["names"] and copied.nested["names"] == {"a"}
    assert copied.nested["scales"][0] is model.nested["scales"][0]  # the tensor inside is shared
    assert type(copied.ordered) is collections.OrderedDict and copied.ordered is not model.ordered
    copied(torch.randn(2, 4))
    copied.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    copied.register_forward_pre_hook(lambda m, i: None)
    assert model.cache == {} and model.calls == [] and "extra" not in model._parameters
    assert len(model._forward_pre_hooks) == 0 and len(copied._forward_pre_hooks) == 1


def test_own_containers_starts_a_copy_again_from_the_users_containers():
    model = Block()
    copied = structural_copy(model)
    copied(torch.randn(2, 4))
    assert len(copied.cache) == 1 and len(copied.calls) == 1
    own_containers(vars(copied), vars(model))
    assert copied.cache == {} and copied.calls == [] and copied.cache is not model.cache


def test_a_forward_rebound_in_init_is_bound_to_the_copy():
    class Rebound(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.forward = self.double

        def double(self, x):
            return self.fc(x) * 2

    model = Rebound()
    copied = structural_copy(model)
    assert copied.forward.__self__ is copied
    copied.fc = nn.Linear(2, 2)  # the copy's forward reads the copy's layers, not the user's
    x = torch.randn(3, 2)
    torch.testing.assert_close(copied(x), copied.fc(x) * 2)


def test_a_class_with_its_own_pickling_hooks_is_copied_through_them():
    class Pickled(nn.Linear):
        def __getstate__(self):
            state = super().__getstate__()
            del state["scratch"]  # what this class does not want copied
            return {**state, "from_getstate": True}

    model = Pickled(2, 2)
    model.scratch = 5
    copied = structural_copy(model)
    assert copied.from_getstate and not hasattr(model, "from_getstate") and not hasattr(copied, "scratch")
    assert copied.weight is model.weight and copied._parameters is not model._parameters


def test_a_parametrized_layer_is_copied_and_computes_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(3, 3)), nn.ReLU())
    copied = structural_copy(model)
    x = torch.randn(2, 3)
    assert type(copied[0]) is type(model[0]) and copied[0] is not model[0]
    assert copied[0].parametrizations is not model[0].parametrizations
    torch.testing.assert_close(copied(x), model(x))
