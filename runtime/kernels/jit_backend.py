"""Numba JIT backend: the kernel source compiled on first use (cached on disk by Numba).

Only used when no AOT build fits this CPU (development, or a platform we did not build for);
the shipped executable has no Numba.
"""
from __future__ import annotations

from types import SimpleNamespace

import numba

from ggufile.runtime.kernels import source, step_source

NAME = "jit"


def load() -> SimpleNamespace:
    """The kernels, each wrapped like its AOT export: no GIL, same fast-math flags."""
    kernels = {name: getattr(source, name) for name in source.KERNEL_NAMES}
    kernels.update({name: getattr(step_source, name) for name in step_source.KERNEL_NAMES})
    return SimpleNamespace(**{
        name: numba.njit(nogil=True, fastmath=set(source.fastmath_for(name)), cache=True)(kernel)
        for name, kernel in kernels.items()
    })
