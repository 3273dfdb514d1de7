"""The data flow of each input (resify/analysis/dataflow.py): a projection of a second input joined into the
main path (a time or class embedding, FiLM, a cross-attention context) is conditioning, not an
existing shortcut, and the main path keeps its sites; real residuals keep theirs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resify
from resify.analysis.analyze import analyze
from resify.analysis.dataflow import input_masks, main_input
from resify.tracing.trace import trace


class Additive(nn.Module):
    """The issue's case: a projection of ``c`` added in every block (a diffusion model's time embedding)."""

    def __init__(self, cond=True, conv=True, depth=4, residual=False):
        super().__init__()
        self.cond, self.conv, self.residual = cond, conv, residual
        self.main = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) if conv else nn.Linear(8, 8) for _ in range(depth))
        self.cproj = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x, c):
        for layer, proj in zip(self.main, self.cproj):
            e = proj(c)[:, :, None, None] if self.conv else proj(c)
            y = torch.relu(layer(x) + (e if self.cond else 0))
            x = x + y if self.residual else y
        return x


class ClassEmbedding(nn.Module):
    """One embedding of the label, added into every block."""

    def __init__(self, depth=4, residual=False):
        super().__init__()
        self.residual = residual
        self.emb = nn.Embedding(10, 8)
        self.main = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x, y):
        e = self.emb(y)
        for layer in self.main:
            y = torch.relu(layer(x) + e)
            x = x + y if self.residual else y
        return x


class FiLM(nn.Module):
    """relu(conv(x) * g + b) with g, b = f(c).chunk(2): scale and shift from the conditioning input."""

    def __init__(self, conv=True, depth=4, residual=False):
        super().__init__()
        self.conv, self.residual = conv, residual
        self.main = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) if conv else nn.Linear(8, 8) for _ in range(depth))
        self.film = nn.ModuleList(nn.Linear(6, 16) for _ in range(depth))

    def forward(self, x, c):
        for layer, film in zip(self.main, self.film):
            g, b = film(c).chunk(2, dim=1)
            if self.conv:
                g, b = g[:, :, None, None], b[:, :, None, None]
            y = torch.relu(layer(x) * g + b)
            x = x + y if self.residual else y
        return x


class CrossAttention(nn.Module):
    """x + attn(x, ctx, ctx) is a real residual (x reaches the add by the identity path); a pooled
    projection of the context added after the feed-forward layer is conditioning."""

    def __init__(self, depth=3, d=16):
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(d, 4, batch_first=True) for _ in range(depth))
        self.main = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.cproj = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x, ctx):
        for attn, layer, proj in zip(self.attn, self.main, self.cproj):
            x = x + attn(x, ctx, ctx, need_weights=False)[0]
            x = torch.relu(layer(x) + proj(ctx).mean(1, keepdim=True))
        return x


class TimeBlock(nn.Module):
    """A diffusion model's residual block: the time embedding joins its branch, x bypasses it."""

    def __init__(self, ch=8, tdim=16):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.temb = nn.Linear(tdim, ch)
        self.norm2, self.conv2 = nn.GroupNorm(4, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, t):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(F.silu(t))[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class Diffusion(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
        self.blocks = nn.ModuleList(TimeBlock() for _ in range(depth))

    def forward(self, x, t):
        temb = self.time(t)
        for block in self.blocks:
            x = block(x, temb)
        return x


def _image():
    return torch.randn(2, 8, 6, 6)


# model, inputs, existing shortcuts, the main path's layers (each must get a site)
CONDITIONED = {
    "time embedding, conv": (lambda: Additive(), lambda: (_image(), torch.randn(2, 8)), 0, "main.*"),
    "time embedding, MLP": (lambda: Additive(conv=False), lambda: (torch.randn(2, 8), torch.randn(2, 8)), 0, "main.*"),
    "class embedding": (
        lambda: ClassEmbedding(),
        lambda: (torch.randn(2, 8), torch.randint(0, 10, (2,))),
        0,
        "main.*",
    ),
    "FiLM, conv": (lambda: FiLM(), lambda: (_image(), torch.randn(2, 6)), 0, "main.*"),
    "FiLM, MLP": (lambda: FiLM(conv=False), lambda: (torch.randn(2, 8), torch.randn(2, 6)), 0, "main.*"),
    "cross-attention": (
        lambda: CrossAttention(),
        lambda: (torch.randn(2, 5, 16), torch.randn(2, 7, 16)),
        3,  # x + attn(x, ctx, ctx) in each block
        "main.*",
    ),
}


@pytest.mark.parametrize("case", sorted(CONDITIONED))
def test_a_projection_of_another_input_is_conditioning_not_an_existing_shortcut(case):
    make, inputs, n_existing, main = CONDITIONED[case]
    torch.manual_seed(0)
    plan = resify.plan(make(), inputs())
    assert len(plan.existing) == n_existing, [(e.node, e.start, e.end) for e in plan.existing]
    main_layers = [name for name in plan.layers if name.startswith(main[:-1])]
    assert [s.start for s in plan.sites if s.start in main_layers] == main_layers
    assert not [s.start for s in plan.skipped if s.code == "inside_existing" and s.start in main_layers]


# the conditioned nets and their hand-written residual twins (x = x + block(x, c): the same weights)
TWINS = {
    "time embedding, conv": (lambda **k: Additive(**k), lambda: (_image(), torch.randn(2, 8))),
    "time embedding, MLP": (lambda **k: Additive(conv=False, **k), lambda: (torch.randn(2, 8), torch.randn(2, 8))),
    "class embedding": (lambda **k: ClassEmbedding(**k), lambda: (torch.randn(2, 8), torch.randint(0, 10, (2,)))),
    "FiLM, conv": (lambda **k: FiLM(**k), lambda: (_image(), torch.randn(2, 6))),
    "FiLM, MLP": (lambda **k: FiLM(conv=False, **k), lambda: (torch.randn(2, 8), torch.randn(2, 6))),
}


@pytest.mark.parametrize("case", sorted(TWINS))
def test_a_conditioned_block_gets_the_hand_written_shortcut_around_its_conditioning(case):
    """x + relu(layer(x) + e), as people write it, not relu(layer(x) + x + e): the block's span goes
    through the conditioning's add (or FiLM's scale and shift) to the activation."""
    make, inputs = TWINS[case]
    torch.manual_seed(0)
    plain, args = make(), inputs()
    hand = make(residual=True)
    hand.load_state_dict(plain.state_dict())
    converted = resify.apply(plain, args, gate=None)
    assert [s.layers for s in resify.applied_plan(converted).sites] == [(f"main.{i}",) for i in range(4)]
    torch.testing.assert_close(converted(*args), hand(*args), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(converted(*args), plain(*args), rtol=1e-2)


def test_the_conditioned_net_gets_the_sites_of_its_unconditioned_twin():
    torch.manual_seed(0)
    x, c = _image(), torch.randn(2, 8)
    plain, conditioned = resify.plan(Additive(cond=False), (x, c)), resify.plan(Additive(), (x, c))
    assert plain.existing == conditioned.existing == ()
    assert [(s.start, s.kind) for s in conditioned.sites] == [(s.start, s.kind) for s in plain.sites]
    assert len(conditioned.sites) == 4


def test_the_cross_attention_residuals_are_the_existing_shortcuts():
    plan = resify.plan(CrossAttention(), (torch.randn(2, 5, 16), torch.randn(2, 7, 16)))
    assert [(e.start, e.bypass, e.layers) for e in plan.existing] == [
        (f"attn.{i}", "identity", (f"attn.{i}",)) for i in range(3)
    ]


def test_a_residual_block_whose_branch_takes_a_time_embedding_keeps_its_shortcut():
    plan = resify.plan(Diffusion(), (_image(), torch.randn(2, 1)))
    assert [(e.start, e.end, e.bypass) for e in plan.existing] == [
        (f"blocks.{i}.norm1", f"blocks.{i}.conv2", "identity") for i in range(3)
    ]
    # the time embedding's projection joins the branch; it is no layer of the block's main path
    assert [e.layers for e in plan.existing] == [(f"blocks.{i}.conv1", f"blocks.{i}.conv2") for i in range(3)]


@pytest.mark.filterwarnings("ignore::resify.ResifyWarning")  # its fast-path checks: the concrete tracer
@pytest.mark.parametrize("norm_first", [False, True])
def test_a_transformer_encoder_layer_keeps_both_residuals(norm_first):
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    plan = resify.plan(layer, torch.randn(2, 5, 16))
    assert [(e.bypass, e.layers) for e in plan.existing] == [
        ("identity", ("self_attn",)),
        ("identity", ("linear1", "linear2")),
    ]
    assert plan.sites == ()


def test_each_value_knows_the_inputs_it_is_computed_from_and_its_main_input_is_the_first():
    analysis = analyze(trace(Additive(conv=False, depth=2), (torch.randn(2, 8), torch.randn(2, 8))))
    masks = input_masks(analysis.traced.graph)
    by_name = {n.name: mask for n, mask in masks.items()}
    assert (by_name["x"], by_name["c"]) == (0b01, 0b10)
    assert by_name["cproj_0"] == 0b10 and by_name["main_0"] == 0b01 and by_name["add"] == 0b11
    assert main_input(masks, analysis.node("add_1")) == 0b01 and main_input(masks, analysis.node("cproj_1")) == 0b10
