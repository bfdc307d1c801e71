"""`ggufile quantize IN.gguf OUT.gguf --type T`: requantize a whole model, llama.cpp style.

Every --type name is a llama.cpp file type (LLAMA_FTYPE_*) and gets llama-quantize's per-tensor
rules (src/llama-quant.cpp, llama_tensor_get_type): 1-D tensors and norms keep their type, the
output / tied token embedding goes to Q6_K (Q8_0 when its rows don't fit), and the _M/_S/_L
mixes give attn_v / ffn_down / attn_output more bits in chosen layers. Two differences:
- Q3_K, Q4_K, Q5_K are aliases of the _M mixes in llama-quantize; here they mean the pure type
  (every quantizable weight of that type, like `llama-quantize --pure`), the only way to
  measure a type by itself. `--pure` does the same for any name.
- Input may already be quantized: it is dequantized first, with a warning (errors compound).

Tensors are processed and written in llama.cpp's order (layer number, then name), which is
what its per-layer counters (i_attention_wv, i_ffn_down) assume; with the metadata copied as
llama-quantize does it, the output from an F16 model is byte-for-byte llama-quantize's file
(checked by examples/compare_llama_cpp.py file).
"""
from __future__ import annotations

import enum
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from ggufile.builder.gguf_writer import Typed, TensorSpec, metadata_with_types, write_gguf
from ggufile.runtime import kernels
from ggufile.runtime.gguf.constants import QUANT_TABLE, QUANTIZATION_VERSION, Ftype, GGMLType, GGUFValueType, Keys
from ggufile.runtime.kernels.types import FLOAT_TYPES
from ggufile.runtime.errors import GGUFileError
from ggufile.runtime.gguf.reader import GGUFReader, TensorInfo
from ggufile.builder.quantizers import quantize as quantize_rows

@dataclass(frozen=True)
class Mix:
    name: str
    ftype: Ftype
    default_type: GGMLType
    pure: bool = False


T = GGMLType
MIXES: dict[str, Mix] = {m.name: m for m in [
    Mix("F32", Ftype.ALL_F32, T.F32),
    Mix("F16", Ftype.MOSTLY_F16, T.F16),
    Mix("BF16", Ftype.MOSTLY_BF16, T.BF16),
    Mix("Q8_0", Ftype.MOSTLY_Q8_0, T.Q8_0),
    Mix("Q4_0", Ftype.MOSTLY_Q4_0, T.Q4_0),
    Mix("Q4_1", Ftype.MOSTLY_Q4_1, T.Q4_1),
    Mix("Q5_0", Ftype.MOSTLY_Q5_0, T.Q5_0),
    Mix("Q5_1", Ftype.MOSTLY_Q5_1, T.Q5_1),
    Mix("Q2_K", Ftype.MOSTLY_Q2_K, T.Q2_K),
    Mix("Q3_K", Ftype.MOSTLY_Q3_K_M, T.Q3_K, pure=True),
    Mix("Q4_K", Ftype.MOSTLY_Q4_K_M, T.Q4_K, pure=True),
    Mix("Q5_K", Ftype.MOSTLY_Q5_K_M, T.Q5_K, pure=True),
    Mix("Q6_K", Ftype.MOSTLY_Q6_K, T.Q6_K),
    Mix("Q3_K_S", Ftype.MOSTLY_Q3_K_S, T.Q3_K),
    Mix("Q3_K_M", Ftype.MOSTLY_Q3_K_M, T.Q3_K),
    Mix("Q3_K_L", Ftype.MOSTLY_Q3_K_L, T.Q3_K),
    Mix("Q4_K_S", Ftype.MOSTLY_Q4_K_S, T.Q4_K),
    Mix("Q4_K_M", Ftype.MOSTLY_Q4_K_M, T.Q4_K),
    Mix("Q5_K_S", Ftype.MOSTLY_Q5_K_S, T.Q5_K),
    Mix("Q5_K_M", Ftype.MOSTLY_Q5_K_M, T.Q5_K),
]}


# Substrings of 2-D weights llama.cpp never quantizes (tensor_allows_quantization).
_NEVER_QUANTIZE = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                   "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight", "position_embd",
                   "token_types.weight", "time_mix_")


