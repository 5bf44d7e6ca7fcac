#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian's oneDNN for Jittor and Open MPI, a virtual environment in .venv with the
# package (and, with --test, the test references), and a first Jittor import that compiles its kernels once.
# Safe to run again: each step is skipped when already done.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --test   # + the test extras of pyproject.toml (pytest and the reference models)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
want_test=0; [ "${1:-}" = "--test" ] && want_test=1
say() { printf '[setup] %s\n' "$*" >&2; }

# 1. oneDNN (Debian's libdnnl-dev is API-compatible with the oneDNN 2.2 Jittor would download).
if [ ! -f /usr/include/dnnl.hpp ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing libdnnl-dev (oneDNN) with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq libdnnl-dev >/dev/null \
      || say "WARNING: apt could not install libdnnl-dev; Jittor will run without oneDNN (slow convolutions)"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq >/dev/null && sudo apt-get install -y -qq libdnnl-dev >/dev/null \
      || say "WARNING: could not install libdnnl-dev; Jittor will run without oneDNN (slow convolutions)"
  else
    say "WARNING: no root and no apt: install libdnnl-dev yourself for fast convolutions; continuing without it"
  fi
fi

# 1b. Open MPI (Debian's openmpi-bin, libopenmpi-dev) for sharded runs under `mpirun` (docs/scale.md): Jittor
# builds its MPI ops when `mpicc` exists. Optional: without it every command runs as before, in one process.
if ! command -v mpicc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing openmpi-bin and libopenmpi-dev (MPI) with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null \
      || say "WARNING: apt could not install Open MPI; runs under mpirun are unavailable (one process still works)"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq >/dev/null && sudo apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null \
      || say "WARNING: could not install Open MPI; runs under mpirun are unavailable (one process still works)"
  else
    say "WARNING: no root and no apt: install openmpi-bin and libopenmpi-dev yourself to run under mpirun"
  fi
fi

# 2. Virtual environment with the package, re-installed only when pyproject.toml changes.
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp_for() { echo ".venv/.cascade-installed-$( (cat pyproject.toml; echo "test=$1") | sha256sum | cut -c1-16)"; }
stamp="$(stamp_for "$want_test")"
# a test install also satisfies a runtime-only set-up
if [ ! -f "$stamp" ] && ! { [ "$want_test" = 0 ] && [ -f "$(stamp_for 1)" ]; }; then
  extras=""; [ "$want_test" = 1 ] && extras="[test]"
  say "installing cascade$extras into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$extras" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import cascade" || { say "ERROR: installing cascade failed"; exit 1; }
  touch "$stamp"
fi

# 3. First Jittor import: wires oneDNN and compiles Jittor's kernels (and its MPI ops when mpicc exists) into
# ~/.cache/jittor once per machine, so ranks started together later find them built. Run outside MPI even when
# called under mpirun (Jittor would otherwise start MPI in this helper process).
env -u OMPI_COMM_WORLD_SIZE .venv/bin/python -c "from cascade import runtime; runtime.jittor(); import sys; print('[setup] jittor ready:', runtime.status, file=sys.stderr)"
