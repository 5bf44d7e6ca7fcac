#!/usr/bin/env bash
# `bash scripts/run.sh COMMAND [args...]`: set up quietly (idempotent; the log is shown only on failure), then
# run `python -m cascade COMMAND args...` in the current directory (so data/ and out/ are the caller's).
# Also as `mpirun -np K bash train.sh ...` (docs/scale.md): each rank encodes its share of the images, rank 0
# fits and writes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="$1"; shift
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
# Under mpirun every rank starts here at once: set-up runs under a lock, one process at a time (the first does
# the work, the others find it done), and outside MPI (Jittor must not start MPI in set-up's helper processes).
lock="${TMPDIR:-/tmp}/cascade-setup-$(printf '%s' "$root" | sha256sum | cut -c1-16).lock"
setup=(env -u OMPI_COMM_WORLD_SIZE bash "$root/scripts/setup.sh")
command -v flock >/dev/null && setup=(flock "$lock" "${setup[@]}")
if ! "${setup[@]}" >"$log" 2>&1; then
  cat "$log" >&2; echo "$cmd: set-up failed (scripts/setup.sh)" >&2; exit 1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
rm -f "$log"
exec "$root/.venv/bin/python" -m cascade "$cmd" "$@"
