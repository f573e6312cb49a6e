"""``python -m dragexp.conformance CASE_DIR... [--out DIR]`` (../shared/conformance/README.md).

Runs each case through dragexp, prints one PASS/FAIL line per case with the largest deviation
per key, optionally writes ``DIR/<case>/produced.safetensors``; exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .case import Case
from .judge import judge_key
from .registry import get_adapter


def run_case(path: Path, out: Path | None, verbose: bool = False) -> bool | None:
    """Run and judge one case. Returns True/False, or None when it has no expected file."""
    t0 = time.perf_counter()
    try:
        case = Case.load(path)
        torch.manual_seed(0)
        produced = get_adapter(case.kind)(case)
    except Exception as exc:  # one broken case must not stop the others
        print(f"FAIL {path.name}: {type(exc).__name__}: {exc}")
        if verbose:
            traceback.print_exc()
        return False
    dt = time.perf_counter() - t0
    if out is not None:
        d = out / path.name
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in produced.items()},
                  str(d / "produced.safetensors"))
    exp_file = path / "expected.safetensors"
    if not exp_file.is_file():
        print(f"RUN  {path.name} ({case.kind}): {len(produced)} keys produced, not judged "
              f"(no expected.safetensors) [{dt:.1f}s]")
        return None
    expected = load_file(str(exp_file))
    verdicts = [judge_key(k, produced.get(k), v) for k, v in expected.items()]
    ok = all(v.ok for v in verdicts)
    print(f"{'PASS' if ok else 'FAIL'} {path.name} ({case.kind}) "
          f"{sum(v.ok for v in verdicts)}/{len(verdicts)} keys [{dt:.1f}s]")
    for v in sorted(verdicts, key=lambda v: (v.ok, v.key)):
        print(f"    {'ok ' if v.ok else 'BAD'} {v.key}: {v.detail}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dragexp.conformance", description=__doc__)
    ap.add_argument("cases", nargs="+", type=Path, help="case folders")
    ap.add_argument("--out", type=Path, default=None, help="write DIR/<case>/produced.safetensors")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    # The cases were recorded single-threaded; one thread is also fastest for these tiny models.
    torch.set_num_threads(1)
    results = [run_case(p, args.out, args.verbose) for p in args.cases]
    n_pass = sum(r is True for r in results)
    n_fail = sum(r is False for r in results)
    n_run = sum(r is None for r in results)
    print(f"{n_pass} passed, {n_fail} failed" + (f", {n_run} not judged" if n_run else ""))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
