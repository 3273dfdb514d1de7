#!/usr/bin/env bash
# Create .venv and install resify with its test dependencies, torch pinned to the pair on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -c .ci/constraints.txt torch torchvision
.venv/bin/pip install -q --disable-pip-version-check -c .ci/constraints.txt -e '.[test,plot]'
# tests/test_browser.py opens the HTML report in a headless chromium: Debian's, when apt-get can install it
# (quietly; where it cannot, that test skips and says why)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 \
    && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; }; then
    echo "setup: installed chromium for tests/test_browser.py"
  else
    echo "setup: no chromium (apt-get missing or it failed); tests/test_browser.py will skip" >&2
  fi
fi
