r"""
---
title: Mixed-precision training
summary: The precision option of the training loop - float32, or matrix products in bfloat16 / float16 under
  torch.autocast, with a gradient scaler for float16 - and how it meets the non-finite-step policy and checkpoints.
---

# Mixed precision

`precision=fp32|bf16|fp16` (default `fp32`), a `Precision` object that [the trainer](trainer.html) owns. With
`bf16` or `fp16` the forward pass and the loss run under `torch.autocast`: matrix products take low-precision
operands, while the residual stream, layer norms, softmax, the memory of the Feedback Transformers and the loss
stay in float32 (the models follow autocast's rules in their own fused loops too). The parameters, their gradients
and the optimizer's state stay float32, so checkpoints hold float32 weights whatever the precision.

* **bf16** has float32's range (8 exponent bits) and needs nothing else. On a CPU with `avx512_bf16` (or a recent
  GPU) its products are fast; elsewhere the CPU emulates them.
* **fp16** has a narrow range: small gradients underflow to zero. A *gradient scaler* multiplies the loss by a
  large factor before the backward pass and divides the gradients by it before clipping and the optimizer step;
  when the scaled gradients overflow, the scaler skips that step and lowers the factor. Those skipped steps are the
  scaler's normal work, not divergence: the non-finite-step policy ([run control](run_control.html)) counts a step
  only when the *loss* is not finite. On CUDA this is `torch.amp.GradScaler('cuda')`; on a CPU the same scaler runs
  on `'cpu'` (PyTorch 2.3 and later), although CPU float16 products are slow: prefer bf16 there.

The scaler's factor is part of the checkpoint, so a resumed fp16 run continues exactly. Validation and samples run
under the same autocast as training. Memory carried across batches is made under autocast too (its keys and
values are low precision), so a run with carried memory resumes in the precision it was trained in.
"""

import contextlib
from typing import Any, ContextManager, Dict, Optional

import torch

# `precision=` values: the autocast dtype of each (`None`: float32, no autocast)
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def check_precision(precision: str) -> None:
    """A `ValueError` unless `precision` is one of `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


class Precision:
    """
    What the trainer asks of the precision: the autocast context, the backward pass, the optimizer step, and the
    gradient scaler's state for checkpoints.

    * `precision`: `fp32`, `bf16` or `fp16`
    * `device`: where the model runs (autocast and the scaler are per device type)
    """

    def __init__(self, precision: str, device: torch.device):
        check_precision(precision)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.device_type = device.type
        # fp16's gradient scaler
        self.scaler: Optional[torch.amp.GradScaler] = (torch.amp.GradScaler(device.type)
                                                       if precision == 'fp16' else None)

    def autocast(self) -> ContextManager:
        """The autocast context of the forward pass and the loss (nothing for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """`loss.backward()`; with a scaler, of the scaled loss, then the gradients are unscaled for clipping."""
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    @property
    def handles_overflow(self) -> bool:
        """Whether a non-finite gradient norm is the scaler's to handle (fp16), not a failed step."""
        return self.scaler is not None

    def step(self, scheduled: Any, skip: bool = False) -> None:
        """
        The optimizer step and its schedule's step (`scheduled` is a `ScheduledOptimizer`), unless the trainer
        `skip`s this step (a non-finite loss or gradient norm on some rank). With a scaler, the scaler takes the
        step (or skips it when the gradients overflowed, and then the schedule does not move), and a skipped step
        still ends with the scaler's `update()`: it has unscaled this step's gradients, and the next step may only
        unscale again after an update.
        """
        if self.scaler is None:
            if not skip:
                scheduled.step()
            return
        if skip:
            self.scaler.update()
            return
        scale = self.scaler.get_scale()
        self.scaler.step(scheduled.optimizer)
        self.scaler.update()
        # A lower scale means the scaler found non-finite gradients and skipped the step
        if self.scaler.get_scale() >= scale and scheduled.scheduler is not None:
            scheduled.scheduler.step()

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps: the scaler's state (fp16)."""
        return {'precision': self.precision,
                'scaler': None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if self.scaler is not None and state and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
