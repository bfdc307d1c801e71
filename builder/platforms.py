"""Which launcher stub runs where: platform names, the stubs prebuilt for each, the prologue's choice.

A platform is named "<os>-<machine>" (linux-x86_64, linux-aarch64, darwin-arm64, ...), the name a
stub's sidecar records. Stubs for a platform other than the one running the builder are built
elsewhere -- `stubs/build_stub.sh PLATFORM` in a Debian 11 root (glibc 2.31), natively or under
qemu-user-static -- and found here by the hash of the sources they froze (`tree_hash`), in:
1. the package itself (ggufile/stubs/prebuilt/PLATFORM/: what a wheel ships),
2. $GGUFILE_CACHE/stubs/PLATFORM/ (default ~/.cache/ggufile: where build_stub.sh puts them).
A stub whose sources differ from this tree's is never used (it would run other code).

A `cached`-launcher executable may carry one runtime per platform; its sh prologue picks one by
`uname -sm` (UNAME below) and says which platforms the file holds when none fits.

Only the standard library at import: setup.py loads this file by path to compute tree_hash.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Platform -> what `uname -sm` prints on machines that run it (Linux arm64 = some BSD-ish kernels).
UNAME = {
    "linux-x86_64": ("Linux x86_64", "Linux amd64"),
    "linux-aarch64": ("Linux aarch64", "Linux arm64"),
    "darwin-arm64": ("Darwin arm64",),
    "darwin-x86_64": ("Darwin x86_64",),
}
# Platforms whose stubs stubs/build_stub.sh builds (Debian 11 roots; the others need their own OS).
BUILDABLE = ("linux-x86_64", "linux-aarch64")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds runtime/ and stubs/ (tree or site-packages)
SHIPPED_DIR = "prebuilt"  # under stubs/: the stubs a wheel carries
STUB_SUFFIX = ".runtime.tar.gz"
_SKIP_SUFFIXES = (".pyc", ".so", ".pyd", ".dylib")
_SKIP_DIRS = ("__pycache__", "cache", SHIPPED_DIR)


def tree_hash(root: Path = PACKAGE_ROOT) -> str:
    """Hash of the sources a stub freezes (runtime/ + stubs/ recipe), without compiled files: the
    AOT kernels are rebuilt for each platform from kernels/src, which is hashed."""
    h = hashlib.sha256()
    for part in ("runtime", "stubs"):
        base = root / part
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base)
            if not path.is_file() or path.suffix in _SKIP_SUFFIXES \
                    or any(d in rel.parts[:-1] for d in _SKIP_DIRS) or path.name.endswith(".sh"):
                continue
            h.update(f"{part}/{rel.as_posix()}".encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def host_platform() -> str:
    from ggufile.builder.stub import stub_platform

    return stub_platform()


def cache_root() -> Path:
    return Path(os.environ.get("GGUFILE_CACHE") or Path.home() / ".cache" / "ggufile")


def search_dirs(platform: str) -> list[Path]:
    return [PACKAGE_ROOT / "stubs" / SHIPPED_DIR / platform, cache_root() / "stubs" / platform]


def sidecar(stub: Path) -> dict:
    try:
        info = json.loads(Path(str(stub) + ".json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def find_stub(platform: str, tree: str | None = None) -> Path | None:
    """The prebuilt `cached` stub for `platform` that froze this tree's sources, or None."""
    tree = tree or tree_hash()
    for folder in search_dirs(platform):
        for stub in sorted(folder.glob(f"*{STUB_SUFFIX}")):
            info = sidecar(stub)
            if info.get("tree") == tree and info.get("platform") == platform:
                return stub
    return None


