"""preserve_output=True: shortcuts start at β=0, so a trained model computes the same function."""

import pytest
import torch
import torch.nn as nn
from reference import vgg_style_cnn

import resify


def plain_mlp(depth=12, width=32, classes=10, features=64):
    layers = [nn.Linear(features, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


@pytest.mark.parametrize("gate", [None, "rezero", "layerscale"])
@pytest.mark.parametrize("shortcut", ["auto", "identity"])
def test_outputs_unchanged_for_every_gate(gate, shortcut):
    torch.manual_seed(0)
    model = vgg_style_cnn().eval()
    x = torch.randn(4, 3, 16, 16)
    converted = resify.apply(model, x, shortcut=shortcut, gate=gate, preserve_output=True).eval()
    plan = resify.applied_plan(converted)
    assert plan.sites and all(s.preserve_output for s in plan.sites)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
    betas = [p for n, p in converted.named_parameters() if n.endswith(".beta")]
    assert len(betas) == len(plan.sites) and all(b.item() == 0.0 for b in betas)


def test_gate_init_other_than_one_is_refused():
    with pytest.raises(resify.PlanError, match="preserve_output=True needs the gate to start at 1"):
        resify.plan(plain_mlp(), torch.randn(2, 64), gate="rezero", gate_init=0.0, preserve_output=True)


def test_pretrained_round_trip_keeps_outputs_then_keeps_learning():
    """Train a plain net, convert with preserve_output, check outputs, fine-tune: the loss keeps falling."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:512])
    torch.manual_seed(0)
    model = plain_mlp(depth=6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    trained_loss = nn.functional.cross_entropy(model(x), y).item()

    converted = resify.apply(model, x[:8], preserve_output=True)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
    opt = torch.optim.Adam(converted.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(converted(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(trained_loss, rel=1e-5)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a + 1e-3 for a, b in zip(losses, losses[1:]))  # no blow-up along the way
    assert any(p.item() != 0.0 for n, p in converted.named_parameters() if n.endswith(".beta"))
