#!/usr/bin/env bash
# The whole test suite with every direct dependency at the lowest version pyproject.toml
# allows (uv's --resolution lowest-direct), in a throwaway virtualenv: run it after raising
# or adding a dependency, so the lower bounds stay true. Not part of `make test` (it takes
# as long again); needs the same services (PostgreSQL, Redis) and `make setup` done once
# (the compiled catalogs).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet uv
uv="$work/tools/bin/uv"
"$uv" pip compile pyproject.toml --extra dev --resolution lowest-direct --quiet \
  --python-version 3.11 -o "$work/lowest.txt"
"$uv" venv --quiet --python "$(command -v python3)" "$work/venv"
"$uv" pip install --quiet --python "$work/venv/bin/python" -r "$work/lowest.txt"
"$uv" pip install --quiet --python "$work/venv/bin/python" --no-deps -e .
grep -E '^[a-z]' "$work/lowest.txt" | tr '\n' ' '
echo
"$work/venv/bin/pytest" -q -ra -n 2 --dist loadfile -p no:cacheprovider
