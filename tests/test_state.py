"""The one save-and-restore (resify/state.py): state_kept puts back buffers and the random state always,
gradients with grads=True and modes with modes=True, also when the code inside raises; without the flags,
what the code did to gradients and modes stays."""

import pytest
import torch
import torch.nn as nn

from resify.state import state_kept


class Boom(Exception):
    pass


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()


def _snapshot(model):
    """Copies of everything state_kept may restore: buffers, grads (None kept), modes, RNG state."""
    return {
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def _same(a, b, key):
    if key == "rng":
        return torch.equal(a[key], b[key])
    if key == "modes":
        return a[key] == b[key]
    return a[key].keys() == b[key].keys() and all(
        (x is None and b[key][n] is None) or (x is not None and b[key][n] is not None and torch.equal(x, b[key][n]))
        for n, x in a[key].items()
    )


def _train_step_with_fresh_grads(model):
    """What gradient_flow does inside: new grads, a forward that moves BatchNorm's statistics, a backward,
    random draws (dropout, randn) and a mode change."""
    for p in model.parameters():
        p.grad = None
    model(torch.randn(8, 3)).square().sum().backward()
    torch.rand(5)
    model.eval()


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("grads,modes", [(True, True), (True, False), (False, True), (False, False)])
def test_restores_what_it_is_asked_to(grads, modes, raises):
    model = _model()
    model[0].weight.grad = torch.ones(4, 3)  # one grad set, the others None
    before = _snapshot(model)
    if raises:
        with pytest.raises(Boom, match="inside"), state_kept(model, grads=grads, modes=modes):
            _train_step_with_fresh_grads(model)
            raise Boom("inside")
    else:
        with state_kept(model, grads=grads, modes=modes):
            _train_step_with_fresh_grads(model)
    after = _snapshot(model)
    assert _same(before, after, "buffers")  # always
    assert _same(before, after, "rng")  # always
    assert _same(before, after, "grads") is grads  # the flag means something: the step changed them
    assert _same(before, after, "modes") is modes


def test_the_step_does_change_everything_when_not_kept():
    """The independent check that the step inside the tests above changes all four kinds of state."""
    model = _model()
    model[0].weight.grad = torch.ones(4, 3)
    before = _snapshot(model)
    _train_step_with_fresh_grads(model)
    after = _snapshot(model)
    assert [_same(before, after, k) for k in ("buffers", "grads", "modes", "rng")] == [False] * 4


def test_the_random_state_inside_continues_from_the_outside_and_is_rewound_after():
    lin = nn.Linear(2, 2)  # built first: its init draws from the random state too
    torch.manual_seed(123)
    expected = torch.rand(3), torch.rand(3)
    torch.manual_seed(123)
    with state_kept(lin) as devices:
        inside = torch.rand(3)
    assert devices == []  # no CUDA tensor: only the CPU state is forked
    after = torch.rand(3)
    assert torch.equal(inside, expected[0]) and torch.equal(after, expected[0])


def test_buffers_are_restored_in_place():
    bn = nn.BatchNorm1d(2)
    mean, count = bn.running_mean, bn.num_batches_tracked
    with state_kept(bn):
        bn(torch.randn(6, 2) + 3.0)
        assert bn.num_batches_tracked.item() == 1 and bn.running_mean.abs().sum() > 0
    assert bn.running_mean is mean and bn.num_batches_tracked is count
    assert bn.running_mean.tolist() == [0.0, 0.0] and bn.num_batches_tracked.item() == 0


def test_a_grad_object_replaced_inside_is_put_back():
    lin = nn.Linear(2, 2)
    g = torch.full((2, 2), 3.0)
    lin.weight.grad = g
    with state_kept(lin, grads=True):
        lin.weight.grad = torch.zeros(2, 2)
        lin.bias.grad = torch.ones(2)
    assert lin.weight.grad is g and lin.weight.grad.tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert lin.bias.grad is None


@pytest.mark.parametrize(
    "step",
    [
        lambda m: m(torch.randn(4, 3)).sum().backward(),
        lambda m: m.zero_grad(set_to_none=False),
    ],
    ids=["backward accumulates", "zero_grad in place"],
)
def test_grads_changed_in_place_are_restored(step):
    model = nn.Sequential(nn.Linear(3, 2))
    model(torch.randn(4, 3)).sum().backward()
    before = model[0].weight.grad.clone()
    with state_kept(model, grads=True):
        step(model)
    assert torch.equal(model[0].weight.grad, before)


def test_a_buffer_reassigned_inside_is_restored():
    bn = nn.BatchNorm1d(2)
    with state_kept(bn):
        bn.running_mean = torch.full((2,), 5.0)
    assert bn.running_mean.tolist() == [0.0, 0.0]
