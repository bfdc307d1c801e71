"""Build-only: the kernels' Numba source, the JIT backend and the AOT build. Never shipped in an
executable (the stub recipe and the .pyz builder exclude this package); it imports numba."""
