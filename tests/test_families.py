"""Layer families beyond Linear and ConvNd: recurrent stacks, attention blocks, transposed
convolutions and upsampling. Each model is converted, run forward and backward at the example's
size and at another one, every parameter must get a gradient, the plan is checked against a
hand-written expectation, the output against a hand-written residual network, and
``preserve_output=True`` must leave the outputs unchanged (≤ 1e-6)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import resify


def _plan(model, *inputs, **policy):
    plan = resify.plan(model, *inputs, **policy)
    return [(s.start, s.end, s.kind, s.projection) for s in plan.sites], {k.start: k.code for k in plan.skipped}


def _trains(converted, inputs):
    converted.zero_grad()
    out = converted(*inputs)
    out.float().square().mean().backward()
    missing = [n for n, p in converted.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    return out


def _preserved(model, example, other):
    torch.manual_seed(0)
    kept = resify.apply(model, example, preserve_output=True).eval()
    model.eval()
    with torch.no_grad():
        for inputs in (example, other):
            torch.testing.assert_close(kept(*inputs), model(*inputs), rtol=1e-6, atol=1e-6)


class RecurrentStack(nn.Module):
    """GNMT-style: the recurrent layers in a ModuleList, the states thrown away."""

    def __init__(self, cell=nn.LSTM, depth=4, d=16, bidirectional=False, batch_first=True, num_layers=1):
        super().__init__()
        self.emb = nn.Embedding(30, d)
        width = lambda i: d if i == 0 or not bidirectional else 2 * d
        self.cells = nn.ModuleList(
            cell(width(i), d, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional)
            for i in range(depth)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(2 * d if bidirectional else d) for _ in range(depth))
        self.head = nn.Linear(2 * d if bidirectional else d, 5)
        self.batch_first = batch_first

    def forward(self, tokens):
        x = self.emb(tokens if self.batch_first else tokens.t())
        for cell, norm in zip(self.cells, self.norms):
            x = norm(cell(x)[0])
        return self.head(x[:, -1] if self.batch_first else x[-1])


RECURRENT = {
    "LSTM": dict(cell=nn.LSTM),
    "GRU, time first, 2 layers each": dict(cell=nn.GRU, batch_first=False, num_layers=2),
    "RNN": dict(cell=nn.RNN),
    "bidirectional LSTM": dict(cell=nn.LSTM, bidirectional=True),
}


@pytest.mark.parametrize("kwargs", RECURRENT.values(), ids=RECURRENT.keys())
def test_a_recurrent_stack_gets_a_shortcut_around_each_layer(kwargs):
    torch.manual_seed(0)
    model = RecurrentStack(**kwargs)
    tokens, other = torch.randint(0, 30, (3, 7)), torch.randint(0, 30, (2, 11))
    sites, skipped = _plan(model, tokens)
    bi = kwargs.get("bidirectional", False)
    first = ("cells.0", "cells.0", "projection", "Linear(16, 32)") if bi else ("cells.0", "cells.0", "identity", None)
    assert sites == [first] + [(f"cells.{i}", f"cells.{i}", "identity", None) for i in range(1, 4)]
    assert skipped == {"head": "linear_span"}
    converted = resify.apply(model, tokens)
    assert _trains(converted, (other,)).shape == (2, 5)
    _preserved(model, (tokens,), (other,))


def test_a_recurrent_shortcut_adds_the_sequence_and_leaves_the_state_alone():
    """x + LayerNorm(LSTM(x)[0]) per layer: the hand-written residual stack, computed by hand."""
    torch.manual_seed(0)
    model = RecurrentStack(depth=3)
    tokens = torch.randint(0, 30, (4, 6))
    converted = resify.apply(model, tokens)
    x = model.emb(tokens)
    for cell, norm in zip(model.cells, model.norms):
        x = x + norm(cell(x)[0])
    torch.testing.assert_close(converted(tokens), model.head(x[:, -1]), rtol=1e-6, atol=1e-6)


class PackedInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.fc = nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.fc(pad_packed_sequence(self.l1(packed)[0], batch_first=True)[0])


class PackedIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.fc = nn.LSTM(8, 8, batch_first=True), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, packed):
        out, (h, c) = self.l2(self.l1(packed)[0])
        return self.fc(h[-1])


def test_packed_sequences_are_skipped_with_a_reason_and_packing_inside_forward_is_refused_clearly():
    packed = pack_padded_sequence(torch.randn(3, 5, 8), torch.tensor([5, 3, 2]), batch_first=True, enforce_sorted=False)
    model = PackedIn()
    plan = resify.plan(model, packed)
    assert plan.sites == () and [(s.start, s.code) for s in plan.skipped] == [
        ("l1", "no_shape"),
        ("l2", "not_single_entry_exit"),  # its state, not its sequence, goes on
        ("fc", "linear_span"),
    ]
    assert "PackedSequence" in plan.skipped[0].reason and "pad_packed_sequence" in plan.skipped[0].reason
    torch.testing.assert_close(resify.apply(model, packed)(packed), model(packed))
    with pytest.raises(resify.TraceError, match="its forward packs sequences .* pass the PackedSequence"):
        resify.plan(PackedInside(), (torch.randn(3, 5, 8), torch.tensor([5, 3, 2])))


class PostNorm(nn.Module):
    """A Transformer encoder block without its residuals: LN(MHA(x)), then LN(FFN(x))."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, residual=False):
        a = self.norm1(self.attn(x, x, x)[0])
        x = x + a if residual else a
        f = self.norm2(self.ff2(F.relu(self.ff1(x))))
        return x + f if residual else f


