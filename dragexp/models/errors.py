"""Errors raised while locating or loading model weights."""

from __future__ import annotations


class ModelSourceError(RuntimeError):
    """A model source (hub id, local folder or single file) could not be loaded.

    The message is one line that names the source and says what to do about it, so it can be
    shown to a user as is (for example at the top of a failed Hydra run).
    """
