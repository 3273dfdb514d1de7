"""resify.constants: the shared choices, thresholds and schema versions, and ``image_size``."""

import typing

import pytest

import resify.constants as constants
from resify.constants import (
    ABS_EXPLODING,
    ABS_VANISHING,
    EXPLODING_RATIO,
    GATE_POLICIES,
    GATES,
    NAMESPACE,
    PROJECTIONS,
    SHORTCUTS,
    TRACERS,
    VANISHING_RATIO,
    VERDICTS,
    image_size,
)


@pytest.mark.parametrize(
    "values,expected",
    [
        (SHORTCUTS, ("auto", "identity", "dense")),
        (GATES, (None, "rezero", "layerscale")),  # None ("no gate") first
        (GATE_POLICIES, ("auto", None, "rezero", "layerscale")),  # the default first
        (TRACERS, ("symbolic", "concrete")),
        (PROJECTIONS, ("auto", "conv", "pad")),
        (VERDICTS, ("healthy", "vanishing", "exploding", "collapsing")),
    ],
)
def test_the_choice_tuples_in_their_order(values, expected):
    assert values == expected


@pytest.mark.parametrize(
    "values,literal",
    [
        (SHORTCUTS, constants.ShortcutChoice),
        (TRACERS, constants.TracerChoice),
        (PROJECTIONS, constants.ProjectionChoice),
        (VERDICTS, constants.Verdict),
    ],
)
def test_each_tuple_is_its_literal_type(values, literal):
    assert values == typing.get_args(literal)


def test_gates_are_the_gate_choices_and_none():
    assert GATES[1:] == typing.get_args(constants.GateChoice)
    assert set(GATE_POLICIES) - {None} == set(typing.get_args(constants.GatePolicy))


def test_the_verdict_thresholds_are_ordered():
    """The bands do not overlap: a ratio cannot be both vanishing and exploding."""
    assert 0 < ABS_VANISHING < VANISHING_RATIO < 1 < EXPLODING_RATIO < ABS_EXPLODING
    assert 0 < constants.COLLAPSE_SIMILARITY < 1
    assert constants.ACTIVATION_GROWTH > 1 and constants.LOSS_GROWTH > 1


def test_the_budget_defaults():
    assert 0 < constants.MAX_ADDED < 1 and constants.MIN_BUDGET == 65_536 and constants.PROJECTION_COST == 1.0


def test_schema_versions_are_positive_integers():
    for v in (constants.PLAN_SCHEMA_VERSION, constants.REPORT_SCHEMA_VERSION):
        assert isinstance(v, int) and v >= 1


def test_namespace_is_a_plain_attribute_name():
    assert NAMESPACE == "resify" and NAMESPACE.isidentifier() and "." not in NAMESPACE


@pytest.mark.parametrize(
    "name,side",
    [
        ("inception_v3", 299),
        ("inception", 299),
        ("resnet18", 224),
        ("googlenet", 224),  # an Inception v1, but torchvision builds it for 224
        ("vit_b_16", 224),
        ("my_inception_v3", 224),  # only a name that starts with it
        ("", 224),
    ],
)
def test_image_size(name, side):
    assert image_size(name) == side


def test_all_lists_names_the_module_defines():
    missing = [n for n in constants.__all__ if not hasattr(constants, n)]
    assert not missing and len(set(constants.__all__)) == len(constants.__all__)
