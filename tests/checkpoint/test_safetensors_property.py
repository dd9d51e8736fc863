"""Property tests (hypothesis, 1,300 cases) of what the converter reads before any tensor data: the
safetensors header parser (``SafetensorsFile``), the index reader (``hf_source.read_index``) and the
two together (``HFSource`` over a directory). Random and mutated inputs either parse correctly or raise
``CheckpointError`` — never another exception — and every case stays within a small memory bound
(tracemalloc peak, which numpy's allocations report to) and a time bound (hypothesis ``deadline``).
"""
from __future__ import annotations

import itertools
import json
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv3_jax.checkpoint.hf_source import HFSource, read_index
from dsv3_jax.checkpoint.safetensors_io import SUPPORTED_DTYPES, SafetensorsFile, save_file, str_to_dtype
from dsv3_jax.errors import CheckpointError, Dsv3Error

MEM_BOUND = 4 << 20          # bytes allocated (peak) per case: inputs are < 64 KB
DEADLINE_MS = 2000           # per case, generous for 2 loaded cores; a real case takes ~1 ms
SETTINGS = dict(deadline=DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_DIR = Path(tempfile.mkdtemp(prefix="st_property_"))
_n = itertools.count()


class Bounded:
    """Trace allocations of one case; fail when the peak exceeds ``MEM_BOUND``."""

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEM_BOUND, f"allocated {peak} bytes"


# ---- strategies ------------------------------------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)
_codes = list(SUPPORTED_DTYPES)
_dim = st.integers(0, 6) | st.sampled_from([-1, 2**31, 2**40, 2**63, 2**64 + 1, 2_000_000])


@st.composite
def valid_file(draw) -> tuple[dict, dict]:
    """A random valid tensor set, as ``{name: array}`` and metadata."""
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
                          max_size=6, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for name in names:
        dt = SUPPORTED_DTYPES[draw(st.sampled_from(_codes))]
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        raw = rng.integers(0, 256, size=int(np.prod(shape, dtype=np.int64)) * dt.itemsize, dtype=np.uint8)
        if dt == np.bool_:
            raw &= 1
        tensors[name] = raw.view(dt).reshape(shape)
    meta = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    return tensors, meta


def _blob(header, data: bytes, n=None) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if n is None else n) + hb + data


@st.composite
def mutated_file(draw) -> bytes:
    """A valid file with structured or byte-level damage, or hostile headers written by hand."""
    kind = draw(st.sampled_from(["field", "field", "bytes", "truncate", "prefix", "json", "hostile"]))
    if kind == "hostile":
        which = draw(st.sampled_from(["dup", "deep", "bigint", "nan", "many", "utf8", "fused", "neg"]))
        if which == "dup":  # duplicate keys (the parser must stay linear in the key count)
            n = draw(st.integers(1, 3000))
            keys = ",".join(f'"k{i}":{{}}' for i in range(n))
            return _blob(f'{{{keys},"k{n - 1}":{{}}}}'.encode(), b"")
        if which == "deep":
            depth = draw(st.integers(100, 5000))
            return _blob(("[" * depth + "]" * depth).encode(), b"")
        if which == "bigint":
            return _blob(f'{{"a":{{"dtype":"F32","shape":[{"9" * draw(st.integers(18, 5000))}],'
                         f'"data_offsets":[0,4]}}}}'.encode(), b"\0" * 4)
        if which == "nan":
            return _blob(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,Infinity]}}', b"")
        if which == "many":  # many zero-size tensors: allowed, and cheap
            return _blob({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
                          for i in range(draw(st.integers(1, 2000)))}, b"")
        if which == "utf8":
            return _blob(b'{"\xff\xfe":{}}', b"")
        if which == "fused":  # the 120-byte header of a fused tensor with 2*10^6 experts
            return _blob({"model.layers.1.mlp.experts.gate_up_proj":
                          {"dtype": "F32", "shape": [draw(_dim), 0, draw(_dim)], "data_offsets": [0, 0]}}, b"")
        return _blob({"a": {"dtype": "F32", "shape": [draw(_dim), draw(_dim)],
                            "data_offsets": [draw(_dim), draw(_dim)]}}, b"\0" * draw(st.integers(0, 64)))
    tensors, meta = draw(valid_file())
    path = _DIR / f"m{next(_n)}.safetensors"
    save_file(tensors, path, metadata=meta)
    blob = path.read_bytes()
    path.unlink()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    if kind == "field" and any(k != "__metadata__" for k in header):
        names = sorted(k for k in header if k != "__metadata__")
        e = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "overlap", "entry"]))
        if field == "drop":
            del e[draw(st.sampled_from(sorted(e)))]
        elif field == "overlap":
            e["data_offsets"] = list(header[draw(st.sampled_from(names))]["data_offsets"])
        elif field == "entry":
            header[names[0]] = draw(_json)
        else:
            e[field] = draw({"dtype": st.sampled_from([*_codes, "F4", "f32", ""]),
                             "shape": st.lists(_dim, max_size=4),
                             "data_offsets": st.lists(_dim, min_size=2, max_size=2)}[field] | _json)
        return _blob(header, data)
    if kind == "json":
        return _blob(draw(_json), data)
    if kind == "prefix":
        return _blob(header, data, n=draw(st.integers(0, 2**64 - 1) | st.integers(0, n + 16)))
    blob = bytearray(blob)
    if kind == "truncate":
        return bytes(blob[:draw(st.integers(0, len(blob)))])
    for _ in range(draw(st.integers(1, 8))):
        blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
    return bytes(blob)


