#!/usr/bin/env bash
# `bash scripts/run.sh COMMAND [args...]`: set up quietly (idempotent; the log is shown only on failure), then
# run `python -m cascade COMMAND args...` in the current directory (so data/ and out/ are the caller's).
# Also as `mpirun -np K bash train.sh ...` (docs/scale.md): each rank encodes its share of the images, rank 0
# fits and writes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="$1"; shift
log="$(mktemp)"; started="$log.started"; trap 'rm -f "$log" "$started"' EXIT
# Under mpirun every rank starts here at once: set-up runs under a lock, one process at a time (the first does
# the work, the others find it done), and outside MPI (Jittor must not start MPI in set-up's helper processes).
lock="${TMPDIR:-/tmp}/cascade-setup-$(printf '%s' "$root" | sha256sum | cut -c1-16).lock"
# (set-up marks when it starts, past the lock: the note below times set-up itself, not the wait for other ranks)
setup=(env -u OMPI_COMM_WORLD_SIZE bash -c 'touch "$0"; exec bash "$1"' "$started" "$root/scripts/setup.sh")
command -v flock >/dev/null && setup=(flock "$lock" "${setup[@]}")
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# --help needs no set-up where the environment exists
for a in "$@"; do
  if { [ "$a" = -h ] || [ "$a" = --help ]; } && [ -x "$root/.venv/bin/python" ]; then
    exec "$root/.venv/bin/python" -m cascade "$cmd" "$@"
  fi
done
# Ctrl-C during set-up: said as the command says it. A set-up still waiting for the lock is dropped; one already
# running (flock's child, started in the background, so Ctrl-C does not reach it) ends its idempotent work alone.
trap 'kill ${setup_pid:-} ${note_pid:-} 2>/dev/null; echo "cascade $cmd: interrupted" >&2; exit 130' INT
"${setup[@]}" >"$log" 2>&1 &
setup_pid=$!
# a set-up that does real work (a new machine, a changed pyproject.toml, Jittor recompiling) says so once; its
# check alone takes a few seconds on a loaded machine, so the note waits longer than that. (Its sleeps hold no
# copy of stderr: killed with the note, they would keep a caller's pipe open, `cmd 2>&1 | tail` waiting 10 s.)
( while [ ! -e "$started" ]; do kill -0 "$setup_pid" 2>/dev/null || exit 0; sleep 0.2 >/dev/null 2>&1; done
  sleep 10 >/dev/null 2>&1; kill -0 "$setup_pid" 2>/dev/null \
    && echo "$cmd: setting up first (scripts/setup.sh; minutes on a new machine, once)..." >&2 ) &
note_pid=$!
if ! wait "$setup_pid"; then
  kill "$note_pid" 2>/dev/null || true
  cat "$log" >&2; echo "$cmd: set-up failed (scripts/setup.sh)" >&2; exit 1
fi
kill "$note_pid" 2>/dev/null || true
rm -f "$log" "$started"
exec "$root/.venv/bin/python" -m cascade "$cmd" "$@"
