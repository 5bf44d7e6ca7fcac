#!/usr/bin/env bash
# Fit the cascade: `bash train.sh [--data DIR] [--out DIR] [--set key=value ...]` (see `bash train.sh --help`).
# Sets itself up first (idempotent, quiet), then runs `python -m cascade train` in the current directory, so
# data/ and out/ default to the current directory's.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
if ! bash "$root/scripts/setup.sh" >"$log" 2>&1; then
  cat "$log" >&2; echo "train.sh: set-up failed (scripts/setup.sh)" >&2; exit 1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m cascade train "$@"
