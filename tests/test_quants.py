"""The NumPy reference dequantization is bit-exact with gguf-py (the test oracle's oracle)."""
from __future__ import annotations

import numpy as np
import pytest

from ggufile.runtime.kernels import reference, types
from ggufile.runtime.gguf.constants import QUANT_TABLE, GGMLType

gguf_quants = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType  # noqa: E402

QUANT_TYPES = sorted(types.WEIGHT_TYPES - types.FLOAT_TYPES)

# Byte offsets of the fp16 scales inside each block type (they must be finite in test data).
F16_OFFSETS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
}


def random_blocks(qtype: GGMLType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes with finite, moderate fp16 scales."""
    rng = np.random.default_rng(seed)
    info = QUANT_TABLE[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, info.type_size), dtype=np.uint8)
    for off in F16_OFFSETS[qtype]:
        scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def test_f16_offsets_cover_every_quant_type():
    assert set(F16_OFFSETS) == set(QUANT_TYPES)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_with_gguf(qtype):
    n_blocks = 37
    blocks = random_blocks(qtype, n_blocks, seed=int(qtype))
    n = n_blocks * QUANT_TABLE[qtype].block_size
    ours = reference.dequantize(blocks, qtype, n)
    theirs = gguf_quants.dequantize(blocks, GGMLQuantizationType(int(qtype))).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == (n,)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", sorted(types.FLOAT_TYPES), ids=lambda t: t.name)
def test_dequantize_float_types(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100).astype(np.float32)
    if qtype == GGMLType.F32:
        raw = x
    elif qtype == GGMLType.F16:
        raw, x = x.astype(np.float16), x.astype(np.float16).astype(np.float32)
    else:
        raw = (x.view(np.uint32) >> 16).astype(np.uint16)
        x = (raw.astype(np.uint32) << 16).view(np.float32)
    out = reference.dequantize(raw, qtype, 100)
    np.testing.assert_array_equal(out, x)


def test_dequantize_accepts_matrix_shape():
    blocks = random_blocks(GGMLType.Q4_K, 6)
    matrix = blocks.reshape(3, -1)  # 3 rows of 2 super-blocks
    flat = reference.dequantize(blocks, GGMLType.Q4_K, 6 * 256)
    np.testing.assert_array_equal(reference.dequantize_matrix(matrix, GGMLType.Q4_K, 512), flat.reshape(3, 512))
    assert reference.row_elements(matrix, GGMLType.Q4_K) == 512


def test_unsupported_type_is_a_clear_error():
    from ggufile.runtime.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        reference.dequantize(np.zeros(34, np.uint8), GGMLType.Q8_1, 32)
