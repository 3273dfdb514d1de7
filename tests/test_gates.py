"""Gates (resify/analysis/gates.py): a branch computed only to scale another value (squeeze-excitation,
attention weights, a sigmoid gate) gets no site, and the values it scales keep theirs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resify
from resify.analysis.analyze import analyze
from resify.tracing.trace import trace


class SE(nn.Module):
    """Squeeze-excitation as torchvision writes it: pool, 1×1 conv, ReLU, 1×1 conv, a bounded activation."""

    def __init__(self, ch, gate):
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(ch, ch // 2, 1), nn.Conv2d(ch // 2, ch, 1), gate

    def forward(self, x):
        return x * self.gate(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class LinearSE(nn.Module):
    """Squeeze-excitation as the SENet paper writes it: Linear layers, the gate reshaped to [N, C, 1, 1]
    (and expanded to the input's shape)."""

    def __init__(self, ch, expand=False):
        super().__init__()
        self.fc1, self.fc2, self.expand = nn.Linear(ch, ch // 2), nn.Linear(ch // 2, ch), expand

    def forward(self, x):
        b, c = x.shape[:2]
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3)))))).view(b, c, 1, 1)
        return x * (s.expand_as(x) if self.expand else s)


class SENet(nn.Module):
    def __init__(self, se):
        super().__init__()
        self.conv1, self.se, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), se, nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv2(self.se(F.relu(self.conv1(x)))))


class AttentionPooling(nn.Module):
    """Attention-based pooling of a bag of instances: softmax weights scale the instances, summed."""

    def __init__(self, d=16):
        super().__init__()
        self.enc, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        self.proj, self.score, self.head = nn.Linear(d, d), nn.Linear(d, 1), nn.Linear(d, d)

    def forward(self, x):
        h = F.relu(self.enc(x))
        a = torch.softmax(self.score(torch.tanh(self.proj(self.norm(h)))), dim=1)
        return F.relu(self.head((a * h).sum(1)))


GATES = {
    "SE, Sigmoid": (lambda: SENet(SE(8, nn.Sigmoid())), ["se.fc1", "se.fc2"]),
    "SE, Hardsigmoid": (lambda: SENet(SE(8, nn.Hardsigmoid())), ["se.fc1", "se.fc2"]),
    "SE, torch.sigmoid": (lambda: SENet(SE(8, torch.sigmoid)), ["se.fc1", "se.fc2"]),
    "SE of Linear layers, reshaped": (lambda: SENet(LinearSE(8)), ["se.fc1", "se.fc2"]),
    "SE of Linear layers, expanded": (lambda: SENet(LinearSE(8, expand=True)), ["se.fc1", "se.fc2"]),
}


@pytest.mark.parametrize("case", sorted(GATES))
def test_a_squeeze_excitation_branch_is_a_gate_and_gets_no_site(case):
    make, gate_layers = GATES[case]
    plan = resify.plan(make(), torch.randn(2, 8, 6, 6))
    assert [s.start for s in plan.sites] == ["conv1", "conv2"]  # the feature maps it scales keep theirs
    skipped = {s.start: s for s in plan.skipped}
    assert [skipped[name].code for name in gate_layers] == ["gate_branch"] * len(gate_layers)
    assert "scales another at 'mul'" in skipped["se.fc2"].reason


def test_attention_weights_are_a_gate():
    plan = resify.plan(AttentionPooling(), torch.randn(2, 5, 16))
    assert [s.start for s in plan.sites] == ["enc", "head"]
    assert {s.start: s.code for s in plan.skipped} == {"proj": "gate_branch", "score": "gate_branch"}


class Attention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        w = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 4.0, dim=-1)
        return w @ self.v(x)


def test_the_weights_of_attention_written_out_gate_its_values():
    analysis = analyze(trace(Attention(), torch.randn(2, 5, 16)))
    assert {name for name in ("q", "k", "v", "x") if name in analysis.gated} == {"q", "k"}
    assert analysis.gated["q"] == "matmul_1"


class Products(nn.Module):
    """x * sigmoid(x) after a layer (its activation), a product of two unbounded branches, and a
    FiLM scale of a conditioning input: none is a gate of the main path."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.film = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(4, 8)

    def forward(self, x, cond):
        h = self.a(x)
        h = h * torch.sigmoid(h)
        h = F.relu(self.b(h)) * F.relu(self.c(h))
        return h * torch.sigmoid(self.film(cond))


def test_a_swish_a_product_of_branches_and_the_main_path_under_a_film_scale_are_no_gates():
    analysis = analyze(trace(Products(), (torch.randn(2, 8), torch.randn(2, 4))))
    gated = {layer.name for layer in analysis.layers if layer.output in analysis.gated}
    assert gated == {"film"}  # the conditioning input's sigmoid scale gates the main path, not the reverse


def test_mobilenet_v3_gets_no_site_inside_its_squeeze_excitation():
    torchvision = pytest.importorskip("torchvision")
    plan = resify.plan(torchvision.models.mobilenet_v3_small(weights=None).eval(), torch.randn(2, 3, 64, 64))
    assert plan.sites, "the inverted residual blocks' other layers keep their sites"
    assert not [s.name for s in plan.sites if any(".fc1" in name or ".fc2" in name for name in s.layers)]
    se = [(s.start, s.code) for s in plan.skipped if ".fc" in s.start]
    assert se and {code for _, code in se} <= {"gate_branch", "inside_existing"}
    assert ("features.1.block.1.fc1", "gate_branch") in se and ("features.1.block.1.fc2", "gate_branch") in se
