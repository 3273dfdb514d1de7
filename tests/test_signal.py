"""The forward signal (report/signal.py, report/figures.py's activation figures): the verdicts on the
activations' scale and on a collapse, each checked against figures computed here with plain torch.

Each reference is taken independently of the probe: forward hooks on the model's own layers keep
their outputs, and the RMS and the similarity between slices are computed in float64 from the N×N
Gram matrix of the slices (the report uses a one-pass formula in the tensor's dtype).
"""

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resify
from resify.constants import ACTIVATION_GROWTH, COLLAPSE_SIMILARITY
from resify.report.figures import activation_figures

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

#: the report's similarity (one pass, sums and norms in the tensor's float32) against the float64
#: Gram-matrix reference: 1 − similarity is resolved to a few 1e-6, 30× finer than the collapse bound
SIM_ABS = 1e-5
#: the report's RMS (float32 norms) against float64
RMS_REL = 1e-5


def _outputs(model, *args):
    """Every own parametric layer's (first) output of one forward, by name, in call order."""
    found, handles = {}, []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", getattr(m, "in_proj_weight", None))
        if "resify" in name.split(".") or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue

        def keep(mod, inputs, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            found.setdefault(name, out.detach().double().clone())

        handles.append(m.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return found


def _rms(t):
    return t.pow(2).mean().sqrt().item()


def _alike(t, dim=0):
    """The slices of ``t`` along ``dim``: the mean off-diagonal entry of their Gram matrix ÷ its mean diagonal entry."""
    x = t.movedim(dim, 0).reshape(t.shape[dim], -1)
    gram = x @ x.T
    n, diagonal = gram.shape[0], gram.diagonal().sum()
    return ((gram.sum() - diagonal) / (n * (n - 1)) / (diagonal / n)).item()


def _cosine(t):
    """The mean pairwise cosine similarity between the slices along dim 0 (Gram matrix of unit vectors)."""
    return _alike(F.normalize(t.reshape(t.shape[0], -1), dim=1))


def _similarity(t, sequence):
    """The report's similarity, by its definition: across dim 0, and for a sequence across dim 1 too, the larger."""
    found = _alike(t, 0)
    return max(found, _alike(t, 1)) if sequence and t.dim() == 3 else found


# ---------------------------------------------------------------------------------------------
# the figures of one output


@pytest.mark.parametrize(
    "shape,sequence",
    [((16, 64), False), ((8, 4, 6, 6), False), ((5, 7, 12), True), ((7, 5, 12), False), ((3, 2), False)],
)
def test_activation_figures_are_the_rms_and_the_gram_matrix_similarity(shape, sequence):
    torch.manual_seed(0)
    t = torch.randn(shape) + 0.5  # a shared offset: the examples are alike, not identical
    norm, sim = activation_figures(t, sequence)
    assert norm == pytest.approx(t.double().norm().item(), rel=RMS_REL)
    assert sim == pytest.approx(_similarity(t.double(), sequence), abs=SIM_ABS)
    x = t.double().reshape(shape[0], -1)  # = 1 − N/(N−1)·(std across the batch ÷ RMS)², the documented identity
    std, rms = x.std(0, unbiased=False).pow(2).mean().sqrt(), x.pow(2).mean().sqrt()
    assert _alike(t.double()) == pytest.approx(1 - shape[0] / (shape[0] - 1) * (std / rms).item() ** 2, abs=1e-12)


def test_with_examples_of_one_norm_it_is_the_mean_pairwise_cosine():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(16, 32) + 0.3, dim=1) * 3.0
    assert activation_figures(t)[1] == pytest.approx(_cosine(t.double()), abs=SIM_ABS)


def test_a_channels_last_output_and_half_precision_are_measured_as_the_tensor_they_hold():
    torch.manual_seed(0)
    t = torch.randn(6, 8, 5, 5) + 1.0
    reference = _alike(t.double())
    assert activation_figures(t.to(memory_format=torch.channels_last))[1] == pytest.approx(reference, abs=SIM_ABS)
    assert activation_figures(t.bfloat16())[1] == pytest.approx(_alike(t.bfloat16().double()), abs=SIM_ABS)


@pytest.mark.parametrize(
    "t,expected",
    [
        (torch.randn(1, 8), None),  # one example: no pair
        (torch.randn(8, 1), None),  # one number per example
        (torch.zeros(4, 8), None),  # nothing to compare
        (torch.cat([torch.zeros(1, 8), torch.ones(1, 8)]), 0.0),  # a zero example is like no other
        (torch.cat([torch.zeros(1, 8), torch.ones(2, 8)]), 0.5),  # (1 + 1) ÷ ((3 − 1)·(0 + 1 + 1)) on one scale
        (torch.full((4, 8), 1e25), 1.0),  # past float32's sum of squares: again in float64
        (torch.full((4, 8), 1e-25), 1.0),  # below it
    ],
)
def test_activation_figures_at_the_edges(t, expected):
    norm, sim = activation_figures(t)
    assert norm == pytest.approx(t.double().norm().item(), rel=RMS_REL)
    assert sim == (None if expected is None else pytest.approx(expected, abs=SIM_ABS))


# ---------------------------------------------------------------------------------------------
# an exploding conversion: a deep un-normalised CNN, initialised as torchvision's VGG, without gates


def vgg_like(depth=16, width=16):
    """``depth`` 3×3 convolutions with ReLU and three max-pools, no normalisation, kaiming (fan-out) init."""
    layers, channels = [], 3
    for i in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        channels = width
        if (i + 1) % (depth // 4) == 0 and i + 1 < depth:
            layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def test_an_ungated_conversion_of_a_deep_plain_cnn_explodes_forward():
    torch.manual_seed(0)
    model, x = vgg_like(), torch.randn(4, 3, 32, 32)
    converted = resify.apply(model, x, gate=None)
    before, after = resify.gradient_flow(model, x), resify.gradient_flow(converted, x)
    outputs = _outputs(converted, x)
    rms = {name: _rms(t) for name, t in outputs.items()}
    first = next(iter(rms.values()))
    growth = max(rms.values()) / first  # measured: 2.85e+03
    assert growth > 10 * ACTIVATION_GROWTH
    assert after.activation_growth == pytest.approx(growth, rel=RMS_REL)
    for r in after.layers:
        if r.name in rms:
            assert r.activation_rms == pytest.approx(rms[r.name], rel=RMS_REL), r.name
    # the gradient alone would say healthy (first/last 196 < 1e3): the forward signal is what explodes
    assert after.first_to_last < 1e3 and before.verdict == "healthy"
    found = re.match(r"activation RMS grows ([\d,]+)× \(> 100×\) from '0' to '(\S+)'$", after.reason)
    assert after.verdict == "exploding" and found, after.reason
    assert float(found.group(1).replace(",", "")) == pytest.approx(growth, rel=1e-3)
    assert rms[found.group(2)] == max(rms.values())
    assert after.recommendation.startswith("try gate='rezero'")
    assert {r.verdict for r in after.layers if r.name in rms and rms[r.name] / first > ACTIVATION_GROWTH} == {
        "exploding"
    }
    c = resify.compare(before, after)
    with torch.no_grad():
        ratio = _rms(converted(x).double()) / _rms(model(x).double())  # the output is the last Linear's
    assert c.output_ratio == pytest.approx(ratio, rel=RMS_REL) and ratio > ACTIVATION_GROWTH
    head = str(len(model) - 1)
    assert c.output_change.name == head and f"output scale: activation RMS of '{head}' " in c.to_text()
    assert c.headline.endswith("verdict healthy → exploding")
    gated = resify.gradient_flow(resify.apply(model, x, gate="rezero"), x)  # the advice taken
    assert gated.verdict == "healthy" and gated.activation_growth < ACTIVATION_GROWTH


def test_compare_flags_an_output_far_above_the_original_even_where_depth_alone_does_not():
    """The compare rule on its own: after's output 150× before's, its growth across depth 1.5×."""
    from resify.report import LayerFlow
    from resify.report.verdicts import compare, judge

    def flow(rms_last):
        records = (
            LayerFlow("a", "Linear", 0, False, (2, 2), 1.0, 1.0, 1.0, 1.0, 1.0),
            LayerFlow("b", "Linear", 1, False, (2, 2), 1.0, 1.0, 1.0, 1.0, rms_last),
        )
        return judge(records, model_class="M", loss="mse to zeros", loss_value=1.0)

    before, after = flow(0.01), flow(1.5)
    assert (before.verdict, after.verdict) == ("healthy", "healthy")
    c = compare(before, after)
    assert c.output_ratio == pytest.approx(150.0)
    assert c.after.verdict == "exploding" and "'b' is 150× the original's (> 100×)" in c.after.reason
    assert c.headline.endswith("verdict healthy → exploding")
    restored = compare(flow(1e-4), flow(0.5))  # 5,000× the original's, yet below its own first layer
    assert restored.output_ratio == pytest.approx(5000.0) and restored.after.verdict == "healthy"


def test_vgg16_ungated_conversion_is_not_healthy():
    """The issue's case: torchvision's VGG-16 converted without gates (then the default), logits' std ~0.07 → ~98."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    x = torch.randn(2, 3, 128, 128)
    converted = resify.apply(model, x, gate=None)
    c = resify.compare(resify.gradient_flow(model, x), resify.gradient_flow(converted, x))
    with torch.no_grad():
        ratio = _rms(converted(x).double()) / _rms(model(x).double())
    assert c.output_ratio == pytest.approx(ratio, rel=RMS_REL) and ratio > 10 * ACTIVATION_GROWTH  # ~1,358×
    assert c.after.verdict == "exploding" and c.after.activation_growth > ACTIVATION_GROWTH  # ~345×
    assert "verdict healthy → exploding" in c.headline


# ---------------------------------------------------------------------------------------------
# a collapsing Transformer stack: nn.TransformerEncoderLayer's blocks without their residuals


class SkiplessBlock(nn.Module):
    """``x = LN1(MHA(x)); x = LN2(FF2(gelu(FF1(x))))``: a post-norm encoder layer minus both residuals."""

    def __init__(self, width, heads, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln1 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, 4 * width)
        self.ff2 = nn.Linear(4 * width, width)
        self.ln2 = nn.LayerNorm(width)

    def forward(self, x):
        x = self.ln1(self.attn(x, x, x, need_weights=False)[0])
        return self.ln2(self.ff2(F.gelu(self.ff1(x))))


class SkiplessEncoder(nn.Module):
    def __init__(self, depth=12, width=64, heads=4, vocab=100, batch_first=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[SkiplessBlock(width, heads, batch_first) for _ in range(depth)])
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        return self.head(self.blocks(self.emb(tokens)))


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_skipless_transformer_stack_collapses(batch_first):
    torch.manual_seed(0)
    model = SkiplessEncoder(batch_first=batch_first)
    tokens = torch.randint(0, 100, (8, 16) if batch_first else (16, 8))  # random tokens
    flow = resify.gradient_flow(model, tokens)
    outputs = _outputs(model, tokens)
    head, emb = _similarity(outputs["head"], True), _similarity(outputs["emb"], True)
    assert head > COLLAPSE_SIMILARITY and emb < 0.1  # every position of every sequence: one vector
    assert flow.output_similarity == pytest.approx(head, abs=SIM_ABS)
    assert flow.layer("emb").activation_similarity == pytest.approx(emb, abs=SIM_ABS)
    for name in ("blocks.0.attn", "blocks.5.ff1", "blocks.11.ff2"):
        assert flow.layer(name).activation_similarity == pytest.approx(_similarity(outputs[name], True), abs=SIM_ABS)
    assert flow.verdict == "collapsing", flow.reason  # the gradient alone would say healthy
    assert "to 'head' every example (or position) gives nearly one vector" in flow.reason
    assert flow.layer("head").verdict == "collapsing" and flow.layer("emb").verdict == "healthy"
    assert flow.recommendation.startswith("try gate='rezero'")  # no shortcut yet; it has norms
    converted = resify.gradient_flow(resify.apply(model, tokens, gate="rezero"), tokens)
    assert converted.verdict == "healthy" and converted.output_similarity < 0.9


# ---------------------------------------------------------------------------------------------
# a healthy net: a small BatchNorm ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def small_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        BasicBlock(16, 16, 1),
        BasicBlock(16, 32, 2),
        BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def test_a_batchnorm_resnet_is_healthy():
    torch.manual_seed(0)
    model, x = small_resnet(), torch.randn(8, 3, 32, 32)
    flow = resify.gradient_flow(model, x)
    outputs = _outputs(model, x)
    rms = {name: _rms(t) for name, t in outputs.items()}
    growth = max(rms.values()) / next(iter(rms.values()))
    output = _alike(outputs["8"])
    assert flow.verdict == "healthy" and flow.recommendation is None
    assert flow.activation_growth == pytest.approx(growth, rel=RMS_REL) and growth < ACTIVATION_GROWTH
    assert flow.output_similarity == pytest.approx(output, abs=SIM_ABS) and output < COLLAPSE_SIMILARITY
    for name, t in outputs.items():
        rec = flow.layer(name)
        assert rec.activation_rms == pytest.approx(rms[name], rel=RMS_REL), name
        assert rec.activation_similarity == pytest.approx(_similarity(t, t.dim() == 3), abs=SIM_ABS), name
    assert {r.verdict for r in flow.layers} == {"healthy"}
    assert math.isfinite(flow.first_to_last)
