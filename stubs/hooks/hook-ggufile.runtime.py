"""PyInstaller hook for ggufile.runtime: everything the runtime loads lazily or by path.

- every submodule (engine, server, tokenizers... are imported inside functions or by name),
  including the AOT-compiled kernel extension modules (runtime/kernels/_aot_*.so), which
  collect_submodules lists like any other module;
- the web UI (runtime/webui/*), read from disk by the server;
- the uvicorn pieces it picks by name at run time (the contrib hook covers most of them).
The kernels' build-time package (kernels/src) is excluded by the spec (excludes win over hidden imports).
"""
from PyInstaller.utils.hooks import collect_data_files, collect_submodules

hiddenimports = collect_submodules("ggufile.runtime", filter=lambda name: not name.startswith("ggufile.runtime.kernels.src")) + [
    "uvicorn.logging",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
]
datas = collect_data_files("ggufile.runtime", excludes=["**/__pycache__"])
