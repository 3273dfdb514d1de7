"""How reports and plans print as text and Markdown (resify/views/tables.py, and the plan's table):
every line within the width asked for, the numbers in the text written by resify.formats from the
records' own fields, Markdown tables with one column count each."""

import re

import pytest
import torch
import torch.nn as nn
from reference import LongNames

import resify
from resify.formats import fmt_number, fmt_shape, fmt_similarity, fmt_times
from resify.views.plan_table import plan_text
from resify.views.tables import comparison_markdown, comparison_text, flow_markdown, flow_text

# ---------------------------------------------------------------------------------------------
# real plans and reports: the seed network before and after resify.apply


@pytest.fixture(scope="module")
def vanishing():
    """A deep sigmoid MLP: a 'vanishing' verdict with a recommendation line in the header."""
    torch.manual_seed(0)
    layers = [m for _ in range(12) for m in (nn.Linear(16, 16), nn.Sigmoid())]
    return resify.gradient_flow(nn.Sequential(*layers, nn.Linear(16, 1)), torch.randn(8, 16))


def _wide(reason):
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


WIDTHS = [
    ("plan", 60, ()),
    ("plan", 80, ()),
    ("plan", 100, ()),
    ("before", 60, ()),
    ("before", 80, ()),
    ("before", 100, ()),
    ("after", 60, ()),
    ("after", 80, ()),
    ("after", 100, ()),
    ("vanishing", 60, ()),
    ("vanishing", 80, ()),
    ("vanishing", 100, ()),
    ("comparison", 60, ()),
    ("comparison", 80, ()),
    ("comparison", 100, ()),
]


def _text(record, width):
    if isinstance(record, resify.Plan):
        return plan_text(record, width)
    if isinstance(record, resify.GradientFlow):
        return flow_text(record, width)
    return comparison_text(record, width)


@pytest.mark.parametrize("which,width", [pytest.param(w, n, marks=m, id=f"{w}-{n}") for w, n, m in WIDTHS])
def test_every_line_fits_the_width(request, seed_reports, which, width):
    record = request.getfixturevalue("vanishing") if which == "vanishing" else seed_reports[which]
    lines = _text(record, width).splitlines()
    assert len(lines) > 5
    assert [line for line in lines if len(line) > width] == []


def _rows(text, header_start):
    """The cells of the table whose header line starts with ``header_start``: lines after its dashes."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    assert set(lines[i + 1].replace(" ", "")) == {"-"}
    rows = []
    for line in lines[i + 2 :]:
        if not line.strip() or set(line.replace(" ", "")) == {"-"} or line.startswith("+ added"):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def _unwrapped(text):
    return text.replace("\n  ", " ")


@pytest.mark.parametrize("which", ["before", "after"])
def test_flow_text_writes_each_records_numbers(seed_reports, which):
    flow = seed_reports[which]
    text = flow_text(flow, 120)  # wide enough for every column
    rows = _rows(text, "#  layer")
    assert [
        [
            str(r.depth),
            ("+" if r.added else "") + r.name,
            r.kind,
            *map(fmt_number, (r.mean_abs_grad, r.grad_norm, r.grad_to_weight, r.input_grad_norm, r.activation_rms)),
            fmt_similarity(r.activation_similarity),
            r.verdict,
        ]
        for r in flow.layers
    ] == rows
    assert f"loss mse to zeros = {fmt_number(flow.loss_value)}, 1 batch" in _unwrapped(text)
    assert f"verdict: {flow.verdict}, {flow.reason}" in _unwrapped(text)
    assert text.endswith("+ added by resify") == any(r.added for r in flow.layers)


def test_the_flow_tables_have_every_layer_of_the_model(seed_reports):
    """Independent of the renderer: the seed's five Linear layers, and after apply a projection per layer."""
    names = ["layers.0.0", "layers.1.0", "layers.2.0", "layers.3.0", "layers.4.0"]
    assert [row[1] for row in _rows(flow_text(seed_reports["before"], 100), "#  layer")] == names
    after = [row[1] for row in _rows(flow_text(seed_reports["after"], 100), "#  layer")]
    assert after == [n for name in names for n in (name, f"+{name.rsplit('.', 1)[0]}.resify.0.proj")]


def test_comparison_text_writes_each_changes_numbers(seed_reports):
    c = seed_reports["comparison"]
    text = comparison_text(c, 100)
    assert text.splitlines()[:2] == [
        "gradient flow: ImprovedResidualNetwork → ImprovedResidualNetwork",
        c.headline,
    ]
    assert _rows(text, "layer       kind") == [
        [
            ch.name,
            ch.after.kind,
            fmt_number(ch.before.mean_abs_grad),
            fmt_number(ch.after.mean_abs_grad),
            fmt_times(ch.ratio),
            fmt_number(ch.before.input_grad_norm),
            fmt_number(ch.after.input_grad_norm),
            fmt_times(ch.input_ratio),
        ]
        for ch in c.layers
    ]
    added = text[text.index(f"added by resify ({len(c.added)}):") :]
    assert _rows(added, "layer ") == [
        [r.name, r.kind, fmt_number(r.mean_abs_grad), fmt_number(r.grad_norm), fmt_number(r.input_grad_norm)]
        for r in c.added
    ]
    assert len(c.added) == 5


