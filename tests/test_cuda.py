"""resify on a CUDA model: new layers land on the GPU, outputs match the hand-written net and the CPU.

Skipped where no GPU is present (CI has none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
Tolerances: float32 MLPs 1e-5 (cuBLAS matmuls without TF32); convolutions (TF32 off) 1e-4 relative, since
cuDNN sums in another order than the CPU; bfloat16 is compared within its own precision.
"""

import pytest
import torch
import torch.nn as nn
from reference import ImprovedResidualNetwork, assert_every_parameter_has_grad, vgg_style_cnn
from test_seed import _copy_seed_weights

import resify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    """Values and devices only: the weights are shared copy-on-write, and data_ptr() would copy them."""
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, value in snap.items():
        assert now[k].device == value.device and torch.equal(now[k], value), k


def test_seed_network_on_cuda_equals_the_hand_written_one_and_stays_on_the_gpu():
    sizes = [128, 64, 64, 32, 32, 10]
    torch.manual_seed(0)
    reference = ImprovedResidualNetwork(sizes, True).to(CUDA)
    plain = ImprovedResidualNetwork(sizes, False).to(CUDA)
    plain.load_state_dict({k: v for k, v in reference.state_dict().items() if k.startswith("layers.")})
    snap = _snapshot(plain)
    x = torch.randn(16, sizes[0], device=CUDA)
    converted = resify.apply(plain, x, gate=None)
    assert {p.device for p in converted.parameters()} == {CUDA}
    _copy_seed_weights(converted, reference, sizes)
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-5)
    converted(x).square().mean().backward()
    assert_every_parameter_has_grad(converted)
    assert all(p.grad.device == CUDA for p in converted.parameters())
    _unchanged(plain, snap)


@pytest.mark.parametrize("gate", [None, "rezero", "layerscale"])
def test_cnn_on_cuda_keeps_outputs_with_preserve_output_and_matches_the_cpu(gate, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    torch.manual_seed(1)
    cpu_model = vgg_style_cnn().eval()
    model = vgg_style_cnn().to(CUDA).eval()
    model.load_state_dict(cpu_model.state_dict())
    snap = _snapshot(model)
    x = torch.randn(4, 3, 16, 16)
    converted = resify.apply(model, x.to(CUDA), gate=gate, preserve_output=True).eval()
    on_cpu = resify.apply(cpu_model, x, gate=gate, preserve_output=True).eval()
    assert {t.device for t in [*converted.parameters(), *converted.buffers()]} == {CUDA}
    with torch.no_grad():
        out = converted(x.to(CUDA))
        torch.testing.assert_close(out, model(x.to(CUDA)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.cpu(), on_cpu(x), rtol=1e-4, atol=1e-5)
    converted.train()(x.to(CUDA)).sum().backward()
    assert_every_parameter_has_grad(converted)
    _unchanged(model, snap)


def test_bfloat16_model_gets_bfloat16_shortcuts_on_cuda():
    torch.manual_seed(2)
    model = nn.Sequential(
        *[m for _ in range(6) for m in (nn.Linear(64, 64), nn.GELU())], nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)
    ).to(CUDA, torch.bfloat16)
    x = torch.randn(8, 64, device=CUDA, dtype=torch.bfloat16)
    converted = resify.apply(model, x, gate="rezero", preserve_output=True)
    assert {(p.device, p.dtype) for p in converted.parameters()} == {(CUDA, torch.bfloat16)}
    assert any(s.kind == "projection" for s in resify.applied_plan(converted).sites)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1.6e-2, atol=1e-2)
    converted(x).float().sum().backward()
    assert_every_parameter_has_grad(converted)


def test_gradient_flow_on_cuda_matches_the_cpu_and_leaves_the_cuda_rng_alone():
    sizes = [64] + [32] * 20 + [10]
    torch.manual_seed(3)
    cpu_model = ImprovedResidualNetwork(sizes, False)
    model = ImprovedResidualNetwork(sizes, False).to(CUDA)
    model.load_state_dict(cpu_model.state_dict())
    x = torch.randn(16, 64)
    rng = torch.cuda.get_rng_state()
    on_gpu = resify.gradient_flow(model, x.to(CUDA), batches=2)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    on_cpu = resify.gradient_flow(cpu_model, x, batches=2)
    assert [r.name for r in on_gpu.layers] == [r.name for r in on_cpu.layers]
    for g, c in zip(on_gpu.layers, on_cpu.layers):
        assert g.mean_abs_grad == pytest.approx(c.mean_abs_grad, rel=1e-4), g.name
        assert g.input_grad_norm == pytest.approx(c.input_grad_norm, rel=1e-4), g.name
    assert all(p.grad is None for p in model.parameters())


def test_an_input_left_on_the_cpu_is_refused_with_the_fix():
    model = ImprovedResidualNetwork([32, 32, 16], False).to(CUDA)
    with pytest.raises(resify.TraceError, match=r"example_input is on cpu but .* are on cuda:0; .*\.to\('cuda:0'\)"):
        resify.apply(model, torch.randn(2, 32))
    with pytest.raises(resify.ResifyError, match=r"example_input is on cpu but"):
        resify.gradient_flow(model, torch.randn(2, 32))
    converted = resify.apply(model)  # a derived input is made on the model's device
    assert converted(torch.randn(3, 32, device=CUDA)).device == CUDA
