"""The interactive editor in the browser: ``python scripts/app.py [overrides]``.

:mod:`dragexp.app.editor` runs edits through the training job's config and ``method.edit``;
:mod:`dragexp.app.progress` follows an edit's stages; :mod:`dragexp.app.ui` is the Gradio UI
(imported lazily, so the editor works without Gradio installed).
"""

from .editor import Editor, EditOutcome, InputError, write_dragbench_sample
from .progress import EditProgress

__all__ = ["Editor", "EditOutcome", "EditProgress", "InputError", "write_dragbench_sample"]
