"""The fast conversion kernels (``checkpoint/transcode.py``: tiled transposes, FP8 through per-block
tables, straight from the mmap into the output) write exactly what the straightforward conversion
writes: every stored array is compared bit for bit with a reference built here from ``HFSource.get``
(float32 dequantisation, ``.T``, numpy's cast) — for ``--dtype bfloat16``, ``--dtype float32`` and
``--keep-fp8``, on a synthetic release-format FP8 checkpoint (BF16 embedding/head/norms, F32 bias)
whose projections have partial 128-blocks. Tolerance: none (bit-identical)."""
from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.checkpoint import convert, fp8, mapping, orbax_io, transcode
from dsv3_jax.checkpoint.hf_source import HFSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import convert as bench_convert  # noqa: E402  (benchmarks/convert.py: the synthetic FP8 release)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8") / "release"
    bench_convert.generate(d, small=True, shard_bytes=2 << 20, layers=3)
    return d


def reference(src: Path, dtype: str, keep_fp8: bool) -> dict[tuple, np.ndarray]:
    """Every stored array, converted the plain way: float32 values from ``HFSource.get``, ``.T`` for
    linears, then ``astype``; FP8 kept: the e4m3 bits and scales from ``get_fp8`` (or ``fp8.quantize``
    of a float source), transposed."""
    with HFSource(src) as s:
        cfg = s.cfg.replace(param_dtype=dtype, fp8_weights=keep_fp8)
        shapes = mapping.param_shapes(cfg)
        _, abstract, _ = orbax_io.abstract_state(cfg)
        dtypes = {p: np.dtype(a.dtype) for p, a in orbax_io.flat_arrays(abstract).items()}
        out: dict[tuple, np.ndarray] = {}
        for pc in mapping.pieces(s.cfg):
            key, sub = orbax_io.disk_path(pc.path, pc.index)
            shape = shapes[pc.path][len(pc.index):]
            sp = mapping.stored_scale_path(cfg, pc.path, shapes)
            stack = shapes[pc.path][1:] if orbax_io.stack_len(pc.path) and pc.index else shapes[pc.path]
            arr = out.setdefault(key, np.zeros(stack, dtypes[pc.path]))
            if sp is not None:
                w8, s_inv = (s.get_fp8(pc.hf_name) if s.is_fp8(pc.hf_name)  # float sources: quantised as released
                             else fp8.quantize(s.get(pc.hf_name, np.float32)))
                arr[sub] = w8.T.reshape(shape)
                skey = orbax_io.disk_path(sp, pc.index)[0]
                sstack = shapes[sp][1:] if orbax_io.stack_len(sp) and pc.index else shapes[sp]
                out.setdefault(skey, np.zeros(sstack, np.float32))[sub] = s_inv.T
                continue
            w = s.get(pc.hf_name, np.float32)
            w = w.T if pc.transform == mapping.LINEAR else w
            arr[sub] = w.reshape(shape).astype(dtypes[pc.path])
    return out


@pytest.mark.parametrize("dtype, keep_fp8, split", [("bfloat16", False, False), ("float32", False, False),
                                                    ("bfloat16", True, False), ("bfloat16", False, True),
                                                    ("float32", True, True)])
def test_conversion_is_bit_identical_to_plain_reference(release, tmp_path, monkeypatch, dtype, keep_fp8, split):
    """Groups of 1 MB (many: output arrays recycled between them); ``split``: every float tensor over
    64 KB (embedding, head, dense MLP) filled in row ranges by several threads."""
    if split:
        monkeypatch.setattr(convert, "SPLIT_BYTES", 1 << 16)
    dst = tmp_path / "orbax"
    convert.hf_to_orbax(release, dst, dtype=dtype, keep_fp8=keep_fp8, progress=False, group_bytes=1 << 20)
    got = orbax_io.read_params(dst)
    want = reference(release, dtype, keep_fp8)
    assert sorted(got) == sorted(want)
    n_fp8 = 0
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert g.tobytes() == w.tobytes(), f"{'/'.join(k)} differs from the plain conversion"
        n_fp8 += g.dtype == fp8.E4M3
    assert (n_fp8 > 0) == keep_fp8  # the FP8-kept run really stored e4m3 weights


