"""
---
title: Utilities
summary: Small helpers shared by the models and the experiments - independent copies of a layer, and the checks of
  an attention span and of an integer setting.
---

# Utilities

A transformer is a stack of $L$ layers with the same shape but *independent* parameters.
It is convenient to build one layer and let the container make the other $L - 1$ copies.
"""

import copy
from typing import Any, Optional

from torch import nn


def clone_module_list(module: nn.Module, n: int) -> nn.ModuleList:
    """
    Make an `nn.ModuleList` of `n` deep copies of `module`.

    Each copy owns its own parameters (nothing is shared with `module` or with another copy), so an
    optimizer trains them separately; they all start from the same initial values.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (the number of copies) must be an int >= 1, got {n!r}")
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def check_memory_span(memory_span: Optional[int]) -> None:
    """
    A `ValueError` unless `memory_span` (how many earlier positions or memory vectors attention may see) is
    `None` (unlimited) or an int >= 1. The Feedback Transformers, their cache and the causal baseline all check it
    here.
    """
    if memory_span is not None and (not isinstance(memory_span, int) or isinstance(memory_span, bool)
                                    or memory_span < 1):
        raise ValueError(f"memory_span must be None (unlimited) or an int >= 1, got {memory_span!r}")


def check_int(key: str, value: Any, minimum: int, maximum: Optional[int] = None) -> None:
    """A `ValueError` naming setting `key` unless `value` is an int (not a bool) in `[minimum, maximum]`."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        bounds = f'in [{minimum}, {maximum}]' if maximum is not None else f'>= {minimum}'
        raise ValueError(f"{key} must be an int {bounds}, got {value!r}")
