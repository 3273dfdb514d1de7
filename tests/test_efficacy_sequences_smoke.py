"""The sequence efficacy benchmark's smallest configuration: resify makes deep recurrent and attention stacks train.

Runs benchmarks/efficacy_sequences.py's own functions (one seed, 2–3 epochs, a few seconds each);
asserts accuracy and equality, not time.
"""

import pytest
import torch

pytest.importorskip("sklearn")
from benchmarks import efficacy_sequences as bench


@pytest.fixture(scope="module")
def data():
    from benchmarks.efficacy_digits import load_data

    return load_data()


def test_each_image_is_read_row_by_row(data):
    seqs = bench.as_sequences(data.x_train)
    assert seqs.shape == (1347, 8, 8)
    assert torch.equal(seqs[5, 3], data.x_train[5, 24:32])  # step 3 = the image's fourth row


@pytest.mark.parametrize(("model", "depth", "sites"), [("lstm", 3, 3), ("transformer", 2, 4)])
def test_resify_computes_the_hand_written_residual_net(data, model, depth, sites):
    check = bench.check_equivalence(model, depth, data)  # raises SystemExit on another plan or other numbers
    assert check.sites == sites
    assert check.output_diff <= 1e-6 and check.grad_diff <= 1e-6


def test_the_check_fails_when_the_shortcuts_are_not_the_hand_written_ones(data, monkeypatch):
    monkeypatch.setattr(bench, "expected_sites", lambda model, depth: [("blocks.0.attn", "blocks.0.ff2")])
    with pytest.raises(SystemExit, match="resify planned"):
        bench.check_equivalence("transformer", 1, data)


# measured on seed 0: LSTM 10.0% → 94.2% after 3 epochs, Transformer 10.0% → 65.6% after 2
@pytest.mark.parametrize(("model", "depth", "epochs", "floor"), [("lstm", 16, 3, 0.8), ("transformer", 12, 2, 0.45)])
@pytest.mark.usefixtures("one_thread")  # one thread, restored after the module (conftest.py)
def test_converted_deep_stack_trains_where_the_plain_one_does_not(data, model, depth, epochs, floor):
    plain, flow = bench.run_one(model, depth, "plain", seed=0, epochs=epochs, data=data)
    converted, _ = bench.run_one(model, depth, "resify", seed=0, epochs=epochs, data=data, plain_flow=flow)
    assert plain.accuracy < 0.2  # chance is 0.1
    assert plain.spread < 1e-2  # every input mapped to the same representation
    assert converted.accuracy > floor
    assert converted.verdict == "healthy" and not converted.diverged
    assert converted.grad_ratio > 1
