"""The parts of a drag on features: points and masks, point trackers, the drag losses, targets."""
