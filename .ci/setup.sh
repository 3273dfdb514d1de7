#!/usr/bin/env bash
# Create .venv, build resify's sdist and wheel, and install the wheel (not editable) with its test
# dependencies, torch pinned to the pair on disk. RESIFY_EDITABLE=1 installs the work tree editable
# instead (for development: edits show without a rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
pip_install() { .venv/bin/pip install -q --disable-pip-version-check -c .ci/constraints.txt "$@"; }
pip_install torch torchvision
pip_install build
if [ "${RESIFY_EDITABLE:-0}" = "1" ]; then
  pip_install -e '.[test,plot]'
else
  rm -rf dist
  # the sdist first, then the wheel built from the sdist: both must carry every package
  .venv/bin/python -m build -q --outdir dist . >/dev/null
  .venv/bin/python .ci/check_dist.py dist
  wheel=$(ls dist/resify-*.whl)
  pip_install --force-reinstall --no-deps "$wheel"
  pip_install "${wheel}[test,plot]"
  echo "setup: installed $(basename "$wheel") (not editable)"
fi
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
