#!/usr/bin/env bash
# Fit the cascade: `bash train.sh [--data DIR] [--out DIR] [--set key=value ...]` (see `bash train.sh --help`).
# Sets itself up first (idempotent, quiet), then runs `python -m cascade train` in the current directory, so
# data/ and out/ default to the current directory's.
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/run.sh" train "$@"
