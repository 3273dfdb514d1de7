"""A representative subset of torchvision's classification zoo (the full sweep: benchmarks/zoo.py)."""

import pytest

torchvision = pytest.importorskip("torchvision")
from benchmarks.zoo import check_model  # noqa: E402  (after the skip: it imports torchvision)

# name -> is it already residual (its shortcuts must be listed in plan.existing)?
SUBSET = {
    "vgg11_bn": False,
    "alexnet": False,
    "resnet18": True,
    "mobilenet_v2": True,
    "densenet121": True,
    "googlenet": False,
    "vit_b_16": True,
    "swin_t": True,
}
# residual throughout: what is left are linear spans (patch embedding, patch merging, the
# classifier head), beside which a projection would be one more linear map, and the stem that maps
# the image into the network's width: no site (name -> a layer left out, and its code)
NO_SITE = {"vit_b_16": ("heads.head", "linear_span"), "swin_t": ("head", "linear_span"), "resnet18": ("conv1", "stem")}


@pytest.mark.parametrize("name", sorted(SUBSET))
def test_zoo_model_converts_or_is_refused_with_a_reason(name):
    row = check_model(name)
    if row["status"] == "refused":
        assert row["reason"], name
        pytest.fail(f"{name} was refused: {row['reason']}")  # none of this subset should be
    assert row["same_shape"], f"{name}: output shape changed"
    assert row["missing_grads"] == [], f"{name}: no gradient for {row['missing_grads'][:5]}"
    if name in NO_SITE:
        assert row["sites"] == 0
        assert NO_SITE[name] in [(s.start, s.code) for s in row["plan"].skipped]
    else:
        assert row["sites"] > 0
    assert row["shapes_from"] == "meta" and row["shape_mismatches"] == [], name
    if SUBSET[name]:
        assert row["existing"] > 0, f"{name} is residual but no existing shortcut was found"
    else:
        assert row["existing"] == 0, f"{name} has no shortcut, yet {row['existing']} were reported"


@pytest.mark.parametrize("name", sorted(SUBSET))
def test_zoo_model_with_preserve_output_computes_the_same_outputs(name):
    row = check_model(name, preserve_output=True)
    assert row["status"] == "converted", row.get("reason")
    assert row["max_rel_diff"] <= 1e-5, f"{name}: outputs moved by {row['max_rel_diff']:.2e} (relative)"
    assert row["missing_grads"] == [], f"{name}: no gradient for {row['missing_grads'][:5]}"


def test_an_existing_shortcut_is_named_by_the_branch_it_goes_around_not_by_its_bypass():
    import torch

    import resify

    plan = resify.plan(torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64))
    block = next(e for e in plan.existing if e.bypass == "projection")
    assert (block.start, block.end) == ("layer2.0.conv1", "layer2.0.bn2")
    assert "layer2.0.downsample.0" in block.layers  # the bypass's conv is still inside the shortcut
