"""The policy keywords (resify/planning/policy.py): one table, ``KEYWORDS`` and ``RULES``, that ``Policy``, the
CLI's flags, the docstrings of ``apply`` and ``plan`` and the README and docs tables agree with; and
``Policy.from_kwargs``' validation."""

import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

import resify
from resify.cli import cli
from resify.errors import PlanError
from resify.planning.policy import KEYWORDS, RULES, Policy, say_flag, say_keyword

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# one table


def test_policy_fields_are_the_table_in_order_with_its_defaults():
    fields = dataclasses.fields(Policy)
    assert [f.name for f in fields] == [k.name for k in KEYWORDS]
    assert [f.default for f in fields] == [k.default for k in KEYWORDS]


def test_the_docstrings_of_plan_and_apply_name_every_keyword_in_the_tables_order():
    plan_doc, apply_doc = inspect.getdoc(resify.plan), inspect.getdoc(resify.apply)
    bullets = re.findall(r"^\s*\* ``(\w+)``(?: / ``(\w+)``)?:", plan_doc, re.M)
    assert [n for pair in bullets for n in pair if n] == [k.name for k in KEYWORDS]
    named = re.findall(r"``(\w+)``", apply_doc.split("policy\nkeywords", 1)[-1].split("; see there")[0])
    assert named == [k.name for k in KEYWORDS]


def _table(path: Path, heading: str) -> list[list[str]]:
    """The rows of the first table under ``heading`` in a Markdown page, split into cells."""
    text = path.read_text().split(heading, 1)[1]
    rows = [line for line in text.split("\n\n|", 1)[0].splitlines() if line.startswith("|")]
    if not rows:
        rows = ["|" + text.split("\n\n|", 1)[1]]
        rows = [line for line in rows[0].split("\n\n", 1)[0].splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


@pytest.mark.parametrize("page,heading", [("README.md", "## The policy"), ("docs/api.md", "## The policy keywords")])
def test_the_pages_tables_list_every_keyword_in_the_tables_order(page, heading):
    rows = _table(ROOT / page, heading)
    names = [n.strip("`") for row in rows for n in row[0].split(" / ")]
    assert names == [k.name for k in KEYWORDS]


def test_the_readme_table_shows_each_keywords_default():
    rows = _table(ROOT / "README.md", "## The policy")
    shown = {n.strip("`"): row[1] for row in rows for n in row[0].split(" / ")}
    assert shown == {k.name: k.default_text for k in KEYWORDS}


def test_the_cli_has_a_flag_per_keyword_with_the_tables_help():
    out = CliRunner().invoke(cli, ["inspect", "--help"], terminal_width=400).output
    flat = " ".join(out.split())
    for entry in KEYWORDS:
        assert entry.option in out, entry.name
        assert " ".join(entry.help.split())[1:40] in flat, entry.name


@pytest.mark.parametrize("rule", RULES, ids=[" & ".join(r.keywords) for r in RULES])
def test_each_rule_is_refused_by_the_library_and_the_cli_in_its_own_words(rule, tmp_path):
    values = {k.name: rule.example.get(k.name, k.default) for k in KEYWORDS}
    assert rule.broken(values)
    with pytest.raises(PlanError) as info:
        Policy.from_kwargs(**rule.example)
    assert str(info.value) == rule.says(values, say_keyword)
    flags = []
    for name, value in rule.example.items():
        said = say_flag(name, value)
        flags += said.split(" ", 1) if " " in said else [said]
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.py"), *flags], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert " ".join(rule.says(values, say_flag).split()) in " ".join(result.output.split())


# ---------------------------------------------------------------------------------------------
# validation


POLICY_ERRORS = {
    "shortcut": ({"shortcut": "x"}, r"shortcut must be one of 'auto', 'identity', 'dense', found 'x'"),
    "dense with a gate": (
        {"shortcut": "dense", "gate": "rezero"},
        r"gate does not combine with shortcut='dense': found gate='rezero' .*; drop gate, or choose shortcut='auto'",
    ),
    "dense_max_growth without dense": (
        {"dense_max_growth": 3},
        r"dense_max_growth needs shortcut='dense': found shortcut='auto'; pass shortcut='dense' or drop dense_max_growth",
    ),
    "dense_max_growth 0": (
        {"shortcut": "dense", "dense_max_growth": 0},
        r"dense_max_growth must be a positive integer or None \(dense: .*\), found 0$",
    ),
    "dense_max_growth 2.5": (
        {"shortcut": "dense", "dense_max_growth": 2.5},
        r"dense_max_growth must be a positive integer or None \(dense: .*\), found 2\.5$",
    ),
    "preserve_output with gate_init": (
        {"preserve_output": True, "gate": "rezero", "gate_init": 0.5},
        r"preserve_output=True needs the gate to start at 1 .*: found gate_init=0\.5; drop gate_init",
    ),
    "gate": ({"gate": "foo"}, r"gate must be one of 'auto', None, 'rezero', 'layerscale', found 'foo'"),
    "group 0": ({"group": 0}, r"group must be a positive integer \(layers per shortcut\), found 0"),
    "group True": ({"group": True}, r"group must be a positive integer \(layers per shortcut\), found True"),
    "group 1.5": ({"group": 1.5}, r"group must be a positive integer \(layers per shortcut\), found 1\.5"),
    "gate_init without gate": (
        {"gate": None, "gate_init": 0.1},
        r"gate_init needs a gate: found gate_init=0\.1 with gate=None; pass gate='auto' \(the default\), gate='rezero'",
    ),
    "gate_init nan": (
        {"gate": "rezero", "gate_init": math.nan},
        r"gate_init must be a finite number or None, found nan",
    ),
    "gate_init inf": (
        {"gate": "layerscale", "gate_init": -math.inf},
        r"gate_init must be a finite number or None, found -inf",
    ),
}


@pytest.mark.parametrize("kwargs,match", POLICY_ERRORS.values(), ids=POLICY_ERRORS.keys())
def test_policy_rejects_invalid_values(kwargs, match):
    with pytest.raises(PlanError, match=match):
        Policy.from_kwargs(**kwargs)


def test_policy_rejects_unknown_keywords_listing_the_known_ones():
    with pytest.raises(PlanError, match=r"unknown policy keyword\(s\) bogus, zz; expected some of ") as info:
        Policy.from_kwargs(zz=1, bogus=2, shortcut="auto")
    listed = str(info.value).split("expected some of ")[1].split(", ")
    assert listed == sorted(f.name for f in dataclasses.fields(Policy))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gate": "rezero", "gate_init": "abc"},
        {"gate": "rezero", "gate_init": "0.5"},
        {"include": 5},
        {"shortcut": "dense", "dense_max_growth": True},
    ],
    ids=["gate_init 'abc'", "gate_init '0.5'", "include 5", "dense_max_growth True"],
)
def test_policy_rejects_values_of_the_wrong_type_with_PlanError(kwargs):
    with pytest.raises(PlanError):
        Policy.from_kwargs(**kwargs)


