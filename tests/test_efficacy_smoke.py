"""The efficacy benchmark's smallest configuration: converting a deep plain MLP makes it trainable.

Runs benchmarks/efficacy_digits.py's own functions (one seed, a 32-layer GELU MLP, 3 epochs,
a few seconds); asserts accuracy, not time.
"""

import pytest
import torch

pytest.importorskip("sklearn")
from benchmarks import efficacy_digits as bench


@pytest.fixture(scope="module")
def data():
    return bench.load_data()


def test_the_split_is_stratified_75_25_and_standardised(data):
    assert len(data.x_train) == 1347 and len(data.x_test) == 450
    counts = torch.bincount(data.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # every digit 43–46 times: stratified
    torch.testing.assert_close(data.x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)


@pytest.mark.usefixtures("one_thread")  # one thread, restored after the module (conftest.py)
def test_converted_32_layer_mlp_trains_where_the_plain_one_does_not(data):
    plain = bench.run_mlp(32, "gelu", "plain", seed=0, epochs=3, data=data)
    converted = bench.run_mlp(32, "gelu", "resify", seed=0, epochs=3, data=data, plain_grad=plain.first_grad)
    assert plain.accuracy < 0.3  # near chance (0.1): the first layers get no gradient
    assert converted.accuracy > 0.75
    assert converted.accuracy - plain.accuracy > 0.5
    assert converted.grad_ratio > 1e6  # the shortcut carries the gradient back to the first layer
    assert not converted.diverged


def test_hand_written_twin_starts_from_the_same_layer_weights(data):
    plain = bench.build("plain", 8, "tanh", seed=3, example=data.x_train[:2])
    hand = bench.build("hand", 8, "tanh", seed=3, example=data.x_train[:2])
    converted = bench.build("resify", 8, "tanh", seed=3, example=data.x_train[:2])
    for name, p in plain.state_dict().items():
        assert torch.equal(hand.state_dict()[name], p), name
        assert torch.equal(converted.state_dict()[name], p), name
