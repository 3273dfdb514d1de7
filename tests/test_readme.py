"""The documentation's examples run as written and print what the pages show.

The pages are README.md, CONTRIBUTING.md and every docs/*.md (``PAGES``); each example is a test,
named by its page and line (``docs/api.md:42``). The conventions they follow (this file enforces
them):

- Every ```` ```python ```` block runs in a fresh interpreter (``sys.executable -c``) with the
  repository root as its working directory, and must exit 0 within ``TIMEOUT`` seconds. Its
  ``tempfile.gettempdir()`` is a folder of this test session's own (``TMPDIR``), removed at its end.
- A ```` ```text ```` block that follows a python block with only blank lines between is that
  block's output: its stdout must match it (see :func:`matches`; stderr, where warnings go, is not
  compared).
- A ```` ```text ```` block whose first line is ``$ resify ...`` shows commands and their output:
  each ``$ resify ...`` line runs, in turn, as ``python -m resify ...`` in one temporary folder
  whose ``examples/`` is the repository's (so that what a command writes, such as ``out/vgg``,
  lands there, for the next command of the block to read); each must exit 0 and print what the
  block shows between its line and the next ``$`` line.
- An HTML comment on the line right before a python block changes how it runs:
  ``<!-- readme-test: skip (why) -->`` skips it (a sketch that needs a GPU or a process group),
  ``<!-- readme-test: needs transformers -->`` skips it unless the named modules are installed,
  ``<!-- readme-test: continues (why) -->`` says that it reads what a block above it wrote (a
  checkpoint in a temporary folder, loaded in a new process): the nearest python block above it
  without that marker runs first, unless it has already passed in this session.
- A relative link to a file must name one that exists, and a ``#fragment`` a heading of that page.

Matching (:func:`matches`): trailing spaces and blank lines at either end are ignored, a run of
spaces equals any other (a column may widen), a line ``...`` stands for any number of lines, and
measured figures, numbers in scientific notation (``2.22e-01``) and ratios (``83×``, ``5.5×``),
may differ by one unit in their last printed digit: what rounding can make of float noise from
another CPU or BLAS build, in a figure printed to three digits. Everything else must be equal.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

import resify

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: every page whose examples are tested, README first
PAGES = [README, *[p for p in [ROOT / "CONTRIBUTING.md"] if p.exists()], *sorted(DOCS.glob("*.md"))]
#: seconds one block or command may take (each takes a few; the slowest, Hugging Face, about 10)
TIMEOUT = 120

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<what>skip|needs|continues)\b\s*(?P<arg>.*?)\s*-->")
#: a figure that float noise can move: scientific notation, or a number right before "×"
_FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?e[-+]\d+|\d+(?:\.\d+)?(?=×))")
#: a Markdown link or image: [text](target) — not inside a code span (those are removed first)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    lang: str  # the fence's info string: "python", "text", "bash", or ""
    text: str
    line: int  # of the opening fence, from 1
    before: str  # the Markdown between the previous block and this one
    page: str = "README.md"  # relative to the repository root

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Example:
    """A python block, the output the page shows for it (if any), and its marker (if any)."""

    code: Block
    output: Block | None
    marker: re.Match[str] | None


def blocks(markdown: str, page: str = "README.md") -> list[Block]:
    """The fenced blocks of ``markdown``, in order (a fence may be indented, as in a list item)."""
    lines = markdown.splitlines()
    found: list[Block] = []
    i, after_previous = 0, 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: a ``` block that is never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
        found.append(Block(lang, "\n".join(body) + "\n", i + 1, "\n".join(lines[after_previous:i]), page))
        i = after_previous = end + 1
    return found


def examples(markdown: str, page: str = "README.md") -> list[Example]:
    """Every python block with the text block right after it and the marker right before it."""
    found = blocks(markdown, page)
    result = []
    for k, block in enumerate(found):
        if block.lang != "python":
            continue
        nxt = found[k + 1] if k + 1 < len(found) else None
        output = nxt if nxt and nxt.lang == "text" and not nxt.before.strip() else None
        preceding = [line for line in block.before.splitlines() if line.strip()]
        marker = _MARKER.fullmatch(preceding[-1].strip()) if preceding else None
        result.append(Example(block, output, marker))
    return result


def commands(markdown: str, page: str = "README.md") -> list[Block]:
    """The text blocks that show ``$ resify ...`` commands and their output."""
    return [b for b in blocks(markdown, page) if b.lang == "text" and b.text.startswith("$ resify ")]


def steps(block: Block) -> list[tuple[str, str]]:
    """A command block's commands, each with the output shown under it (up to the next ``$`` line)."""
    found: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            found.append((line[2:], []))
        else:
            found[-1][1].append(line)
    return [(command, "\n".join(shown) + "\n") for command, shown in found]


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _same_figure(shown: str, actual: str) -> bool:
    """Equal but for one unit in the last digit ``shown`` prints (8.28e-02 matches 8.27e-02)."""
    a, b = Decimal(shown), Decimal(actual)
    exponent = a.as_tuple().exponent
    assert isinstance(exponent, int)
    return abs(a - b) <= Decimal(1).scaleb(exponent)


