#!/usr/bin/env bash
# The README's main job on a fresh machine: set up (idempotent), then evaluate every stage and the full cascade
# on the real CLIP-feature tasks shipped in benchmarks/realbench (extra arguments go to `python -m cascade bench`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m cascade bench benchmarks/realbench/*.npz "$@"
