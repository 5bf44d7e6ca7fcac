#!/usr/bin/env bash
# `bash scripts/run.sh COMMAND [args...]`: set up quietly (idempotent; the log is shown only on failure), then
# run `python -m cascade COMMAND args...` in the current directory (so data/ and out/ are the caller's).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="$1"; shift
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
if ! bash "$root/scripts/setup.sh" >"$log" 2>&1; then
  cat "$log" >&2; echo "$cmd: set-up failed (scripts/setup.sh)" >&2; exit 1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m cascade "$cmd" "$@"
