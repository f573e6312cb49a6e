#!/usr/bin/env python
"""The authors' DragDiffusion / DragNoise code timed side by side with dragexp's faithful and
fast settings on one sample (dragexp.performance.reference_bench).

Setup, outside the repository (the authors' code is never copied into the project); R is
--reference-dir (default /work/reference):

    git clone https://github.com/Yujun-Shi/DragDiffusion $R/DragDiffusion
    git -C $R/DragDiffusion checkout ebe659a9c5b7
    git clone https://github.com/haofengl/DragNoise $R/DragNoise
    git -C $R/DragNoise checkout 10727312aef7
    python -m pip install --no-deps --target $R/env-dd diffusers==0.24.0 \
        huggingface_hub==0.25.2 transformers==4.36.2 tokenizers==0.15.2 einops==0.8.2
    python -m pip install --no-deps --target $R/env-dn diffusers==0.17.1 \
        huggingface_hub==0.25.2 transformers==4.30.2 tokenizers==0.13.3 einops==0.8.2 \
        tensorboard protobuf absl-py

Run (python = the project's venv):

    python scripts/bench_reference.py                        # tiny model, both methods, CPU
    python scripts/bench_reference.py --method dragnoise --model sd15_random --n-pix-step 10

Options: --method, --model tiny|sd15_random, --size, --n-pix-step, --lora-steps, --settings,
--repeat N, --reference-dir, --json PATH (the path is the last line printed).
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dragexp.performance.reference_bench import main

    main(sys.argv[1:])
