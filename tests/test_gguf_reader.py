"""The GGUF reader against gguf-py (the oracle), and its error paths on deliberately broken files."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from ggufile.runtime.gguf.constants import GGMLType
from ggufile.runtime.errors import GGUFFormatError
from ggufile.runtime.gguf.reader import GGUFReader


def write_tiny_gguf(path, extra_kv=None):
    """A small valid GGUF with metadata of every value type and three tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.arr_i32", [1, 2, 3])
    w.add_array("t.arr_str", ["a", "bc", "日本"])
    w.add_array("t.nested", [[1, 2], [3]])
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 32)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal(64).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_metadata_of_every_type(tiny):
    md = GGUFReader(tiny).metadata
    assert md["t.u8"] == 7 and md["t.i8"] == -7 and md["t.u16"] == 65535 and md["t.i16"] == -300
    assert md["t.u32"] == 4_000_000_000 and md["t.i32"] == -5 and md["t.f32"] == 1.5
    assert md["t.u64"] == 2**40 and md["t.i64"] == -(2**40) and md["t.f64"] == 2.25
    assert md["t.bool"] is True and md["t.str"] == "héllo"
    assert list(md["t.arr_i32"]) == [1, 2, 3]
    assert md["t.arr_str"].tolist() == ["a", "bc", "日本"] and md["t.arr_str"][2] == "日本"
    assert [list(a) for a in md["t.nested"]] == [[1, 2], [3]]


def test_tensors_match_gguf_py(tiny):
    ours = GGUFReader(tiny)
    for t in gguf.GGUFReader(str(tiny)).tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in t.shape)
        assert info.ggml_type == GGMLType(int(t.tensor_type))
        assert np.array_equal(ours.tensor_bytes(t.name), np.asarray(t.data).view(np.uint8).reshape(-1))
    assert ours.tensor_matrix("a.weight").shape == (4, 32)
    assert ours.tensor_matrix("b.weight").dtype == np.float16
    assert ours.tensor_matrix("c.weight").shape == (2, 68)


def test_reads_from_offset_inside_a_bigger_file(tiny, tmp_path):
    data = tiny.read_bytes()
    host = tmp_path / "host.bin"
    host.write_bytes(b"\x7fELF" + b"x" * 65532 + data + b"trailer")
    r = GGUFReader(host, offset=65536, size=len(data))
    assert r.metadata["t.str"] == "héllo"
    assert np.array_equal(r.tensor_bytes("a.weight"), GGUFReader(tiny).tensor_bytes("a.weight"))


def test_real_model_matches_gguf_py(smollm2_path):
    # gguf-py takes minutes to parse gemma3's 262k-token vocabulary, so the oracle runs on SmolLM2.
    path = smollm2_path
    ours = GGUFReader(path)
    theirs = gguf.GGUFReader(str(path))
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors[:20]:
        assert ours.tensors[t.name].offset == t.data_offset
    assert ours.metadata["tokenizer.ggml.tokens"][100] == str(bytes(theirs.fields["tokenizer.ggml.tokens"].parts[
        theirs.fields["tokenizer.ggml.tokens"].data[100]]), "utf-8")


# -- broken files: every one is a one-line GGUFFormatError ------------------------------------

def patch_after(path, marker: bytes, skip: int, fmt: str, value) -> None:
    """Overwrite the field `skip` bytes past the first `marker` in the file with struct `fmt`."""
    data = bytearray(path.read_bytes())
    at = data.index(marker) + len(marker) + skip
    data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(data))


def _expect_error(path, match):
    with pytest.raises(GGUFFormatError, match=match) as info:
        GGUFReader(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path):
    _expect_error(tmp_path, "directory")


def test_empty_file(tmp_path):
    (tmp_path / "e.gguf").write_bytes(b"")
    _expect_error(tmp_path / "e.gguf", "empty")


def test_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 definitely a zip file")
    _expect_error(tmp_path / "x.gguf", "bad magic")


def test_unsupported_version(tiny):
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", 1)
    tiny.write_bytes(bytes(data))
    _expect_error(tiny, "version 1")


@pytest.mark.parametrize("keep", [5, 24, 100, 300, 600])
def test_truncated_header(tiny, keep):
    tiny.write_bytes(tiny.read_bytes()[:keep])
    _expect_error(tiny, "truncated|corrupt")


def test_truncated_tensor_data(tiny):
    data = tiny.read_bytes()
    tiny.write_bytes(data[:-40])
    _expect_error(tiny, "lies outside")


def test_huge_counts_do_not_allocate(tiny):
    data = bytearray(tiny.read_bytes())
    data[16:24] = struct.pack("<Q", 2**62)  # metadata count
    tiny.write_bytes(bytes(data))
    _expect_error(tiny, "cannot fit")


def test_huge_string_length(tiny):
    data = bytearray(tiny.read_bytes())
    data[24:32] = struct.pack("<Q", 2**60)  # first key's length
    tiny.write_bytes(bytes(data))
    _expect_error(tiny, "claims|truncated")


