"""Progress of one edit through its real stages, for a progress bar.

An edit (``method.edit``) runs: LoRA fine-tuning (a Lightning fit), DDIM inversion, the drag
optimisation (a Lightning fit) and the denoising. :class:`EditProgress` follows them without any
method-specific code:

* LoRA steps: a plain Lightning callback of the LoRA fit (``lora_callbacks`` of the method);
* optimisation steps: a :class:`~dragexp.callbacks.DragCallback` among the drag callbacks;
* inversion and denoising steps: a forward pre-hook on the UNet that counts the distinct
  timesteps it is called with before the optimisation starts and after it ends (classifier-free
  guidance calls the UNet twice per step with the same timestep, so steps are counted, not calls).

A stage that does not run (LoRA reused from the cache, 0 LoRA steps, an early stop) is skipped:
the bar jumps to the next stage's start. Reports are rate-limited.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import lightning as L
import torch

from ..callbacks import DragCallback

__all__ = ["EditProgress", "STAGES"]

STAGES = ("lora", "inversion", "optimisation", "denoising")
_LABELS = {"lora": "LoRA step", "inversion": "inversion step",
           "optimisation": "drag step", "denoising": "denoising step"}


class _LoRAProgress(L.Callback):
    def __init__(self, owner: "EditProgress"):
        self.owner = owner

    def on_train_start(self, trainer, pl_module) -> None:
        self.owner._enter("lora", total=int(trainer.max_steps) if trainer.max_steps > 0 else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.owner._step("lora", int(trainer.global_step))

    def on_train_end(self, trainer, pl_module) -> None:
        self.owner._enter("inversion")


class _DragProgress(DragCallback):
    drag_hook_order = 90   # after tracking, the stop rule and the recorder

    def __init__(self, owner: "EditProgress"):
        self.owner = owner

    def on_train_start(self, trainer, pl_module) -> None:
        self.owner._enter("optimisation", total=getattr(pl_module, "n_steps", None))

    def on_drag_step_end(self, trainer, module, state) -> None:
        self.owner._step("optimisation", int(state.step) + 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.owner._enter("denoising")


class EditProgress:
    """Turns an edit's stages into ``report(fraction, text)`` calls.

    Args:
        report: called with the overall fraction in [0, 1] and a text such as
            ``"drag step 3/80"``.
        totals: expected steps per stage (``lora``, ``inversion``, ``optimisation``,
            ``denoising``); a stage's share of the bar is proportional to it.
        min_interval: seconds between two reports (the first and stage changes always report).
    """

    def __init__(self, report: Callable[[float, str], None], totals: dict[str, int],
                 min_interval: float = 0.1):
        self.report = report
        self.totals = {s: max(0, int(totals.get(s) or 0)) for s in STAGES}
        self.min_interval = float(min_interval)
        self.stage = "inversion"     # no LoRA fit started: the first UNet steps are the inversion
        self.count = 0
        self.events: list[tuple[float, str, int]] = []   # (seconds since start, stage, step)
        self._t0 = time.perf_counter()
        self._last_report = -1.0
        self._last_t = None

    # -- what the method is given --------------------------------------------------------
    def lora_callback(self) -> L.Callback:
        return _LoRAProgress(self)

    def drag_callback(self) -> DragCallback:
        return _DragProgress(self)

    @contextmanager
    def watch(self, unet: torch.nn.Module):
        """Count inversion and denoising steps from the UNet's calls while the block runs."""
        handle = unet.register_forward_pre_hook(self._unet_call, with_kwargs=True)
        self.report(0.0, "preparing")
        try:
            yield self
        finally:
            handle.remove()
        self._emit(force=True, text="decoding")

    # -- bookkeeping ---------------------------------------------------------------------
    def _unet_call(self, module, args, kwargs):
        if self.stage not in ("inversion", "denoising"):
            return None
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        try:
            t = int(t.flatten()[0]) if torch.is_tensor(t) else int(t)
        except (TypeError, ValueError, IndexError):
            t = None
        if t is None or t != self._last_t:
            self._last_t = t
            self._step(self.stage, self.count + 1)
        return None

    def _enter(self, stage: str, total: int | None = None) -> None:
        if total is not None and total > 0:
            self.totals[stage] = int(total)
        self.stage, self.count, self._last_t = stage, 0, None
        self._emit(force=True)

    def _step(self, stage: str, k: int) -> None:
        if stage != self.stage:
            self._enter(stage)
        self.count = k
        self.events.append((time.perf_counter() - self._t0, stage, k))
        self._emit()

    def fraction(self) -> float:
        total = sum(self.totals.values())
        if total <= 0:
            return 0.0
        i = STAGES.index(self.stage)
        done = sum(self.totals[s] for s in STAGES[:i])
        return min(1.0, (done + min(self.count, self.totals[self.stage])) / total)

    def text(self) -> str:
        label = _LABELS[self.stage]
        total = self.totals[self.stage]
        if self.count == 0:
            return f"{label.rsplit(' ', 1)[0]}..."
        return f"{label} {self.count}/{total}" if 0 < self.count <= total else f"{label} {self.count}"

    def _emit(self, force: bool = False, text: str | None = None) -> None:
        now = time.perf_counter()
        if not force and now - self._last_report < self.min_interval:
            return
        self._last_report = now
        self.report(self.fraction(), text or self.text())
