"""PyInstaller hook for ggufile.runtime: everything the runtime loads lazily or by path.

- every submodule (engine, server, tokenizers... are imported inside functions or by name),
  including the AOT-compiled kernel extension modules (runtime/kernels/*.so), which
  collect_submodules lists like any other module;
- the web UI (runtime/webui/*), read from disk by the server;
- the uvicorn pieces it picks by name at run time (the contrib hook covers most of them).
Build-time only modules (the AOT builder, the JIT backend and the kernel source, which all
import numba) are left out: the stub runs the AOT modules, or NumPy.
"""
from PyInstaller.utils.hooks import collect_data_files, collect_submodules

BUILD_ONLY = {f"ggufile.runtime.kernels.{m}" for m in ("aot_build", "jit_backend", "source")}


def _runtime_module(name: str) -> bool:
    return name not in BUILD_ONLY


hiddenimports = collect_submodules("ggufile.runtime", filter=_runtime_module) + [
    "uvicorn.logging",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
]
datas = collect_data_files("ggufile.runtime", excludes=["**/__pycache__"])
