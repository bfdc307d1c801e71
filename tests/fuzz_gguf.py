"""Mutation fuzzer for hostile GGUF files: no crash, no uncaught exception, no hang, no huge allocation.

    python tests/fuzz_gguf.py --files 50000 --seed 1 --jobs 2 --keep /tmp/fuzz-failures

Seeds are tiny synthetic models written here (llama with a byte-level BPE vocabulary, gemma3
with a SentencePiece one, several weight types), each with a chat template. Every file is one
mutation of a seed: a header field overwritten with an edge value (counts, lengths, dimensions,
types, offsets), a metadata value replaced by one of another type or range (e.g.
rope.dimension_count = 1000000, head_count_kv = 0, NaN, a string, an array), random bytes,
a truncation, or a corrupted container trailer. Each file goes through the stages the CLI and the
builder run: reader + --info, tokenizer, model load + chat template + two decode steps, build
validation, and `inspect` of the file wrapped in a container.

The stages run in worker processes under an address-space limit (RLIMIT_AS: their start-up size
plus ALLOC_BUDGET), so a segfault, an abort or a hang costs one file, not the run. Per file and
stage the outcome must be success or a GGUFileError whose message is one printable line;
anything else (another exception, MemoryError = allocation beyond the budget, a signal, a
timeout) is a failure, reported with the mutation that caused it (and the file, with --keep).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ALLOC_BUDGET = 1 << 30  # what one file may make a worker allocate beyond its start-up size
FILE_TIMEOUT = 30.0  # seconds for all stages of one file (a tiny model takes milliseconds)
N_CTX = 64
STAGES = ("info", "tokenizer", "generate", "build", "inspect")
MAX_ERROR_LINE = 500

# -- seeds -----------------------------------------------------------------------------------

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] | trim }}"
         "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def _bpe_vocab() -> dict:
    from ggufile.runtime.tokenizer.pretokenize import CHAR_TO_BYTE

    alphabet = sorted(CHAR_TO_BYTE, key=CHAR_TO_BYTE.get)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "o n"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": len(tokens) - 3, "tokenizer.ggml.eos_token_id": len(tokens) - 1,
            "tokenizer.chat_template": CHATML}


def _spm_vocab() -> dict:
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["▁", "e", "t", "a", "o", "▁t", "he", "▁the", "in", "er", "x", "▁x"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = np.array([0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))], np.float32)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": GEMMA}


# (arch, weight type name, n_embd, n_head, n_head_kv, head_dim, n_ff)
SEED_SHAPES = (
    ("llama", "F32", 64, 4, 2, 16, 96),
    ("llama", "Q8_0", 64, 4, 2, 16, 128),
    ("llama", "Q4_K", 256, 4, 4, 64, 256),
    ("gemma3", "F16", 64, 4, 1, 16, 128),
    ("gemma3", "Q6_K", 256, 2, 1, 128, 256),
)


def write_seed(path: Path, arch: str, type_name: str, E: int, H: int, KV: int, D: int, F: int, rng) -> None:
    from ggufile.builder.gguf_writer import TensorSpec, write_gguf
    from ggufile.builder.quantizers import quantize
    from ggufile.runtime.gguf.constants import GGMLType

    vocab = _bpe_vocab() if arch == "llama" else _spm_vocab()
    n_vocab, qtype = len(vocab["tokenizer.ggml.tokens"]), GGMLType[type_name]
    meta = {"general.architecture": arch, "general.name": f"fuzz-{arch}-{type_name}",
            f"{arch}.context_length": 128, f"{arch}.embedding_length": E, f"{arch}.block_count": 2,
            f"{arch}.feed_forward_length": F, f"{arch}.attention.head_count": H,
            f"{arch}.attention.head_count_kv": KV, f"{arch}.attention.key_length": D,
            f"{arch}.attention.value_length": D, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
            f"{arch}.rope.freq_base": 10000.0, f"{arch}.rope.dimension_count": D}
    if arch == "gemma3":
        meta[f"{arch}.attention.sliding_window"] = 16
    meta.update(vocab)

    def mat(name, rows, k):
        return TensorSpec(name, (k, rows), qtype, quantize(rng.standard_normal((rows, k), np.float32) * 0.05, qtype))

    def vec(name, n):
        return TensorSpec(name, (n,), GGMLType.F32, np.ones(n, np.float32))

    tensors = [mat("token_embd.weight", n_vocab, E), vec("output_norm.weight", E)]
    for il in range(2):
        p = f"blk.{il}."
        tensors += [vec(p + "attn_norm.weight", E), mat(p + "attn_q.weight", H * D, E),
                    mat(p + "attn_k.weight", KV * D, E), mat(p + "attn_v.weight", KV * D, E),
                    mat(p + "attn_output.weight", E, H * D), vec(p + "ffn_norm.weight", E),
                    mat(p + "ffn_gate.weight", F, E), mat(p + "ffn_up.weight", F, E),
                    mat(p + "ffn_down.weight", E, F)]
        if arch == "gemma3":
            tensors += [vec(p + "attn_q_norm.weight", D), vec(p + "attn_k_norm.weight", D),
                        vec(p + "post_attention_norm.weight", E), vec(p + "post_ffw_norm.weight", E)]
    write_gguf(path, meta, tensors)


class Seed:
    """A seed file's bytes plus where its header fields lie (for in-place field mutations)."""

    def __init__(self, path: Path):
        from ggufile.runtime.gguf.reader import GGUFReader

        self.path = path
        self.data = path.read_bytes()
        with GGUFReader(path) as r:
            self.metadata = dict(r.metadata)
            self.value_types = dict(r.value_types)
            self.header_end = r.data_offset
            self.tensors = [(t.name, t.shape, t.ggml_type, t.offset - r.data_offset) for t in r.tensors.values()]
            self.tensor_data = {t.name: bytes(r.tensor_bytes(t.name)) for t in r.tensors.values()}
        self.fields = _header_fields(self.data)
        self.fields_by_group: dict[str, list] = {}
        for f in self.fields:
            self.fields_by_group.setdefault(f[2].split("[")[0].rsplit(" ", 1)[0], []).append(f)
        self.field_groups = sorted(self.fields_by_group)


