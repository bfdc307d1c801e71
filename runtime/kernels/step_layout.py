"""The integer tables the compiled one-token step reads (see src/step.decode_token).

The step takes the whole model as a few flat arrays, so one exported signature fits every model:
  tensors  int64 (n_tensors, TENSOR_COLS): where each weight matrix lies: in the file's bytes
           (blob 0) or, packed at load (kernels/packing.py, type PACKED[its type]), in blob 1
  layers   int64 (n_layer, LAYER_COLS): each layer's matrices (tensor rows) and norm vectors
           (offsets into one float32 array of all norm weights; -1 when the model has none)
  cfg      int64 (CFG_LEN,): dimensions and flags (the tokens, their positions and sequences
           come as arrays of their own)
  cfg_f    float32 (CFG_F_LEN,): the float settings
  sync     int64 (SYNC_LEN,): the threads' barrier and the abort flag
Both the Numba source and the runtime's driver import these names; nothing else spells them.
"""
from __future__ import annotations

# tensors: one row per weight matrix
T_OFFSET, T_TYPE, T_ROWS, T_COLS, T_ROW_BYTES, T_BLOB = range(6)
TENSOR_COLS = 6
BLOB_FILE, BLOB_PACKED = 0, 1
# the T_TYPE of a packed matrix: its own type + PACKED_TYPE_BASE (the lanes' repacked ids)
PACKED_TYPE_BASE = 1000

# layers: matrices (tensor row numbers; -1 if absent: L_WK/L_WV when L_WQ is a fused q|k|v
# matrix, L_GATE when L_UP is a fused gate|up matrix, the dense FFN's with experts) ...
L_WQ, L_WK, L_WV, L_WO, L_GATE, L_UP, L_DOWN = range(7)
# ... and norm weights and biases (offsets into the float32 vector array, -1 if absent)
L_ATTN_NORM, L_FFN_NORM, L_Q_NORM, L_K_NORM, L_POST_ATTN_NORM, L_POST_FFN_NORM, L_QKV_BIAS = range(7, 14)
L_SWA = 14  # 1: sliding-window layer (its own rope tables and window)
# experts: the router's tensor row, and the first of n_expert gate, then up, then down rows
L_ROUTER, L_EXPERTS = 15, 16
LAYER_COLS = 17

# cfg
(C_N_EMBD, C_N_HEAD, C_N_KV, C_HEAD_DIM, C_N_FF, C_N_VOCAB, C_N_ROT, C_NEOX, C_GELU, C_WINDOW,
 C_N_LAYER, C_EMBD, C_OUTPUT, C_OUTPUT_NORM, C_QK, C_QK_K, C_N_EXPERT, C_N_EXPERT_USED, C_ACTS) = range(19)
CFG_LEN = 19
# C_ACTS: the 8-bit activation blocks the model's matrices read (bits; a Q4_K_M model none of Q8_0's)
A_Q8_0, A_Q8_K = 1, 2

# cfg_f
F_EPS, F_EMBD_SCALE, F_ATTN_SOFTCAP = range(3)  # soft-cap 0: none
CFG_F_LEN = 3

# rope: float32 (ROPE_ROWS, n_rot) per token, its position's cos and signed sin, laid out per dimension
R_COS_Q, R_SIN_Q, R_COS_K, R_SIN_K = range(4)  # global layers; + ROPE_SWA for sliding-window layers
ROPE_SWA = 4
ROPE_ROWS = 8

# work: float32 scratch rows (see src/step.decode_token)
W_X, W_H, W_QKV, W_ATT, W_FFN, W_MOE = range(6)
WORK_ROWS = 6

# scores: float32 (threads, ATTN_HEADS * n_ctx): each thread's attention scores for as many
# query heads of one kv head as one call serves
ATTN_HEADS = 4

# sync: barrier arrivals, barrier generation, abort (set when a thread could not start)
S_COUNT, S_GENERATION, S_ABORT = range(3)
SYNC_LEN = 8  # the rest pads the array past a cache line