def parse_platforms(value: str | None) -> list[str]:
    """"linux-x86_64,linux-aarch64" -> the list; unknown names are an error."""
    from ggufile.runtime.errors import GGUFileError

    names = [p.strip() for p in (value or "").split(",") if p.strip()]
    for name in names:
        if name not in UNAME:
            hint = " (Windows executables need the onefile launcher: build on Windows)" \
                if name.startswith(("windows", "win32")) else ""
            raise GGUFileError(f"unknown platform {name!r}{hint}; choose from {', '.join(UNAME)}")
    if len(set(names)) != len(names):
        raise GGUFileError(f"--platform {value}: a platform is named twice")
    return names


def parse_stub_args(values) -> tuple[Path | None, dict[str, Path]]:
    """--stub PATH (one) and --stub PLATFORM=PATH (any number) -> (plain path, {platform: path})."""
    from ggufile.runtime.errors import GGUFileError

    plain, by_platform = None, {}
    for value in values or ():
        name, sep, path = value.partition("=")
        if sep and name in UNAME:
            by_platform[name] = Path(path)
        elif plain is None:
            plain = Path(value)
        else:
            raise GGUFileError("--stub PATH is given twice; name platforms with --stub PLATFORM=PATH")
    for path in [plain, *by_platform.values()]:
        if path is not None and not path.is_file():
            raise GGUFileError(f"stub {path}: no such file")
    return plain, by_platform


def resolve_stubs(platforms: list[str], explicit: dict[str, Path], echo=print) -> list[tuple[str, Path]]:
    """One `cached` stub per platform, in order: --stub PLATFORM=PATH, else a prebuilt stub for this
    tree, else (this machine's platform only) the stub PyInstaller builds here."""
    from ggufile.runtime.errors import GGUFileError

    from ggufile.builder.stub import ensure_stub, stub_kind

    tree, host, chosen = tree_hash(), host_platform(), []
    for platform in platforms or [host]:
        stub = explicit.get(platform) or find_stub(platform, tree)
        if stub is None and platform == host:
            stub = ensure_stub(echo=echo, launcher="cached")
        if stub is None:
            how = (f"build it with `sudo stubs/build_stub.sh {platform}` (from a ggufile checkout) or "
                   if platform in BUILDABLE else "build it there with `ggufile stub --launcher cached`, then ")
            raise GGUFileError(f"no {platform} launcher stub for this ggufile (sources {tree}): {how}"
                               f"pass --stub {platform}=PATH")
        if stub_kind(stub) != "cached":
            raise GGUFileError(f"{stub}: several platforms need `cached` runtime stubs (.runtime.tar.gz)")
        chosen.append((platform, stub))
    for platform in explicit:
        if platforms and platform not in platforms:
            raise GGUFileError(f"--stub {platform}=...: {platform} is not in --platform")
    return chosen


def default_cached_stub(echo=print) -> Path:
    """This machine's `cached` stub: a prebuilt one for this tree (e.g. glibc 2.31), else built here."""
    from ggufile.builder.stub import ensure_stub

    return find_stub(host_platform()) or ensure_stub(echo=echo, launcher="cached")


def select_script(runtimes: list[dict]) -> str:
    """The prologue's `case` on `uname -sm`: sets h (runtime hash), o (offset), n (size).
    A runtime of unknown platform (a stub without a sidecar) is taken on any machine."""
    lines = ['case $(uname -sm 2>/dev/null) in']
    for rt in runtimes:
        names = UNAME.get(rt["platform"])
        pattern = "|".join(f'"{n}"' for n in names) if names else "*"
        lines.append(f'  {pattern}) h={rt["sha256"][:16]} o={rt["offset"]} n={rt["size"]} ;;')
    if all(rt["platform"] in UNAME for rt in runtimes):
        held = ", ".join(rt["platform"] for rt in runtimes)
        lines.append(f'  *) echo "Error: this file holds ggufile runtimes for {held} only; this machine is '
                     f'$(uname -sm 2>/dev/null || echo unknown). Rebuild with --platform, or get the model '
                     f'out with: ggufile extract $0 -o model.gguf" >&2; exit 1 ;;')
    lines.append("esac")
    return "\n".join(lines)
