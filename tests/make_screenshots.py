"""Make the screenshots of ``resify inspect --html`` in docs/report.md: the seed network and torchvision's VGG-16.

Run from the repository root, where .ci/setup.sh has installed chromium and torchvision:

    .venv/bin/python tests/make_screenshots.py

It runs the real command (``python -m resify inspect ... --html``), checks each page in the browser
as tests/test_browser.py does (no console error, one arc per shortcut), and writes
docs/report_seed.html, docs/report_seed.png and docs/report_vgg16.png.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from browser import chromium, probe, screenshot

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: (name, the model and its input as inspect takes them, page width px, most height px)
PAGES = [
    ("seed", ["examples/seed_mlp.py"], 1300, 1500),
    ("vgg16", ["torchvision:vgg16", "--input-shape", "1,3,224,224"], 1400, 1900),
]


def main() -> None:
    if chromium() is None:
        sys.exit("no chromium: .ci/setup.sh installs it (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec, width, height in PAGES:
            page = Path(tmp) / f"report_{name}.html"
            command = [sys.executable, "-m", "resify", "inspect", *spec, "--html", str(page)]
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            seen = probe(page, (width, 1000))
            if seen.errors or seen.console or seen.drawn_arcs != seen.arcs:
                sys.exit(f"{name}: the page does not load cleanly: {seen}")
            png = screenshot(page, DOCS / f"report_{name}.png", width=width, max_height=height)
            print(f"{png.relative_to(ROOT)}: {seen.arcs} arcs, page {page.stat().st_size:,} bytes")
            if name == "seed":
                (DOCS / page.name).write_text(page.read_text(encoding="utf-8"), encoding="utf-8")


if __name__ == "__main__":
    main()