def _same_line(shown: str, actual: str) -> bool:
    s, a = _FIGURE.split(shown), _FIGURE.split(actual)  # text, figure, text, figure, …, text
    if len(s) != len(a):
        return False
    for k, (x, y) in enumerate(zip(s, a)):
        if k % 2 and not _same_figure(x, y):
            return False
        if not k % 2 and re.sub(" +", " ", x) != re.sub(" +", " ", y):
            return False
    return True


def matches(shown: str, actual: str) -> bool:
    """Whether ``actual`` is the output ``shown`` (the rules are in the module's docstring)."""
    want, got = _lines(shown), _lines(actual)
    segments: list[list[str]] = [[]]
    for line in want:
        if line.strip() == "...":
            segments.append([])
        else:
            segments[-1].append(line)

    def at(pos: int, segment: list[str]) -> bool:
        return pos + len(segment) <= len(got) and all(_same_line(w, g) for w, g in zip(segment, got[pos:]))

    if len(segments) == 1:
        return len(want) == len(got) and at(0, want)
    first, *middle, last = segments
    if not at(0, first):
        return False
    pos = len(first)
    for segment in middle:  # each at its first place after the previous: that leaves the most room
        pos = next((p for p in range(pos, len(got) - len(segment) + 1) if at(p, segment)), -1)
        if pos < 0:
            return False
        pos += len(segment)
    return len(got) - len(last) >= pos and at(len(got) - len(last), last)


#: the blocks' temporary folder: a session's own, so that two sessions never read each other's files
_TMP = tempfile.mkdtemp(prefix="resify-docs-")
atexit.register(shutil.rmtree, _TMP, True)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # output to a pipe: the CLI's text is 100 columns wide there, unless COLUMNS says otherwise
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"PYTHONIOENCODING": "utf-8", "TMPDIR": _TMP}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _check(shown: str | None, result: subprocess.CompletedProcess[str], where: str) -> None:
    assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stderr[-4000:]}"
    if shown is not None:
        assert matches(shown, result.stdout), (
            f"{where} printed something else than the page shows; it printed:\n{result.stdout}"
        )


def _read(page: Path) -> str:
    return page.read_text(encoding="utf-8")


_EXAMPLES = [e for page in PAGES for e in examples(_read(page), _name(page))]
_COMMANDS = [b for page in PAGES for b in commands(_read(page), _name(page))]
#: the blocks that ran and printed what their page shows, in this session
_PASSED: set[str] = set()


def _continued(example: Example) -> Example:
    """The block a ``continues`` block reads from: the nearest one above it without that marker."""
    above = [e for e in _EXAMPLES if e.code.page == example.code.page and e.code.line < example.code.line]
    head = next((e for e in reversed(above) if not (e.marker and e.marker["what"] == "continues")), None)
    assert head is not None, f"{example.code.where}: a continues block with no block above it"
    return head


