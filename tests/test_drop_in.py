"""The converted model is a drop-in replacement: wherever the original runs, it runs, the same way.

Each case is a small model written in a style that once broke a conversion (tests/styles.py). The
rule checked: for every input the original accepts, in train and eval mode, the converted model
runs, returns the same shape and, with ``preserve_output=True``, the same values (rtol 1e-5).
"""

import copy
import pickle

import pytest
import styles
import torch
import torch.nn as nn
from reference import assert_every_parameter_has_grad, forward_sources

import resify


def _runs(model, x):
    try:
        with torch.no_grad():
            return model(x), None
    except Exception as e:
        return None, e


# model builder, the example input's shape, other input shapes the original accepts (or rejects)
SIZES = [
    (styles.mobilenet_v1_style, (2, 3, 64, 64), [(2, 3, 96, 96), (1, 3, 33, 33), (3, 3, 17, 40), (1, 3, 2, 2)]),
    (styles.small_cnn, (2, 3, 32, 32), [(1, 3, 17, 17), (2, 3, 64, 48), (4, 3, 7, 9)]),
    (styles.conv3d_clip_net, (2, 3, 8, 32, 32), [(1, 3, 4, 24, 24), (2, 3, 6, 20, 28), (1, 3, 1, 8, 8)]),
    (styles.valid_conv_net, (2, 1, 28, 28), [(1, 1, 31, 31), (3, 1, 40, 29), (1, 1, 12, 12), (1, 1, 9, 9)]),
    (styles.EfficientHead, (2, 3, 32, 32), [(1, 3, 9, 9), (5, 3, 64, 31)]),
]


@pytest.mark.parametrize("build,example,others", SIZES, ids=[b.__name__ for b, _, _ in SIZES])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_converted_model_runs_exactly_where_the_original_runs(build, example, others, mode):
    torch.manual_seed(0)
    model = build().train(mode == "train")
    converted = resify.apply(model, torch.randn(example))
    preserved = resify.apply(model, torch.randn(example), preserve_output=True)
    assert converted.training == preserved.training == (mode == "train")
    for shape in [example, *others]:
        x = torch.randn(shape)
        torch.manual_seed(1)
        want, error = _runs(copy.deepcopy(model), x)  # a copy: train mode updates BN statistics
        torch.manual_seed(1)
        got, got_error = _runs(copy.deepcopy(converted), x)
        assert (error is None) == (got_error is None), f"{shape}: original {error!r}, converted {got_error!r}"
        if error is not None:
            continue
        assert got.shape == want.shape, shape
        torch.manual_seed(1)
        same, _ = _runs(copy.deepcopy(preserved), x)
        torch.testing.assert_close(same, want, rtol=1e-5, atol=1e-6, msg=lambda m, shape=shape: f"{shape}: {m}")


def test_the_example_size_is_not_baked_into_pooled_shortcuts():
    """Converted at 64x64, run on 96x96: batch 2 in, batch 2 out (once (8, 10): a wrong answer)."""
    torch.manual_seed(0)
    model = styles.mobilenet_v1_style().eval()
    converted = resify.apply(model, torch.randn(2, 3, 64, 64)).eval()
    assert any(getattr(s.shortcut, "pool", False) for s in resify.applied_plan(converted).sites)
    assert converted(torch.randn(2, 3, 96, 96)).shape == (2, 10)


def test_a_batch_of_one_that_the_original_trains_on_the_converted_model_trains_on():
    torch.manual_seed(0)
    model = styles.EfficientHead().train()
    converted = resify.apply(model, torch.randn(4, 3, 32, 32))
    head = next(s for s in resify.applied_plan(converted).sites if s.start == "head.0")
    # the head normalises before it pools: so does its shortcut (BN on 16x16 maps, then the pool)
    assert head.projection == "Conv2d(8, 32, 1) + BatchNorm2d + AvgPool2d(→out)" and head.shortcut.pool_last
    x = torch.randn(1, 3, 32, 32)
    model(x).sum().backward()  # the original trains on one sample ...
    out = converted(x)  # ... and so does the converted model
    out.sum().backward()
    assert_every_parameter_has_grad(converted)


