"""Tests for dsv3_jax.checkpoint.safetensors_io (torch-free safetensors I/O)."""
from __future__ import annotations

import itertools
import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3_jax.checkpoint import safetensors_io as stio
from dsv3_jax.checkpoint.safetensors_io import (
    SUPPORTED_DTYPES, MissingTensorError, SafetensorsError, SafetensorsFile,
    dtype_to_str, load_file, save_file, str_to_dtype,
)

RNG = np.random.default_rng(0)


def _random(dtype: np.dtype, shape) -> np.ndarray:
    """Random bit patterns of ``dtype`` (NaNs included for float types)."""
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = RNG.integers(0, 256, size=n, dtype=np.uint8)
    if dtype == np.bool_:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def _bits(a) -> bytes:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def _raw(path, header, data: bytes = b"", n: int | None = None, header_bytes: bytes | None = None):
    """Write a hand-made safetensors file; ``n`` overrides the length prefix."""
    hb = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("code", list(SUPPORTED_DTYPES))
def test_round_trip_every_dtype(tmp_path, code):
    dt = SUPPORTED_DTYPES[code]
    tensors = {"a": _random(dt, (3, 5)), "scalar": _random(dt, ()), "empty": _random(dt, (0, 4)),
               "vec": _random(dt, (7,))}
    p = tmp_path / "x.safetensors"
    save_file(tensors, p, metadata={"format": "np"})
    with SafetensorsFile(p) as f:
        assert f.keys() == sorted(tensors) and len(f) == 4 and "a" in f and "b" not in f
        assert f.metadata == {"format": "np"}
        for k, v in tensors.items():
            assert f.info(k) == (code, v.shape)
            assert f.nbytes(k) == v.nbytes
            got = f.get(k)
            assert got.dtype == dt and got.shape == v.shape and _bits(got) == _bits(v)
    loaded = load_file(p)
    assert all(_bits(loaded[k]) == _bits(v) and loaded[k].flags.writeable for k, v in tensors.items())


def test_dtype_str_mapping():
    for code, dt in SUPPORTED_DTYPES.items():
        assert dtype_to_str(dt) == code and str_to_dtype(code) == dt
    assert dtype_to_str(np.dtype(">f4")) == "F32"
    assert dtype_to_str(ml_dtypes.float8_e4m3fn) == "F8_E4M3"
    with pytest.raises(SafetensorsError, match="complex64"):
        dtype_to_str(np.complex64)
    with pytest.raises(SafetensorsError, match="F8_E4M3"):
        str_to_dtype("F4")


def test_header_layout_matches_reference(tmp_path):
    p = tmp_path / "x.safetensors"
    tensors = {"b": np.ones(3, np.float16), "a": np.ones(1, np.uint8), "c": np.ones(2, np.float64)}
    save_file(tensors, p)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:9] == b"{"
    header = json.loads(raw[8:8 + n])
    assert raw[8:8 + n].rstrip(b" ") == json.dumps(header, separators=(",", ":")).encode()
    offs = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert offs[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offs, offs[1:]))
    assert offs[-1][1] == len(raw) - 8 - n  # buffer fully covered, no gaps
    for e in header.values():  # every tensor aligned to its itemsize
        assert (8 + n + e["data_offsets"][0]) % str_to_dtype(e["dtype"]).itemsize == 0


