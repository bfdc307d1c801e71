"""The PyInstaller recipe for ggufile launcher stubs (spec, hooks, entry script).

Built stubs are cached in stubs/cache/ (or $GGUFILE_CACHE/stubs); see ggufile.builder.stub.
The spec reads this file by path (runpy), so keep it free of imports.
"""

# Runtime modules that exist only to build or benchmark the kernels: they import numba, which
# neither the stub nor the .pyz ships. Without them the kernels load the AOT modules, or NumPy.
BUILD_ONLY_MODULES = [
    "ggufile.runtime.kernels.aot_build",
    "ggufile.runtime.kernels.jit_backend",
    "ggufile.runtime.kernels.source",
    "ggufile.runtime.kernels.lanes_source",
    "ggufile.runtime.kernels.step_source",
    "ggufile.runtime.kernels.sync_source",
    "ggufile.runtime.kernels.bench",
]