@pytest.mark.parametrize(
    "kwargs,fields",
    [
        ({}, {"include": (), "exclude": (), "leaf_modules": ()}),
        ({"include": "a.*", "exclude": ["b", "c"]}, {"include": ("a.*",), "exclude": ("b", "c")}),
        ({"include": None, "leaf_modules": nn.LSTM}, {"include": (), "leaf_modules": (nn.LSTM,)}),
        ({"leaf_modules": [nn.GRU, "enc.*"]}, {"leaf_modules": (nn.GRU, "enc.*")}),
    ],
)
def test_policy_makes_patterns_and_leaves_tuples(kwargs, fields):
    policy = Policy.from_kwargs(**kwargs)
    assert {k: getattr(policy, k) for k in fields} == fields


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({}, None),
        ({"gate": "rezero"}, 0.0),
        ({"gate": "layerscale"}, 1e-4),
        ({"gate": "rezero", "gate_init": 0.3}, 0.3),
        ({"gate": "layerscale", "gate_init": -2.0}, -2.0),
        ({"gate": "rezero", "preserve_output": True}, 1.0),  # the branch starts whole
        ({"gate": "layerscale", "preserve_output": True, "gate_init": 1.0}, 1.0),
        ({"preserve_output": True}, None),
    ],
)
def test_effective_gate_init(kwargs, expected):
    assert Policy.from_kwargs(**kwargs).effective_gate_init == expected


def test_policy_to_dict_writes_leaf_classes_by_name():
    d = Policy.from_kwargs(include="x.*", leaf_modules=[nn.LSTM, "enc.*"]).to_dict()
    assert (d["include"], d["exclude"], d["leaf_modules"]) == (["x.*"], [], ["LSTM", "enc.*"])
