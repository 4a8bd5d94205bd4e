"""Mixed precision that clips gradients with any AdamW, fused included.

Lightning's `MixedPrecision` plugin refuses `clip_gradients` for every optimizer that advertises
`_step_supports_amp_scaling` (fused AdamW does), "because it performs unscaling of gradients
internally". That reasoning only holds for fp16 with a GradScaler, and even there it is wrong:
`GradScaler.unscale_` works on a fused optimizer, and `GradScaler.step` then tells the optimizer
the gradients are already unscaled (`grad_scale=None`), still skipping the step on inf/NaN. Under
bf16-mixed there is no scaler at all, so there is nothing to unscale and clipping is plain
clipping. The refusal made `trainer.precision=auto` (bf16-mixed on GPUs and on CPUs with native
bf16) + `algo.optim.impl=auto` (fused AdamW) crash at the first optimizer step.

`ClippingMixedPrecision` is Lightning's plugin with that one decision changed:

* bf16-mixed: clip the gradients as they are (no scaler);
* 16-mixed: unscale once (whatever the optimizer), then clip; the scaler's step and update as usual.

Everything else (autocast context, the scaler's state in checkpoints) is Lightning's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch.optim import LBFGS, Optimizer

MIXED = ("16-mixed", "bf16-mixed")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
# Lightning's short forms, spelled out (a bare "bf16" would otherwise reach Lightning's own AMP
# plugin and the fused-AdamW clipping refusal this module exists to avoid).
ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}


class PrecisionError(ValueError):
    """A trainer.precision that cannot run with the chosen strategy or accelerator."""


class ClippingMixedPrecision(MixedPrecision):
    """torch.autocast training that clips gradient norms for fused and non-fused optimizers alike."""

    def _unscale_once(self, optimizer: Optimizer) -> None:
        """Divide the gradients by the loss scale unless that already happened in this step (the
        scaler raises on a second unscale_ before update())."""
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.amp.grad_scaler import OptState

        if isinstance(optimizer, LightningOptimizer):  # manual optimization hands the wrapper
            optimizer = optimizer.optimizer  # the scaler keys its state by the optimizer's id
        state = self.scaler._per_optimizer_states[id(optimizer)]
        if state["stage"] is not OptState.UNSCALED:
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer, model, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.scaler is None:  # bf16: nothing to unscale
            return Precision.optimizer_step(self, optimizer, model=model, closure=closure, **kwargs)
        if isinstance(optimizer, LBFGS):
            raise PrecisionError("trainer.precision=16-mixed cannot drive the LBFGS optimizer")
        closure_result = closure()
        # Automatic optimization returns None when training_step skipped the batch: no backward ran.
        skipped = closure_result is None and model.automatic_optimization
        if not skipped:
            # Unscale before on_before_optimizer_step and clipping see the gradients, fused or not.
            self._unscale_once(optimizer)
        self._after_closure(model, optimizer)
        if skipped:
            return closure_result
        step_output = self.scaler.step(optimizer, **kwargs)  # skipped by the scaler on inf/NaN
        self.scaler.update()
        return step_output

    def clip_gradients(self, optimizer: Optimizer, clip_val: int | float = 0.0, gradient_clip_algorithm=None) -> None:
        from lightning.pytorch.utilities import GradClipAlgorithmType

        if clip_val > 0 and self.scaler is not None:
            # Manual optimization clips before opt.step(): the gradients must be unscaled first.
            self._unscale_once(optimizer)
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm or GradClipAlgorithmType.NORM)


def normalize_precision(value: str | int) -> str:
    """trainer.precision in its long form ("bf16" -> "bf16-mixed"); an unknown value is refused."""
    value = ALIASES.get(str(value), str(value))
    if value not in PRECISIONS:
        raise PrecisionError(f"trainer.precision={value!r} is not a precision: use one of {', '.join(PRECISIONS)}")
    return value


def autocast_device(accelerator: str) -> str:
    """The torch.autocast device type of a trainer.accelerator value (as Lightning resolves it)."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return accelerator  # cpu, mps


def mixed_precision_plugin(precision: str, accelerator: str, strategy: str = "single") -> MixedPrecision | None:
    """Our plugin for a *-mixed precision (None otherwise: Lightning builds the plain plugins)."""
    if precision not in MIXED:
        return None
    device = autocast_device(accelerator)
    if precision == "16-mixed" and strategy == "fsdp":
        raise PrecisionError(
            "trainer.precision=16-mixed is not supported with strategy=fsdp (FSDP2 has no "
            "loss scaler here): use trainer.precision=bf16-mixed"
        )
    if precision == "16-mixed" and device == "cpu":
        raise PrecisionError(
            "trainer.precision=16-mixed needs a GPU (fp16 loss scaling on a CPU is not "
            "supported here): use trainer.precision=bf16-mixed, which needs no loss scaling"
        )
    return ClippingMixedPrecision(precision, device)