def test_save_noncontiguous_and_big_endian(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = tmp_path / "x.safetensors"
    save_file({"t": a.T, "be": a.astype(">i4"), "sl": a[:, ::2]}, p)
    got = load_file(p)
    np.testing.assert_array_equal(got["t"], a.T)
    np.testing.assert_array_equal(got["be"], a.astype(np.int32))
    np.testing.assert_array_equal(got["sl"], a[:, ::2])


def test_save_rejects_bad_input_without_writing(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(SafetensorsError, match="complex"):
        save_file({"a": np.zeros(2, np.complex64)}, p)
    with pytest.raises(SafetensorsError, match="__metadata__"):
        save_file({"__metadata__": np.zeros(2)}, p)
    with pytest.raises(SafetensorsError, match="metadata"):
        save_file({"a": np.zeros(2)}, p, metadata={"k": 1})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    p = tmp_path / "x.safetensors"
    save_file({"old": np.zeros(2, np.float32)}, p)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(stio.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_file({"new": np.ones(4, np.float32)}, p)
    assert [x.name for x in tmp_path.iterdir()] == ["x.safetensors"]  # temp file removed
    assert load_file(p).keys() == {"old"}  # previous file untouched


# --------------------------------------------------------------------------- interop
NP_INTEROP = ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL"]


@pytest.mark.parametrize("code", NP_INTEROP)
def test_interop_with_safetensors_numpy(tmp_path, code):
    stnp = pytest.importorskip("safetensors.numpy")
    dt = SUPPORTED_DTYPES[code]
    tensors = {"x": _random(dt, (4, 3)), "s": _random(dt, ()), "z": _random(dt, (0,))}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_file(tensors, ours, metadata={"k": "v"})
    stnp.save_file(tensors, str(theirs), metadata={"k": "v"})
    back = stnp.load_file(str(ours))
    with SafetensorsFile(theirs) as f:
        assert f.metadata == {"k": "v"}
        for k, v in tensors.items():
            assert _bits(back[k]) == _bits(v) and back[k].shape == v.shape
            assert _bits(f.get(k)) == _bits(v) and f.get(k).shape == v.shape


@pytest.mark.parametrize("code", ["BF16", "F8_E4M3", "F8_E5M2"])
def test_read_safetensors_numpy_written_ml_dtypes(tmp_path, code):
    # safetensors.numpy can *write* ml_dtypes arrays but not load them back.
    stnp = pytest.importorskip("safetensors.numpy")
    v = _random(SUPPORTED_DTYPES[code], (5, 3))
    p = tmp_path / "theirs.safetensors"
    stnp.save_file({"w": v}, str(p))
    with SafetensorsFile(p) as f:
        assert f.info("w") == (code, (5, 3)) and _bits(f.get("w")) == _bits(v)


@pytest.mark.parametrize("code,tname", [("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                        ("BF16", "bfloat16")])
def test_interop_with_safetensors_torch(tmp_path, code, tname):
    torch = pytest.importorskip("torch")
    stt = pytest.importorskip("safetensors.torch")
    tdt = getattr(torch, tname)
    dt = SUPPORTED_DTYPES[code]
    v = _random(dt, (6, 4))
    scale = np.linspace(0.5, 2, 6, dtype=np.float32).reshape(6, 1)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_file({"w": v, "w_scale_inv": scale}, ours)
    back = stt.load_file(str(ours))
    assert back["w"].dtype == tdt and back["w"].view(torch.uint8).numpy().tobytes() == _bits(v)
    assert np.array_equal(back["w_scale_inv"].numpy(), scale)
    t = torch.from_numpy(_random(np.dtype(np.uint8), (3, 8)).copy()).view(tdt)
    stt.save_file({"w": t}, str(theirs), metadata={"format": "pt"})
    with SafetensorsFile(theirs) as f:
        assert f.metadata == {"format": "pt"} and f.info("w") == (code, (3, 8 // dt.itemsize))
        assert _bits(f.get("w")) == t.view(torch.uint8).numpy().tobytes()


# --------------------------------------------------------------------------- reader API
def test_get_is_zero_copy_and_read_only(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, p)
    with SafetensorsFile(p) as f:
        a = f.get("w")
        assert not a.flags.owndata and not a.flags.writeable and a.flags.c_contiguous
        base = a
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, (mmap.mmap, memoryview))
        with pytest.raises(ValueError):
            a[0, 0] = 1
    assert a[7, 7] == 63  # view survives close(); mapping released when `a` dies
    with pytest.raises(SafetensorsError, match="closed"):
        f.get("w")


def test_missing_tensor(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"layers.0.weight": np.zeros(1, np.float32)}, p)
    with SafetensorsFile(p) as f:
        for call in (f.get, f.info, f.nbytes):
            with pytest.raises(MissingTensorError) as ei:
                call("layers.0.weigth")
            assert isinstance(ei.value, KeyError) and isinstance(ei.value, SafetensorsError)
            msg = str(ei.value)
            assert "layers.0.weigth" in msg and str(p) in msg and "layers.0.weight" in msg


def _entry(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


BAD_CASES = {
    "short": (lambda p: p.write_bytes(b"\x01\x02\x03"), ["shorter", "8"]),
    "huge_header": (lambda p: _raw(p, {}, n=200_000_000), ["exceeds", "limit"]),
    "header_past_eof": (lambda p: _raw(p, {}, n=4096), ["truncated", "re-download"]),
    "not_json": (lambda p: _raw(p, None, header_bytes=b"{not json"), ["JSON"]),
    "not_utf8": (lambda p: _raw(p, None, header_bytes=b'{"\xff":1}'), ["UTF-8"]),
    "not_object": (lambda p: _raw(p, [1, 2]), ["JSON object", "list"]),
    "dup_keys": (lambda p: _raw(p, None, header_bytes=b'{"a":{},"a":{}}'), ["duplicate"]),
    "bad_metadata": (lambda p: _raw(p, {"__metadata__": {"k": 1}}), ["__metadata__"]),
    "entry_not_obj": (lambda p: _raw(p, {"w": 3}), ["'w'", "dtype", "data_offsets"]),
    "missing_field": (lambda p: _raw(p, {"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
                      ["'w'", "data_offsets"]),
    "dtype_type": (lambda p: _raw(p, {"w": _entry(dtype=5)}, bytes(8)), ["dtype", "string"]),
    "unknown_dtype": (lambda p: _raw(p, {"w": _entry(dtype="F4")}, bytes(8)),
                      ["unknown dtype", "'F4'", "F8_E4M3", "BF16"]),
    "neg_dim": (lambda p: _raw(p, {"w": _entry(shape=(-2,))}, bytes(8)), ["shape", "non-negative"]),
    "float_dim": (lambda p: _raw(p, {"w": _entry(shape=(2.0,))}, bytes(8)), ["shape", "integers"]),
    "bool_dim": (lambda p: _raw(p, {"w": _entry(shape=(True, 2))}, bytes(8)), ["shape"]),
    "shape_not_list": (lambda p: _raw(p, {"w": {**_entry(), "shape": "2"}}, bytes(8)), ["shape"]),
    "offs_reversed": (lambda p: _raw(p, {"w": _entry(offs=(8, 0))}, bytes(8)), ["data_offsets", "begin <= end"]),
    "offs_len": (lambda p: _raw(p, {"w": _entry(offs=(0,))}, bytes(8)), ["data_offsets"]),
    "offs_neg": (lambda p: _raw(p, {"w": _entry(offs=(-8, 0))}, bytes(8)), ["data_offsets"]),
    "truncated": (lambda p: _raw(p, {"w": _entry(shape=(4,), offs=(0, 16))}, bytes(10)),
                  ["truncated", "expected at least", "file has", "re-download the shard"]),
    "size_mismatch": (lambda p: _raw(p, {"w": _entry(shape=(3,), offs=(0, 8))}, bytes(12)),
                      ["'w'", "12 bytes", "span 8"]),
    "too_large": (lambda p: _raw(p, {"w": _entry(shape=(2**40, 2**40, 0), offs=(0, 0))}), ["too large"]),
    "too_many_dims": (lambda p: _raw(p, {"w": _entry(shape=(1,) * 40, offs=(0, 4))}, bytes(4)), ["shape"]),
    "overlap": (lambda p: _raw(p, {"a": _entry(offs=(0, 8)), "b": _entry(offs=(4, 12))}, bytes(12)),
                ["overlap", "'a'", "'b'"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_files_raise_clear_errors(tmp_path, case):
    make, words = BAD_CASES[case]
    p = tmp_path / "bad.safetensors"
    make(p)
    with pytest.raises(SafetensorsError) as ei:
        SafetensorsFile(p)
    msg = str(ei.value)
    assert str(p) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_gaps_and_zero_size_tensors_tolerated(tmp_path):
    header = {"a": _entry(offs=(0, 8)), "b": _entry(offs=(16, 24)), "e": _entry(shape=(0, 3), offs=(4, 4)),
              "__metadata__": {"m": "x"}}
    data = np.arange(6, dtype=np.float32).tobytes()
    p = _raw(tmp_path / "gap.safetensors", header, data)
    with SafetensorsFile(p) as f:
        assert f.get("a").tolist() == [0, 1] and f.get("b").tolist() == [4, 5]
        assert f.get("e").shape == (0, 3) and f.metadata == {"m": "x"}


# --------------------------------------------------------------------------- fuzzing
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=10)
_dtype_names = st.sampled_from([*SUPPORTED_DTYPES, "F4", "f32", ""])
_small = st.integers(0, 24) | st.integers(-3, 2**66)
_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": _dtype_names | _json,
        "shape": st.lists(_small, max_size=4) | _json,
        "data_offsets": st.lists(_small, min_size=2, max_size=2) | st.lists(_small, max_size=3) | _json,
    })
_headers = st.dictionaries(st.text(max_size=4), _entries | _json, max_size=4) | _json


_rarely = st.sampled_from([False, False, False, True])  # shrinks towards False


@st.composite
def _consistent(draw) -> tuple[dict, bytes]:
    """A valid header + data buffer, built from random supported entries."""
    header, off = {}, 0
    for name in draw(st.lists(st.text(max_size=4), min_size=1, max_size=4, unique=True)):
        code = draw(st.sampled_from(list(SUPPORTED_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = int(np.prod(shape, dtype=np.int64)) * SUPPORTED_DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    return header, draw(st.binary(min_size=off, max_size=off))


@st.composite
def _files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutate", "structured", "structured", "structured"]))
    if kind == "bytes":
        return draw(st.binary(max_size=96))
    if kind == "mutate":  # random byte edits of a fixed valid file
        blob = bytearray(_VALID)
        for _ in range(draw(st.integers(1, 6))):
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        return bytes(blob)
    if kind == "json":  # random JSON (or random entries) as header
        hdr, data = draw(_headers), draw(st.binary(max_size=128))
    else:  # a consistent file, then one field of one entry perturbed / dropped
        hdr, data = draw(_consistent())
        if draw(_rarely.map(lambda r: not r)):
            names = sorted(hdr)
            e = hdr[draw(st.sampled_from(names))]
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "overlap"]))
            if field == "overlap":
                e["data_offsets"] = list(hdr[draw(st.sampled_from(names))]["data_offsets"])
            elif draw(_rarely):
                del e[field]
            else:
                e[field] = draw({"dtype": _dtype_names,
                                 "shape": st.lists(_small, max_size=3),
                                 "data_offsets": st.lists(_small, min_size=2, max_size=2)}[field] | _json)
    if isinstance(hdr, dict) and draw(_rarely):
        hdr["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3)) | _json)
    hb = json.dumps(hdr).encode()
    n = len(hb) if not draw(_rarely) else draw(st.integers(0, 2**64 - 1) | st.integers(0, len(hb) + 64))
    blob = struct.pack("<Q", n) + hb + data
    if draw(_rarely):  # truncation at a random point
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


def _valid_blob() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.safetensors")
        save_file({"w": np.ones((2, 3), ml_dtypes.float8_e4m3fn), "s": np.ones(2, np.float32),
                   "b": np.zeros((), ml_dtypes.bfloat16), "z": np.zeros((0, 2), np.int64)}, p,
                  metadata={"k": "v"})
        with open(p, "rb") as f:
            return f.read()


_VALID = _valid_blob()
_counter = itertools.count()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=_files())
def test_fuzz_reader_never_crashes(tmp_path_factory, blob):
    p = tmp_path_factory.getbasetemp() / f"fuzz_{next(_counter)}.safetensors"
    p.write_bytes(blob)
    try:
        f = SafetensorsFile(p)
    except SafetensorsError:
        return
    with f:
        assert isinstance(f.metadata, dict)
        for name in f.keys():
            code, shape = f.info(name)
            a = f.get(name)
            assert a.shape == shape and a.dtype == str_to_dtype(code)
            assert len(a.tobytes()) == f.nbytes(name) == a.nbytes
            del a
