"""HTML views (resify/views/html.py, resify/views/chart.py): notebook fragments and pages are valid, self-contained
HTML, and every figure in them is the one the text rendering prints."""

import html
import re
from dataclasses import replace
from html.parser import HTMLParser

import pytest
import torch
from reference import ImprovedResidualNetwork

import resify
from resify.views.html import report_page

SEED_SIZES = [128, 64, 32, 16, 8, 1]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Checker(HTMLParser):
    """Every element closed in order (SVG's self-closed elements too); the tables' cells collected."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}  # by the class of the <div> around the table
        self._where: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "div":
            self._where.append(dict(attrs).get("class", ""))
        if tag == "tr":
            self.tables.setdefault(next((w for w in reversed(self._where) if w != "scroll"), ""), []).append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag == "div":
            self._where.pop()
        if tag in ("td", "th") and self._cell is not None:
            table = next(w for w in reversed(self._where) if w != "scroll")
            self.tables[table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def check(markup: str) -> _Checker:
    checker = _Checker()
    checker.feed(markup)
    checker.close()
    assert checker.problems == [] and checker.stack == [], (checker.problems, checker.stack)
    return checker


def text_rows(text: str, header_start: str) -> list[list[str]]:
    """The rows of the aligned text table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    width = len(re.split(r"\s{2,}", lines[start + 1].strip()))  # the dashes under the header: one run a column
    rows = []
    for line in lines[start + 2 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != width:  # the blank line or the note ("+ added by resify") after the table
            break
        rows.append(cells)
    return rows


@pytest.fixture(scope="module")
def seed():
    """The README's seed example: the plan and the comparison of the seed network, seeded alike."""
    torch.manual_seed(123)
    model = ImprovedResidualNetwork(SEED_SIZES, use_shortcut=False)
    x = torch.randn(10, 128)
    converted = resify.apply(model, x)
    return resify.applied_plan(converted), resify.compare(
        resify.gradient_flow(model, x), resify.gradient_flow(converted, x)
    )


def test_the_notebook_views_are_valid_html_scoped_to_one_element(seed):
    plan, comparison = seed
    for record in (plan, comparison, comparison.before, comparison.after):
        fragment = record._repr_html_()
        assert fragment.startswith('<div class="resify-view"><style>') and fragment.endswith("</div>")
        check(fragment)
        style = fragment[fragment.index("<style>") + 7 : fragment.index("</style>")]
        selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{", style) for s in rule.split(",")]
        assert all(s.startswith((".resify-view", ".resify-page")) for s in selectors if not s.startswith("@")), (
            selectors
        )
        assert "<script" not in fragment


def test_the_plan_in_html_has_the_text_tables_figures(seed):
    plan, _ = seed
    found = check(plan._repr_html_()).tables
    sites = [row[:5] for row in found["sites"][1:]]
    assert sites == text_rows(str(plan), "span ")
    assert [row[5] for row in found["sites"][1:]] == ["projection"] * 5  # how the diagram draws each
    assert plan.summary() in plan._repr_html_() and "existing shortcuts: none" in plan._repr_html_()


def test_a_comparison_in_html_has_the_text_tables_figures(seed):
    _, comparison = seed
    markup = comparison._repr_html_()
    found = check(markup).tables
    text = comparison.to_text(width=200)
    assert found["layers"][1:] == text_rows(text, "layer ")
    added = text[text.index("added by resify") :]
    assert found["added"][1:] == text_rows(added, "layer ")
    for line in (comparison.headline, comparison.before.reason, comparison.after.reason):
        assert html.escape(line, quote=False) in markup
    assert "83×" in comparison.headline and found["layers"][1][:5] == [
        "layers.0.0",
        "Linear",
        "1.20e-05",
        "9.95e-04",
        "83×",
    ]


def test_one_report_in_html_has_the_text_tables_figures(seed):
    _, comparison = seed
    flow = comparison.after
    found = check(flow._repr_html_()).tables
    assert found["flow"][1:] == text_rows(flow.to_text(width=250), "#  ")
    assert html.escape(flow.reason, quote=False) in flow._repr_html_()


def test_the_chart_plots_the_figure_the_verdict_is_judged_on(seed):
    _, comparison = seed
    markup = comparison._repr_html_()
    chart = markup[markup.index('<svg class="resify-chart"') : markup.index("</svg>", markup.index("resify-chart"))]
    tips = re.findall(r"<title>((?:before|after): layers\.\d\.0): ([^<]+)</title>", chart)
    before = comparison.before.layers
    last = before[-1].input_grad_norm
    assert tips[0] == ("before: layers.0.0", resify.formats.fmt_number(before[0].input_grad_norm / last))
    assert len(tips) == 10 and tips[0][1] == "7.94e-03"  # the README's first/last ratio, per layer
    assert chart.count('class="series"') == 2


def test_pages_are_self_contained(seed):
    plan, comparison = seed
    info = {
        "class": "ImprovedResidualNetwork",
        "source": "seed",
        "parameters_after": 22018,
        "example_input": [[10, 128]],
    }
    for page in (
        plan.to_html(),
        comparison.to_html(),
        comparison.before.to_html(),
        report_page(info, plan, comparison),
    ):
        assert page.startswith("<!DOCTYPE html>\n") and '<meta charset="utf-8">' in page
        check(page)
        assert not re.search(r"\b(src|href)=|url\(|@import|<script|<link|<iframe", page)  # nothing to fetch


def test_the_report_page_holds_the_model_the_diagram_the_plan_and_both_flows(seed):
    plan, comparison = seed
    info = {"class": "ImprovedResidualNetwork", "source": "examples/seed_mlp.py:model", "parameters_after": 22018}
    page = report_page({**info, "example_input": [[10, 128]], "resify_version": resify.__version__}, plan, comparison)
    for part in ('id="architecture"', 'class="resify-diagram"', 'id="plan"', 'id="gradient-flow"', "resify-chart"):
        assert part in page
    assert "11,009 → 22,018" in page and "examples/seed_mlp.py:model" in page and comparison.headline in page
    assert page.count('class="arc site projection"') == 5
    # the diagram's tooltips carry each layer's gradient before → after, as the table prints it
    assert "mean |grad| 1.20e-05 → 9.95e-04 (83×)" in page
    without = report_page({**info, "example_input": [[10, 128]]}, plan, None)
    assert 'id="gradient-flow"' not in without and "resify-chart" not in without


def test_text_from_the_model_is_escaped(seed):
    plan, comparison = seed
    odd = replace(plan, model_class="<img src=x onerror=alert(1)>", notes=("a & b <i>",))
    markup = odd.to_html()
    assert "<img" not in markup and "&lt;img src=x onerror=alert(1)&gt;" in markup and "a &amp; b &lt;i&gt;" in markup
    check(markup)
    flow = replace(comparison.before, reason="x < y & z")
    assert "x &lt; y &amp; z" in flow.to_html()


def test_a_plan_without_sites_or_a_model_without_layers_still_renders():
    model = torch.nn.Sequential(torch.nn.ReLU())
    plan = resify.plan(model, torch.randn(2, 3))
    markup = plan._repr_html_()
    check(markup)
    assert "no shortcut will be added" in markup and plan.n_layers == 0
