r"""
---
title: Compiled inference
summary: The per-token inference step built with torch.compile over fixed shapes, for fast generation; what
  compile= accepts, and a clear error at the start when the compiler it needs is missing.
---

# Compiled inference

At the README's sizes a generation step is not arithmetic: it is a few hundred small operations (about 25 per
layer), each of which costs microseconds of dispatch whatever its size. `torch.compile` fuses the element-wise ones
into a few kernels and removes the Python between them. It does so best for code whose shapes do not change from
call to call, and [the fixed-shape step](static_step.html) is that code: one compiled function serves every
position of a generation while the state's cache keeps its capacity.

`FeedbackTransformer(..., compile=True)` (or `compile='reduce-overhead'`: CUDA graphs on a GPU) runs its
inference calls (without autograd: evaluation, `generate`) through it. Nothing happens at import or construction
but the checks below: the step is compiled at its first call, and compiled again when a call brings shapes it
was not built for (another batch size, a grown cache; after the second shape `torch.compile` makes the sizes
symbolic). A call the compiler cannot take any more (past `torch._dynamo`'s recompile limit) runs the same step
eagerly: slower, never different.

## What compiling needs

Inductor, the compiler behind `torch.compile`, writes C++ for the CPU and Triton kernels for CUDA GPUs, and builds
them on the spot. `check_compile` is called with the device of a model's first call, and by the experiments when
they check their configuration (a bad configuration ends the command with exit status 2), so that a missing
compiler is an error that names it before any step runs, not a crash inside the first one: on the CPU a C++
compiler (inductor's `cpp.cxx` setting, or `$CXX`), on a GPU the `triton` package. The constructors check only
that `compile=` is one of its values: the device is not known yet.
"""

import importlib.util
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Union

import torch

# The values of `compile=`: off, and `torch.compile`'s modes
COMPILE_MODES = (None, 'default', 'reduce-overhead')


def compile_mode(compile: Union[bool, str, None]) -> Optional[str]:
    """`torch.compile`'s mode for a `compile=` setting: `None` (off), `'default'` or `'reduce-overhead'`."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return 'default'
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False, None, 'default' or 'reduce-overhead', got {compile!r}")
    return compile


def cxx_compilers() -> List[str]:
    """The C++ compilers inductor would try on the CPU: `$CXX`, then its `cpp.cxx` setting."""
    from torch._inductor import config
    names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    return [n for n in (os.environ.get('CXX'), *names) if n]


def find_cxx() -> Optional[str]:
    """The path of the first C++ compiler of `cxx_compilers()` that is installed, or `None`."""
    for name in cxx_compilers():
        path = shutil.which(name)
        if path:
            return path
    return None


def has_triton() -> bool:
    """Whether the `triton` package (inductor's GPU code generator) is installed."""
    return importlib.util.find_spec('triton') is not None


def check_compile(compile: Union[bool, str, None], device_type: str = 'cpu') -> None:
    """
    A `ValueError` for a `compile=` value that is not one, a `RuntimeError` naming what is missing when the
    compiled step could not be built on `device_type` (`'cpu'`, `'cuda'`); nothing when `compile` is off.
    """
    mode = compile_mode(compile)
    if mode is None:
        return
    if device_type == 'cuda' and not has_triton():
        raise RuntimeError("compile=True on a CUDA device needs Triton, and the 'triton' package is not "
                           "installed (pip install triton), or use compile=False")
    if device_type != 'cuda' and find_cxx() is None:
        raise RuntimeError(f"compile=True needs a C++ compiler to build the compiled step on the CPU, and none of "
                           f"{', '.join(cxx_compilers()) or '(none configured)'} was found on PATH: install one "
                           f"(e.g. g++) or set $CXX, or use compile=False")


def compile_options(mode: str) -> Dict[str, Any]:
    """
    `torch.compile`'s keyword arguments for `mode` (it takes a mode or options, not both). The default mode drops
    inductor's checks of its inputs' sizes and strides inside the compiled code: the guards that choose the
    compiled code check them already, and at a generated token's sizes the second check costs a sixth of the call.
    """
    if mode == 'default':
        return {'options': {'size_asserts': False}}
    return {'mode': mode}


class CompiledStep:
    """
    A model's compiled steps: each function compiled at its first call (never at import or construction), and
    dropped by copies of the model.
    """

    def __init__(self, mode: str):
        self.mode = mode
        # The compiled version of each function
        self.compiled: Dict[Callable, Callable] = {}
        # The device types whose toolchain was checked
        self.checked = set()

    def __call__(self, fn: Callable, device: torch.device) -> Callable:
        """`fn` compiled (the first time; the same compiled function afterwards), for a call on `device`."""
        if device.type not in self.checked:
            check_compile(self.mode, device.type)
            self.checked.add(device.type)
        if fn not in self.compiled:
            # Not `fullgraph`: past the compiler's recompile limit a call must run the function eagerly, not fail
            self.compiled[fn] = torch.compile(fn, **compile_options(self.mode))
        return self.compiled[fn]

    def __getstate__(self) -> dict:
        # Copies of the model (`copy.deepcopy`, pickling) compile their own
        return {'mode': self.mode, 'compiled': {}, 'checked': set()}
