"""Lightning callbacks of dragexp (installed as ``dragexp.callbacks``)."""

from .drag import DragCallback, PointTracking, StopWhenReached, TrajectoryRecorder

__all__ = ["DragCallback", "PointTracking", "StopWhenReached", "TrajectoryRecorder"]
