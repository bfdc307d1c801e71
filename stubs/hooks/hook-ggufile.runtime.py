"""PyInstaller hook for ggufile.runtime: everything the runtime loads lazily or by path.

- every submodule (engine, server, tokenizers... are imported inside functions or by name),
  including the AOT-compiled kernel extension modules (runtime/kernels/*.so), which
  collect_submodules lists like any other module;
- the web UI (runtime/webui/*), read from disk by the server;
- the uvicorn pieces it picks by name at run time (the contrib hook covers most of them).
Build-time only modules (the AOT builder, which needs numba) are left out.
"""
from PyInstaller.utils.hooks import collect_data_files, collect_submodules

BUILD_ONLY = ("aot_build", "jit")


def _runtime_module(name: str) -> bool:
    return not any(part in BUILD_ONLY for part in name.split("."))


hiddenimports = collect_submodules("ggufile.runtime", filter=_runtime_module) + [
    "uvicorn.logging",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
]
datas = collect_data_files("ggufile.runtime", excludes=["**/__pycache__"])
