"""Lightning callbacks of dragexp (installed as ``dragexp.callbacks``)."""
