"""The wheel is platform-specific: it ships the AOT kernels and this platform's prebuilt launcher stub,
so `pip install ggufile` then `ggufile build` needs no PyInstaller and no compiler.

The stub comes from (first found, and only if it froze exactly these sources, by tree hash):
$GGUFILE_WHEEL_STUB (a .runtime.tar.gz), $GGUFILE_CACHE/stubs/PLATFORM/ (what
`sudo stubs/build_stub.sh PLATFORM` makes: glibc 2.31), then the host-built stub caches
($GGUFILE_CACHE/stubs, stubs/cache: `ggufile stub --launcher cached`). The platform tag is
manylinux_X_Y for the newest glibc the stub and the kernels need (read from their ELF files).
Everything else is in pyproject.toml.
"""
import os
import platform as host
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
platforms = runpy.run_path(str(HERE / "builder" / "platforms.py"))
glibc = runpy.run_path(str(HERE / "builder" / "glibc.py"))
PLATFORM = f"{sys.platform}-{host.machine().lower()}"
KERNELS = HERE / "runtime" / "kernels"


def candidates():
    if os.environ.get("GGUFILE_WHEEL_STUB"):
        yield Path(os.environ["GGUFILE_WHEEL_STUB"])
        return
    cache = Path(os.environ.get("GGUFILE_CACHE") or Path.home() / ".cache" / "ggufile") / "stubs"
    for folder in (cache / PLATFORM, cache, HERE / "stubs" / "cache"):
        yield from sorted(folder.glob(f"*{platforms['STUB_SUFFIX']}"))


def wheel_stub() -> Path:
    tree = platforms["tree_hash"](HERE)
    for stub in candidates():
        info = platforms["sidecar"](stub)
        if stub.is_file() and info.get("tree") == tree and info.get("platform") == PLATFORM:
            return stub
    sys.exit(f"error: no {PLATFORM} launcher stub for these sources (tree {tree}); build one first: "
             f"`sudo stubs/build_stub.sh {PLATFORM}` (glibc 2.31) or `ggufile stub --launcher cached`, "
             f"or set GGUFILE_WHEEL_STUB")


def manylinux_tag(stub: Path) -> str:
    floors = [(platforms["sidecar"](stub).get("glibc_floor") or {}).get("glibc")]
    floors += [glibc["newest"]({v for vs in glibc["needed_versions"](so.read_bytes()).values() for v in vs},
                               "GLIBC") for so in KERNELS.glob("_aot_*.so")]
    newest = max((f for f in floors if f), key=lambda v: tuple(map(int, v.split("."))), default="2.17")
    major, minor = newest.split(".")[:2]
    return f"manylinux_{major}_{minor}_{host.machine()}"


class BinaryDistribution(Distribution):
    """Compiled files inside: a cpXY-cpXY-PLATFORM wheel, not py3-none-any."""

    def has_ext_modules(self):
        return True


class BuildPyWithStub(build_py):
    """The usual build_py, plus this platform's stub under ggufile/stubs/prebuilt/PLATFORM/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not sys.platform.startswith("linux"):
            return  # an editable install builds its stub on first use
        stub = wheel_stub()
        dest = Path(self.build_lib) / "ggufile" / "stubs" / platforms["SHIPPED_DIR"] / PLATFORM
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        shutil.copy2(stub, dest / stub.name)
        shutil.copy2(f"{stub}.json", dest / f"{stub.name}.json")
        self.announce(f"shipping the {PLATFORM} stub {stub.name}", level=2)


options = {}
if sys.platform.startswith("linux") and "bdist_wheel" in sys.argv:
    options["bdist_wheel"] = {"plat_name": manylinux_tag(wheel_stub())}
setup(distclass=BinaryDistribution, cmdclass={"build_py": BuildPyWithStub}, options=options)
