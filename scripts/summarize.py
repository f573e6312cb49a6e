#!/usr/bin/env python
"""``python scripts/summarize.py DIR``: summary.csv and summary.png for every run below DIR, and
for an ``experiment=paper/*`` folder also paper_table.csv and paper_figure.png."""

import sys

from dragexp.reporting.paper_plots import write_paper_figure
from dragexp.reporting.summary import write_summary

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = write_summary(sys.argv[1])
    if out is None:
        sys.exit(f"no run_summary.json below {sys.argv[1]}")
    print(*out, sep="\n")
    paper = write_paper_figure(sys.argv[1])
    if paper is not None:
        print(*paper, sep="\n")
