#!/usr/bin/env bash
# Lint, format check, type check, then the tests: what CI runs after .ci/setup.sh (CONTRIBUTING.md: "Checks").
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
# the Hugging Face tests again on the newest transformers the registry serves (the suite above ran on
# the pinned one): put beside the pinned install, not over it
if [ "$#" -eq 0 ]; then
  newest=$(mktemp -d)
  add() { .venv/bin/pip install -q --disable-pip-version-check --no-deps --target "$newest" "$@" >/dev/null 2>&1; }
  if add transformers; then
    # what the new release needs and the pinned environment lacks, two levels deep (never torch: --no-deps)
    for _ in 1 2; do
      mapfile -t missing < <(.venv/bin/python .ci/missing_requirements.py "$newest")
      [ "${#missing[@]}" -eq 0 ] && break
      echo "check: adding ${missing[*]} beside the newest transformers"
      add "${missing[@]}"
    done
    echo "check: the Hugging Face tests on transformers $(PYTHONPATH="$newest" .venv/bin/python -c 'import transformers; print(transformers.__version__)')"
    PYTHONPATH="$newest" .venv/bin/pytest tests/test_huggingface.py tests/test_checkpoint.py -k "hugging or built or skipless or cache or tiny"
  else
    echo "check: the newest transformers could not be installed; its pass is skipped" >&2
  fi
  rm -rf "$newest"
fi
