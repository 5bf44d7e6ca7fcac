"""What checking converted weights costs a run: time to verify a file of real CLIP size.

Every `train` and `test` reads each converted weights file once to verify it (CRC-32 of each member, SHA-256
of the arrays against the one recorded at conversion; docs/failures.md). This writes a converted file with as
many float32 parameters as CLIP ViT-B/32 and one as RN101 (zeros: the cost does not depend on the values),
then times ``cascade.models.weights.verify_weights`` on each (best of ``--repeat``, the file in the page
cache, as in a run that follows another; a cold read adds the disk's read time for the file).

    .venv/bin/python benchmarks/weights_check_speed.py [--repeat 3] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cascade.models.weights import save_weights, verify_weights  # noqa: E402

# parameter counts of OpenAI's released models (fp32 after conversion)
SIZES = {"ViT-B/32": 151_277_313, "RN101": 119_688_033}


def _fake_state(n_params: int, chunk: int = 8 << 20) -> dict[str, np.ndarray]:
    state, left, i = {}, n_params, 0
    while left > 0:
        n = min(chunk, left)
        state[f"w{i:04d}"] = np.zeros(n, np.float32)
        left -= n
        i += 1
    return state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the temporary files (default: the temp folder)")
    args = ap.parse_args()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    print(f"cpu cores: {os.cpu_count()}, avx512f: {'avx512f' in flags}, load average: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, n in SIZES.items():
            path = Path(tmp) / "w.npz"
            save_weights(path, _fake_state(n), {"arch": "clip", "model": name})
            size = path.stat().st_size / 2**20
            warm = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                verify_weights(path)
                warm.append(time.perf_counter() - t)
            print(f"{name:9s} {size:7.1f} MiB  verify (in page cache): best {min(warm):.2f} s, "
                  f"worst {max(warm):.2f} s of {args.repeat}")
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
