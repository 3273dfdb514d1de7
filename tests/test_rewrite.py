"""The rewrite stage: new modules, names, devices, dtypes, modes, and the user's model untouched."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import ImprovedResidualNetwork, assert_every_parameter_has_grad, is_resify_key, vgg_style_cnn

import resify


def test_vgg_style_cnn_gets_identity_and_pooled_projections():
    torch.manual_seed(0)
    model = vgg_style_cnn()
    x = torch.randn(4, 3, 32, 32)
    converted = resify.apply(model, x, gate=None)  # the forms and their parameters, no gate beside them
    plan = resify.applied_plan(converted)
    by_start = {s.start: s for s in plan.sites}
    # conv 16->16 keeps the shape: identity; 16->32 with BatchNorm then max-pool: a 1x1 conv +
    # BatchNorm, then the average over the branch's output size (the norm before the pool, as in the span)
    assert by_start["3"].kind == "identity" and by_start["3"].added_params == 0
    assert by_start["6"].kind == "projection"
    assert by_start["6"].projection == "Conv2d(16, 32, 1) + BatchNorm2d + AvgPool2d(→out)"
    assert by_start["6"].shortcut.pool and by_start["6"].shortcut.pool_last
    assert by_start["6"].in_shape == (4, 16, 32, 32) and by_start["6"].out_shape == (4, 32, 16, 16)
    assert by_start["6"].added_params == 16 * 32 + 2 * 32
    proj = converted.get_submodule("resify.6.proj")
    assert isinstance(proj, nn.Conv2d) and proj.kernel_size == (1, 1) and proj.stride == (1, 1) and proj.bias is None
    assert isinstance(converted.get_submodule("resify.6.norm"), nn.BatchNorm2d)
    # 64->64 then global average pooling: the shortcut is that pooling alone, no parameters
    assert by_start["17"].projection == "AvgPool2d(→out)" and by_start["17"].added_params == 0
    # the classifier (Linear 64 -> 10, no activation after it) is linear: no projection beside it
    assert "22" not in by_start
    assert [s.code for s in plan.skipped if s.start == "22"] == ["linear_span"]
    y = converted(x)
    assert y.shape == model(x).shape
    y.square().mean().backward()
    assert_every_parameter_has_grad(converted)
    assert all(p.grad.abs().sum() > 0 for p in converted.parameters())


def test_pooled_shortcut_computes_the_average_pool_of_its_input():
    """out = F(x) + conv1x1(avgpool(x) to F(x)'s size), checked against torch.nn.functional by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )
    x = torch.randn(2, 3, 7, 7)  # 7 is odd: the last pooling window is partial
    converted = resify.apply(model, x, gate=None).eval()
    plan = resify.applied_plan(converted)
    assert [s.projection for s in plan.sites] == ["AvgPool2d(→out) + Conv2d(3, 6, 1)", "AvgPool2d(→out)"]
    w = converted.get_submodule("resify.0.proj").weight
    for xi in (x, torch.randn(1, 3, 12, 9)):  # the example's size, then another one
        f = model[2](model[1](model[0](xi)))
        h = f + F.conv2d(F.adaptive_avg_pool2d(xi, f.shape[2:]), w)
        expected = model[5](model[4](model[3](h))) + h.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(converted(xi), expected, rtol=1e-5, atol=1e-6)


def test_strided_conv_without_pooling_keeps_a_strided_projection():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
    plan = resify.plan(model, torch.randn(1, 3, 8, 8))
    assert plan.sites[0].projection == "Conv2d(3, 8, 1, stride=2)" and not plan.sites[0].shortcut.pool


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "ids": {n: id(p) for n, p in model.named_parameters()},
    }