def test_comparison_text_centres_each_group_label_over_its_columns(seed_reports):
    lines = comparison_text(seed_reports["comparison"], 100).splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("layer "))
    group, header = lines[i - 1], lines[i]
    for label, first in (("mean |grad| of weight", 2), ("‖input grad‖", 5)):
        starts = [m.start() for m in re.finditer(r"\S+", lines[i + 1])]  # the dashes of each column
        ends = [m.end() for m in re.finditer(r"\S+", lines[i + 1])]
        lo, hi = starts[first], ends[first + 2]
        at = group.index(label)
        assert lo <= at and at + len(label) <= hi
        assert abs((at - lo) - (hi - at - len(label))) <= 1
    assert header.split() == ["layer", "kind", "before", "after", "×", "before", "after", "×"]


def test_plan_text_writes_each_sites_numbers(seed_reports):
    plan = seed_reports["plan"]
    text = plan_text(plan, 100)
    rows = _rows(text, "span")
    assert rows == [
        [
            s.start,
            f"{fmt_shape(s.in_shape)} -> {fmt_shape(s.out_shape)}",
            s.projection,
            "-",
            f"{s.added_params:,}",
        ]
        for s in plan.sites
    ]
    # Linear(n, m) adds n·m + m: written with thousands separators
    assert [r[4] for r in rows] == ["8,256", "2,080", "528", "136", "9"]
    assert [r[2] for r in rows] == [
        "Linear(128, 64)",
        "Linear(64, 32)",
        "Linear(32, 16)",
        "Linear(16, 8)",
        "Linear(8, 1)",
    ]
    assert (
        text.splitlines()[0] == "resify plan for ImprovedResidualNetwork (symbolic trace, 5 layers, 11,009 parameters)"
    )
    assert text.splitlines()[-1] == "total: " + plan.summary()


@pytest.fixture(scope="module")
def long_plan():
    torch.manual_seed(0)
    return resify.plan(LongNames(), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("width", [80, 100, 128, 129, 200])
def test_names_and_labels_are_cut_only_where_the_width_forces_it(long_plan, width):
    whole = _rows(plan_text(long_plan, 10_000), "span")
    needed = len(plan_text(long_plan, 10_000).splitlines()[4])  # the header row of the table, unwrapped
    assert needed == 129 and whole[1][0] == "feature_extraction_stages.1.residual_block_body.0"
    text = plan_text(long_plan, width)
    assert max(map(len, text.splitlines())) <= width
    rows = _rows(text, "span")
    if width >= needed:
        assert rows == whole and "…" not in text
    else:
        assert rows != whole and all(r[0].startswith("…") for r in rows)


def test_plan_to_text_takes_the_terminals_width_and_str_stays_at_100(long_plan, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert long_plan.to_text() == plan_text(long_plan, 200) == long_plan.to_text(200)
    assert "feature_extraction_stages.1.residual_block_body.0  " in long_plan.to_text()
    assert str(long_plan) == plan_text(long_plan, 100) == long_plan.to_text(100)
    monkeypatch.setenv("COLUMNS", "80")
    assert long_plan.to_text() == plan_text(long_plan, 80) != str(long_plan)


def test_a_narrow_plan_cuts_the_shortcut_label_at_its_end(seed_reports):
    rows = _rows(plan_text(seed_reports["plan"], 50), "span")
    assert [r[2] for r in rows] == ["Linear(…", "Linear(…", "Linear(…", "Linear(…", "Linear(…"]


# ---------------------------------------------------------------------------------------------
# Markdown


def _tables(md):
    """Blocks of consecutive '|' lines, each row as its cells (escaped pipes kept inside a cell)."""
    blocks, cur = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif cur:
            blocks.append(cur)
            cur = []
    return blocks


@pytest.mark.parametrize(
    "which,columns",
    [("before", [10]), ("after", [10]), ("comparison", [8, 5]), ("vanishing", [10])],
)
def test_markdown_tables_have_one_column_count(request, seed_reports, which, columns):
    record = request.getfixturevalue("vanishing") if which == "vanishing" else seed_reports[which]
    md = comparison_markdown(record) if which == "comparison" else flow_markdown(record)
    tables = _tables(md)
    assert [len(t[0]) for t in tables] == columns
    for t in tables:
        assert {len(row) for row in t} == {len(t[0])}
        assert all(re.fullmatch(r":?-{3}:?", cell) for cell in t[1])


def test_flow_markdown_writes_each_records_numbers(seed_reports):
    flow = seed_reports["after"]
    (rows,) = _tables(flow_markdown(flow))
    assert rows[2:] == [
        [
            str(r.depth),
            f"`{r.name}`" + (" *added*" if r.added else ""),
            r.kind,
            *map(fmt_number, (r.mean_abs_grad, r.grad_norm, r.grad_to_weight, r.input_grad_norm, r.activation_rms)),
            fmt_similarity(r.activation_similarity),
            r.verdict,
        ]
        for r in flow.layers
    ]


def test_comparison_markdown_writes_each_changes_numbers(seed_reports):
    c = seed_reports["comparison"]
    changes, added = _tables(comparison_markdown(c))
    assert changes[2:] == [
        [
            f"`{ch.name}`",
            ch.after.kind,
            fmt_number(ch.before.mean_abs_grad),
            fmt_number(ch.after.mean_abs_grad),
            fmt_times(ch.ratio),
            fmt_number(ch.before.input_grad_norm),
            fmt_number(ch.after.input_grad_norm),
            fmt_times(ch.input_ratio),
        ]
        for ch in c.layers
    ]
    assert [row[0] for row in added[2:]] == [f"`{r.name}`" for r in c.added]