def get_mix(name: str) -> Mix:
    mix = MIXES.get(name.upper())
    if mix is None:
        raise GGUFileError(f"unknown quantization type {name!r}; choose one of {', '.join(MIXES)}")
    return mix


# -- llama_tensor_get_type -------------------------------------------------------------------
class Cat(enum.Enum):
    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


def category(name: str) -> Cat:
    """tensor_get_category: broad roles by name (attn_qkv / attn_kv_b count as attn_v)."""
    if name == "output.weight":
        return Cat.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Cat.TOKEN_EMBD
    for key, cat in (("attn_qkv.weight", Cat.ATTN_V), ("attn_kv_b.weight", Cat.ATTN_V),
                     ("attn_v.weight", Cat.ATTN_V), ("attn_k.weight", Cat.ATTN_K),
                     ("attn_q.weight", Cat.ATTN_Q), ("attn_output.weight", Cat.ATTN_OUTPUT),
                     ("ffn_up", Cat.FFN_UP), ("ffn_gate", Cat.FFN_GATE), ("ffn_down", Cat.FFN_DOWN)):
        if key in name:
            return cat
    return Cat.OTHER


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and not any(s in name for s in _NEVER_QUANTIZE)


_LAYER = re.compile(r"^blk\.(\d+)\.")


def llama_order(names) -> list[str]:
    """llama_model_loader's weight_name_comparer: layer number (non-layer tensors first), then name."""
    def key(n: str):
        m = _LAYER.match(n)
        return (int(m.group(1)) if m else -1, n.encode())
    return sorted(names, key=key)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class ModelInfo:
    arch: str
    n_layer: int
    n_gqa: int
    n_expert: int
    tied_embeddings: bool
    n_attention_wv: int


class _TypeChooser:
    """Stateful like llama.cpp's quantize_state_impl: counters advance per tensor in llama order."""

    def __init__(self, mix: Mix, info: ModelInfo):
        self.mix, self.info = mix, info
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def choose(self, name: str, shape: tuple[int, ...], cat: Cat) -> GGMLType:
        new_type = self.mix.default_type
        if new_type not in FLOAT_TYPES and not self.mix.pure:
            new_type = self._rules(new_type, name, shape, cat)
        if new_type not in FLOAT_TYPES:
            new_type = _fallback(name, shape, new_type)
        return new_type

    def _rules(self, new_type: GGMLType, name: str, shape, cat: Cat) -> GGMLType:
        ft, info = self.mix.ftype, self.info
        falcon = info.arch == "falcon"
        if cat == Cat.OUTPUT or (info.tied_embeddings and cat == Cat.TOKEN_EMBD):
            if falcon or shape[0] % QUANT_TABLE[new_type].block_size:
                return T.Q8_0
            return new_type if new_type == T.Q8_0 else T.Q6_K
        if cat == Cat.ATTN_V:
            i, n = self.i_attention_wv, info.n_attention_wv
            if ft == Ftype.MOSTLY_Q2_K:
                new_type = T.Q4_K if info.n_gqa >= 4 else T.Q3_K
            elif ft == Ftype.MOSTLY_Q3_K_M:
                new_type = T.Q5_K if i < 2 else T.Q4_K
            elif ft == Ftype.MOSTLY_Q3_K_L:
                new_type = T.Q5_K
            elif ft in (Ftype.MOSTLY_Q4_K_M, Ftype.MOSTLY_Q5_K_M) and _use_more_bits(i, n):
                new_type = T.Q6_K
            elif ft == Ftype.MOSTLY_Q4_K_S and i < 4:
                new_type = T.Q5_K
            if info.n_expert == 8:
                new_type = T.Q8_0
            self.i_attention_wv += 1
        elif cat == Cat.ATTN_K:
            if info.n_expert == 8:
                new_type = T.Q8_0
        elif cat == Cat.FFN_DOWN:
            i, n = self._layer(name)
            if ft == Ftype.MOSTLY_Q2_K:
                new_type = T.Q3_K
            elif ft == Ftype.MOSTLY_Q3_K_M:
                new_type = (T.Q5_K if i < n // 16 else
                            T.Q4_K if not falcon or _use_more_bits(i, n) else T.Q3_K)
            elif ft == Ftype.MOSTLY_Q3_K_L:
                new_type = T.Q4_K if falcon else T.Q5_K
            elif ft == Ftype.MOSTLY_Q4_K_M:
                if falcon:
                    new_type = T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
                elif _use_more_bits(i, n):
                    new_type = T.Q6_K
            elif ft == Ftype.MOSTLY_Q5_K_M and _use_more_bits(i, n):
                new_type = T.Q6_K
            elif ft == Ftype.MOSTLY_Q4_K_S and not falcon and i < n // 8:
                new_type = T.Q5_K
            self.i_ffn_down += 1
        elif cat == Cat.ATTN_OUTPUT:
            if falcon:
                if ft == Ftype.MOSTLY_Q3_K_L:
                    new_type = T.Q4_K
            elif info.n_expert == 8:
                if ft in (Ftype.MOSTLY_Q2_K, Ftype.MOSTLY_Q3_K_S, Ftype.MOSTLY_Q3_K_M,
                          Ftype.MOSTLY_Q4_K_S, Ftype.MOSTLY_Q4_K_M):
                    new_type = T.Q5_K
            else:
                new_type = {Ftype.MOSTLY_Q2_K: T.Q3_K, Ftype.MOSTLY_Q3_K_M: T.Q4_K,
                            Ftype.MOSTLY_Q3_K_L: T.Q5_K}.get(ft, new_type)
        return new_type

    def _layer(self, name: str) -> tuple[int, int]:
        """layer_info: the counter for dense models, the name's layer for MoE (experts interleave)."""
        if self.info.n_expert > 1:
            m = _LAYER.match(name)
            if not m:
                raise GGUFileError(f"cannot determine the layer of tensor {name}")
            return int(m.group(1)), self.info.n_layer
        return self.i_ffn_down, self.info.n_layer