def test_huge_array_count(tmp_path):
    path = write_tiny_gguf(tmp_path / "a.gguf")
    patch_after(path, b"t.arr_i32", 4 + 4, "<Q", 2**61)  # past value type ARRAY, element type
    _expect_error(path, "truncated|corrupt")


def test_unknown_value_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "v.gguf")
    patch_after(path, b"t.u8", 0, "<I", 99)
    _expect_error(path, "unknown value type")


def test_unknown_tensor_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    patch_after(path, b"a.weight", 4 + 2 * 8, "<I", 1234)  # past n_dims, two dims
    _expect_error(path, "unknown type 1234")


def test_too_many_dimensions(tmp_path):
    path = write_tiny_gguf(tmp_path / "d.gguf")
    patch_after(path, b"a.weight", 0, "<I", 9)
    _expect_error(path, "dimensions|corrupt|truncated")


def test_tensor_offset_out_of_range(tmp_path):
    path = write_tiny_gguf(tmp_path / "o.gguf")
    patch_after(path, b"c.weight", 4 + 2 * 8 + 4, "<Q", 2**50)  # past n_dims, dims, type
    _expect_error(path, "lies outside")


def test_bad_alignment(tmp_path):
    path = tmp_path / "al.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", 48)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _expect_error(path, "power of two")


def test_window_outside_file(tiny):
    with pytest.raises(GGUFFormatError, match="outside the file"):
        GGUFReader(tiny, offset=10, size=10**9)


# -- big string arrays: compiled scan (when the AOT kernels have it) == the Python loop ------

from ggufile.runtime import kernels  # noqa: E402


def _write_string_array_gguf(path, texts):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.big", texts)
    w.add_tensor("a.weight", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _big_texts(n=2000):
    return [f"tok{i}" if i % 7 else ("" if i % 2 else "▁日本😀") for i in range(n)]


def test_big_string_array_same_with_and_without_the_scanner(tmp_path, monkeypatch):
    texts = _big_texts()
    path = _write_string_array_gguf(tmp_path / "s.gguf", texts)
    scanned = GGUFReader(path, scan_strings=kernels.string_scanner()).metadata["t.big"]
    looped = GGUFReader(path).metadata["t.big"]
    assert isinstance(looped._starts, list)
    assert list(np.asarray(scanned._starts)) == looped._starts and list(np.asarray(scanned._ends)) == looped._ends
    assert scanned.tolist() == looped.tolist() == list(scanned) == texts
    assert scanned[14] == "▁日本😀" and scanned.bytes_at(7) == b"" and scanned[-1] == texts[-1]


@pytest.mark.parametrize("cut", [3, 700, 9000])
def test_truncated_big_string_array_same_error_both_ways(tmp_path, monkeypatch, cut):
    path = _write_string_array_gguf(tmp_path / "s.gguf", _big_texts())
    data = path.read_bytes()
    start = data.index(b"t.big") + len(b"t.big") + 4 + 4 + 8  # value type, element type, count
    end_of_array = start + sum(8 + len(t.encode()) for t in _big_texts())
    path.write_bytes(data[:end_of_array - cut])
    with pytest.raises(GGUFFormatError) as scanned:
        GGUFReader(path, scan_strings=kernels.string_scanner())
    with pytest.raises(GGUFFormatError) as looped:
        GGUFReader(path)
    assert str(scanned.value) == str(looped.value)
    assert "\n" not in str(scanned.value) and "truncated or corrupt GGUF: t.big[" in str(scanned.value)


def test_big_string_array_huge_length_same_error_both_ways(tmp_path, monkeypatch):
    path = _write_string_array_gguf(tmp_path / "s.gguf", _big_texts())
    data = bytearray(path.read_bytes())
    at = data.index(b"tok1000") - 8
    data[at:at + 8] = struct.pack("<Q", 2**63)
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match=r"t.big\[1000\] claims") as scanned:
        GGUFReader(path, scan_strings=kernels.string_scanner())
    with pytest.raises(GGUFFormatError) as looped:
        GGUFReader(path)
    assert str(scanned.value) == str(looped.value)


@pytest.mark.parametrize("odd", [b"a\x00b", b"\xff\xfe", b"\xe2\x82", b"\x82\xac"])
def test_string_array_tolist_falls_back_for_nul_and_invalid_utf8(tmp_path, odd):
    """tolist decodes everything at once only when that equals decoding each string alone."""
    raw = [b"x", b"\xe2\x82\xac", odd, b"", b"\xac y"]
    # gguf-py writes str only: write the array by hand after a normal header.
    body = b"".join(struct.pack("<Q", len(t)) + t for t in raw)
    key = b"t.raw"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 8, len(raw)) + body
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    path = tmp_path / "raw.gguf"
    path.write_bytes(header + kv)
    arr = GGUFReader(path).metadata["t.raw"]
    assert arr.tolist() == [t.decode("utf-8", errors="replace") for t in raw] == list(arr)
