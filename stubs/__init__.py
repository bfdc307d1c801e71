"""The PyInstaller recipe for ggufile launcher stubs (spec, hooks, entry script).

Built stubs are cached in stubs/cache/ (or $GGUFILE_CACHE/stubs); see ggufile.builder.stub.
"""
