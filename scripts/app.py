#!/usr/bin/env python
"""Interactive drag editor in the browser.

    python scripts/app.py [--host 127.0.0.1] [--port 7860] [--out DIR] [--samples DIR] [overrides...]

Overrides are Hydra overrides of ``configs/train.yaml``, exactly as for ``scripts/train.py``
(``model=local model.path=/my/sd15``, ``method=dragnoise``, ``method.n_pix_step=40``,
``trainer.precision=bf16-mixed``, ...). The method and its main parameters can also be changed in
the page. Edits are written to ``--out`` (default ``outputs/app/<date>/``) in the layout of a
run's ``results/``; "Save as sample" writes DragBench-layout samples (default folder
``outputs/app_samples``) that ``data=dragbench data.root=...`` reads.
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] [hydra overrides...]")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: GRADIO_SERVER_PORT or the first free from 7860)")
    p.add_argument("--out", default=None, help="folder for edits (default outputs/app/<date>)")
    p.add_argument("--samples", default=None,
                   help="default folder of 'save as sample' (default outputs/app_samples)")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        p.error(f"unknown options {bad}; Hydra overrides look like key=value")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from dragexp.app.editor import Editor
    from dragexp.app.ui import launch

    editor = Editor(overrides, out_dir=args.out, samples_dir=args.samples)
    logging.getLogger("dragexp.app").info("loading the model (%s)...", editor.cfg.model._target_)
    editor.models  # build before serving, so the first click does not wait for it
    launch(editor, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
