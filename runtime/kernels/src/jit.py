"""Numba JIT backend: the kernel source compiled on first use (cached on disk by Numba).

Only used when no AOT build fits this CPU (development, or a platform we did not build for);
the shipped executable has no Numba.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import numba
from llvmlite import binding as llvm

from ggufile.runtime.kernels import packing, step_layout
from ggufile.runtime.kernels.src import exports, lanes, step, sync, tiles

NAME = "jit"


def _cache_dir() -> str:
    """Numba's disk cache checks a kernel's own file only, and the kernels' code also lives in
    lanes and tiles (the IR), step and sync, with constants from packing and step_layout: one
    cache directory per content of all, and per instruction set the IR was emitted for."""
    digest = hashlib.sha256(os.environ.get(lanes.ISA_ENV, "").encode())
    digest.update(llvm.get_host_cpu_name().encode() + llvm.get_host_cpu_features().flatten().encode())
    for module in (exports, lanes, tiles, step, sync, packing, step_layout):
        digest.update(Path(module.__file__).read_bytes())
    return str(Path(exports.__file__).parent / "__pycache__" / f"jit-{digest.hexdigest()[:16]}")


def load() -> SimpleNamespace:
    """The kernels, each wrapped like its AOT export: no GIL, same fast-math flags."""
    kernels = {name: getattr(exports, name) for name in exports.KERNEL_NAMES}
    kernels.update({name: getattr(step, name) for name in step.KERNEL_NAMES})
    saved, numba.config.CACHE_DIR = numba.config.CACHE_DIR, _cache_dir()  # read as each is wrapped
    try:
        return SimpleNamespace(**{
            name: numba.njit(nogil=True, fastmath=set(exports.fastmath_for(name)), cache=True)(kernel)
            for name, kernel in kernels.items()
        })
    finally:
        numba.config.CACHE_DIR = saved
