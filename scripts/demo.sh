#!/usr/bin/env bash
# `bash scripts/demo.sh [DIR]`: the whole journey on a small synthetic workspace, with nothing to download.
# Writes DIR (default demo/; an empty folder, or one holding only an earlier demo, which is removed first) with
# `python -m cascade demo`: a dataset in the challenge's layout and a tiny CLIP with random weights. Then trains,
# tests and scores the result, as a user does with the real data (docs/usage.md). Half a minute once set up; the
# first run several minutes more, while Jittor compiles its operators.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-demo}"
if [ -f "$dir/demo.toml" ]; then
  # an earlier demo is replaced, unless something was added beside what the demo writes (data/, demo.toml, out/)
  extra="$(ls -A "$dir" | grep -vxE 'data|demo\.toml|out' || true)"
  if [ -n "$extra" ]; then
    echo "demo: $dir holds an earlier demo and files it did not write ($(printf '%s' "$extra" | tr '\n' ' ')); move them or give another DIR" >&2
    exit 2
  fi
  rm -rf "$dir"
elif [ -e "$dir" ] && ! { [ -d "$dir" ] && [ -z "$(ls -A "$dir")" ]; }; then
  echo "demo: $dir exists and is neither empty nor a demo folder; give another DIR" >&2; exit 2
fi
bash "$root/scripts/run.sh" demo "$dir"
cd "$dir"
bash "$root/train.sh" --config demo.toml --quiet
bash "$root/test.sh" --config demo.toml --quiet
echo
"$root/.venv/bin/python" -m cascade eval out/result.txt data/test_labels.txt --classes data/classes.txt
echo
echo "demo: the submission is $dir/out/result.txt; the model $dir/out/model/; the validation report $dir/out/report/"
