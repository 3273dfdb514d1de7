"""resify.views.plan_table: the plan as an aligned text table (``plan_text``) and the gate paragraphs (``gate_lines``)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from reference import SEED_SIZES, ImprovedResidualNetwork
from torch import nn

import resify
from resify.tracing.units import WHOLE_CODES, WholeModule
from resify.views.plan_table import gate_lines, plan_text


@pytest.fixture(scope="module")
def seed_plan():
    torch.manual_seed(0)
    model, x = ImprovedResidualNetwork(SEED_SIZES, use_shortcut=False), torch.randn(10, 128)
    return resify.plan(model, x, gate=None)


@pytest.fixture(scope="module")
def residual_plan():
    """A net that has its shortcuts: every span is skipped as inside one."""
    torch.manual_seed(0)
    return resify.plan(ImprovedResidualNetwork([8, 8, 8, 8], use_shortcut=True), torch.randn(2, 8))


def test_the_seed_plans_table(seed_plan):
    lines = plan_text(seed_plan).splitlines()
    # 128·64+64, 64·32+32, 32·16+16, 16·8+8, 8·1+1 parameters, 11,009 in all
    assert lines[0] == "resify plan for ImprovedResidualNetwork (symbolic trace, 5 layers, 11,009 parameters)"
    assert "existing shortcuts: none" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("span "))
    assert lines[header].split() == ["span", "shape", "shortcut", "gate", "+params"]
    assert set(lines[header + 1]) <= {"-", " "}
    rows = [line.split() for line in lines[header + 2 : header + 7]]
    assert [r[0] for r in rows] == [f"layers.{i}.0" for i in range(5)]
    assert [r[-1] for r in rows] == ["8,256", "2,080", "528", "136", "9"]
    assert [r[-2] for r in rows] == ["-"] * 5  # gate=None
    shapes = [" ".join(r[1:6]) for r in rows]
    assert shapes[0] == "[10, 128] -> [10, 64]" and shapes[-1] == "[10, 8] -> [10, 1]"
    # the +params column is right-aligned
    ends = {len(line.rstrip()) for line in lines[header : header + 7]}
    assert len(ends) == 1
    shown = "forwards rewritten (5): layers.0 (1), layers.1 (1), layers.2 (1), layers.3 (1), layers.4 (1)"
    assert shown in lines
    assert lines[-1].startswith("total: ") and lines[-1] == "total: " + seed_plan.summary()
    assert not gate_lines(seed_plan, 100)  # the gates were given (none), not chosen


def test_existing_shortcuts_and_skipped_spans(residual_plan):
    text = plan_text(residual_plan)
    lines = text.splitlines()
    assert "existing shortcuts (3):" in lines and "skipped (3):" in lines
    existing = [line for line in lines if line.startswith("  add at ")]
    assert existing == [
        "  add at add over layers.0.0 (identity)",
        "  add at add_1 over layers.1.0 (identity)",
        "  add at add_2 over layers.2.0 (identity)",
    ]
    assert "no shortcut will be added" in lines and "forwards rewritten" not in text
    assert "  layers.1.0: inside the existing shortcut at 'add_1'" in lines


@pytest.mark.parametrize("width", [40, 45, 50, 55, 60, 80, 100])  # (its columns at their headers: 37)
def test_every_line_fits_the_width_and_long_lines_are_cut_with_an_ellipsis(residual_plan, seed_plan, width):
    for plan in (residual_plan, seed_plan):
        assert all(len(line) <= width for line in plan_text(plan, width).splitlines())
    narrow = plan_text(residual_plan, 30).splitlines()
    cut = [line for line in narrow if line.startswith("  layers.0.0: ")]
    assert cut == ["  layers.0.0: inside the exis…"]  # 29 characters and the ellipsis: 30


def test_width_none_is_the_terminals(residual_plan, monkeypatch):
    monkeypatch.setenv("COLUMNS", "44")
    assert max(map(len, plan_text(residual_plan, None).splitlines())) <= 44
    assert plan_text(residual_plan, None) == plan_text(residual_plan, 44)


def test_a_plan_owned_by_the_root_names_no_forwards_and_whole_modules_are_listed():
    plan = resify.plan(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4), gate=None)
    assert [s.owner for s in plan.sites] == [""]
    assert "forwards rewritten" not in plan_text(plan)
    code = WHOLE_CODES[0]
    whole = dataclasses.replace(plan, whole=(WholeModule("", code, "its reason"), WholeModule("enc", code, "other")))
    lines = plan_text(whole).splitlines()
    at = lines.index("kept whole (2): their own forwards run as they are")
    assert lines[at + 1 : at + 3] == [f"  (the model itself): {code}: its reason", f"  enc: {code}: other"]


@dataclasses.dataclass(frozen=True)
class _Reason:
    """The fields of a gate reason that ``gate_lines`` groups by, and words that show the figure it passes."""

    value: float | None
    rule: str = "compounds"
    branch: str = "plain"
    ends: str = "GELU"
    sites: int = 3
    layers: int = 3
    detail: str = ""

    def words(self, figure=None):
        return f"<{self.rule}: {figure}>"


def _site(name, gate, reason):
    return SimpleNamespace(start=name, end=name, gate=gate, gate_init=None, gate_reason=reason, owner="")


def test_gate_lines_group_sites_by_gate_and_rule_and_give_the_range_of_their_figures():
    sites = [
        _site("a", "rezero", _Reason(1.5)),
        _site("b", "rezero", _Reason(3.0)),
        _site("c", None, _Reason(2.0, rule="shallow")),
        _site("d", "rezero", _Reason(2.0)),
        _site("e", "rezero", _Reason(2.0)),
        _site("f", None, None),  # a gate given, not chosen: not in a paragraph, but counted
    ]
    lines = gate_lines(SimpleNamespace(sites=sites), 200)
    assert lines == [
        "",
        "gates chosen (gate='auto'): rezero at 4 sites, none at 2 sites",
        "  rezero at a, b, d, … (4 in all): <compounds: 1.5× to 3.0×>",
        "  none at c: <shallow: None>",  # one value: the reason's own figure (words' default)
    ]
    assert gate_lines(SimpleNamespace(sites=[_site("f", None, None)]), 100) == []


def test_gate_lines_wrap_at_the_width_with_hanging_indents():
    sites = [_site(f"layer_with_a_long_name_{i}", "rezero", _Reason(1.0)) for i in range(3)]
    lines = gate_lines(SimpleNamespace(sites=sites), 40)
    assert lines[1] == "gates chosen (gate='auto'): rezero at 3 sites"
    body = lines[2:]
    assert len(body) > 1 and body[0].startswith("  rezero at ") and all(line.startswith("    ") for line in body[1:])
    assert all(len(line) <= 40 for line in body)
