#!/usr/bin/env bash
# Lint, format check, type check, then the tests: what CI runs after .ci/setup.sh (README: "Tests").
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
