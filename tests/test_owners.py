"""resify.planning.owners: each site's owner is the smallest module whose forward holds its span; nested
owners whose spans meet merge; names are under the owner."""

import torch
import torch.nn as nn

import resify
from resify.planning.owners import aliases, qualified


def _plan(model, x, **policy):
    return resify.plan(model, x, **policy)


def test_a_span_inside_one_block_is_owned_by_the_block():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    plan = _plan(model, torch.randn(2, 4), shortcut="identity")
    assert [(s.owner, s.start, s.name) for s in plan.sites] == [("0", "0.0", "0"), ("0", "0.2", "2")]


def test_a_span_across_two_blocks_is_owned_by_their_parent_which_takes_the_inner_sites_too():
    seq, lin, relu = nn.Sequential, nn.Linear, nn.ReLU
    model = seq(seq(lin(4, 4), relu(), lin(4, 4), relu(), lin(4, 4), relu()), seq(lin(4, 4), relu()), lin(4, 2))
    x = torch.randn(3, 4)
    plan = _plan(model, x, shortcut="identity", group=2)
    # 0.4 … 1.0 crosses the two blocks: the root owns it; 0.0 … 0.2, inside block 0 (which the root's
    # forward now inlines), moves to the root too; names are relative to the owner
    assert [(s.owner, s.layers, s.name) for s in plan.sites] == [
        ("", ("0.0", "0.2"), "0_0"),
        ("", ("0.4", "1.0"), "0_4"),
    ]
    converted = resify.apply(model, x, shortcut="identity", group=2, gate="rezero", gate_init=1.0)
    b = model[0]
    h1 = torch.relu(b[2](torch.relu(b[0](x)))) + x
    h2 = torch.relu(model[1][0](torch.relu(b[4](h1)))) + h1
    torch.testing.assert_close(converted(x), model[2](h2))


def test_qualified_names_and_aliases():
    assert qualified("", "a.b") == "a.b" and qualified("x", "a") == "x.a" and qualified("x", "") == "x"
    shared = nn.Linear(2, 2)
    model = nn.Module()
    model.enc = shared
    model.blocks = nn.Sequential(shared)
    assert aliases(model)["enc"] == {"enc", "blocks.0"}