def _header_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, label) of every fixed-size field of the header: counts, lengths, types,
    scalar values, tensor dims/types/offsets."""
    fields = [(8, 8, "tensor count"), (16, 8, "kv count"), (4, 4, "version")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(label):
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        fields.append((pos, 8, label + " length"))
        pos += 8 + n

    def value(vtype, label):
        nonlocal pos
        if vtype == 8:
            string(label)
        elif vtype == 9:
            (etype,) = struct.unpack_from("<I", data, pos)
            fields.append((pos, 4, label + " element type"))
            (count,) = struct.unpack_from("<Q", data, pos + 4)
            fields.append((pos + 4, 8, label + " count"))
            pos += 12
            for i in range(count):
                if etype in sizes and i > 4:  # scalars: only the first few are interesting
                    pos += sizes[etype] * (count - i)
                    break
                value(etype, f"{label}[{i}]")
        else:
            fields.append((pos, sizes[vtype], label))
            pos += sizes[vtype]

    for i in range(n_kv):
        start = pos
        string(f"key #{i}")
        key = data[start + 8:pos].decode()
        (vtype,) = struct.unpack_from("<I", data, pos)
        fields.append((pos, 4, f"{key} type"))
        pos += 4
        value(vtype, key)
    for i in range(n_tensors):
        start = pos
        string(f"tensor #{i} name")
        name = data[start + 8:pos].decode()
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields.append((pos, 4, f"{name} n_dims"))
        pos += 4
        for d in range(n_dims):
            fields.append((pos, 8, f"{name} dim {d}"))
            pos += 8
        fields.append((pos, 4, f"{name} type"))
        fields.append((pos + 4, 8, f"{name} offset"))
        pos += 12
    return fields


# -- mutations -------------------------------------------------------------------------------

EDGE_INTS = [0, 1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 127, 255, 256, 1000, 4095, 65535, 65536, 1000000,
             2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48, 2**63 - 1, 2**63, 2**64 - 1]
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-45, 1e38, 3.4e38, float("nan"), float("inf"), float("-inf"), 1e-30]


def _edge_int(rng: random.Random, size: int) -> int:
    v = rng.choice(EDGE_INTS) if rng.random() < 0.8 else rng.getrandbits(8 * size)
    if rng.random() < 0.2:
        v = -v
    return v % (1 << (8 * size))


def mutate_field(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    # a field group (a key, a tensor, an array's elements) first, so the vocabulary's thousands
    # of string lengths do not drown out the few dozen hyperparameters
    group = rng.choice(seed.field_groups)
    off, size, label = rng.choice(seed.fields_by_group[group])
    data = bytearray(seed.data)
    if size == 4 and label.endswith(("eps", "base", "factor")) or (size in (4, 8) and rng.random() < 0.15):
        v = rng.choice(EDGE_FLOATS)
        data[off:off + size] = struct.pack("<f" if size == 4 else "<d", v)
        return bytes(data), f"field {label} = float {v}"
    v = _edge_int(rng, size)
    data[off:off + size] = v.to_bytes(size, "little")
    return bytes(data), f"field {label} = {v}"


def _other_value(rng: random.Random, old):
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(EDGE_INTS[:-3])
    if kind == 1:
        return float(rng.choice(EDGE_FLOATS))
    if kind == 2:
        return rng.choice(["", "x", "llama", "gemma3", "gpt2", "\x1b[2J\x1b[Hverified OK", "é" * 300, "9"])
    if kind == 3:
        return np.array([rng.choice(EDGE_INTS[:20]) for _ in range(rng.randrange(0, 5))], dtype=np.uint32)
    if kind == 4:
        return [rng.choice(["a", "b c", "\x00", "Ġ t"]) for _ in range(rng.randrange(0, 5))]
    if kind == 5:
        return bool(rng.getrandbits(1))
    if kind == 6 and isinstance(old, (int, np.integer)) and not isinstance(old, bool):
        return int(old) * rng.choice([2, 3, 16, 1000]) + rng.choice([0, 1, -1])
    if kind == 7 and isinstance(old, (int, np.integer)) and not isinstance(old, bool):
        return -1
    return rng.choice(EDGE_INTS)


TEMPLATES = [
    "{% for i in range(10**9) %}{{ i }}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}", "{{ 1/0 }}", "{% include 'a' %}", "{% import 'a' as b %}", "{% extends 'a' %}",
    "{{ messages[0]['content'].__class__.__mro__ }}", "{{ raise_exception('no') }}", "{% for %}",
    "{{ messages | tojson }}", "{{ messages[0]['content'].split('</think>')[-1] }}",
    "\x1b[2J{{ 'hi' }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
]


def mutate_value(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    meta = dict(seed.metadata)
    key = rng.choice(sorted(meta))
    action = rng.random()
    if key == "tokenizer.chat_template" or action < 0.08:
        key, value = "tokenizer.chat_template", rng.choice(TEMPLATES)
    elif action < 0.15:
        del meta[key]
        return _rewrite(seed, meta), f"drop {key}"
    else:
        value = _other_value(rng, meta[key])
    meta[key] = value
    return _rewrite(seed, meta), f"value {key} = {_short(value)}"


def _short(value) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) < 80 else text[:77] + "..."


def _rewrite(seed: Seed, meta: dict, tensors=None) -> bytes:
    from ggufile.builder.gguf_writer import _header, _pad
    from ggufile.runtime.gguf.constants import GGUF_DEFAULT_ALIGNMENT

    class Spec:  # what _header needs of a tensor: name, shape, type, nbytes
        def __init__(self, name, shape, ggml_type, nbytes):
            self.name, self.shape, self.ggml_type, self.nbytes = name, shape, ggml_type, nbytes

    specs = [Spec(n, s, t, len(seed.tensor_data[n])) for n, s, t, _ in (tensors or seed.tensors)]
    header = _header(meta, specs, GGUF_DEFAULT_ALIGNMENT)
    out = [header, b"\0" * _pad(len(header), GGUF_DEFAULT_ALIGNMENT)]
    for s in specs:
        out += [seed.tensor_data[s.name], b"\0" * _pad(s.nbytes, GGUF_DEFAULT_ALIGNMENT)]
    return b"".join(out)


def mutate_tensors(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    tensors = list(seed.tensors)
    i = rng.randrange(len(tensors))
    name = tensors[i][0]
    if rng.random() < 0.5:
        del tensors[i]
        return _rewrite(seed, seed.metadata, tensors), f"drop tensor {name}"
    j = rng.randrange(len(tensors))  # two tensors swap names (shapes no longer match)
    tensors[i], tensors[j] = (tensors[j][0],) + tensors[i][1:], (name,) + tensors[j][1:]
    return _rewrite(seed, seed.metadata, tensors), f"swap tensor names {name} <-> {tensors[i][0]}"


def mutate_bytes(seed: Seed, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(seed.data)
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randrange(1, 9)
        for _ in range(n):
            data[rng.randrange(seed.header_end)] = rng.randrange(256)
        return bytes(data), f"{n} random header bytes"
    if kind == 1:
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), f"truncated at {cut}"
    if kind == 2:
        at, n = rng.randrange(seed.header_end), rng.randrange(1, 64)
        return bytes(data[:at] + data[at + n:]), f"{n} header bytes deleted at {at}"
    at = rng.randrange(seed.header_end)
    return bytes(data[:at] + bytes(rng.getrandbits(8) for _ in range(8)) + data[at:]), f"8 bytes inserted at {at}"


MUTATORS = ((mutate_field, 0.45), (mutate_value, 0.35), (mutate_tensors, 0.05), (mutate_bytes, 0.15))


def mutate(seeds: list[Seed], rng: random.Random) -> tuple[bytes, str, bool]:
    """(file bytes, description, whether the container trailer gets corrupted too)."""
    seed = rng.choice(seeds)
    fn = rng.choices([m for m, _ in MUTATORS], [w for _, w in MUTATORS])[0]
    data, what = fn(seed, rng)
    return data, f"{seed.path.stem}: {what}", rng.random() < 0.1


# -- the worker: one process that runs every stage on file after file --------------------------

def _check_line(message: str) -> str | None:
    if "\n" in message or "\r" in message or not message.isprintable():
        return "error message is not one printable line"
    if len(message) > MAX_ERROR_LINE:
        return f"error message is {len(message)} characters long"
    return None


class Unprintable(Exception):
    """What --info / inspect would print holds control characters or is huge."""


def _check_shown(facts: dict) -> None:
    for key, value in facts.items():
        text = str(value)
        if not text.isprintable() or len(text) > MAX_ERROR_LINE:
            raise Unprintable(f"{key}: {text[:100]!r}")


def _run_stage(stage: str, path: str, container: str):
    from ggufile.runtime import kernels
    from ggufile.runtime.gguf.reader import GGUFReader

    if stage == "info":
        from ggufile.runtime.gguf.info import describe_gguf

        with GGUFReader(path, scan_strings=kernels.string_scanner()) as r:
            _check_shown(describe_gguf(r))
    elif stage == "tokenizer":
        from ggufile.runtime.tokenizer.tokenizer import StreamDecoder, Tokenizer

        with GGUFReader(path, scan_strings=kernels.string_scanner()) as r:
            tok = Tokenizer.from_metadata(r.metadata)
            ids = tok.encode("Hello the world <|im_start|> <start_of_turn> é😀\n", parse_special=True)
            tok.decode(ids)
            decoder = StreamDecoder(tok)
            "".join(decoder.feed(t) for t in ids) + decoder.flush()
    elif stage == "generate":
        from ggufile.runtime.engine import Engine
        from ggufile.runtime.sampling import SamplingParams

        engine = Engine.open(path, n_ctx=N_CTX)
        try:
            ids = engine.chat_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}])
            for params in (SamplingParams(temperature=0), SamplingParams(seed=1)):
                list(engine.generate(ids[:8], params, max_tokens=2))
            list(engine.generate(engine.tokenize("x"), SamplingParams(temperature=0), max_tokens=2))
        finally:
            engine.reader.close()
    elif stage == "build":
        from ggufile.builder.build import validate_model

        validate_model(Path(path))
    elif stage == "inspect":
        from ggufile.runtime.container import read_container

        _check_shown(read_container(container).describe(verify=True))


def _wrap_container(gguf: bytes, path: str, corrupt: bool, rng: random.Random) -> None:
    """The file as a minimal `cached`-layout container: [GGUF][trailer]."""
    import hashlib

    from ggufile.runtime.container import pack_trailer

    trailer = bytearray(pack_trailer(0, len(gguf), hashlib.sha256(gguf).hexdigest(), {"name": "fuzz"}))
    if corrupt:
        for _ in range(rng.randrange(1, 4)):
            trailer[rng.randrange(len(trailer))] = rng.randrange(256)
    Path(path).write_bytes(gguf + bytes(trailer))


def worker() -> None:
    """Read file paths from stdin, answer one JSON line per file on stdout."""
    import resource

    from ggufile.runtime.errors import GGUFileError

    vm = _vm_size()
    resource.setrlimit(resource.RLIMIT_AS, (vm + ALLOC_BUDGET, resource.RLIM_INFINITY))
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing the stages print may corrupt the protocol
    for line in sys.stdin:
        path, container = json.loads(line)
        results = {}
        for stage in STAGES:
            try:
                _run_stage(stage, path, container)
                results[stage] = ["ok", ""]
            except GGUFileError as err:
                bad = _check_line(str(err))
                if bad:
                    results[stage] = ["bad-message", f"{bad}: {str(err)[:200]!r}"]
                elif "out of memory" in str(err):
                    results[stage] = ["over-budget", str(err)]
                else:
                    results[stage] = ["error", str(err)]
            except MemoryError:
                results[stage] = ["over-budget", "MemoryError"]
            except Exception as err:  # noqa: BLE001 -- exactly what the fuzzer looks for
                import traceback

                tb = traceback.extract_tb(err.__traceback__)[-1]
                where = f"{Path(tb.filename).name}:{tb.lineno}"
                results[stage] = ["exception", f"{type(err).__name__} at {where}: {str(err)[:200]}"]
        out.write(json.dumps(results) + "\n")
        out.flush()


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class Worker:
    def __init__(self):
        env = dict(os.environ, GGUFILE_THREADS="2", PYTHONHASHSEED="0")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)

    def send(self, path: str, container: str) -> None:
        self.proc.stdin.write(json.dumps([path, container]) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> tuple[str, dict]:
        """("done", results) or ("crash", {returncode}) or ("hang", {})."""
        ready, _, _ = select.select([self.proc.stdout], [], [], FILE_TIMEOUT)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            return "hang", {}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            return "crash", {"returncode": rc}
        return "done", json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# -- the campaign ----------------------------------------------------------------------------

def make_seeds(folder: Path) -> list[Seed]:
    rng = np.random.default_rng(0)
    seeds = []
    for shape in SEED_SHAPES:
        path = folder / f"seed-{shape[0]}-{shape[1]}.gguf"
        write_seed(path, *shape, rng=rng)
        seeds.append(Seed(path))
    return seeds


def campaign(n_files: int, seed: int = 0, jobs: int = 1, keep: Path | None = None, log=print) -> dict:
    """Run n_files mutations; returns {"files", "failures": [...], "outcomes": Counter, "seconds"}."""
    t0 = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="ggufile-fuzz-"))
    try:
        seeds = make_seeds(folder)
        rng = random.Random(seed)
        workers = [Worker() for _ in range(max(1, jobs))]
        failures, outcomes = [], Counter()
        pending: list = []
        for i in range(n_files):
            data, what, corrupt = mutate(seeds, rng)
            w = i % len(workers)
            path = folder / f"case-{w}.gguf"
            container = folder / f"case-{w}.exe"
            path.write_bytes(data)
            _wrap_container(data, str(container), corrupt, rng)
            pending.append((i, w, path, container, what))
            if len(pending) == len(workers) or i == n_files - 1:
                _send_all(workers, pending)
                for case, w, path, container, what in pending:
                    status, results = workers[w].receive()
                    _record(case, status, results, what, outcomes, failures, keep, path, container, log)
                    if status != "done":
                        workers[w] = Worker()
                pending = []
            if log and (i + 1) % 1000 == 0:
                log(f"{i + 1} files, {len(failures)} failures, {time.monotonic() - t0:.0f} s")
        for w in workers:
            w.close()
        return {"files": n_files, "failures": failures, "outcomes": outcomes, "seconds": time.monotonic() - t0}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _send_all(workers, pending) -> None:
    for _, w, path, container, _ in pending:
        workers[w].send(str(path), str(container))


def _record(i, status, results, what, outcomes, failures, keep, path, container, log) -> None:
    if status != "done":
        outcomes[status] += 1
        failures.append({"case": i, "kind": status, "mutation": what, **results})
    else:
        for stage, (outcome, message) in results.items():
            outcomes[f"{stage}:{outcome}"] += 1
            if outcome not in ("ok", "error"):
                failures.append({"case": i, "kind": outcome, "stage": stage, "mutation": what, "detail": message})
    if keep and failures and failures[-1]["case"] == i:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, keep / f"case-{i}.gguf")
        shutil.copy(container, keep / f"case-{i}.exe")
        if log:
            log(json.dumps(failures[-1]))


def main() -> int:
    if "--worker" in sys.argv:
        worker()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="copy failing files here")
    args = ap.parse_args()
    report = campaign(args.files, args.seed, args.jobs, args.keep)
    kinds = Counter(f["kind"] for f in report["failures"])
    print(json.dumps({"files": report["files"], "seconds": round(report["seconds"]),
                      "failures": dict(kinds), "outcomes": dict(sorted(report["outcomes"].items()))}, indent=1))
    for f in report["failures"][:50]:
        print(json.dumps(f))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
