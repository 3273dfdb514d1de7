"""The denoiser benchmark's smallest configurations: a conditioned net gets its sites, and trains.

Runs benchmarks/efficacy_denoiser.py's own functions (seed 0, depths 8 and 16, a few epochs,
a few seconds); asserts what the plan holds and how the MSE compares, not time.
"""

import math

import pytest
import torch

pytest.importorskip("sklearn")
from benchmarks import efficacy_denoiser as bench


@pytest.fixture(scope="module")
def data():
    return bench.noisy_data()


def test_the_test_set_is_corrupted_at_its_levels(data):
    assert data.x_test.shape == (450, 64) and data.sigma_test.shape == (450, 1)
    lo, hi = bench.SIGMA
    assert lo <= data.sigma_test.min() and data.sigma_test.max() <= hi
    noise = (data.x_test - data.clean_test) / (data.sigma_test * data.std)
    assert abs(noise.std().item() - 1.0) < 0.02  # unit Gaussian noise, scaled per example by its level
    assert 0.3 < bench.baselines(data)["noisy input"] < 0.4  # E[σ²]·std² for σ ~ U(0.1, 1): 0.37·std²


def test_the_default_plan_has_a_site_in_every_block_and_no_existing_shortcut(data):
    for depth in (8, 16):
        check = bench.check_plan(depth, data)
        assert check.block_sites == depth  # the σ-injection does not keep a block from its site
        assert check.existing == 0  # an add of the other input's embedding is not a shortcut
        assert check.sites == depth + 2  # plus inp and out


def test_hand_written_twin_has_the_plain_nets_weights(data):
    plain = bench.build("plain", 4, seed=3, data=data)
    hand = bench.build("hand", 4, seed=3, data=data)
    converted = bench.build("resify", 4, seed=3, data=data)
    for name, p in plain.state_dict().items():
        assert torch.equal(hand.state_dict()[name], p), name
        assert torch.equal(converted.state_dict()[name], p), name


@pytest.mark.usefixtures("one_thread")  # one thread, restored after the module (conftest.py)
def test_every_variant_trains_at_depth_8(data):
    for variant in bench.VARIANTS:
        r = bench.run_one(variant, 8, seed=0, epochs=5, data=data)
        assert not r.diverged and math.isfinite(r.mse), variant
        # below where it started and below the mean image's 1.34 (plain: 1.16; the others 0.49–0.86)
        assert r.mse < 0.95 * min(r.mse_init, bench.baselines(data)["mean training image"]), (variant, r)


@pytest.mark.usefixtures("one_thread")
def test_default_beats_plain_at_depth_16(data):
    plain = bench.run_one("plain", 16, seed=0, epochs=5, data=data)
    default = bench.run_one("default", 16, seed=0, epochs=5, data=data)
    assert not default.diverged
    assert default.mse < 0.6 * plain.mse  # 0.57 against 1.35 (the plain net outputs about the mean image)
