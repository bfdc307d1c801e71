"""Quantization: bit-exact legacy types (gguf-py oracle), K-quants against a scalar port of
ggml's _ref code, round-trip error per type, the GGUF writer, and llama.cpp's per-tensor rules."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from ggufile.builder.gguf_writer import TensorSpec, Typed, write_gguf
from ggufile.builder.quantize_model import get_mix, plan_types, quantize_command, quantize_file
from ggufile.runtime import kernels
from ggufile.runtime.gguf.constants import QUANT_TABLE, GGMLType, GGUFValueType
from ggufile.runtime.gguf.reader import GGUFReader
from ggufile.builder.quantizers import quantize

gguf = pytest.importorskip("gguf")  # test oracle only
F32 = np.float32
LEGACY = [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]
K_QUANTS = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
# Relative RMSE of round-tripping Gaussian weights (ours: 0.296 0.150 0.071 0.036 0.018;
# Q8_0 .0054, Q4_0 .086, Q4_1 .078, Q5_0 .043, Q5_1 .038): the bound is ~10% above each.
MAX_REL_RMSE = {GGMLType.Q8_0: 0.006, GGMLType.Q4_0: 0.095, GGMLType.Q4_1: 0.086, GGMLType.Q5_0: 0.047,
                GGMLType.Q5_1: 0.042, GGMLType.Q2_K: 0.33, GGMLType.Q3_K: 0.165, GGMLType.Q4_K: 0.079,
                GGMLType.Q5_K: 0.040, GGMLType.Q6_K: 0.0195}


def weights(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows of varied scale, plus the edge blocks: all zero, constant, one outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * rng.uniform(1e-3, 2.0, (rows, 1))).astype(F32)
    x[0, :256] = 0
    x[1, :256] = -0.75
    x[2, 5] = 40.0
    return x


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_types_bit_exact_with_gguf_py(qtype):
    x = weights(48, 1024)
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype.name])
    np.testing.assert_array_equal(quantize(x, qtype), ref)


@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda t: t.name)
def test_round_trip_error_and_layout(qtype):
    x = weights(64, 2048, seed=1)
    q = quantize(x, qtype)
    info = QUANT_TABLE[qtype]
    assert q.dtype == np.uint8 and q.shape == (64, 2048 // info.block_size * info.type_size)
    y = kernels.dequantize(q, qtype, x.size).reshape(x.shape)
    # The oracle's dequantizer reads our bytes the same way as the runtime's.
    np.testing.assert_array_equal(y, gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype.name]))
    body = x[3:]  # edge rows aside
    rel = np.sqrt(np.mean((y[3:] - body) ** 2) / np.mean(body ** 2))
    assert rel < MAX_REL_RMSE[qtype]
    np.testing.assert_array_equal(y[0, :256], 0)  # zero block stays exactly zero
    assert np.isfinite(y).all()


# -- scalar transliteration of ggml-quants.c (quantize_row_q{3,4,6}_K_ref), the K-quant oracle --
def _nearest_int(v) -> int:
    return int(np.rint(F32(v)))


def _make_qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = F32(0)
    if mx == mn:
        return F32(0), -mn, [0] * n
    iscale = F32(nmax) / (mx - mn)
    scale = F32(1) / iscale
    L = [max(0, min(nmax, _nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
    best = F32(0)
    for i in range(n):
        diff = scale * F32(L[i]) + mn - x[i]
        best += w[i] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
        aux = [max(0, min(nmax, _nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
        sl, sl2, sxl = F32(0), F32(0), F32(0)
        for i in range(n):
            l = F32(aux[i])
            sl += w[i] * l
            sl2 += w[i] * l * l
            sxl += w[i] * l * x[i]
        D = sum_w * sl2 - sl * sl
        if D > 0:
            this_scale = (sum_w * sxl - sum_x * sl) / D
            this_min = (sl2 * sum_x - sl * sxl) / D
            if this_min > 0:
                this_min, this_scale = F32(0), sxl / sl2
            cur = F32(0)
            for i in range(n):
                diff = this_scale * F32(aux[i]) + this_min - x[i]
                cur += w[i] * (abs(diff) if use_mad else diff * diff)
            if cur < best:
                L, best, scale, mn = aux, cur, this_scale, this_min
    return scale, -mn, L


def _ref_q4_k(x):
    scales, mins, L = [], [], []
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        s2 = F32(0)
        for v in xs:
            s2 += v * v
        av = np.sqrt(s2 / F32(32))
        sc, m, l = _make_qkx2(xs, [av + abs(v) for v in xs], 15, -1.0, 0.1, 20, False)
        scales.append(sc), mins.append(m), L.extend(l)
    max_scale, max_min = max([F32(0)] + scales), max([F32(0)] + mins)
    inv_s = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_m = F32(63) / max_min if max_min > 0 else F32(0)
    ls = [min(63, _nearest_int(inv_s * s) & 0xFF) for s in scales]
    lm = [min(63, _nearest_int(inv_m * m) & 0xFF) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    d, dmin = np.float16(max_scale / F32(63)), np.float16(max_min / F32(63))
    for j in range(8):
        dd = F32(d) * F32(ls[j])
        if dd == 0:
            continue
        dm = F32(dmin) * F32(lm[j])
        for i in range(32):
            L[32 * j + i] = max(0, min(15, _nearest_int((x[32 * j + i] + dm) / dd)))
    qs = [L[c + i] | (L[c + i + 32] << 4) for c in range(0, 256, 64) for i in range(32)]
    return bytes(np.array([d, dmin], dtype=np.float16).tobytes()) + bytes(packed) + bytes(qs)


def _make_qx(x, nmax):
    amax, mx = F32(0), F32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < F32(1e-15):
        return F32(0), [0] * len(x)

    def trial(iscale):
        ls = [max(-nmax, min(nmax - 1, _nearest_int(iscale * v))) for v in x]
        slx, sl2 = F32(0), F32(0)
        for v, l in zip(x, ls):
            w = v * v
            slx += w * v * F32(l)
            sl2 += w * F32(l) * F32(l)
        return ls, slx, sl2

    ls, slx, sl2 = trial(F32(-nmax) / mx)
    L = [l + nmax for l in ls]
    scale = slx / sl2 if sl2 else F32(0)
    best = scale * slx
    for step in range(-9, 10):
        if step == 0:
            continue
        ls, slx, sl2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        if sl2 > 0 and slx * slx > best * sl2:
            L, scale = [l + nmax for l in ls], slx / sl2
            best = scale * slx
    return scale, L


def _ref_q6_k(x):
    scales, L = [], []
    for b in range(16):
        s, l = _make_qx(x[16 * b:16 * b + 16], 32)
        scales.append(s), L.extend(l)
    amax, max_scale = F32(0), F32(0)
    for s in scales:
        if abs(s) > amax:
            amax, max_scale = abs(s), s
    if amax < F32(1e-15):
        return bytes(210)
    iscale = F32(-128) / max_scale
    d = np.float16(F32(1) / iscale)
    sc = [min(127, _nearest_int(iscale * s)) for s in scales]
    for j in range(16):
        dd = F32(d) * F32(sc[j])
        if dd == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, _nearest_int(x[16 * j + i] / dd))) + 32
    ql, qh = [0] * 128, [0] * 64
    for c in range(0, 256, 128):
        for i in range(32):
            q1, q2, q3, q4 = (L[c + i + o] for o in (0, 32, 64, 96))
            ql[c // 2 + i] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            ql[c // 2 + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            qh[c // 4 + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    return bytes(ql) + bytes(qh) + np.array(sc, dtype=np.int8).tobytes() + np.float16(d).tobytes()


@pytest.mark.parametrize("qtype, ref", [(GGMLType.Q4_K, _ref_q4_k), (GGMLType.Q6_K, _ref_q6_k)],
                         ids=["Q4_K", "Q6_K"])
def test_k_quants_match_scalar_port_of_ggml_reference(qtype, ref):
    x = weights(3, 512, seed=2).reshape(-1, 256)[:6]  # includes the zero, constant and outlier blocks
    ours = quantize(x, qtype)
    for b in range(x.shape[0]):
        assert ours[b].tobytes() == ref(list(x[b])), f"block {b}"


# -- writer ------------------------------------------------------------------------------------
def test_writer_round_trips_every_value_type(tmp_path):
    meta = {
        "general.architecture": "llama",
        "general.alignment": Typed(GGUFValueType.UINT32, 64),
        "u8": Typed(GGUFValueType.UINT8, 200), "i8": Typed(GGUFValueType.INT8, -5),
        "u16": Typed(GGUFValueType.UINT16, 60000), "i16": Typed(GGUFValueType.INT16, -300),
        "u32": 7, "i32": -7, "u64": Typed(GGUFValueType.UINT64, 1 << 40), "i64": Typed(GGUFValueType.INT64, -(1 << 40)),
        "f32": 0.5, "f64": Typed(GGUFValueType.FLOAT64, 1e-300), "b": True, "s": "héllo",
        "arr_i32": np.array([1, -2, 3], dtype=np.int32), "arr_str": ["a", "", "ß"],
        "arr_bool": np.array([True, False]), "nested": [np.array([1.5], dtype=np.float32)],
    }
    data = np.arange(64, dtype=np.float32).reshape(2, 32)
    q = quantize(data, GGMLType.Q8_0)
    specs = [TensorSpec("a", (32, 2), GGMLType.F32, data), TensorSpec("b", (32, 2), GGMLType.Q8_0, lambda: q)]
    path = write_gguf(tmp_path / "t.gguf", meta, specs)
    r = GGUFReader(path)
    assert r.alignment == 64 and r.tensors["b"].offset % 64 == 0
    np.testing.assert_array_equal(r.tensor_matrix("a"), data)
    np.testing.assert_array_equal(r.tensor_matrix("b"), q)
    for key in ("u8", "i8", "u16", "i16", "u64", "i64", "f64"):
        assert r.metadata[key] == meta[key].value
    assert (r.metadata["u32"], r.metadata["i32"], r.metadata["f32"], r.metadata["b"], r.metadata["s"]) == \
           (7, -7, 0.5, True, "héllo")
    assert list(r.metadata["arr_str"]) == ["a", "", "ß"] and r.metadata["arr_i32"].tolist() == [1, -2, 3]
    g = gguf.GGUFReader(path)  # the oracle reads the same types
    assert g.fields["i16"].types == [gguf.GGUFValueType.INT16]
    assert g.fields["arr_bool"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL]
    assert g.fields["nested"].types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY]


def test_writer_is_atomic(tmp_path):
    def boom():
        raise RuntimeError("producer failed")
    with pytest.raises(RuntimeError):
        write_gguf(tmp_path / "x.gguf", {}, [TensorSpec("a", (4,), GGMLType.F32, boom)])
    assert list(tmp_path.iterdir()) == []


# -- per-tensor rules and the command ---------------------------------------------------------
@pytest.mark.real_model
def test_q4_k_m_plan_matches_llama_cpp_file(gemma3_path):
    """gemma-3-270m-q4_k_m.gguf was written by llama-quantize Q4_K_M: our rules pick every type."""
    r = GGUFReader(gemma3_path)
    plan = plan_types(r, get_mix("Q4_K_M"))
    assert {n: t.ggml_type for n, t in r.tensors.items()} == plan


@pytest.mark.real_model
def test_quantize_file_q4_k_m(smollm2_path, tmp_path):
    out = tmp_path / "q.gguf"
    seen = []
    res = quantize_file(smollm2_path, out, "Q4_K_M", progress=seen.append)
    assert res.requantized and len(seen) == 272
    r, g = GGUFReader(out), gguf.GGUFReader(out)
    src = GGUFReader(smollm2_path)
    assert r.metadata["general.file_type"] == 15 and r.metadata["general.quantization_version"] == 2
    assert g.fields["general.file_type"].types == [gguf.GGUFValueType.UINT32]
    assert sorted(r.tensors) == sorted(src.tensors)
    assert list(r.tensors)[:3] == ["output_norm.weight", "token_embd.weight", "blk.0.attn_k.weight"]  # llama order
    assert list(r.metadata)[-2:] == ["general.quantization_version", "general.file_type"]
    types = {n: t.ggml_type.name for n, t in r.tensors.items()}
    # llama.cpp's Q4_K_M on a 30-layer, 576-wide llama: tied embedding -> Q8_0 (576 % 256 != 0),
    # ffn_down Q6_K in use_more_bits layers else Q4_K, attn_v Q8_0 / Q5_0 (Q6_K/Q4_K fall back).
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.4.attn_v.weight"] == "Q5_0"
    assert types["blk.7.attn_q.weight"] == "Q5_0"
    # The metadata is copied: the vocabulary comes through unchanged.
    assert list(r.metadata["tokenizer.ggml.tokens"][:50]) == list(src.metadata["tokenizer.ggml.tokens"][:50])
    # Weights survive: the requantized embedding is close to the original.
    name = "blk.3.ffn_down.weight"
    a = kernels.dequantize(np.ascontiguousarray(r.tensor_bytes(name)), r.tensors[name].ggml_type, r.tensors[name].n_elements)
    b = kernels.dequantize(np.ascontiguousarray(src.tensor_bytes(name)), src.tensors[name].ggml_type, src.tensors[name].n_elements)
    assert np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)) < 0.1


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(quantize_command, [str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"), "-t", "Q4_0"])
    assert res.exit_code != 0 and "no such file" in res.output and "Traceback" not in res.output
    res = runner.invoke(quantize_command, [str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"), "-t", "Q9_9"])
    assert res.exit_code != 0 and "unknown quantization type" in res.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    res = runner.invoke(quantize_command, [str(bad), str(tmp_path / "o.gguf"), "-t", "Q8_0"])
    assert res.exit_code != 0 and "bad magic" in res.output
    assert not (tmp_path / "o.gguf").exists()
    tiny = write_gguf(tmp_path / "tiny.gguf", {"general.architecture": "llama"},
                      [TensorSpec("w.weight", (32, 2), GGMLType.F32, np.ones((2, 32), np.float32))])
    res = runner.invoke(quantize_command, [str(tiny), str(tmp_path / "nodir" / "o.gguf"), "-t", "Q8_0"])
    assert res.exit_code != 0 and "no such directory" in res.output