def _read_all(path: Path) -> dict:
    """Parse ``path`` and read every tensor; the invariants of a file that parses."""
    size = path.stat().st_size
    out = {}
    with SafetensorsFile(path) as f:
        assert isinstance(f.metadata, dict) and all(isinstance(v, str) for v in f.metadata.values())
        for name in f.keys():
            code, shape = f.info(name)
            a = f.get(name)
            assert a.dtype == str_to_dtype(code) and a.shape == shape and a.nbytes == f.nbytes(name) <= size
            out[name] = np.array(a)
            f.release(name)
    return out


# ---- the header parser -------------------------------------------------------------------------------
@settings(max_examples=300, **SETTINGS)
@given(case=valid_file())
def test_valid_files_round_trip(case):
    tensors, meta = case
    path = _DIR / f"v{next(_n)}.safetensors"
    save_file(tensors, path, metadata=meta)
    try:
        with Bounded():
            got = _read_all(path)
    finally:
        path.unlink()
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].shape == v.shape and got[k].tobytes() == v.tobytes()


@settings(max_examples=500, **SETTINGS)
@given(blob=mutated_file())
def test_damaged_headers_parse_or_raise_checkpoint_error(blob):
    path = _DIR / f"d{next(_n)}.safetensors"
    path.write_bytes(blob)
    try:
        with Bounded():
            try:
                _read_all(path)
            except CheckpointError as e:
                assert str(path) in str(e) and "\n" not in str(e)
    finally:
        path.unlink()


# ---- the index reader --------------------------------------------------------------------------------
_shard_names = st.sampled_from([
    "a.safetensors", "b.safetensors", "sub/c.safetensors", "./a.safetensors", "sub//c.safetensors",
    "../x.safetensors", "sub/../../x.safetensors", "/etc/x.safetensors", "//x.safetensors", "", ".",
    "..", "a.bin", "a\\..\\b.safetensors", "a\0.safetensors", "~/x.safetensors", "sub/./../a.safetensors",
]) | st.text(max_size=20) | st.none() | st.integers() | st.lists(st.text(max_size=3), max_size=2)


@st.composite
def index_json(draw) -> bytes:
    kind = draw(st.sampled_from(["map", "map", "map", "json", "bytes", "weight_map"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    if kind == "weight_map":
        return json.dumps({"weight_map": draw(_json), "metadata": draw(_json)}).encode()
    wm = draw(st.dictionaries(st.text(max_size=10), _shard_names, max_size=8))
    return json.dumps({"metadata": {"total_size": draw(st.integers())}, "weight_map": wm}).encode()


def _inside(root: str, fname: str) -> bool:
    return os.path.normpath(os.path.join(root, fname)).startswith(root + os.sep)


@settings(max_examples=400, **SETTINGS)
@given(raw=index_json())
def test_index_entries_stay_inside_src_or_raise(raw):
    d = _DIR / f"i{next(_n)}"
    d.mkdir()
    index = d / "model.safetensors.index.json"
    index.write_bytes(raw)
    try:
        with Bounded():
            try:
                by_file = read_index(index)
            except CheckpointError as e:
                assert str(index) in str(e)
                return
    finally:
        index.unlink()
        d.rmdir()
    wm = json.loads(raw)["weight_map"]
    assert sorted(n for names in by_file.values() for n in names) == sorted(wm)
    for fname in by_file:
        assert isinstance(fname, str) and fname.endswith(".safetensors") and not os.path.isabs(fname)
        assert ".." not in Path(fname).parts and _inside(str(d), fname), fname


# ---- both, as the converter opens a model directory ---------------------------------------------------
_CFG = {"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
        "kv_lora_rank": 4, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4, "q_lora_rank": None,
        "intermediate_size": 8, "n_routed_experts": None, "num_nextn_predict_layers": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    (d / "config.json").write_text(json.dumps(_CFG))
    save_file({"model.embed_tokens.weight": np.zeros((16, 8), np.float32)}, d / "a.safetensors")
    save_file({"lm_head.weight": np.zeros((16, 8), np.float32)}, d / "b.safetensors")
    (d / "sub").mkdir()
    save_file({"model.norm.weight": np.ones(8, np.float32)}, d / "sub" / "c.safetensors")
    save_file({"x": np.ones(1, np.float32)}, d.parent / "x.safetensors")  # what a '..' entry would read
    return d


@settings(max_examples=100, **SETTINGS)
@given(raw=index_json())
def test_hf_source_opens_or_raises(model_dir, raw):
    index = model_dir / "model.safetensors.index.json"
    index.write_bytes(raw)
    try:
        with Bounded():
            try:
                with HFSource(model_dir) as src:
                    for n in src.names:  # only files inside the directory were opened
                        assert _inside(str(model_dir), os.path.relpath(src.where(n), model_dir))
            except Dsv3Error as e:
                assert isinstance(e, CheckpointError) or "config" in str(e)
    finally:
        index.unlink()
