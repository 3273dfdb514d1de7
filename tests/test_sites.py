"""The plan's records (resify/planning/sites.py): shortcut labels derived from typed fields,
and Site / Skipped / Plan written by to_dict and read back by from_dict, also through JSON."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import ImprovedResidualNetwork

import resify
from resify.constants import PLAN_SCHEMA_VERSION
from resify.errors import PlanError
from resify.planning.sites import SKIP_CODES, Dense, Identity, Plan, Projection, Site, Skipped


def small_cnn():
    """Conv stages whose spans need, in turn: a 1×1 conv, an identity, a strided 1×1 conv with its
    BatchNorm, a parameter-free pool, a pool then a 1×1 conv; the head ends in a bounded Sigmoid."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
        nn.Sigmoid(),
    )


X = torch.randn(2, 3, 16, 16)


@pytest.fixture(scope="module")
def cnn_plan():
    torch.manual_seed(0)
    return resify.plan(small_cnn(), X, gate=None)  # the forms and their parameters, no gate beside them


@pytest.fixture(scope="module")
def dense_plan():
    torch.manual_seed(0)
    return resify.plan(small_cnn(), X, shortcut="dense")


@pytest.fixture(scope="module")
def seed_plan():
    """The seed's network with its own shortcuts: every span is inside one (the plan's 'existing')."""
    torch.manual_seed(0)
    return resify.plan(ImprovedResidualNetwork([16, 8, 8, 4], True), torch.randn(3, 16))


# ---------------------------------------------------------------------------------------------
# shortcut forms and their labels

LABELS = {
    "identity": (Identity(), "identity"),
    "linear": (Projection("linear", (128, 64)), "Linear(128, 64)"),
    "conv": (Projection("conv", (3, 8), dims=2), "Conv2d(3, 8, 1)"),
    "conv strided, norm": (
        Projection("conv", (8, 16), dims=2, stride=(2, 2), norm="BatchNorm2d"),
        "Conv2d(8, 16, 1, stride=2) + BatchNorm2d",
    ),
    "conv, per-dim stride": (Projection("conv", (8, 16), dims=2, stride=(2, 1)), "Conv2d(8, 16, 1, stride=(2, 1))"),
    "conv1d strided": (Projection("conv", (2, 4), dims=1, stride=(3,)), "Conv1d(2, 4, 1, stride=3)"),
    "pool": (Projection("pool", (16, 16), dims=2, pool=True), "AvgPool2d(→out)"),
    "pool then conv": (Projection("conv", (16, 32), dims=2, pool=True), "AvgPool2d(→out) + Conv2d(16, 32, 1)"),
    "conv, norm, then pool": (
        Projection("conv", (4, 8), dims=3, pool=True, pool_last=True, norm="BatchNorm3d"),
        "Conv3d(4, 8, 1) + BatchNorm3d + AvgPool3d(→out)",
    ),
    "dense": (Dense("layers.1", 8), "concat, widens layers.1 by 8"),
    "dense pooled": (Dense("5", 19, pool=True), "concat, widens 5 by 19 (shortcut avg-pooled to the output size)"),
}


@pytest.mark.parametrize("form,label", LABELS.values(), ids=LABELS.keys())
def test_shortcut_labels(form, label):
    assert form.label == label


def _site(shortcut):
    return Site("a", "b", ("a", "b"), (2, 4), (2, 8), shortcut, None, None, 0)


@pytest.mark.parametrize("form,label", LABELS.values(), ids=LABELS.keys())
def test_site_kind_and_projection_follow_the_shortcut(form, label):
    site = _site(form)
    kind = {Identity: "identity", Projection: "projection", Dense: "dense"}[type(form)]
    assert (site.kind, site.projection) == (kind, None if kind == "identity" else label)
    d = site.to_dict()
    assert (d["kind"], d["projection"], d["shortcut"]["form"]) == (kind, site.projection, kind)


# ---------------------------------------------------------------------------------------------
# real plans: their records, round trips, skip codes


