"""The integer tables the compiled one-token step reads (see src/step.decode_token).

The step takes the whole model as a few flat arrays, so one exported signature fits every model:
  tensors  int64 (n_tensors, TENSOR_COLS): where each weight matrix lies in the file's bytes
  layers   int64 (n_layer, LAYER_COLS): each layer's matrices (tensor rows) and norm vectors
           (offsets into one float32 array of all norm weights; -1 when the model has none)
  cfg      int64 (CFG_LEN,): dimensions, flags and the token/position of this step
  cfg_f    float32 (CFG_F_LEN,): the float settings
  sync     int64 (SYNC_LEN,): the threads' barrier and the abort flag
Both the Numba source and the runtime's driver import these names; nothing else spells them.
"""
from __future__ import annotations

# tensors: one row per weight matrix
T_OFFSET, T_TYPE, T_ROWS, T_COLS, T_ROW_BYTES = range(5)
TENSOR_COLS = 5

# layers: matrices (tensor row numbers) ...
L_WQ, L_WK, L_WV, L_WO, L_GATE, L_UP, L_DOWN = range(7)
# ... and norm weights (offsets into the float32 vector array, -1 if absent)
L_ATTN_NORM, L_FFN_NORM, L_Q_NORM, L_K_NORM, L_POST_ATTN_NORM, L_POST_FFN_NORM = range(7, 13)
L_SWA = 13  # 1: sliding-window layer (its own rope tables and window)
LAYER_COLS = 14

# cfg
(C_N_EMBD, C_N_HEAD, C_N_KV, C_HEAD_DIM, C_N_FF, C_N_VOCAB, C_N_ROT, C_NEOX, C_GELU, C_WINDOW,
 C_N_LAYER, C_TOKEN, C_POS, C_EMBD, C_OUTPUT, C_OUTPUT_NORM, C_QK, C_QK_K) = range(18)
CFG_LEN = 18

# cfg_f
F_EPS, F_EMBD_SCALE = range(2)
CFG_F_LEN = 2

# rope: float32 (ROPE_ROWS, n_rot), this position's cos and signed sin, laid out per dimension
R_COS_Q, R_SIN_Q, R_COS_K, R_SIN_K = range(4)  # global layers; + ROPE_SWA for sliding-window layers
ROPE_SWA = 4
ROPE_ROWS = 8

# sync: barrier arrivals, barrier generation, abort (set when a thread could not start)
S_COUNT, S_GENERATION, S_ABORT = range(3)
SYNC_LEN = 8  # the rest pads the array past a cache line
