#!/usr/bin/env bash
# Lint, format check, type check, then the tests: what CI runs after .ci/setup.sh (README: "Tests").
# The tests run from a copy of the work tree without resify/, so they import the installed package
# (the wheel .ci/setup.sh installed), and the docstring examples run from it too (--pyargs resify).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
git ls-files -co --exclude-standard | grep -v '^resify/' | tar -cf - -T - | tar -xf - -C "$stage"
ln -s "$PWD/.venv" "$stage/.venv"
cd "$stage"
.venv/bin/python -c 'import resify, sys; print("check: testing resify", resify.__version__, "from", resify.__file__)'
.venv/bin/pytest tests --pyargs resify "$@"
