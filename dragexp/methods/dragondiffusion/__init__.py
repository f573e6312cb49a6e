"""DragonDiffusion and DiffEditor: editing by energy guidance during sampling.

* :mod:`.method` - the edit (drag, move, resize, appearance, paste);
* :mod:`.regions` - its masks, point patches and latent edits on its own grids;
* :mod:`.sampling` - inversion into the memory bank and the guided DDIM sampler;
* :mod:`.energy` - the energies on decoder features and the guidance they give;
* :mod:`.memory_bank` - the memory bank and visual cross-attention;
* :mod:`.image_prompt` - DiffEditor's image prompt.
"""

from .method import DragonDiffusionMethod

__all__ = ["DragonDiffusionMethod"]