def test_kernels_match_numpy_on_odd_shapes():
    """Partial tiles and blocks in both dimensions, every e4m3 byte (NaN included), and the
    non-finite detector on each float format."""
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (130, 259), (300, 97), (128, 512)]:
        w8 = rng.integers(0, 256, shape, dtype=np.uint8).view(fp8.E4M3)
        s = (rng.random(fp8.scale_shape(shape), np.float32) + 0.5).astype(np.float32)
        for dt in (np.float32, ml_dtypes.bfloat16):
            out = np.empty(shape[::-1], dt)
            transcode.dequantize_transposed_into(out, w8, s)
            want = fp8.dequantize(w8, s).T.astype(dt)
            assert out.view(np.uint8).tobytes() == np.ascontiguousarray(want).view(np.uint8).tobytes(), (shape, dt)
        t = np.empty(shape[::-1], fp8.E4M3)
        transcode.transpose_into(t, w8)
        assert t.view(np.uint8).tobytes() == np.ascontiguousarray(w8.T).view(np.uint8).tobytes()
    for dt in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16):
        a = np.ones((5, 7), dt)
        assert not transcode.has_nonfinite(a)
        for bad in (np.inf, -np.inf, np.nan):
            b = a.copy()
            b[3, 4] = bad
            assert transcode.has_nonfinite(b), (dt, bad)
    assert transcode.has_nonfinite(np.array([0x7F], np.uint8).view(fp8.E4M3))
    assert not transcode.has_nonfinite(np.array([0x7E], np.uint8).view(fp8.E4M3))


def test_nonfinite_detector_on_every_length_and_layout():
    """The word-at-a-time NaN/Inf test (``has_nonfinite``) agrees with ``np.isfinite`` for every float
    format, lengths that do and do not fill 64-bit words, a bad value in the tail or a word, strided
    views, and 0-d arrays; ``tables_finite`` ignores only the two NaN bytes of e4m3."""
    rng = np.random.default_rng(1)
    for dt in (fp8.E4M3, ml_dtypes.bfloat16, np.float16, np.float32, np.float64):
        bads = [np.nan] if dt == fp8.E4M3 else [np.nan, np.inf, -np.inf]
        for n in (1, 2, 3, 7, 8, 9, 15, 16, 17, 64, 129):
            a = (rng.standard_normal(n) * 3).astype(np.float32).astype(dt)
            assert not transcode.has_nonfinite(a), (dt, n)
            for i in {0, n // 2, n - 1}:
                for bad in bads:
                    b = a.copy()
                    b[i] = bad
                    assert transcode.has_nonfinite(b), (dt, n, i, bad)
                    assert transcode.has_nonfinite(np.tile(b, (2, 1))[:, ::-1]), (dt, n, i)  # not contiguous
        assert transcode.has_nonfinite(np.array(np.nan).astype(dt)) and not transcode.has_nonfinite(np.array(1.0).astype(dt))
    big = np.full(3 * transcode._SWAR_WORDS * 8 + 5, 0.5, ml_dtypes.bfloat16)  # several passes of words
    assert not transcode.has_nonfinite(big)
    big[2 * transcode._SWAR_WORDS * 4 + 1] = -np.inf
    assert transcode.has_nonfinite(big)
    s = np.ones((2, 2), np.float32)
    assert transcode.tables_finite(transcode.block_tables(s, ml_dtypes.bfloat16))  # NaN bytes only
    s[1, 0] = 3e38  # 448 * 3e38 overflows float32
    assert not transcode.tables_finite(transcode.block_tables(s, np.float32))


def test_progress_bar_shows_rate_and_eta(release, tmp_path, capsys):
    """The bar (stderr) reports bytes per second and the time left; ``progress=False`` (``--quiet``) prints nothing."""
    convert.hf_to_orbax(release, tmp_path / "a", progress=True, group_bytes=1 << 20)
    err = capsys.readouterr().err
    assert "B/s" in err and "<" in err and "100%" in err, err[-300:]  # [elapsed<remaining, rate]
    convert.hf_to_orbax(release, tmp_path / "b", progress=False, group_bytes=1 << 20)
    assert capsys.readouterr().err == ""
