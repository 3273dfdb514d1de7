"""resify.units: the parts of a model that trace, where the whole model does not."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from resify.errors import TraceError
from resify.units import WHOLE_CODES, is_layer_module, relative_leaves, trace_units


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Body()
        self.blocks = nn.ModuleList([Body(), Body()])
        self.spare = Body()

    def forward(self, x):
        h = self.body(x)
        return self.blocks[1](torch.from_numpy(np.tanh(self.blocks[0](h).detach().numpy())))  # via numpy


def test_a_root_that_traces_is_the_one_unit():
    units, whole, calls = trace_units(Body(), (torch.randn(2, 4),), {})
    assert [u.path for u in units] == [""] and whole == [] and calls == {}


def test_an_untraceable_root_is_planned_in_its_children_in_forward_order():
    units, whole, calls = trace_units(Root(), (torch.randn(2, 4),), {})
    assert [u.path for u in units] == ["body", "blocks.0", "blocks.1"]  # each traces on its own inputs
    assert [(w.module, w.code) for w in whole] == [("", "untraceable"), ("spare", "not_called")]
    assert all(w.code in WHOLE_CODES for w in whole)
    assert calls["blocks.1"].args[0].shape == (2, 4)


def test_a_rejected_example_is_the_roots_error():
    with pytest.raises(TraceError):
        trace_units(Body(), (torch.randn(2, 5),), {})


def test_layer_modules_and_relative_leaves():
    assert (
        is_layer_module(nn.Linear(2, 2))
        and not is_layer_module(nn.Sequential())
        and not is_layer_module(nn.ModuleList())
    )
    assert relative_leaves([nn.LSTM, "body.fc1", "*.fc2"], "body") == [nn.LSTM, "fc1", "*.fc2"]
