"""The one table of GGUF/GGML format constants.

Every other module imports these: the GGUF magic and value types, metadata key names,
and (block size, bytes per block) for each tensor type. Nothing else hard-codes them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

GGUF_MAGIC = b"GGUF"
GGUF_SUPPORTED_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4

# Bounds a hostile file cannot push us past (a real model is far below each).
MAX_NESTED_ARRAY_DEPTH = 4
MAX_STRING_BYTES = 1 << 30


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size scalar value types -> NumPy dtype string (little endian).
SCALAR_DTYPES = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    BF16 = 30


@dataclass(frozen=True)
class QuantInfo:
    block_size: int  # elements per block
    type_size: int  # bytes per block


QK_K = 256  # super-block size of the K-quants
QK = 32  # block size of the legacy quants

# (elements per block, bytes per block) -- the single source of truth.
QUANT_TABLE: dict[GGMLType, QuantInfo] = {
    GGMLType.F32: QuantInfo(1, 4),
    GGMLType.F16: QuantInfo(1, 2),
    GGMLType.BF16: QuantInfo(1, 2),
    GGMLType.Q4_0: QuantInfo(QK, 2 + QK // 2),
    GGMLType.Q4_1: QuantInfo(QK, 4 + QK // 2),
    GGMLType.Q5_0: QuantInfo(QK, 2 + 4 + QK // 2),
    GGMLType.Q5_1: QuantInfo(QK, 4 + 4 + QK // 2),
    GGMLType.Q8_0: QuantInfo(QK, 2 + QK),
    GGMLType.Q8_1: QuantInfo(QK, 4 + QK),
    GGMLType.Q2_K: QuantInfo(QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    GGMLType.Q3_K: QuantInfo(QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q4_K: QuantInfo(QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: QuantInfo(QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: QuantInfo(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.Q8_K: QuantInfo(QK_K, 4 + QK_K + QK_K // 16 * 2),
}

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION: the current block layouts


class Ftype(enum.IntEnum):
    """llama.cpp's LLAMA_FTYPE values (stored as general.file_type)."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_BF16 = 32


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    """Bytes a tensor of n_elements takes; n_elements must be a whole number of blocks."""
    info = QUANT_TABLE[ggml_type]
    return n_elements // info.block_size * info.type_size


# Metadata keys (the `{arch}` ones are formatted with general.architecture).
class Keys:
    ARCHITECTURE = "general.architecture"
    NAME = "general.name"
    ALIGNMENT = "general.alignment"
    FILE_TYPE = "general.file_type"
    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    BLOCK_COUNT = "{arch}.block_count"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    SLIDING_WINDOW = "{arch}.attention.sliding_window"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
    ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
    ROPE_SCALING_ORIG_CTX = "{arch}.rope.scaling.original_context_length"
    VOCAB_SIZE = "{arch}.vocab_size"

    TOKENIZER_MODEL = "tokenizer.ggml.model"
    TOKENIZER_PRE = "tokenizer.ggml.pre"
    TOKENS = "tokenizer.ggml.tokens"
    SCORES = "tokenizer.ggml.scores"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    MERGES = "tokenizer.ggml.merges"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    EOT_ID = "tokenizer.ggml.eot_token_id"
    EOM_ID = "tokenizer.ggml.eom_token_id"
    UNK_ID = "tokenizer.ggml.unknown_token_id"
    PAD_ID = "tokenizer.ggml.padding_token_id"
    ADD_BOS = "tokenizer.ggml.add_bos_token"
    ADD_EOS = "tokenizer.ggml.add_eos_token"
    ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
    ADD_SEP = "tokenizer.ggml.add_sep_token"
    FIM_PAD_ID = "tokenizer.ggml.fim_pad_token_id"
    FIM_REP_ID = "tokenizer.ggml.fim_rep_token_id"
    FIM_SEP_ID = "tokenizer.ggml.fim_sep_token_id"
    # Fill-in-the-middle ids: the current key first, then the older name llama.cpp still reads.
    FIM_PRE_IDS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id")
    FIM_SUF_IDS = ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id")
    FIM_MID_IDS = ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id")
    CHAT_TEMPLATE = "tokenizer.chat_template"


class TokenType(enum.IntEnum):
    """llama.cpp's per-token attribute in tokenizer.ggml.token_type."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6
