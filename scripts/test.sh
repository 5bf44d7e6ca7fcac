#!/usr/bin/env bash
# The whole test suite, on a fresh machine: sets itself up first (idempotent), then runs pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -q "$@"
