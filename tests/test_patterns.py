"""The include / exclude patterns (resify/planning/patterns.py): which layers they leave out and why,
and the patterns refused: an include that matches nothing, patterns that leave out every layer."""

import pytest
import torch
from reference import ImprovedResidualNetwork

import resify
from resify.planning.patterns import pattern_reason
from resify.planning.policy import Policy


@pytest.mark.parametrize(
    "policy, name, reason",
    [
        ({"exclude": ["head*"]}, "head.fc", ("excluded", "excluded by pattern 'head*'")),
        ({"exclude": ["head*"]}, "body.0", None),
        ({"include": ["body.*"]}, "head.fc", ("excluded", "not matched by include=['body.*']")),
        ({"include": ["body.*"]}, "body.0", None),
        ({"include": ["body.*"], "exclude": ["body.0"]}, "body.0", ("excluded", "excluded by pattern 'body.0'")),
        ({}, "anything", None),
    ],
)
def test_pattern_reason(policy, name, reason):
    """Globs on the qualified name, matched whole and case-sensitively; an exclude wins over an include."""
    assert pattern_reason(name, Policy.from_kwargs(**policy)) == reason


def test_a_glob_matches_the_whole_name_and_its_case():
    policy = Policy.from_kwargs(exclude=["fc"])
    assert pattern_reason("head.fc", policy) is None and pattern_reason("FC", policy) is None
    assert pattern_reason("fc", policy) is not None


def test_a_pattern_that_matches_no_layer_lists_the_layers():
    model = ImprovedResidualNetwork([8, 8, 8], False)
    with pytest.raises(
        resify.PlanError, match=r"include pattern 'lstms\.\*' matches no layer; .*: layers\.0\.0, layers\.1\.0"
    ):
        resify.plan(model, torch.randn(2, 8), include=["lstms.*"])
    with pytest.warns(resify.ResifyWarning, match="exclude pattern 'head' matches no layer"):
        plan = resify.plan(model, torch.randn(2, 8), exclude="head")
    assert len(plan.sites) == 2


@pytest.mark.parametrize(
    "patterns, given",
    [
        ({"exclude": "*"}, r"exclude=\['\*'\]"),
        ({"exclude": ["layers.0.*", "layers.1.*"]}, r"exclude=\['layers.0.\*', 'layers.1.\*'\]"),
        ({"include": "layers.0.*", "exclude": "layers.0.0"}, r"include=\['layers.0.\*'\], exclude=\['layers.0.0'\]"),
    ],
)
def test_patterns_that_leave_out_every_layer_are_refused_with_what_to_try(patterns, given):
    model = ImprovedResidualNetwork([8, 8, 8], False)
    with pytest.raises(
        resify.PlanError,
        match=rf"^every layer was excluded \({given}\): no layer is left to put a shortcut around; the layers are: "
        r"layers\.0\.0, layers\.1\.0; exclude only some of them \(e\.g\. exclude=\['layers\.1\.\*'\]; "
        r"CLI: --exclude 'layers\.1\.\*'\), or drop the pattern$",
    ):
        resify.plan(model, torch.randn(2, 8), **patterns)
    plan = resify.plan(model, torch.randn(2, 8), exclude="layers.1.*")  # the example it gives leaves one in
    assert [s.start for s in plan.sites] == ["layers.0.0"]