class TestTrainingFlag:
    """``self.training`` read in forward survives conversion: a graph per mode, switched by train()/eval()."""

    def test_eval_mode_adds_no_noise_and_drops_nothing(self):
        torch.manual_seed(0)
        model = styles.NoisyTrainer()
        converted = resify.apply(model, torch.randn(4, 8), preserve_output=True)
        assert type(converted) is styles.NoisyTrainer
        sources = forward_sources(converted)
        assert set(sources) == {True, False} and sources[True] != sources[False]  # a forward per mode
        assert any("self.training" in note for note in resify.applied_plan(converted).notes)
        x = torch.randn(4, 8)
        converted.eval(), model.eval()
        torch.testing.assert_close(converted(x), converted(x))  # deterministic in eval mode
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
        converted.train(), model.train()
        assert not torch.equal(converted(x), converted(x))  # noise and dropout in training
        torch.manual_seed(3)
        a = model(x)
        torch.manual_seed(3)
        torch.testing.assert_close(converted(x), a, rtol=1e-5, atol=1e-6)  # the same random draws

    def test_converted_in_eval_mode_still_trains_with_noise(self):
        model = styles.NoisyTrainer().eval()
        converted = resify.apply(model, torch.randn(4, 8))
        assert not converted.training
        x = torch.randn(4, 8)
        torch.testing.assert_close(converted(x), converted(x))
        converted.train()
        assert not torch.equal(converted(x), converted(x))
        converted(x).sum().backward()
        assert_every_parameter_has_grad(converted)

    def test_both_graphs_share_one_set_of_modules_and_parameters(self):
        converted = resify.apply(styles.NoisyTrainer(), torch.randn(4, 8), gate="rezero")
        sources = forward_sources(converted)
        assert all("self.resify.fc1.alpha" in src for src in sources.values()) and len(sources) == 2
        plan = resify.applied_plan(converted)
        names = [n for n, _ in converted.named_parameters()]
        assert len(names) == len(set(names))
        assert sum(p.numel() for p in converted.parameters()) == plan.params_before + plan.added_params

    @pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
    def test_copies_keep_both_modes(self, how, tmp_path):
        torch.manual_seed(0)
        converted = resify.apply(styles.NoisyTrainer(), torch.randn(4, 8), gate="rezero", gate_init=0.5)
        if how == "pickle":
            other = pickle.loads(pickle.dumps(converted))
        elif how == "deepcopy":
            other = copy.deepcopy(converted)
        else:
            torch.save(converted, tmp_path / "m.pt")
            other = torch.load(tmp_path / "m.pt", weights_only=False)
        assert type(other) is styles.NoisyTrainer and len(forward_sources(other)) == 2
        x = torch.randn(4, 8)
        torch.testing.assert_close(other.eval()(x), converted.eval()(x))
        other.train()
        assert not torch.equal(other(x), other(x))
        with torch.no_grad():  # a copy owns its parameters
            other.get_parameter("resify.fc1.alpha").fill_(2.0)
        assert converted.get_parameter("resify.fc1.alpha").item() == 0.5

    def test_a_model_that_never_reads_training_keeps_one_graph(self):
        converted = resify.apply(styles.deep_mlp(), torch.randn(2, 8))
        assert len(forward_sources(converted)) == 1

    def test_a_model_whose_training_branch_changes_nothing_keeps_one_graph(self):
        class Reads(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                mode = "training" if self.training else "eval"  # read, but the graph is the same
                return torch.relu(self.fc(x)) if mode else x

        assert not isinstance(resify.apply(Reads(), torch.randn(2, 4)), resify.DualGraphModule)


@pytest.mark.parametrize(
    "build,x,last",
    [
        (styles.DCGANGenerator, torch.randn(3, 8), "net.8"),
        (styles.sigmoid_autoencoder, torch.randn(3, 64), "6"),
    ],
)
def test_no_shortcut_crosses_a_bounded_output_activation(build, x, last):
    torch.manual_seed(0)
    model = build()
    converted = resify.apply(model, x)
    plan = resify.applied_plan(converted)
    assert last not in {s.start for s in plan.sites}
    reason = {s.start: s.reason for s in plan.skipped}[last]
    assert reason.startswith("the span ends in a bounded activation")
    assert plan.sites, "the other layers still get shortcuts"
    with torch.no_grad():  # outputs stay in the activation's range, even with large inputs
        y = converted(100 * x)
    low = -1.0 if build is styles.DCGANGenerator else 0.0
    assert y.min() >= low and y.max() <= 1.0


def test_a_bounded_activation_inside_the_network_still_gets_its_shortcut():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    plan = resify.plan(model, torch.randn(2, 4))
    assert [s.start for s in plan.sites] == ["0", "2"]
