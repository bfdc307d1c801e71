"""Which AOT kernel variants this CPU can run (no numba, no compilation: just CPU flags)."""
from __future__ import annotations

import platform
from pathlib import Path

# Variant name -> (LLVM target CPU, CPU flags it needs), best last within an architecture.
_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"})
_V4 = _V3 | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
X86_VARIANTS = {
    "generic": ("x86-64", frozenset()),
    "x86-64-v3": ("haswell", _V3),
    "x86-64-v4": ("skylake-avx512", _V4),
    # Cascade Lake = Skylake-AVX512 + VNNI (vpdpbusd); Ice Lake, Sapphire Rapids, Zen 4/5 have it too.
    "x86-64-v4-vnni": ("cascadelake", _V4 | {"avx512_vnni"}),
}
ARM_VARIANTS = {"aarch64": ("generic", frozenset())}


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def variants_for_machine(arch: str | None = None) -> dict[str, tuple[str, frozenset]]:
    arch = arch or machine()
    if arch == "x86_64":
        return X86_VARIANTS
    if arch == "aarch64":
        return ARM_VARIANTS
    return {}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty if unknown: only generic code runs)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def runnable_variants(flags: frozenset[str] | None = None, arch: str | None = None) -> list[str]:
    """Variant names this CPU can run, best first."""
    flags = cpu_flags() if flags is None else flags
    names = [name for name, (_, needs) in variants_for_machine(arch).items() if needs <= flags]
    return names[::-1]


def module_name(variant: str) -> str:
    """The extension module a variant is built into (inside ggufile.runtime.kernels)."""
    return "_aot_" + variant.replace("-", "_")
