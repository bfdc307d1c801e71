"""Compile the kernels ahead of time with numba.pycc: one extension module per CPU variant.

    python -m ggufile.runtime.kernels.src.aot_build [--variant x86-64-v3 ...] [--out DIR]

Writes `_aot_<variant>` extension modules next to this file (gitignored). The shipped
executable imports them with no numba/LLVM present. Variants the build machine cannot run
are compiled too: LLVM cross-targets any CPU of the same architecture. Each variant is built
in a process of its own, all at once: Numba compiles callee functions (the step's kernels)
once per process, so the IR lanes.py emits for one variant's ISA must not be reused for
another's.

pycc builds its export wrappers from a default numba `Flags()`, which holds the GIL and uses
no fast-math. `KernelModuleCompiler` builds them from the flags the JIT gets from
`njit(nogil=True, fastmath=...)`: `release_gil` (the wrapper calls PyEval_SaveThread before
the kernel and PyEval_RestoreThread after) and the same per-kernel fast-math set
(exports.fastmath_for).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

with warnings.catch_warnings():  # pycc is "pending deprecation" but is the AOT path numba has
    warnings.simplefilter("ignore")
    import numba.pycc.compiler as pycc_compiler
from numba.core.compiler import Flags
from numba.core.cpu import FastMathOptions
from numba.core.codegen import AOTCPUCodegen
from numba.pycc import CC

from ggufile.runtime.kernels import cpu
from ggufile.runtime.kernels.src import exports, lanes, step

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the AOT modules ship in kernels/, beside their loader


def kernel_flags(fastmath=exports.FASTMATH) -> Flags:
    """What njit(nogil=True, fastmath=...) sets, for pycc's exports."""
    flags = Flags()
    flags.release_gil = True
    flags.fastmath = FastMathOptions(set(fastmath))
    return flags


def _compile_kernel(typingctx, targetctx, func, args, return_type, flags, **kwargs):
    """pycc compiles every export with one Flags object; give each kernel its own fast-math set."""
    flags = flags.copy()
    flags.fastmath = FastMathOptions(set(exports.fastmath_for(func.__name__)))
    return _pycc_compile_extra(typingctx, targetctx, func, args, return_type, flags, **kwargs)


_pycc_compile_extra = pycc_compiler.compile_extra


@contextlib.contextmanager
def _pycc_patched():
    """pycc's _cull_exports calls the module-level names `Flags()` and `compile_extra`: point
    them at ours (GIL released, per-kernel fast-math)."""
    saved = pycc_compiler.Flags, pycc_compiler.compile_extra
    pycc_compiler.Flags, pycc_compiler.compile_extra = kernel_flags, _compile_kernel
    try:
        yield
    finally:
        pycc_compiler.Flags, pycc_compiler.compile_extra = saved


class KernelModuleCompiler(pycc_compiler.ModuleCompiler):
    def _cull_exports(self):
        with _pycc_patched():
            return super()._cull_exports()


TUNING = {"x86-64-v4": "-prefer-256-bit", "x86-64-v4-vnni": "-prefer-256-bit"}


class KernelCC(CC):
    """CC whose exports release the GIL and use the kernels' fast-math flags."""

    target_features = ""  # LLVM feature string added to target_cpu's (pycc passes none)

    def _compile_object_files(self, build_dir):
        features = self.target_features
        saved = AOTCPUCodegen._customize_tm_features
        AOTCPUCodegen._customize_tm_features = lambda codegen: features  # read as the codegen is made
        try:
            compiler = KernelModuleCompiler(self._export_entries, self._basename, self._use_nrt,
                                            cpu_name=self._target_cpu)
        finally:
            AOTCPUCodegen._customize_tm_features = saved
        assert compiler.context.codegen()._tm_features == features
        compiler.external_init_function = self._init_function
        temp_obj = os.path.join(build_dir, os.path.splitext(self._output_file)[0] + ".o")
        compiler.write_native_object(temp_obj, wrap=True)
        return [temp_obj], compiler.dll_exports


def build_variant(variant: str, llvm_cpu: str, out_dir: Path) -> Path:
    cc = KernelCC(cpu.module_name(variant))
    cc.output_dir = str(out_dir)
    cc.target_cpu = llvm_cpu
    # skylake-avx512 tuning prefers 256-bit vectors; the decode kernels' 16-lane float loops run
    # 1.25x faster as 512-bit code (Zen 4: Q4_1 7.6 -> 9.5 GB/s, as JIT-compiled for the host).
    cc.target_features = TUNING.get(variant, "")
    cc.verbose = False
    for module in (exports, step):
        for name, signature in module.SIGNATURES.items():
            cc.export(name, signature)(getattr(module, name))
    cc.compile()  # pycc builds in its own temporary directory
    return out_dir / cc.output_file


def lanes_isa(variant: str) -> str:
    """The integer instructions lanes.py may use in a variant."""
    needs = cpu.variants_for_machine()[variant][1]
    return "avx512vnni" if "avx512_vnni" in needs else "avx2" if "avx2" in needs else "portable"


def _build_here(variant: str, out_dir: Path) -> None:
    if os.environ.get(lanes.ISA_ENV) != lanes_isa(variant):
        raise SystemExit(f"{lanes.ISA_ENV} must be {lanes_isa(variant)} to build {variant}")
    start = time.perf_counter()
    path = build_variant(variant, cpu.variants_for_machine()[variant][0], out_dir)
    print(f"{variant:10} -> {path.name} ({path.stat().st_size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - start:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    variants = cpu.variants_for_machine()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", choices=sorted(variants),
                    help="build only these (default: all for this architecture)")
    ap.add_argument("--out", type=Path, default=PACKAGE_DIR)
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not variants:
        print(f"no AOT variants defined for {cpu.machine()}; the JIT/NumPy backends will be used")
        return 0
    chosen = args.variant or list(variants)
    if args.in_process:
        for variant in chosen:
            _build_here(variant, args.out)
        return 0
    total = time.perf_counter()
    children = [subprocess.Popen(
        [sys.executable, "-m", __spec__.name, "--in-process", "--variant", variant, "--out", str(args.out)],
        env={**os.environ, lanes.ISA_ENV: lanes_isa(variant)}) for variant in chosen]
    failed = [v for v, child in zip(chosen, children) if child.wait() != 0]
    if failed:
        print(f"AOT build failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"total {time.perf_counter() - total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
