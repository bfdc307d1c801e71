"""The PyInstaller recipe for ggufile launcher stubs (spec, hooks, entry script).

Built stubs are cached in stubs/cache/ (or $GGUFILE_CACHE/stubs); see ggufile.builder.stub.
The spec reads this file by path (runpy), so keep it free of imports.
"""

# The package that exists only to build or benchmark the kernels (Numba source, the AOT build,
# the JIT backend): it imports numba, which neither the stub nor the .pyz ships. Without it the
# kernels load the AOT modules, or NumPy.
BUILD_ONLY_PACKAGE = "ggufile.runtime.kernels.src"
