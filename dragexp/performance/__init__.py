"""How fast an edit runs and what it costs: speed settings and the stage profiler."""
