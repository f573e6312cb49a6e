"""Conformance runner: dragexp against the golden cases recorded from the authors' code."""