class SDPABlock(nn.Module):
    """Attention written by hand: q, k, v projections, F.scaled_dot_product_attention, out projection."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)

    def forward(self, x, residual=False):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        y = self.norm(self.o(a))
        return x + y if residual else y


class Encoder(nn.Module):
    def __init__(self, block=PostNorm, depth=3, d=16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(block(d) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def forward(self, x, residual=False):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x, residual) if residual else block(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("block", [PostNorm, SDPABlock])
def test_a_skipless_transformer_gets_sublayer_shortcuts_with_its_norms_in_place(block):
    torch.manual_seed(0)
    model = Encoder(block).eval()
    x, other = torch.randn(3, 7, 8), torch.randn(2, 12, 8)
    sites, skipped = _plan(model, x)
    if block is PostNorm:  # x + LN1(MHA(x)) and x + LN2(FF2(relu(FF1(x)))): identities, no projection
        expected = [s for i in range(3) for s in ((f"blocks.{i}.attn",) * 2, (f"blocks.{i}.ff1", f"blocks.{i}.ff2"))]
    else:  # q, k, v and o are one sub-layer: x + LN(o(sdpa(q(x), k(x), v(x))))
        expected = [(f"blocks.{i}.q", f"blocks.{i}.o") for i in range(3)]
    assert [(a, b) for a, b, _, _ in sites] == expected and {k for _, _, k, _ in sites} == {"identity"}
    assert skipped == {"inp": "linear_span", "head": "linear_span"}
    converted = resify.apply(model, x, gate=None).eval()  # the hand-written encoder has no gates
    with torch.no_grad():
        for inputs in (x, other):  # the hand-written residual encoder, same weights
            torch.testing.assert_close(converted(inputs), model(inputs, residual=True), rtol=1e-5, atol=1e-6)
    assert _trains(converted.train(), (other,)).shape == (2, 10)
    _preserved(model, (x,), (other,))


def dcgan_generator(nz=16, ngf=8):
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh(),
    )  # fmt: skip


def test_a_dcgan_generator_gets_upsampled_shortcuts_and_keeps_its_tanh():
    torch.manual_seed(0)
    model = dcgan_generator()
    z, other = torch.randn(2, 16, 1, 1), torch.randn(3, 16, 2, 2)
    sites, skipped = _plan(model, z)
    assert sites == [
        ("0", "0", "projection", "Upsample(→out, nearest) + Conv2d(16, 32, 1) + BatchNorm2d"),
        ("3", "3", "projection", "Upsample(→out, nearest) + Conv2d(32, 16, 1) + BatchNorm2d"),
        ("6", "6", "projection", "Upsample(→out, nearest) + Conv2d(16, 8, 1) + BatchNorm2d"),
        ("9", "9", "identity", None),  # k3 s1 p1: the size holds at every size
    ]
    assert skipped == {"12": "bounded_output"}  # a shortcut would take the image out of [-1, 1]
    converted = resify.apply(model, z)
    assert _trains(converted, (other,)).shape == model(other).shape == (3, 3, 40, 40)
    _preserved(model, (z,), (other,))
    # the first site by hand: z upsampled (nearest) to the branch's size, 1×1 conv, BatchNorm, added
    converted.eval(), model.eval()
    seen = []
    converted.get_submodule("3").register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        converted(z)
        branch = model[2](model[1](model[0](z)))
        up = F.interpolate(z, size=branch.shape[2:], mode="nearest")
        shortcut = converted.get_submodule("resify.0.norm")(converted.get_submodule("resify.0.proj")(up))
        torch.testing.assert_close(seen[0], branch + shortcut, rtol=1e-6, atol=1e-6)


class Autoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.d1, self.d2 = nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.up, self.d3 = nn.Upsample(scale_factor=2), nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.e2(F.relu(self.e1(x))))
        h = self.up(F.relu(self.d2(F.relu(self.d1(h)))))
        return torch.sigmoid(self.d3(h))


def test_a_conv_autoencoder_gets_shortcuts_on_both_paths_and_no_global_identity():
    torch.manual_seed(0)
    model = Autoencoder()
    x, other = torch.randn(2, 1, 16, 16), torch.randn(1, 1, 24, 20)
    sites, skipped = _plan(model, x)
    assert sites == [
        ("e1", "e1", "projection", "Conv2d(1, 8, 1, stride=2)"),
        ("e2", "e2", "projection", "Conv2d(8, 16, 1, stride=2)"),
        ("d1", "d1", "projection", "Upsample(→out, nearest) + Conv2d(16, 8, 1)"),
        ("d2", "d2", "projection", "Upsample(→out, nearest)"),  # conv → relu → upsample: the upsample only
    ]
    assert skipped == {"d3": "bounded_output"}  # never x + AE(x): that would make the identity trivial
    converted = resify.apply(model, x)
    assert _trains(converted, (other,)).shape == (1, 1, 24, 20)
    _preserved(model, (x,), (other,))
    converted.eval(), model.eval()
    seen = []
    converted.get_submodule("d1").register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():  # the decoder's two sites by hand, from what the converted encoder gave d1
        y = converted(x)
        h = seen[0]
        h = F.relu(model.d1(h)) + converted.get_submodule("resify.d1.proj")(F.interpolate(h, scale_factor=2.0))
        h = model.up(F.relu(model.d2(h))) + F.interpolate(h, scale_factor=2.0)
        torch.testing.assert_close(y, torch.sigmoid(model.d3(h)), rtol=1e-6, atol=1e-6)


def test_the_report_sees_recurrent_attention_and_transposed_layers_and_names_the_embedding():
    torch.manual_seed(0)
    flow = resify.gradient_flow(RecurrentStack(depth=6), torch.randint(0, 30, (4, 9)))
    assert [r.kind for r in flow.layers] == ["Embedding", *["LSTM"] * 6, "Linear"]
    assert flow.layer("cells.0").shape == (64, 16)  # weight_ih_l0: 4 gates × 16
    assert "from 'cells.0' to 'head'" in flow.reason and "'emb' before it (integer input)" in flow.reason
    attention = resify.gradient_flow(Encoder(PostNorm, depth=1), torch.randn(2, 5, 8))
    assert [r.name for r in attention.layers][:2] == ["inp", "blocks.0.attn"]
    assert attention.layer("blocks.0.attn").kind == "MultiheadAttention"
    decoder = resify.gradient_flow(dcgan_generator(), torch.randn(2, 16, 1, 1))
    assert [r.kind for r in decoder.layers] == ["ConvTranspose2d"] * 5


def test_an_lstm_stack_whose_embedding_gets_almost_no_gradient_is_vanishing():
    """The issue's case: the embedding gets ~1e-5 of the head's weight gradient."""
    torch.manual_seed(0)
    model = RecurrentStack(depth=8)
    for norm in model.norms:  # without the norms' rescaling the gradient fades layer by layer
        norm.weight.data.fill_(0.05)
    tokens = torch.randint(0, 30, (4, 9))
    before = resify.gradient_flow(model, tokens)
    assert before.verdict == "vanishing", before.reason
    after = resify.gradient_flow(resify.apply(copy.deepcopy(model), tokens), tokens)
    assert after.verdict == "healthy", after.reason
