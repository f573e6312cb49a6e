"""Point tracking strategies: where did each handle move after an optimisation step?

Every tracker is called as ``tracker(F0, F1, handles_init, handles, targets=...)`` and returns
the new handle positions (float32 (N, 2) row, col); it never modifies its inputs.

* :class:`NearestFeatureTracker` - DragDiffusion's tracking (docs/methods.md, DragDiffusion 3,
  step 2): for each handle, search the (2 r_p + 1)^2 window around its current position for the
  feature nearest in channel-summed L1 distance to F0 at the *initial* handle; row-major argmin,
  first minimum wins.
* :class:`NextPointTracker` - EasyDrag (docs/methods.md, EasyDrag 10-11): each handle may jump
  to :func:`next_point` only if that strictly raises the cosine similarity to F0 at the initial
  handle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BorderError(ValueError):
    """A window or patch reaches past the top/left border where the reference crashes."""


class Tracker:
    """Base of the point trackers: ``tracker(F0, F1, handles_init, handles, targets=...)``
    returns the new handle positions (float32 (N, 2) row, col) without modifying its inputs.

    :meth:`check_start` is asked before an edit does any work (LoRA, inversion), so a start the
    tracker cannot run from fails at once, naming the sample and the point.
    """

    def __call__(self, F0: torch.Tensor, F1: torch.Tensor, handles_init: torch.Tensor,
                 handles: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check_start(self, handles: torch.Tensor, sample) -> None:
        """Raise if this tracker cannot start from ``handles`` (grid (row, col)) of ``sample``
        (a :class:`~dragexp.data.sample.DragSample`); nothing here."""


class NearestFeatureTracker(Tracker):
    """L1 nearest-neighbour tracking in a window around each handle.

    Args:
        radius: search radius r_p (window 2 r_p + 1).
        border: ``"clip"`` clips the window at the feature-map borders (DragDiffusion).
            ``"reference"`` reproduces DragNoise, whose unprotected slicing equals clipping at
            the bottom/right border but crashes when a window starts above/left of the map:
            there it raises :class:`BorderError` naming the handle instead.
    """

    def __init__(self, radius: int = 3, border: str = "clip"):
        if border not in ("clip", "reference"):
            raise ValueError(f"tracker border must be 'clip' or 'reference', got {border!r}")
        self.radius = int(radius)
        self.border = border

    def _crashes_reference(self, row: int, col: int) -> bool:
        """The reference's window would start above or left of the map (``border="reference"``)."""
        return self.border == "reference" and (row < self.radius or col < self.radius)

    def check_start(self, handles: torch.Tensor, sample) -> None:
        """With ``border="reference"``, refuse handles within the radius of the top/left border
        (where the reference crashes at the first tracking step), naming the clicked point."""
        for i, (r, c) in enumerate(handles.tolist()):
            if self._crashes_reference(int(r), int(c)):
                x, y = sample.points[2 * i]
                raise BorderError(
                    f"sample {sample.name!r}: handle {i} at (x={x:g}, y={y:g}) maps to "
                    f"supervision (row {int(r)}, col {int(c)}), within the tracking radius "
                    f"{self.radius} of the top/left border, where the authors' DragNoise code "
                    "crashes; set callbacks.tracking.tracker.border=clip to clip the windows "
                    "and continue")

    def __call__(self, F0: torch.Tensor, F1: torch.Tensor, handles_init: torch.Tensor,
                 handles: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return the new handle positions (float32 (N, 2) row, col); inputs are not modified.

        ``targets`` is accepted for the common tracker signature and not used.
        """
        H, W = F1.shape[-2:]
        r = self.radius
        new = handles.clone()
        for i in range(handles.shape[0]):
            r0, c0 = int(handles_init[i, 0]), int(handles_init[i, 1])
            f0 = F0[:, :, r0, c0][..., None, None]
            pr, pc = int(handles[i, 0]), int(handles[i, 1])
            if self._crashes_reference(pr, pc):
                raise BorderError(
                    f"handle {i} at (row {pr}, col {pc}) is within the tracking radius {r} of the "
                    f"top/left border of the {H}x{W} feature map, where the reference "
                    "implementation crashes; set the tracker border to 'clip' to continue")
            r1, r2 = max(0, pr - r), min(H, pr + r + 1)
            c1, c2 = max(0, pc - r), min(W, pc + r + 1)
            dist = (f0 - F1[:, :, r1:r2, c1:c2]).abs().sum(dim=1)[0]
            row, col = divmod(int(dist.argmin()), dist.shape[-1])
            new[i, 0] = r1 + row
            new[i, 1] = c1 + col
        return new


def next_point(p: torch.Tensor, t: torch.Tensor, jump: float = 12.0, snap: float = 18.0
               ) -> torch.Tensor:
    """EasyDrag's next point for handle ``p`` towards target ``t`` ((row, col) float tensors).

    With d the unit vector from p to t: ``round(p + jump * d)`` if ``|t - p| >= snap``, else t
    itself (also when p == t, where d is NaN). ``torch.round`` rounds half to even, as the
    authors' code does (docs/methods.md, EasyDrag 10).
    """
    diff = t - p
    dist = diff.norm()
    if dist >= snap:
        return torch.round(p + diff / dist * jump)
    return t.clone()


def handles_moved(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether a tracker moved any handle (EasyDrag's ``update_point`` flag)."""
    return not torch.equal(before, after)


class NextPointTracker(Tracker):
    """EasyDrag's tracking: accept :func:`next_point` only if it looks more like the handle.

    For each handle p (initial p0, target t) with candidate q = ``next_point(p, t)``, the
    handle moves to q iff cos(F0[p0], F1[q]) > cos(F0[p0], F1[p]) (strict: a tie, e.g. p == t,
    keeps p). Features are indexed at ``int()`` of the coordinates; in EasyDrag they are the
    image-resolution maps and the points image pixels.

    Args:
        jump: length of one jump along the handle-target direction (12 px).
        snap: a handle closer than this to its target jumps straight onto it (18 px).
    """

    def __init__(self, jump: float = 12.0, snap: float = 18.0):
        self.jump = float(jump)
        self.snap = float(snap)

    def __call__(self, F0: torch.Tensor, F1: torch.Tensor, handles_init: torch.Tensor,
                 handles: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            raise ValueError("NextPointTracker needs the targets")
        new = handles.clone()
        for i in range(handles.shape[0]):
            p0, p, t = handles_init[i], handles[i], targets[i]
            q = next_point(p, t, self.jump, self.snap)
            f0 = F0[:, :, int(p0[0]), int(p0[1])]
            here = F.cosine_similarity(f0, F1[:, :, int(p[0]), int(p[1])], dim=1, eps=1e-8)
            there = F.cosine_similarity(f0, F1[:, :, int(q[0]), int(q[1])], dim=1, eps=1e-8)
            if bool(there > here):
                new[i] = q
        return new
