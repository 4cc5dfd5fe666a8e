r"""
---
title: Configurable optimizer with the Noam learning-rate schedule
summary: Adam, optionally with the warm-up-then-decay schedule of "Attention Is All You Need", as labml configs.
---

# Optimizer configurations

Set from the command line with labml-style keys: `optimizer.optimizer=Noam` (or `Adam`, `AdamWarmup`),
`optimizer.learning_rate=1.0`, `optimizer.warmup=2000`, `optimizer.weight_decay=0`.

## The Noam schedule

"Attention Is All You Need" raises the learning rate linearly for `warmup` steps and then decays it with the
inverse square root of the step $s$ (counting from 1):

$$\eta_s = \eta \cdot d_{model}^{-1/2} \cdot \min\big(s^{-1/2},\; s \cdot \mathit{warmup}^{-3/2}\big).$$

With `learning_rate` $\eta = 1$, $d_{model} = 128$ and 2,000 warm-up steps the rate peaks at about $2 \cdot 10^{-3}$.
It is PyTorch's own `LambdaLR` over Adam, so its step count is saved and restored with `state_dict()`.

## Warm-up, then constant

`AdamWarmup` (the Feedback Transformer authors' schedule) raises the rate linearly to `learning_rate` over
`warmup` steps and keeps it there: $\eta_s = \eta \cdot \min(1, s / \mathit{warmup})$.

## Warm-up, then cosine decay

`AdamCosine` warms up the same way and then lowers the rate along a half cosine to zero at the last step $T$
(`total_steps`, which the experiment sets from its length):

$$\eta_s = \eta \cdot \frac{1}{2}\Big(1 + \cos\big(\pi \cdot \frac{s - \mathit{warmup}}{T - \mathit{warmup}}\big)\Big)
  \quad (s > \mathit{warmup}).$$
"""

import math
from typing import Any, Dict, Optional

import torch
from labml.configs import BaseConfigs, meta_config, option
from torch.optim.lr_scheduler import LambdaLR

from labml_nn.experiments.labml_adapter import set_values


class NoamFactor:
    """The Noam multiplier of the learning rate at scheduler step `i` (optimizer step $s = i + 1$)."""

    def __init__(self, d_model: int, warmup: int):
        self.d_model = d_model
        self.warmup = warmup

    def __call__(self, i: int) -> float:
        s = i + 1
        return self.d_model ** -0.5 * min(s ** -0.5, s * self.warmup ** -1.5)


class WarmupFactor:
    r"""The multiplier $\min(1, s / \mathit{warmup})$ at scheduler step `i` (optimizer step $s = i + 1$)."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, i: int) -> float:
        return min(1.0, (i + 1) / self.warmup)


class CosineFactor(WarmupFactor):
    r"""Linear warm-up, then $\frac{1}{2}(1 + \cos(\pi\, p))$ with $p$ the fraction of the steps after it."""

    def __init__(self, warmup: int, total_steps: int):
        super().__init__(warmup)
        self.total_steps = total_steps

    def __call__(self, i: int) -> float:
        s = i + 1
        if s <= self.warmup:
            return super().__call__(i)
        progress = min(1.0, (s - self.warmup) / max(1, self.total_steps - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))


class ScheduledOptimizer:
    """
    An optimizer and its (optional) learning-rate schedule, stepped together.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Optional[LambdaLR] = None):
        self.optimizer = optimizer
        self.scheduler = scheduler

    def step(self) -> None:
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        """The learning rate the next step will use."""
        return self.optimizer.param_groups[0]['lr']

    def state_dict(self) -> Dict[str, Any]:
        return {'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state['optimizer'])
        if (self.scheduler is None) != (state['scheduler'] is None):
            raise ValueError("The checkpoint's optimizer schedule does not match optimizer.optimizer")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state['scheduler'])


class OptimizerConfigs(BaseConfigs):
    """
    * `optimizer`: `Adam` (constant `learning_rate`), `Noam` (Adam with the Noam schedule), `AdamWarmup`
      (linear warm-up over `warmup` steps, then constant) or `AdamCosine` (warm-up, then cosine decay to zero)
    * `learning_rate`: the constant rate, or $\\eta$ of the Noam schedule
    * `warmup`, `d_model`: of the Noam schedule (`warmup` also of `AdamWarmup` and `AdamCosine`)
    * `total_steps`: the optimizer steps of the whole run, for `AdamCosine` (set by the experiment)
    """
    optimizer: ScheduledOptimizer
    learning_rate: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 2000
    d_model: int = 512
    total_steps: int = 0
    parameters: Any

    def __init__(self):
        super().__init__(_primary='optimizer')

    def validate(self) -> None:
        """A `ValueError` naming the first value Adam or the schedule cannot work with."""
        for key, low in (('learning_rate', 'finite number > 0'), ('eps', 'finite number >= 0'),
                         ('weight_decay', 'finite number >= 0')):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
                    key == 'learning_rate' and value == 0):
                raise ValueError(f"optimizer.{key} must be a {low}, got {value!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 1:
            raise ValueError(f"optimizer.warmup must be an int >= 1 (steps of the Noam warm-up), "
                             f"got {self.warmup!r}")


meta_config(OptimizerConfigs.parameters)


def optimizer_configs(parameters: Any, d_model: int, defaults: Dict[str, Any],
                      total_steps: int) -> OptimizerConfigs:
    """
    The `optimizer.*` configs of an experiment: its model's `parameters` and width `d_model` (Noam), its `defaults`
    (the command line overrides them) and the length of its run in steps (`AdamCosine`).
    """
    conf = OptimizerConfigs()
    conf.parameters = parameters
    conf.d_model = d_model
    for key, value in defaults.items():
        setattr(conf, key, value)
    conf.total_steps = total_steps
    return conf


def check_optimizer_values(defaults: Dict[str, Any], values: Dict[str, Any]) -> None:
    """Check the `optimizer.*` entries of `values` over `defaults`, before the model (its parameters) exists."""
    conf = OptimizerConfigs()
    prefix = 'optimizer.'
    set_values(conf, {**defaults, **{k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}})
    conf.validate()


def _adam(c: OptimizerConfigs, lr: float) -> torch.optim.Adam:
    c.validate()
    return torch.optim.Adam(c.parameters, lr=lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)


@option(OptimizerConfigs.optimizer, 'Adam')
def _adam_optimizer(c: OptimizerConfigs) -> ScheduledOptimizer:
    return ScheduledOptimizer(_adam(c, c.learning_rate))


def _scheduled_adam(c: OptimizerConfigs, factor: Any) -> ScheduledOptimizer:
    optimizer = _adam(c, c.learning_rate)
    return ScheduledOptimizer(optimizer, LambdaLR(optimizer, factor))


@option(OptimizerConfigs.optimizer, 'Noam')
def _noam_optimizer(c: OptimizerConfigs) -> ScheduledOptimizer:
    return _scheduled_adam(c, NoamFactor(c.d_model, c.warmup))


@option(OptimizerConfigs.optimizer, 'AdamWarmup')
def _adam_warmup_optimizer(c: OptimizerConfigs) -> ScheduledOptimizer:
    return _scheduled_adam(c, WarmupFactor(c.warmup))


@option(OptimizerConfigs.optimizer, 'AdamCosine')
def _adam_cosine_optimizer(c: OptimizerConfigs) -> ScheduledOptimizer:
    if c.total_steps < 1:
        raise ValueError(f"optimizer.optimizer=AdamCosine needs the run's total_steps >= 1, "
                         f"got {c.total_steps}")
    return _scheduled_adam(c, CosineFactor(c.warmup, c.total_steps))
