"""resify.tracing.inputs: example inputs normalised to a tuple, checked against the model's device, or derived."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from resify.errors import InputError
from resify.tracing.inputs import as_inputs, check_device, derive_example_input


def test_as_inputs_normalises_to_a_tuple():
    x, y = torch.zeros(2), torch.ones(3)
    assert as_inputs(None) is None
    assert as_inputs(x)[0] is x and len(as_inputs(x)) == 1
    assert as_inputs([x, y]) == (x, y) and isinstance(as_inputs([x, y]), tuple)
    t = (x, y)
    assert as_inputs(t) == t
    assert as_inputs(()) == ()


def test_a_packed_sequence_is_one_input_not_a_tuple_of_its_fields():
    packed = pack_sequence([torch.ones(3, 2), torch.ones(2, 2)])
    assert isinstance(packed, tuple)  # (why as_inputs checks for it before tuples)
    assert as_inputs(packed) == (packed,)


@pytest.mark.parametrize("bad,name", [(3, "int"), ({"x": 1}, "dict"), ("x", "str")])
def test_as_inputs_refuses_other_types_naming_them(bad, name):
    with pytest.raises(InputError, match=f"found {name}; pass e.g. example_input=torch.randn"):
        as_inputs(bad)


def test_check_device_accepts_inputs_on_the_models_device_and_non_tensors():
    check_device(nn.Linear(2, 2), (torch.zeros(1, 2), 3, None))


def test_check_device_refuses_an_input_on_another_device():
    model = nn.Linear(2, 2).to("meta")
    check_device(model, (torch.zeros(1, 2),))  # a meta model takes inputs anywhere
    model = nn.Linear(2, 2)
    with pytest.raises(InputError, match=r"^example_input is on meta but Linear's parameters are on cpu; "):
        check_device(model, (torch.zeros(1, 2, device="meta"),))
    with pytest.raises(InputError, match=r"example_input\[1\] is on meta .* example_input\[1\]\.to\('cpu'\)$"):
        check_device(model, (torch.zeros(1, 2), torch.zeros(1, device="meta")))


def test_check_device_reads_a_buffer_where_there_is_no_parameter():
    model = nn.BatchNorm1d(2, affine=False)
    assert not list(model.parameters())
    with pytest.raises(InputError, match="BatchNorm1d's parameters are on cpu"):
        check_device(model, (torch.zeros(2, 2, device="meta"),))
    check_device(nn.ReLU(), (torch.zeros(1, device="meta"),))  # nothing to compare with


def test_derive_example_input_for_a_linear_first_layer():
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    (x,) = derive_example_input(model)
    expected = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, expected) and x.dtype == torch.float32
    # the model's dtype, and the same tensor each time (its own generator: the global state is not drawn)
    state = torch.get_rng_state()
    (x64,) = derive_example_input(model.double())
    assert torch.equal(torch.get_rng_state(), state)
    assert x64.dtype == torch.float64 and torch.equal(
        x64, torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )


def test_derive_example_input_takes_the_given_first_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    (x,) = derive_example_input(model, first_layer=model[2])
    assert x.shape == (2, 4)


@pytest.mark.parametrize(
    "model,hint",
    [
        (
            nn.Sequential(nn.Embedding(100, 8)),
            "Embedding) does not fix the input shape; pass one, e.g. example_input=torch.randint(0, 100, (2, 16)) "
            "(CLI: --input-shape 2,16:int64)",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 8, 3)),
            "Conv2d) does not fix the input shape; pass one, e.g. example_input=torch.randn(2, 3, 32, 32) "
            "(CLI: --input-shape 2,3,32,32)",
        ),
        (
            nn.Sequential(nn.Conv1d(6, 8, 3)),
            "e.g. example_input=torch.randn(2, 6, 32) (CLI: --input-shape 2,6,32)",
        ),
        (
            nn.Sequential(nn.LSTM(4, 4)),
            "(LSTM) does not fix the input shape; pass one, e.g. example_input=torch.randn(...) "
            "(CLI: --input-shape SHAPE, once per positional input)",
        ),
        (nn.ReLU(), "(no layer with parameters) does not fix"),
    ],
)
def test_derive_example_input_says_what_to_pass_where_it_cannot(model, hint):
    with pytest.raises(InputError) as info:
        derive_example_input(model)
    message = str(info.value)
    assert message.startswith("no example_input given and the first layer (") and hint in message


def test_check_device_refuses_a_packed_sequence_on_another_device():
    packed = pack_sequence([torch.ones(3, 2, device="meta"), torch.ones(2, 2, device="meta")])
    with pytest.raises(InputError, match="example_input is on meta but LSTM's parameters are on cpu"):
        check_device(nn.LSTM(2, 2), (packed,))
