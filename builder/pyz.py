"""`build --format pyz`: a Python zipapp holding the runtime and the model, runnable by any python3.

Decision: the zipapp requires only NumPy (and a CPython >= 3.10) on the target; the runtime's
pure-Python dependencies (click, jinja2, markupsafe, starlette, uvicorn and theirs) are vendored
into the zip, so `python3 model.pyz --chat` works wherever `import numpy` does. Compiled parts
are left out: Python cannot import extension modules from a zip (markupsafe and uvicorn fall
back to pure Python), so the kernels run on their NumPy backend (the AOT kernels are native-
executable only), and the numba-only build modules are left out too.

The model is the last member, ZIP_STORED, its data on a 64 KiB boundary: the local header
carries a padding extra field (id 0xD935, as Android's zipalign does), so the runtime can mmap
it in place from the zip.
"""
from __future__ import annotations

import importlib.util
import json
import struct
import zipfile
from pathlib import Path

import ggufile.runtime
from ggufile.stubs import BUILD_ONLY_PACKAGE
from ggufile.runtime import __version__
from ggufile.runtime.container import (
    ALIGNMENT,
    FORMAT_VERSION,
    META_MEMBER,
    MODEL_MEMBER,
    ZIP_ALIGN_EXTRA_ID,
    ZIP_LOCAL_HEADER,
    EmbeddedModel,
    read_pyz,
    zip_data_offset,
)
from ggufile.runtime.errors import GGUFileError

from ggufile.builder.build import Progress, atomic_output, check_output, copy_window, default_name, validate_model

SHEBANG = b"#!/usr/bin/env python3\n"
VENDORED = ["click", "jinja2", "markupsafe", "starlette", "anyio", "sniffio", "idna", "h11",
            "uvicorn", "typing_extensions"]
MAIN = '''"""ggufile zipapp: run the model stored in this file (python3 THIS.pyz --help)."""
import os
import sys

if sys.version_info < (3, 10):
    sys.exit(f"Error: this ggufile .pyz needs Python 3.10 or newer ({sys.executable} is "
             f"{sys.version.split()[0]}); or use the native executable (ggufile build --format exe)")
try:
    import numpy  # noqa: F401 -- the one dependency not inside the zip
except ImportError:
    sys.exit(f"Error: this ggufile .pyz needs NumPy, which {sys.executable} lacks: pip install numpy "
             f"(Debian/Ubuntu: apt install python3-numpy); or use the native executable")

from ggufile.runtime.launch import launch

sys.exit(launch(container=os.path.dirname(os.path.abspath(__file__))))
'''
EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same inputs give the same zip
SKIP_SUFFIXES = {".pyc", ".so", ".pyd", ".dylib", ".c", ".pyi"}


def _package_files(root: Path, arc_prefix: str):
    skip = BUILD_ONLY_PACKAGE.replace(".", "/") + "/"
    for p in sorted(root.rglob("*")):
        arcname = f"{arc_prefix}/{p.relative_to(root).as_posix()}"
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in SKIP_SUFFIXES \
                and not arcname.startswith(skip):
            yield p, arcname


def code_files():
    """(path, name in zip) of the runtime and the vendored pure-Python packages."""
    yield from _package_files(Path(ggufile.runtime.__file__).parent, "ggufile/runtime")
    for name in VENDORED:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise GGUFileError(f"building a .pyz needs {name} installed (pip install {name})")
        origin = Path(spec.origin)
        if spec.submodule_search_locations:
            yield from _package_files(origin.parent, name)
        else:
            yield origin, origin.name


def _write_code(zf: zipfile.ZipFile) -> None:
    def add(arcname: str, data: bytes) -> None:
        zf.writestr(zipfile.ZipInfo(arcname, EPOCH), data, compress_type=zipfile.ZIP_DEFLATED)

    add("__main__.py", MAIN.encode())
    add("ggufile/__init__.py", b'"""ggufile (runtime only)."""\n')
    for path, arcname in code_files():
        add(arcname, path.read_bytes())


def _aligned_info(pos: int, size: int) -> zipfile.ZipInfo:
    """ZipInfo for the model whose local header, starting at `pos`, ends on ALIGNMENT."""
    info = zipfile.ZipInfo(MODEL_MEMBER, EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64_extra = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0  # zipfile adds it itself
    header = ZIP_LOCAL_HEADER.size + len(MODEL_MEMBER.encode()) + zip64_extra
    pad = -(pos + header + 4) % ALIGNMENT  # the extra field's own 4-byte header counts too
    info.extra = struct.pack("<HH", ZIP_ALIGN_EXTRA_ID, pad) + bytes(pad)
    return info


def build_pyz(model: Path, out: Path, name: str | None = None, default_args: list[str] | None = None,
              progress: Progress = None) -> EmbeddedModel:
    model = Path(model)
    check_output(out, (model,))
    facts = validate_model(model)
    size = model.stat().st_size
    meta = {"format_version": FORMAT_VERSION, "name": name or default_name(model, facts),
            "default_args": list(default_args or []), "source": model.name, "built_by": __version__,
            "sha256": ""}
    with atomic_output(out, executable=True) as f:
        f.write(SHEBANG)
        with zipfile.ZipFile(f, "w") as zf:
            _write_code(zf)
            info = _aligned_info(f.tell(), size)
            with zf.open(info, "w", force_zip64=size * 1.05 > zipfile.ZIP64_LIMIT) as dst:
                meta["sha256"] = copy_window(model, 0, size, dst, progress)
            zf.writestr(zipfile.ZipInfo(META_MEMBER, EPOCH), json.dumps(meta, sort_keys=True, indent=1))
            _check_aligned(f, zf)
    return read_pyz(out)


def _check_aligned(f, zf: zipfile.ZipFile) -> None:
    offset = zip_data_offset(f, zf.getinfo(MODEL_MEMBER))
    f.seek(0, 2)
    if offset % ALIGNMENT:
        raise GGUFileError(f"internal error: model data at {offset} is not {ALIGNMENT}-aligned")