def _run_example(example: Example) -> None:
    if example.marker and example.marker["what"] == "continues":
        head = _continued(example)
        if head.code.where not in _PASSED:
            _run_example(head)
    result = _run([sys.executable, "-c", example.code.text], ROOT)
    where = f"the python block at {example.code.where}"
    _check(example.output.text if example.output else None, result, where)
    _PASSED.add(example.code.where)


@pytest.mark.parametrize("example", _EXAMPLES, ids=[e.code.where for e in _EXAMPLES])
def test_python_block_runs_and_prints_what_the_page_shows(example: Example) -> None:
    if example.marker and example.marker["what"] == "skip":
        pytest.skip(f"{example.code.where}: {example.marker['arg'].strip('()')}")
    if example.marker and example.marker["what"] == "needs":
        for module in example.marker["arg"].split():
            pytest.importorskip(module)
    _run_example(example)


@pytest.mark.parametrize("block", _COMMANDS, ids=[b.where for b in _COMMANDS])
def test_resify_commands_print_what_the_page_shows(block: Block, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    for command, shown in steps(block):
        argv = shlex.split(command)
        assert argv[0] == "resify", f"{block.where}: a command block runs resify only, found {command!r}"
        result = _run([sys.executable, "-m", "resify", *argv[1:]], tmp_path)
        _check(shown, result, f"`{command}` ({block.where})")


def test_the_main_examples_are_run_and_their_output_checked() -> None:
    """apply and the printed plan in the README, the gradient-flow table, saving and loading, and the
    two commands must stay checked, not skipped."""
    checked = [e for e in _EXAMPLES if e.marker is None or e.marker["what"] == "continues"]
    shown = [e for e in checked if e.output is not None]
    readme = [e for e in shown if e.code.page == "README.md"]
    assert any("resify.apply(" in e.code.text for e in readme)
    assert any("print(resify.plan(" in e.code.text and "resify plan for" in e.output.text for e in readme)
    assert any(b.page == "README.md" for b in _COMMANDS)
    assert any("resify.gradient_flow(" in e.code.text and "mean |grad|" in e.output.text for e in shown)
    saving = [e.code.text for e in shown if e.code.page == "docs/saving.md"]
    assert any("resify.save(" in t for t in saving) and any("resify.load(" in t for t in saving)
    assert {shlex.split(line[2:])[1] for b in _COMMANDS for line in b.text.splitlines() if line.startswith("$ ")} >= {
        "inspect",
        "convert",
    }


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_marker_stands_right_before_a_python_block(page: Path) -> None:
    """A misplaced or misspelt marker would silently do nothing."""
    markers = re.findall(r"^\s*<!--\s*readme-test.*$", _read(page), flags=re.MULTILINE)  # not those quoted in prose
    attached = [e for e in examples(_read(page), _name(page)) if e.marker is not None]
    assert len(markers) == len(attached)
    assert all(_MARKER.fullmatch(e.marker.group(0)) for e in attached)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _prose(markdown: str) -> str:
    """``markdown`` without its fenced blocks (the lines inside them blanked)."""
    lines = markdown.splitlines()
    inside = False
    for i, line in enumerate(lines):
        fence = _FENCE.match(line) if not inside else line.strip() == "```"
        if fence or inside:
            lines[i] = ""
        if fence:
            inside = not inside
    return "\n".join(lines)


def _anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    for line in _prose(markdown).splitlines():
        if re.match(r"#+ ", line):
            base = _slug(line.lstrip("#"))
            slug, n = base, 1
            while slug in found:  # GitHub numbers repeated headings
                slug, n = f"{base}-{n}", n + 1
            found.add(slug)
    return found


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_points_to_a_file_and_a_heading_that_exist(page: Path) -> None:
    prose = re.sub(r"`+[^`\n]*`+", "", _prose(_read(page)))  # code spans are not links
    broken = []
    for target in _LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif fragment and file.suffix == ".md" and fragment not in _anchors(_read(file)):
            broken.append(f"{target} (no heading #{fragment} in {_name(file)})")
    assert broken == [], f"{_name(page)}: broken links"


def _table(page: Path, header: str) -> str:
    text = _read(page)
    return text[text.index(header) :].split("\n\n", 1)[0]


def test_the_module_table_lists_every_module_of_the_package() -> None:
    """docs/how-it-works.md names each file under resify/, and only files that exist."""
    table = _table(DOCS / "how-it-works.md", "| file | stage |")
    named = set(re.findall(r"`(resify/[\w/]+\.py)`", table))
    for folder in re.findall(r"`(resify/\w+)/`", table):  # a package: its modules named in the row
        row = next(line for line in table.splitlines() if f"`{folder}/`" in line)
        named |= {f"{folder}/{name}" for name in re.findall(r"`(\w+\.py)`", row)}
    package = Path(resify.__file__).resolve().parent  # the package under test: installed or in the work tree
    files = {
        "resify/" + p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert sorted(files - named) == [], "modules the table in docs/how-it-works.md does not list"
    assert sorted(named - files) == [], "files the table in docs/how-it-works.md lists that do not exist"


@pytest.mark.parametrize(
    "shown, actual, expected",
    [
        ("a  1.20e-05  83×\n", "a 1.20e-05    83×\n", True),  # spaces: a column may widen
        ("x 1.20e-05\n", "x 1.21e-05\n", True),  # one unit in the last digit
        ("x 1.20e-05\n", "x 1.22e-05\n", False),
        ("x 9.99e-04\n", "x 1.00e-03\n", True),  # rounding over a decade
        ("first layer: 83× more\n", "first layer: 84× more\n", True),
        ("first layer: 83× more\n", "first layer: 85× more\n", False),
        ("+11,009 parameters\n", "+11,010 parameters\n", False),  # counts are exact
        ("layers.0.0\n", "layers.0.1\n", False),
        ("a\n...\nd\n", "a\nb\nc\nd\n", True),
        ("a\n...\nd\n", "a\nb\nc\n", False),
        ("a\n...\nc\n...\n", "a\nb\nc\nd\n", True),
        ("a\nb\n", "a\nb\nc\n", False),  # without "...", nothing may follow
        ("\na\n\n", "a\n", True),
    ],
)
def test_matches(shown: str, actual: str, expected: bool) -> None:
    assert matches(shown, actual) is expected


def test_a_command_block_is_split_into_its_commands() -> None:
    block = Block("text", "$ resify convert m.py -o out\nwrote out\n$ resify inspect m.py\nplan\n...\n", 1, "")
    assert steps(block) == [("resify convert m.py -o out", "wrote out\n"), ("resify inspect m.py", "plan\n...\n")]


@pytest.mark.parametrize(
    "heading, slug",
    [
        ("The API", "the-api"),
        ("Quick start: two commands", "quick-start-two-commands"),
        ("`resify.watch`: gradient flow while training", "resifywatch-gradient-flow-while-training"),
        ("Gates, groups, dense, preserve_output", "gates-groups-dense-preserve_output"),
    ],
)
def test_slug(heading: str, slug: str) -> None:
    assert _slug(heading) == slug


def _codes_in_table(page: Path, header: str) -> list[str]:
    rows = _table(page, header).splitlines()[2:]  # below the header and its rule
    return [re.match(r"\| `(\w+)` \|", row).group(1) for row in rows]


def test_the_skip_code_table_lists_exactly_the_codes_the_planner_uses() -> None:
    from resify.planning.sites import SKIP_CODES

    assert _codes_in_table(DOCS / "api.md", "| `code` | the candidate was skipped because |") == list(SKIP_CODES)


def test_the_kept_whole_table_lists_exactly_the_codes_resify_uses() -> None:
    assert _codes_in_table(DOCS / "api.md", "| `code` | the module was kept whole because |") == list(
        resify.WHOLE_CODES
    )


def test_the_gate_rule_table_lists_exactly_the_rules_gate_auto_uses() -> None:
    from resify.planning.sites import GATE_RULES

    assert _codes_in_table(DOCS / "api.md", "| `rule` | the site gets | because |") == list(GATE_RULES)
