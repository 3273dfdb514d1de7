"""resify.tracing.calls: what each module receives in one run of the example, and the run leaves no trace."""

import torch
import torch.nn as nn

from resify.tracing.calls import as_call, record_calls, record_calls_on_meta


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, scale=1.0, mask=None):
        h = self.bn(self.fc(x)) * scale
        return h if mask is None else h * mask


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block()

    def forward(self, x):
        return self.b(self.a(x), 2.0, mask=torch.ones(4))


def test_as_call_keeps_leading_tensors_by_position_and_names_the_rest():
    block, x = Block(), torch.randn(3, 4)
    call = as_call(block, (x, 2.0), {"mask": None})
    assert call.args == (x,) and call.kwargs == {"scale": 2.0, "mask": None}
    assert as_call(block, (x,), {}).kwargs == {}


def test_record_calls_gives_each_modules_first_call_and_restores_the_model():
    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(3, 4)
    seen = []
    model.a.register_forward_hook(lambda m, i, o: seen.append(1))
    stats = model.a.bn.running_mean.clone()
    calls = record_calls(model, (x,), {})
    assert set(calls) >= {"", "a", "b", "a.fc", "b.bn"}
    assert calls["b"].kwargs["scale"] == 2.0 and torch.equal(calls["b"].kwargs["mask"], torch.ones(4))
    assert calls["a"].args[0] is x
    assert seen == [] and torch.equal(model.a.bn.running_mean, stats)  # no hook called, no statistic moved
    assert model.training and model.a.training


def test_on_meta_the_shapes_come_back_without_computing():
    model, x = nn.Sequential(Block(), Block()).eval(), torch.randn(3, 4)
    calls = record_calls_on_meta(model, (x,), {}, {"0", "1"})
    assert calls is not None and calls["1"].args[0].shape == (3, 4) and calls["1"].args[0].device.type == "cpu"
    # a forward that makes a real tensor of its own (torch.ones) cannot run on meta: a real run instead
    assert record_calls_on_meta(Net().eval(), (x,), {}, {"a", "b"}) is None

    class ReadsValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum().item() > 0 else self.fc(-x)

    assert record_calls_on_meta(ReadsValues(), (x,), {}, {"fc"}) is None  # needs real values: a real run
