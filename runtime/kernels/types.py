"""One row per GGML tensor type: what the CPU kernels do with it (ggml's type_traits_cpu).

The block geometry (elements and bytes per block) is a format fact and lives in
gguf/constants.QUANT_TABLE; this table says how we compute with each type. Every "which types
have X" set in the runtime, the kernels and the builder is a query on TRAITS, so a new type is
one row here plus its kernels (and the tests check each kernel table against these rows).

    >>> TRAITS[GGMLType.Q4_1].activation, TRAITS[GGMLType.Q4_1].has_sums
    ('q8_0', True)
    >>> sorted(t.name for t in FLOAT_TYPES)
    ['BF16', 'F16', 'F32']
"""
from __future__ import annotations

from dataclasses import dataclass

from ggufile.runtime.gguf.constants import GGMLType

T = GGMLType

# Activation formats (ggml's vec_dot_type): what a weight type's dot product multiplies with.
Q8_0, Q8_K, F16, BF16, F32 = "q8_0", "q8_k", "f16", "bf16", "f32"


@dataclass(frozen=True)
class TypeTraits:
    activation: str | None  # vec_dot_type of its decode dot product; None: never a weight
    has_sums: bool = False  # its dot product also reads the activations' block sums (Q8_1 d*sum, Q8_K bsums)
    is_float: bool = False  # stored as plain floats, no blocks
    quantizable: bool = True  # the builder's quantizers write it

    @property
    def is_weight(self) -> bool:
        return self.activation is not None


TRAITS: dict[GGMLType, TypeTraits] = {
    T.F32: TypeTraits(F32, is_float=True),
    T.F16: TypeTraits(F16, is_float=True),
    T.BF16: TypeTraits(BF16, is_float=True),
    T.Q4_0: TypeTraits(Q8_0),
    T.Q4_1: TypeTraits(Q8_0, has_sums=True),
    T.Q5_0: TypeTraits(Q8_0),
    T.Q5_1: TypeTraits(Q8_0, has_sums=True),
    T.Q8_0: TypeTraits(Q8_0),
    T.Q2_K: TypeTraits(Q8_K, has_sums=True),
    T.Q3_K: TypeTraits(Q8_K, has_sums=True),
    T.Q4_K: TypeTraits(Q8_K, has_sums=True),
    T.Q5_K: TypeTraits(Q8_K, has_sums=True),
    T.Q6_K: TypeTraits(Q8_K, has_sums=True),
    # activation-only formats in ggml: never the type of a weight
    T.Q8_1: TypeTraits(None, quantizable=False),
    T.Q8_K: TypeTraits(None, quantizable=False),
}


def _where(test) -> frozenset[GGMLType]:
    return frozenset(t for t, traits in TRAITS.items() if test(traits))


WEIGHT_TYPES = _where(lambda r: r.is_weight)  # every type a model's tensors may have
FLOAT_TYPES = _where(lambda r: r.is_float)
BLOCK_TYPES = WEIGHT_TYPES - FLOAT_TYPES  # quantized in blocks
QUANTIZABLE_TYPES = _where(lambda r: r.quantizable)
Q8_0_FAMILY = _where(lambda r: r.activation == Q8_0)
Q8_K_FAMILY = _where(lambda r: r.activation == Q8_K)
WITH_SUMS = _where(lambda r: r.has_sums)
# Decode dot products emitted lane for lane as llama.cpp's (kernels/src/lanes.py): all but F32,
# whose dot product is a plain float loop.
LANE_TYPES = WEIGHT_TYPES - {T.F32}
