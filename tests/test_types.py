"""The type traits table (kernels/types.py) against every kernel table that must agree with it."""
from __future__ import annotations

import inspect
import re

import pytest

from ggufile.builder import quantizers
from ggufile.runtime.gguf.constants import QUANT_TABLE, GGMLType
from ggufile.runtime.kernels import compiled, packing, reference, types


def test_every_format_type_has_one_row():
    assert set(types.TRAITS) == set(QUANT_TABLE)


def test_float_types_are_one_element_blocks():
    assert {t for t, info in QUANT_TABLE.items() if info.block_size == 1} == types.FLOAT_TYPES


def test_reference_dequantizes_every_weight_type():
    for qtype in types.WEIGHT_TYPES:
        info = QUANT_TABLE[qtype]
        raw = bytes(info.type_size * (256 // info.block_size))
        assert reference.dequantize(raw, qtype, 256).shape == (256,)


def test_builder_quantizes_exactly_the_quantizable_types():
    assert set(quantizers._BLOCK_QUANT) | types.FLOAT_TYPES == types.QUANTIZABLE_TYPES


def test_compiled_backend_activation_table():
    assert set(compiled.ACTIVATION) == types.BLOCK_TYPES
    assert set(compiled.ACTIVATION.values()) == {types.Q8_0, types.Q8_K}


def _compared_types(func, packed: bool = False) -> set[GGMLType]:
    """The types a Numba dispatch chain (`qt == _Q4_0 ...`) names; with packed, the packed
    ones (`qt == _P4_0`: PACKED_TYPE_BASE + Q4_0)."""
    source = inspect.getsource(func.py_func)
    names = re.findall(r"qt == _(\w+)", source)
    if packed:
        return {GGMLType["Q" + name[1:]] for name in names if name.startswith("P")}
    return {GGMLType[name] for name in names if not name.startswith("P")}


@pytest.mark.parametrize("name", ["_matvec", "_get_row"])
def test_decode_step_dispatch_covers_exactly_the_weight_types(name):
    pytest.importorskip("numba")
    from ggufile.runtime.kernels.src import step
    from ggufile.runtime.model.step import STEP_WEIGHT_TYPES

    assert _compared_types(getattr(step, name)) == STEP_WEIGHT_TYPES == types.WEIGHT_TYPES
    # the matrices packed at load: all of them in _matvec, none in _get_row (the embedding is not packed)
    assert _compared_types(getattr(step, name), packed=True) == (set(packing.PACKED_LAYOUT) if name == "_matvec"
                                                                 else set())


def test_exported_kernels_follow_the_table():
    pytest.importorskip("numba")
    from ggufile.runtime.kernels.src import exports

    for qtype in types.BLOCK_TYPES:
        mv = exports.SIGNATURES[f"mv_{qtype.name.lower()}"]
        assert len(mv.args) == (9 if qtype in types.WITH_SUMS else 8), qtype.name
        assert f"dq_{qtype.name.lower()}" in exports.SIGNATURES
    assert exports.LANE_KERNELS == ({f"mv_{t.name.lower()}" for t in types.LANE_TYPES}
                                    | {f"mv_{t.name.lower()}_packed" for t in packing.PACKED_LAYOUT})
