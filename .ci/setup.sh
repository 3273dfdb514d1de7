#!/usr/bin/env bash
# Create .venv and install resify with its test dependencies, torch pinned to the pair on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -c .ci/constraints.txt torch torchvision
.venv/bin/pip install -q --disable-pip-version-check -c .ci/constraints.txt -e '.[test,plot]'