def test_the_cnn_plan_has_each_form(cnn_plan):
    forms = [(s.start, s.end, s.shortcut) for s in cnn_plan.sites]
    assert forms == [
        ("0", "0", Projection("conv", (3, 8), dims=2)),
        ("2", "2", Identity()),
        ("5", "5", Projection("conv", (8, 16), dims=2, stride=(2, 2), norm="BatchNorm2d")),
        ("8", "8", Projection("pool", (16, 16), dims=2, pool=True)),
        ("11", "11", Projection("conv", (16, 32), dims=2, pool=True)),
    ]
    # a 1×1 conv adds cin·cout weights (no bias); its BatchNorm 2·cout
    assert [s.added_params for s in cnn_plan.sites] == [3 * 8, 0, 8 * 16 + 2 * 16, 0, 16 * 32]
    assert [(s.start, s.code) for s in cnn_plan.skipped] == [("15", "bounded_output")]


def test_a_site_writes_its_shortcut_as_a_typed_record(cnn_plan):
    d = cnn_plan.sites[2].to_dict()
    written = {
        "form": "projection",
        "op": "conv",
        "channels": [8, 16],
        "dims": 2,
        "stride": [2, 2],
        "pool": False,
        "pool_last": False,
        "norm": "BatchNorm2d",
    }
    assert {k: d["shortcut"].get(k, "missing") for k in written} == written
    assert set(d["shortcut"]) == {"form"} | {f.name for f in dataclasses.fields(Projection)}
    assert json.loads(json.dumps(d)) == d  # lists, not tuples
    assert (d["kind"], d["projection"]) == ("projection", "Conv2d(8, 16, 1, stride=2) + BatchNorm2d")
    assert (d["in_shape"], d["out_shape"], d["layers"]) == ([2, 8, 16, 16], [2, 16, 8, 8], ["5"])


def test_the_dense_plan_widens_the_next_layer(dense_plan):
    assert [(s.start, s.shortcut) for s in dense_plan.sites] == [
        ("0", Dense("2", 3)),
        ("2", Dense("5", 11)),  # 3 + 8 channels reach layer 5
        ("5", Dense("8", 19, pool=True)),
        ("8", Dense("11", 35, pool=True)),
    ]
    # the consumer (3×3 conv) gains extra_channels × its output channels × 9 weights
    assert [s.added_params for s in dense_plan.sites] == [3 * 8 * 9, 11 * 16 * 9, 19 * 16 * 9, 35 * 32 * 9]
    assert [(s.start, s.code) for s in dense_plan.skipped] == [("11", "no_consumer"), ("15", "bounded_output")]


PLANS = ["cnn_plan", "dense_plan", "seed_plan"]


@pytest.mark.parametrize("which", PLANS)
def test_records_round_trip_through_their_dicts(request, which):
    plan = request.getfixturevalue(which)
    assert plan.sites or plan.existing
    assert [Site.from_dict(s.to_dict()) for s in plan.sites] == list(plan.sites)
    assert [Skipped.from_dict(s.to_dict()) for s in plan.skipped] == list(plan.skipped)
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("which", PLANS)
def test_a_plan_round_trips_through_json(request, which):
    plan = request.getfixturevalue(which)
    text = json.dumps(plan.to_dict())
    back = Plan.from_dict(json.loads(text))
    assert back == plan
    assert json.dumps(back.to_dict()) == text
    assert str(back) == str(plan)


def test_the_seed_plan_keeps_the_existing_shortcuts(seed_plan):
    assert [(e.kind, e.bypass) for e in seed_plan.existing] == [
        ("add", "projection"),
        ("add", "identity"),
        ("add", "projection"),
    ]
    assert seed_plan.to_dict()["existing"] == [e.to_dict() for e in seed_plan.existing]


@pytest.mark.parametrize("version", [0, None, "2"])
def test_plan_from_dict_rejects_an_unknown_schema_version(cnn_plan, version):
    d = {**cnn_plan.to_dict(), "schema_version": version}
    v = PLAN_SCHEMA_VERSION
    with pytest.raises(PlanError, match=rf"expected a plan of schema_version 1 to {v}, found {version!r}; re-create"):
        Plan.from_dict(d)