def _fallback(name: str, shape, new_type: GGMLType) -> GGMLType:
    """tensor_type_fallback: rows that are not a whole number of blocks get a compatible type."""
    ncols = shape[0]
    if ncols % QUANT_TABLE[new_type].block_size == 0:
        return new_type
    fallback = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(new_type)
    if fallback is None:
        raise GGUFileError(f"tensor {name}: row of {ncols} is not a multiple of the {new_type.name} "
                           f"block size and {new_type.name} has no fallback type")
    return fallback if ncols % QUANT_TABLE[fallback].block_size == 0 else T.F16


def model_info(reader: GGUFReader) -> ModelInfo:
    def num(key, default):
        v = reader.get(key, default)
        return int(v) if isinstance(v, (int, float)) else int(np.max(v)) if isinstance(v, np.ndarray) else default

    n_head = num(Keys.HEAD_COUNT, 1)
    n_head_kv = num(Keys.HEAD_COUNT_KV, n_head) or n_head
    return ModelInfo(
        arch=reader.architecture,
        n_layer=num(Keys.BLOCK_COUNT, 0),
        n_gqa=max(1, n_head // max(1, n_head_kv)),
        n_expert=num("{arch}.expert_count", 0),
        tied_embeddings="output.weight" not in reader.tensors,
        n_attention_wv=sum(category(n) == Cat.ATTN_V for n in reader.tensors),
    )


def plan_types(reader: GGUFReader, mix: Mix) -> dict[str, GGMLType]:
    """Target type of every tensor, as llama_tensor_get_type would choose it."""
    chooser = _TypeChooser(mix, model_info(reader))
    plan = {}
    for name in llama_order(reader.tensors):
        t = reader.tensors[name]
        plan[name] = chooser.choose(name, t.shape, category(name)) if allows_quantization(name, t.shape) \
            else t.ggml_type
    return plan


# -- the conversion --------------------------------------------------------------------------
def _as_f32_rows(reader: GGUFReader, t: TensorInfo) -> np.ndarray:
    raw = np.ascontiguousarray(reader.tensor_bytes(t.name))
    return kernels.dequantize(raw, t.ggml_type, t.n_elements).reshape(t.n_rows, t.shape[0])


def _producer(reader: GGUFReader, t: TensorInfo, new_type: GGMLType):
    if new_type == t.ggml_type:
        return lambda: reader.tensor_bytes(t.name)  # unchanged: copied byte for byte
    return lambda: quantize_rows(_as_f32_rows(reader, t), new_type)


@dataclass(frozen=True)
class QuantizeResult:
    out_path: Path
    types: dict[str, tuple[GGMLType, GGMLType]]  # name -> (from, to)
    in_bytes: int
    out_bytes: int
    requantized: bool


def quantize_file(in_path, out_path, qtype_or_mix: str, progress: Callable[[str], None] | None = None,
                  pure: bool = False, warn: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize IN to OUT with a type or mix name; `progress(name)` after each tensor."""
    mix = get_mix(qtype_or_mix)
    if pure and mix.default_type not in FLOAT_TYPES:
        mix = Mix(mix.name, mix.ftype, mix.default_type, pure=True)
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve():
        raise GGUFileError("output would overwrite the input; choose another path")
    if not out_path.parent.is_dir():
        raise GGUFileError(f"{out_path.parent}: no such directory")
    reader = GGUFReader(in_path)
    try:
        plan = plan_types(reader, mix)
        src = {n: t.ggml_type for n, t in reader.tensors.items()}
        requant = sorted({src[n].name for n in plan if plan[n] != src[n] and src[n] not in FLOAT_TYPES})
        if requant and warn is not None:
            warn(f"warning: {in_path.name} is already quantized ({', '.join(requant)}); requantizing "
                 f"compounds the error - start from an F16/BF16/F32 model for best quality")
        metadata = metadata_with_types(reader)
        # gguf_set_val_* removes a key and appends it: these two end the header, in this order.
        metadata.pop("general.quantization_version", None)
        metadata.pop(Keys.FILE_TYPE, None)
        metadata["general.quantization_version"] = Typed(GGUFValueType.UINT32, QUANTIZATION_VERSION)
        metadata[Keys.FILE_TYPE] = Typed(GGUFValueType.UINT32, int(mix.ftype))
        specs = [TensorSpec(n, reader.tensors[n].shape, plan[n], _producer(reader, reader.tensors[n], plan[n]))
                 for n in llama_order(reader.tensors)]
        write_gguf(out_path, metadata, specs, on_tensor=(lambda s: progress(s.name)) if progress else None)
        return QuantizeResult(out_path, {n: (src[n], plan[n]) for n in reader.tensors},
                              in_path.stat().st_size, out_path.stat().st_size, bool(requant))
    finally:
        reader.close()


@click.command("quantize")
@click.argument("in_path", metavar="IN.gguf", type=click.Path(dir_okay=False))
@click.argument("out_path", metavar="OUT.gguf", type=click.Path(dir_okay=False))
@click.option("--type", "-t", "qtype", required=True, metavar="TYPE",
              help=f"one of {', '.join(MIXES)} (Q3_K/Q4_K/Q5_K: the pure type; _S/_M/_L: llama.cpp's mixes)")
@click.option("--pure", is_flag=True, help="every quantizable weight gets TYPE (no per-tensor rules)")
def quantize_command(in_path: str, out_path: str, qtype: str, pure: bool) -> None:
    """Requantize a GGUF model with llama.cpp's algorithms and per-tensor type rules."""
    try:
        get_mix(qtype)
        with GGUFReader(in_path) as r:
            n_tensors = len(r.tensors)
        with click.progressbar(length=n_tensors, label=f"quantizing to {qtype.upper()}",
                               item_show_func=lambda n: n or "", file=sys.stderr) as bar:
            def step(name: str) -> None:
                bar.update(1, name)
            res = quantize_file(in_path, out_path, qtype, progress=step, pure=pure,
                                warn=lambda m: click.echo(m, err=True))
    except GGUFileError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f"{err.filename or out_path}: {err.strerror or err}") from None
    counts: dict[str, int] = {}
    for _, new in res.types.values():
        counts[new.name] = counts.get(new.name, 0) + 1
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    click.echo(f"{res.out_path}: {res.in_bytes / 1e6:.1f} MB -> {res.out_bytes / 1e6:.1f} MB ({mix})")