@pytest.mark.parametrize("training", [True, False])
def test_the_users_model_is_never_changed(training):
    torch.manual_seed(0)
    model = vgg_style_cnn()
    model.train(training)
    model[0].register_forward_hook(lambda m, i, o: None)
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # gradients present before the call
    before = _snapshot(model)
    converted = resify.apply(model, torch.randn(4, 3, 16, 16), gate="rezero")
    converted(torch.randn(2, 3, 16, 16)).sum().backward()
    after = _snapshot(model)
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k  # BatchNorm statistics too
    for k, g in before["grads"].items():
        assert torch.equal(g, after["grads"][k]), k
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["ids"] == after["ids"]
    assert not any(p is q for p in converted.parameters() for q in model.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_is_kept(training):
    model = vgg_style_cnn().train(training)
    model[1].train(not training)  # a submodule in the other mode keeps it
    converted = resify.apply(model, torch.randn(2, 3, 16, 16))
    assert converted.training == training
    assert converted.get_submodule("1").training == (not training)
    assert converted.get_submodule("resify.6.proj").training == training


def test_state_dict_keeps_names_and_misses_only_new_parameters():
    model = ImprovedResidualNetwork([128, 64, 32, 16, 8, 1], False)
    converted = resify.apply(model, torch.randn(3, 128), gate="rezero")
    result = converted.load_state_dict(model.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(is_resify_key(k) for k in result.missing_keys)
    assert sorted(result.missing_keys) == sorted(k for k in converted.state_dict() if is_resify_key(k))
    # each under its owner, the smallest module whose forward holds the span: layers.<i>
    assert sorted(result.missing_keys) == sorted(
        f"layers.{i}.resify.0.{name}" for i in range(5) for name in ("alpha", "proj.weight", "proj.bias")
    )
    for k, v in model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v)


def test_float64_and_meta_device():
    model = vgg_style_cnn().double()
    converted = resify.apply(model, torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert {p.dtype for p in converted.parameters()} == {torch.float64}
    converted(torch.randn(2, 3, 16, 16, dtype=torch.float64)).sum().backward()

    meta = ImprovedResidualNetwork([16, 8, 8, 4], False).to("meta")
    converted = resify.apply(meta)  # example input derived on the meta device
    assert {p.device.type for p in converted.parameters()} == {"meta"}
    assert converted(torch.empty(5, 16, device="meta")).shape == (5, 4)


def test_graph_lints_and_applying_twice_adds_nothing():
    model = ImprovedResidualNetwork([32, 32, 16, 16, 8], False)
    x = torch.randn(4, 32)
    once = resify.apply(model, x)
    assert type(once) is type(model)
    twice = resify.apply(once, x)
    plan = resify.applied_plan(twice)
    assert plan.sites == ()
    assert len(plan.existing) == 4
    assert {s.code for s in plan.skipped} == {"inside_existing"}
    torch.testing.assert_close(twice(x), once(x))
    assert sum(p.numel() for p in twice.parameters()) == sum(p.numel() for p in once.parameters())


@pytest.mark.parametrize(
    "gate,init,expected", [("rezero", None, 0.0), ("rezero", 0.5, 0.5), ("layerscale", None, 1e-4)]
)
def test_gates_scale_the_branch_not_the_shortcut(gate, init, expected):
    torch.manual_seed(0)
    model = ImprovedResidualNetwork([16, 16, 16], False)
    x = torch.randn(4, 16)
    kwargs = {"gate_init": init} if init is not None else {}
    converted = resify.apply(model, x, gate=gate, **kwargs)
    plan = resify.applied_plan(converted)
    assert all(s.gate == gate for s in plan.sites)
    # a reference written by hand: x + g * F(x) for each layer
    ref = x
    for i, seq in enumerate(model.layers):
        g = converted.get_parameter(f"layers.{i}.resify.0.{'alpha' if gate == 'rezero' else 'gamma'}")
        assert torch.allclose(g, torch.full_like(g, expected))
        ref = ref + g * seq(ref)
    torch.testing.assert_close(converted(x), ref)
    if gate == "layerscale":
        assert converted.get_parameter("layers.0.resify.0.gamma").shape == (16,)


def test_layerscale_on_convolutions_is_per_channel():
    converted = resify.apply(vgg_style_cnn(), torch.randn(2, 3, 16, 16), gate="layerscale")
    assert converted.get_parameter("resify.3.gamma").shape == (16, 1, 1)
    assert converted.get_parameter("resify.6.gamma").shape == (32, 1, 1)
    converted(torch.randn(2, 3, 16, 16)).sum().backward()
    assert_every_parameter_has_grad(converted)


def test_an_ungated_identity_shortcut_adds_the_spans_input_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 4)
    converted = resify.apply(model, x, shortcut="identity", gate=None)
    assert [(s.start, s.kind, s.gate) for s in resify.applied_plan(converted).sites] == [
        ("0", "identity", None),
        ("2", "identity", None),
    ]
    h = torch.relu(model[0](x)) + x  # x + F(x), nothing scaled
    h = torch.relu(model[2](h)) + h
    torch.testing.assert_close(converted(x), model[4](h), rtol=0, atol=0)
