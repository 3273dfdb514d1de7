"""resify.tracing.units: the parts of a model that trace, where the whole model does not."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from resify.errors import TraceError
from resify.tracing.units import WHOLE_CODES, is_layer_module, relative_leaves, trace_units


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


def _fill_window(size, window):
    """As Swin3D's ``_get_window_and_shift_size``: fills in the list it is given."""
    if size < window[0]:
        window[0] = size
    return window


def _peak(x):
    """A value read off the tensor: no meta tensor says it, so the shapes come from a real run."""
    return float(x.detach().abs().max()) + 1.0


torch.fx.wrap("_fill_window")
torch.fx.wrap("_peak")


class Windowed(nn.Module):
    def __init__(self, reads_a_value):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.reads_a_value = reads_a_value

    def forward(self, x):
        window = _fill_window(x.shape[0], [8, 8])  # fx passes the literal [8, 8] as an immutable_list
        h = torch.relu(self.fc1(x)) * window[0]
        if self.reads_a_value:
            h = h / _peak(h)
        return self.fc2(h)


@pytest.mark.parametrize("reads_a_value", [False, True], ids=["meta", "real run"])
def test_a_wrapped_function_that_fills_in_a_list_argument_does_not_split_the_root(reads_a_value):
    """Swin3D's blocks were kept whole: recording shapes ran its wrapped function on fx's immutable
    copy of a list argument, which the function mutates; it gets a list of its own, as in forward."""
    import resify

    torch.manual_seed(0)
    model, x = Windowed(reads_a_value), torch.randn(3, 4)
    units, whole, _ = trace_units(model, (x,), {})
    assert [u.path for u in units] == [""] and whole == []
    assert units[0].traced.shapes_from == ("run" if reads_a_value else "meta")
    converted = resify.apply(model, x, preserve_output=True)
    assert resify.applied_plan(converted).whole == ()
    torch.testing.assert_close(converted(x), model(x))
    torch.testing.assert_close(converted(x[:2]), model(x[:2]))  # the window follows the batch
