"""PyInstaller hook for ggufile.runtime: everything the runtime loads lazily or by path.

- every submodule (engine, server, tokenizers... are imported inside functions or by name),
  including the AOT-compiled kernel extension modules (runtime/kernels/_aot_*.so), which
  collect_submodules lists like any other module;
- the web UI (runtime/webui/*), read from disk by the server;
- the uvicorn pieces it picks by name at run time (the contrib hook covers most of them);
- llguidance (constrained output, imported on first use) and its metadata (it reads its version).
The kernels' build-time package (kernels/src) is excluded by the spec (excludes win over hidden imports).
"""
from PyInstaller.utils.hooks import collect_data_files, collect_submodules, copy_metadata

hiddenimports = collect_submodules("ggufile.runtime", filter=lambda name: not name.startswith("ggufile.runtime.kernels.src")) + [
    "uvicorn.logging",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
    # llguidance's core; its torch / hf / mlx / llama_cpp / tiktoken adapters are never imported.
    "llguidance", "llguidance._lib", "llguidance._grammar_from", "llguidance.gbnf_to_lark",
    "llguidance._tokenizer", "llguidance._struct_tag", "llguidance._util",
]
datas = collect_data_files("ggufile.runtime", excludes=["**/__pycache__"])
try:
    datas += copy_metadata("llguidance")
except Exception:  # not installed: the stub then refuses constrained output with a clear 400
    pass
