"""Headless Chromium for the HTML tests and the screenshots: no playwright, no CDP, the browser's own flags.

``probe(page)`` opens a copy of the page with a small script put first in its ``<head>`` that records
every error (script errors, failed resources, ``console.error``/``warn``), and on ``load`` writes what
it measured (navigation timing, the arcs in the rendered diagram, their drawn size) into the DOM,
which ``--dump-dom`` prints. Chromium's own log of console messages (``--enable-logging=stderr``) is
read too. ``screenshot(page, png)`` is ``--screenshot`` at the page's full height.

Used by ``test_browser.py`` and ``make_screenshots.py``; ``.ci/setup.sh`` installs Debian's chromium.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: where to look for the browser; RESIFY_CHROMIUM overrides
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
TIMEOUT = 120

_PROBE = """<script>
(() => {
  const errors = [];
  window.addEventListener("error", (e) => errors.push(e.message || ("failed to load " + (e.target.src || e.target.href))), true);
  window.addEventListener("unhandledrejection", (e) => errors.push("unhandled rejection: " + e.reason));
  for (const level of ["error", "warn"]) {
    const original = console[level];
    console[level] = (...args) => { errors.push(level + ": " + args.join(" ")); original.apply(console, args); };
  }
  window.addEventListener("load", () => {
    const nav = performance.getEntriesByType("navigation")[0];
    const diagram = document.querySelector("svg.resify-diagram");
    const box = diagram ? diagram.getBoundingClientRect() : {width: 0, height: 0};
    const drawn = [...document.querySelectorAll("svg.resify-diagram path.arc")].filter((p) => p.getBBox().height > 0);
    const layout = document.documentElement.scrollHeight;  // forces style and layout of the whole page
    document.documentElement.setAttribute("data-resify-probe", JSON.stringify({
      load_ms: nav.loadEventStart, dom_ms: nav.domContentLoadedEventEnd, ready_ms: performance.now(),
      arcs: document.querySelectorAll("svg.resify-diagram path.arc").length,
      site_arcs: document.querySelectorAll("svg.resify-diagram path.arc.site").length,
      existing_arcs: document.querySelectorAll("svg.resify-diagram path.arc.existing").length,
      drawn_arcs: drawn.length, diagram: [box.width, box.height], height: layout,
      width: document.documentElement.scrollWidth, errors,
    }));
  });
})();
</script>"""


@dataclass(frozen=True)
class Probe:
    """What the browser saw: timings in ms from navigation start, the diagram's arcs, errors."""

    load_ms: float  # the load event (every byte parsed, the page's own resources loaded)
    ready_ms: float  # after the load handler forced style and layout of the whole page
    arcs: int
    site_arcs: int
    existing_arcs: int
    drawn_arcs: int  # arcs with a non-empty bounding box in the rendered SVG
    diagram: tuple[float, float]  # the diagram's rendered width and height (px)
    height: int  # the page's scroll height (px)
    width: int
    errors: tuple[str, ...]  # from the page (script errors, failed loads, console.error/warn)
    console: tuple[str, ...]  # console messages in chromium's own log
    wall_s: float  # the whole browser run, start-up included


def chromium() -> str | None:
    """The path of a Chromium or Chrome binary, or None."""
    given = os.environ.get("RESIFY_CHROMIUM")
    if given:
        return given if shutil.which(given) else None
    return next((found for name in NAMES if (found := shutil.which(name))), None)


def _run(args: list[str], timeout: int = TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    binary = chromium()
    if binary is None:
        raise RuntimeError("no chromium found; .ci/setup.sh installs it (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="resify-chromium-") as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"]
        flags += ["--disable-extensions", "--mute-audio", f"--user-data-dir={profile}"]
        start = time.perf_counter()
        done = subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=timeout)
        return done, time.perf_counter() - start


def probe(page: Path, window: tuple[int, int] = (1400, 1000)) -> Probe:
    """Load ``page`` headless in a ``window`` of (width, height) px, from a probing copy beside it, and
    report what the browser measured."""
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text)
    assert head is not None, f"{page} has no <head>"
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(text[: head.end()] + _PROBE + text[head.end() :], encoding="utf-8")
    try:
        size = f"--window-size={window[0]},{window[1]}"
        done, wall = _run(["--enable-logging=stderr", "--v=0", size, "--dump-dom", copy.resolve().as_uri()])
    finally:
        copy.unlink()
    found = re.search(r'data-resify-probe="([^"]*)"', done.stdout)
    assert found, f"the page never fired its load event (exit {done.returncode}): {done.stderr[-2000:]}"
    d = json.loads(html.unescape(found.group(1)))
    console = tuple(line for line in done.stderr.splitlines() if ":CONSOLE" in line)
    return Probe(
        load_ms=d["load_ms"],
        ready_ms=d["ready_ms"],
        arcs=d["arcs"],
        site_arcs=d["site_arcs"],
        existing_arcs=d["existing_arcs"],
        drawn_arcs=d["drawn_arcs"],
        diagram=tuple(d["diagram"]),
        height=d["height"],
        width=d["width"],
        errors=tuple(d["errors"]),
        console=console,
        wall_s=wall,
    )


def screenshot(page: Path, png: Path, width: int = 1400, max_height: int = 2400) -> Path:
    """A PNG of ``page`` at ``width`` px and its full height (at most ``max_height``)."""
    height = min(max_height, probe(page, (width, 1000)).height)
    done, _ = _run([f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()])
    assert png.exists(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return png
