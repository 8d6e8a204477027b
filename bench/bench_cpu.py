"""CPU benchmark: wanpipe vs diffusers on the same mid-size random checkpoint (see wanpipe.bench).

python bench/bench_cpu.py [--repeats 3] [--steps 8] [--frames 17] [--size 128] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanpipe.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + ["--out-dir", str(Path(__file__).resolve().parent / "results")]))
