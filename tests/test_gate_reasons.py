"""Why gate='auto' chose a site's gate, in words (resify/planning/gate_reasons.py): every rule has its
sentence, each with the figures it read and the limits it compared them with."""

import pytest

from resify.constants import AUTO_GROWTH, AUTO_OUTWEIGHS, AUTO_SHRINK, DEEP_LAYERS
from resify.planning.gate_reasons import GATE_RULES, GateReason


def test_every_rule_has_words():
    for rule in GATE_RULES:
        text = GateReason(rule, "plain", "ReLU", 3.0, 4, 40, "why").text
        assert text and "?" not in text and "None" not in text


def test_outweighs_names_the_branch_the_figure_and_the_limit():
    text = GateReason("outweighs", "norm", "LayerNorm", 9.5).text
    assert text.startswith("the branch (LayerNorm) outweighs its shortcut")
    assert "9.5×" in text and f"more than {AUTO_OUTWEIGHS:g}×" in text and text.endswith("the gate starts at 0")


@pytest.mark.parametrize("rule", ["compounds", "shallow"])
def test_the_depth_rules_give_the_product_and_the_rate_a_site(rule):
    # 16 sites that together grow the mean square 65536×: 2× a site (65536 ** (1 / 16))
    text = GateReason(rule, "plain", "ReLU", 65536.0, 16, 40).text
    assert "16 sites whose branches no norm ends" in text and "in 40 layers" in text
    assert "65,536×, 2.0× a site" in text and f"{AUTO_GROWTH:g}×" in text and f"{DEEP_LAYERS} layers" in text


def test_a_range_replaces_the_figure_where_sites_are_grouped():
    assert "3.0× to 5.8×" in GateReason("outweighs", "plain", "ReLU", 4.0).words("3.0× to 5.8×")


def test_rule_4_says_where_the_gate_starts_and_why():
    at_zero = GateReason("outweighs", "plain", "ReLU", 9.0)
    assert at_zero.starts == "the gate starts at 0"
    raised = GateReason("outweighs", "plain", "ReLU", 9.0, start=0.44, shrunk=0.0025)
    assert raised.starts.startswith("the gate starts at 0.44:")
    assert "0.0025×" in raised.starts and f"below 1/{AUTO_SHRINK:g}" in raised.starts


def test_unmeasured_says_why_and_what_decided():
    text = GateReason("unmeasured", "plain", "ReLU", layers=12, detail="meta tensors").text
    assert text.startswith("not measured (meta tensors)") and "(12 layers)" in text
