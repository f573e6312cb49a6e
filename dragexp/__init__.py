"""dragexp: drag-based diffusion image editing as Lightning modules and Hydra experiments."""

__version__ = "0.1.0"

# hydra.run.dir's resolver (configs/train.yaml), for every entry point that composes train.yaml
from . import run_dirs as _run_dirs  # noqa: E402,F401
