#!/usr/bin/env bash
# Write the submission: `bash test.sh [--data DIR] [--out DIR] [--set key=value ...]` (see `bash test.sh --help`).
# Sets itself up first (idempotent, quiet), then runs `python -m cascade test` in the current directory, so
# data/ and out/ default to the current directory's.
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/run.sh" test "$@"
