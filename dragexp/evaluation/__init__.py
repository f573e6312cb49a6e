"""DragBench evaluation: Mean Distance (DIFT), Image Fidelity (LPIPS), CLIP similarity.

The arithmetic follows the DragDiffusion authors' ``drag_bench_evaluation`` scripts step by
step (docs/evaluation.md) and is implemented once:

- :mod:`.resize`: the PIL-bilinear resize of the edit to the source size, [-1, 1] scaling;
- :mod:`.dift`: DIFT features (SD 2.1, t=261, ``up_blocks[1]``, ensemble 8, sampled VAE
  latent, prompt), noise sources, DIFT model sources (tiny, stored, Hub / local, random SD 2.1)
  and an exact-position stand-in for diagnostics;
- :mod:`.matching`: global cosine argmax, per-pair distances, MD pooled over pairs;
- :mod:`.lpips_if`: LPIPS(alex) on 224 x 224 squashed inputs, IF = 1 - LPIPS;
- :mod:`.clip_sim`: CLIP ViT-B/32 image-image cosine (open_clip, OpenAI layout);
- :mod:`.metrics`: one sample's scores and their aggregation, per-sample seeds;
- :mod:`.runner`: results folders (run, sweep, plain root, "do nothing") and the evaluator;
- :mod:`.report`: per-sample / per-category / comparison tables, plots, W&B.

``scripts/evaluate.py`` and the conformance adapters (:mod:`dragexp.conformance.dragbench_eval`)
both call :func:`~.metrics.score_sample` and :func:`~.metrics.aggregate`.
"""

from .metrics import SampleScore, aggregate, sample_seed, score_sample

__all__ = ["SampleScore", "aggregate", "sample_seed", "score_sample"]
