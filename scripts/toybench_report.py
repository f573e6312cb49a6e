#!/usr/bin/env python
"""``python scripts/toybench_report.py DIR``: the toybench ground-truth table (printed, and
``toybench_table.csv``/``.md``) and plot (``toybench.png``) for every run below DIR."""

import sys

from dragexp.evaluation.toybench_report import write_toybench_report

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if write_toybench_report(sys.argv[1]) is None:
        sys.exit(f"no toybench run (run_summary.json with ground-truth metrics) below {sys.argv[1]}")