@pytest.mark.parametrize("version", [PLAN_SCHEMA_VERSION + 1, 99])
def test_a_plan_from_a_newer_release_is_refused_with_the_version_it_needs(cnn_plan, version):
    d = {**cnn_plan.to_dict(), "schema_version": version}
    v = PLAN_SCHEMA_VERSION
    with pytest.raises(PlanError, match=rf"schema_version {v} or older, found {version}: .* upgrade resify"):
        Plan.from_dict(d)


def test_a_schema_2_plan_still_reads_with_its_sites_owned_by_the_root(cnn_plan):
    d = cnn_plan.to_dict()
    d["schema_version"] = 2
    for s in d["sites"]:
        del s["owner"], s["exit_step"]
    del d["whole"]
    back = Plan.from_dict(d)
    assert [(s.owner, s.exit_step) for s in back.sites] == [("", 0)] * len(cnn_plan.sites)
    assert [s.start for s in back.sites] == [s.start for s in cnn_plan.sites]


def test_site_from_dict_rejects_an_unknown_kind(cnn_plan):
    d = cnn_plan.sites[0].to_dict()
    d["shortcut"] = {**d["shortcut"], "form": "bridge"}
    with pytest.raises(PlanError, match="expected a site of kind identity, projection or dense, found 'bridge'"):
        Site.from_dict(d)


def test_a_skipped_record_without_a_code_reads_as_unrecorded():
    assert Skipped.from_dict({"start": "a", "end": "b", "reason": "why"}) == Skipped("a", "b", "unrecorded", "why")


SKIP_PLANS = {
    "auto": ({}, {"bounded_output"}),
    "dense": ({"shortcut": "dense", "dense_max_growth": 4}, {"dense_growth", "no_consumer", "bounded_output"}),
    "identity, group 2": (
        {"shortcut": "identity", "group": 2},
        {"identity_needs_same_shape", "bounded_output", "group_remainder"},
    ),
    "exclude": ({"exclude": "0"}, {"excluded", "bounded_output"}),
}


@pytest.mark.parametrize("policy,codes", SKIP_PLANS.values(), ids=SKIP_PLANS.keys())
def test_every_skip_code_is_a_known_one(policy, codes):
    plan = resify.plan(small_cnn(), X, **policy)
    assert {s.code for s in plan.skipped} == codes
    assert codes <= set(SKIP_CODES)


def test_plan_counts_and_added_params(cnn_plan):
    # the pooled shortcut of the fourth span has no parameters: counted apart from the learned ones
    assert cnn_plan.counts() == {"identity": 1, "projection": 3, "parameter-free": 1}
    assert [s.kind for s in cnn_plan.sites].count("projection") == 4  # the JSON's kind is unchanged
    assert "5 shortcut(s) (1 identity, 3 projection, 1 parameter-free); " in cnn_plan.summary()
    assert cnn_plan.added_params == sum(s.added_params for s in cnn_plan.sites) == 24 + 160 + 512
    assert cnn_plan.to_dict()["added_params"] == cnn_plan.added_params


@pytest.mark.parametrize(
    "policy,counts",
    [
        ({"projection": "pad"}, {"identity": 1, "parameter-free": 4}),
        ({"shortcut": "dense"}, None),  # every site dense
    ],
)
def test_parameter_free_projections_are_counted_as_such(policy, counts):
    plan = resify.plan(small_cnn(), X, **policy)
    learned = [s for s in plan.sites if isinstance(s.shortcut, Projection) and s.shortcut.learned]
    assert all(s.added_params > 0 for s in learned)
    free = [s for s in plan.sites if isinstance(s.shortcut, Projection) and not s.shortcut.learned]
    assert all(s.added_params == 0 for s in free)
    if counts is None:
        counts = {"dense": len(plan.sites)}
    assert plan.counts() == counts
    assert plan.summary().startswith(
        f"{len(plan.sites)} shortcut(s) ({', '.join(f'{v} {k}' for k, v in counts.items())});"
    )


class ReadsTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.training:
            h = h * 0.5
        return self.fc2(F.relu(h))


def test_the_plan_of_a_model_that_reads_training_round_trips():
    plan = resify.plan(ReadsTraining(), torch.randn(2, 8))
    assert plan.other_mode_sites is not None
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
