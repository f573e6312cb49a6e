"""Lightning callbacks of dragexp (installed as ``dragexp.callbacks``)."""

from .auto_mask import AutoMask, AutoMaskError
from .drag import (DragCallback, PointTracking, StopWhenReached, TrajectoryRecorder,
                   callback_images, check_before_edit, trajectory_recorder)

__all__ = ["AutoMask", "AutoMaskError", "DragCallback", "PointTracking", "StopWhenReached",
           "TrajectoryRecorder", "callback_images", "check_before_edit", "trajectory_recorder"]
