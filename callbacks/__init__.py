"""Lightning callbacks of dragexp (installed as ``dragexp.callbacks``)."""

from .auto_mask import AutoMask, AutoMaskError, callback_images, check_callbacks
from .drag import DragCallback, PointTracking, StopWhenReached, TrajectoryRecorder

__all__ = ["AutoMask", "AutoMaskError", "DragCallback", "PointTracking", "StopWhenReached",
           "TrajectoryRecorder", "callback_images", "check_callbacks"]
