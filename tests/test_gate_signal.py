"""The forward gate='auto' reads (resify/planning/gate_signal.py): each site's mean squares as the
converted model computes them, checked against the same sums written out with plain torch."""

import pytest
import torch
import torch.nn as nn

import resify
from resify.planning.gate_signal import SiteSignal, Unmeasured, measure_sites
from resify.tracing.trace import trace


def _ms(t: torch.Tensor) -> float:
    return t.double().square().mean().item()


def _setup(model, x):
    plan = resify.plan(model, x, gate=None)
    return trace(model, x), plan.sites


def test_identity_sites_measure_input_branch_shortcut_and_sum_in_forward_order():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU()), torch.randn(16, 6)
    traced, sites = _setup(model, x)
    assert [s.kind for s in sites] == ["identity", "identity"]
    signals = measure_sites(traced, sites, lambda site, signal: 1.0)  # ungated: x + F(x) at each site
    f0 = torch.relu(model[0](x))
    h = x + f0
    f1 = torch.relu(model[2](h))
    want = [SiteSignal(_ms(x), _ms(f0), _ms(x), _ms(h)), SiteSignal(_ms(h), _ms(f1), _ms(h), _ms(h + f1))]
    got = [signals[s.name] for s in sites]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-5)
    assert got[1].growth == pytest.approx(_ms(h + f1) / _ms(h), rel=1e-5)
    assert got[1].gain == pytest.approx(_ms(h + f1) / _ms(h), rel=1e-5)  # an identity: its input is its shortcut
    assert got[0].ratio == pytest.approx(_ms(f0) / _ms(x), rel=1e-5)


def test_a_gate_decided_on_the_way_scales_what_the_next_site_receives():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU()), torch.randn(16, 6)
    traced, sites = _setup(model, x)
    signals = measure_sites(traced, sites, lambda site, signal: 0.0 if site is sites[0] else 1.0)
    # the first branch gated at 0: the second site receives x itself
    f1 = torch.relu(model[2](x))
    assert signals[sites[1].name] == pytest.approx(SiteSignal(_ms(x), _ms(f1), _ms(x), _ms(x + f1)), rel=1e-5)


def test_measuring_leaves_buffers_and_the_random_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 6), nn.ReLU())
    x = torch.randn(16, 6)
    traced, sites = _setup(model.train(), x)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    measure_sites(traced, sites, lambda site, signal: 1.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())


def test_a_model_on_the_meta_device_cannot_be_measured():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
    x = torch.randn(4, 6, device="meta")
    traced, sites = _setup(model, x)
    with pytest.raises(Unmeasured):
        measure_sites(traced, sites, lambda site, signal: 1.0)
