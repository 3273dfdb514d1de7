"""The README's examples run as written and print what the README shows.

The conventions README.md follows (this file enforces them):

- Every ```` ```python ```` block runs in a fresh interpreter (``sys.executable -c``) with the
  repository root as its working directory, and must exit 0 within ``TIMEOUT`` seconds.
- A ```` ```text ```` block that follows a python block with only blank lines between is that
  block's output: its stdout must match it (see :func:`matches`; stderr, where warnings go, is not
  compared).
- A ```` ```text ```` block whose first line is ``$ resify ...`` shows a command and its output: the
  command runs as ``python -m resify ...`` in a temporary folder whose ``examples/`` is the
  repository's (so that what it writes, such as ``out/vgg``, lands there), and its stdout must match
  the rest of the block.
- An HTML comment on the line right before a python block changes how it runs:
  ``<!-- readme-test: skip (why) -->`` skips it (a sketch that needs a GPU or a process group),
  ``<!-- readme-test: needs transformers -->`` skips it unless the named modules are installed.

Matching (:func:`matches`): trailing spaces and blank lines at either end are ignored, a run of
spaces equals any other (a column may widen), a line ``...`` stands for any number of lines, and
measured figures, numbers in scientific notation (``2.22e-01``) and ratios (``83×``, ``5.5×``),
may differ by one unit in their last printed digit: what rounding can make of float noise from
another CPU or BLAS build, in a figure printed to three digits. Everything else must be equal.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

import resify

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: seconds one block or command may take (each takes a few; the slowest, Hugging Face, about 10)
TIMEOUT = 120

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<what>skip|needs)\b\s*(?P<arg>.*?)\s*-->")
#: a figure that float noise can move: scientific notation, or a number right before "×"
_FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?e[-+]\d+|\d+(?:\.\d+)?(?=×))")


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    lang: str  # the fence's info string: "python", "text", "bash", or ""
    text: str
    line: int  # of the opening fence, from 1
    before: str  # the Markdown between the previous block and this one


@dataclass(frozen=True)
class Example:
    """A python block, the output the README shows for it (if any), and its marker (if any)."""

    code: Block
    output: Block | None
    marker: re.Match[str] | None


def blocks(markdown: str) -> list[Block]:
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
            raise ValueError(f"README.md:{i + 1}: a ``` block that is never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
        found.append(Block(lang, "\n".join(body) + "\n", i + 1, "\n".join(lines[after_previous:i])))
        i = after_previous = end + 1
    return found


def examples(markdown: str) -> list[Example]:
    """Every python block with the text block right after it and the marker right before it."""
    found = blocks(markdown)
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


def commands(markdown: str) -> list[Block]:
    """The text blocks that show a ``$ resify ...`` command and its output."""
    return [b for b in blocks(markdown) if b.lang == "text" and b.text.startswith("$ resify ")]


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


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # output to a pipe: the CLI's text is 100 columns wide there, unless COLUMNS says otherwise
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"PYTHONIOENCODING": "utf-8"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _check(shown: Block | None, result: subprocess.CompletedProcess[str], where: str) -> None:
    assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stderr[-4000:]}"
    if shown is not None:
        text = shown.text.split("\n", 1)[1] if shown.text.startswith("$ ") else shown.text
        assert matches(text, result.stdout), (
            f"{where} printed something else than README.md:{shown.line} shows; it printed:\n{result.stdout}"
        )


_EXAMPLES = examples(README.read_text(encoding="utf-8"))
_COMMANDS = commands(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("example", _EXAMPLES, ids=[f"line{e.code.line}" for e in _EXAMPLES])
def test_readme_python_block_runs_and_prints_what_the_readme_shows(example: Example) -> None:
    if example.marker and example.marker["what"] == "skip":
        pytest.skip(f"README.md:{example.code.line}: {example.marker['arg'].strip('()')}")
    if example.marker and example.marker["what"] == "needs":
        for module in example.marker["arg"].split():
            pytest.importorskip(module)
    result = _run([sys.executable, "-c", example.code.text], ROOT)
    _check(example.output, result, f"the python block at README.md:{example.code.line}")


@pytest.mark.parametrize("block", _COMMANDS, ids=[f"line{b.line}" for b in _COMMANDS])
def test_readme_resify_command_prints_what_the_readme_shows(block: Block, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    argv = shlex.split(block.text.splitlines()[0][2:])
    result = _run([sys.executable, "-m", "resify", *argv[1:]], tmp_path)
    _check(block, result, f"`{' '.join(argv)}` (README.md:{block.line})")


def test_the_main_examples_are_run_and_their_output_checked() -> None:
    """apply, the printed plan and the gradient-flow table must stay checked, not skipped."""
    checked = [e for e in _EXAMPLES if e.marker is None]
    assert any("resify.apply(" in e.code.text for e in checked)
    shown = [e for e in checked if e.output is not None]
    assert any("print(resify.plan(" in e.code.text and "resify plan for" in e.output.text for e in shown)
    assert any("resify.gradient_flow(" in e.code.text and "mean |grad|" in e.output.text for e in shown)
    assert {b.text.split()[2] for b in _COMMANDS} >= {"inspect", "convert"}


def test_every_marker_stands_right_before_a_python_block() -> None:
    """A misplaced or misspelt marker would silently do nothing."""
    text = README.read_text(encoding="utf-8")
    markers = re.findall(r"^\s*<!--\s*readme-test.*$", text, flags=re.MULTILINE)  # not those quoted in prose
    attached = [e for e in _EXAMPLES if e.marker is not None]
    assert len(markers) == len(attached)
    assert all(_MARKER.fullmatch(e.marker.group(0)) for e in attached)


def test_the_module_table_lists_every_module_of_the_package() -> None:
    """README's "How it works" names each file under resify/, and only files that exist."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| file | stage |") :].split("\n\n", 1)[0]
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
    assert sorted(files - named) == [], "modules the README's table does not list"
    assert sorted(named - files) == [], "files the README's table lists that do not exist"


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


def test_the_skip_code_table_lists_exactly_the_codes_the_planner_uses() -> None:
    from resify.sites import SKIP_CODES

    text = README.read_text(encoding="utf-8")
    table = text[text.index("| `code` | the candidate was skipped because |") :].split("\n\n", 1)[0]
    rows = table.splitlines()[2:]  # below the header and its rule
    assert [re.match(r"\| `(\w+)` \|", row).group(1) for row in rows] == list(SKIP_CODES)
