#!/usr/bin/env python
"""Per-stage benchmark of one edit, faithful and fast side by side (dragexp.performance.bench).

    python scripts/bench.py method=dragdiffusion model=sd15_random
    python scripts/bench.py method=dragdiffusion,dragnoise,easydrag,dragondiffusion model=sd15_random
    python scripts/bench.py method=dragnoise bench.quick=true          # CPU, tiny model, < 1 min

Options (``bench.settings``, ``bench.warmup``, ``bench.flops``, ``bench.quick``, ``bench.json``)
and the figures printed: :mod:`dragexp.performance.bench`; measured: docs/benchmarks/README.md.
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dragexp.performance.bench import main

    main(sys.argv[1:])
