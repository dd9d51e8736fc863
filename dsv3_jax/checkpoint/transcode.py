"""Fast, exact host kernels for conversion: transposed copies and FP8 dequantisation into place.

numpy's strided copy of ``a.T`` walks one array with a stride of a whole row, so a large transpose
misses the cache on every element (2-4 ns each); copying ``TILE_ROWS`` source rows at a time keeps
both sides in L1/L2 (0.6 ns per byte element here). Dequantising FP8 goes through a per-block table:
a 128×128 block has one scale, so its 256 possible e4m3 bytes map to 256 output values,
``table[b] = dtype(float32(e4m3(b)) * scale)`` — the same float32 multiply and the same cast as
``fp8.dequantize`` followed by ``astype``, so the result is bit-for-bit that of the plain path
(docs/design.md §Conversion speed), at the cost of one byte transpose and one table lookup per weight.
Every kernel releases the GIL inside numpy, so conversion runs them on worker threads.
"""
from __future__ import annotations

import numpy as np

from . import fp8

TILE_ROWS = 32   # source rows per tile of a transposed copy (measured best for 1/2/4-byte items)
TILE_COLS = 512  # source columns per tile
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose_into(out: np.ndarray, src: np.ndarray) -> None:
    """``out[...] = src.T`` for 2-D arrays (``out`` contiguous, any float dtype; ``src`` may be an mmap
    view), tile by tile. A cast, if the dtypes differ, is numpy's own (identical to ``out[...] = src.T``)."""
    rows, cols = src.shape
    if out.shape != (cols, rows):
        raise ValueError(f"transpose_into: out {out.shape} is not the transpose of {src.shape}")
    if out.dtype == src.dtype and out.dtype.itemsize in _UINT:  # a plain byte copy (ml_dtypes too)
        out, src = out.view(_UINT[out.dtype.itemsize]), src.view(_UINT[out.dtype.itemsize])
    for r in range(0, rows, TILE_ROWS):
        for c in range(0, cols, TILE_COLS):
            out[c:c + TILE_COLS, r:r + TILE_ROWS] = src[r:r + TILE_ROWS, c:c + TILE_COLS].T


def block_tables(scale_inv: np.ndarray, dtype) -> np.ndarray:
    """``[nb_out, nb_in, 256]`` table of ``dtype`` values: entry ``b`` of block ``(i, j)`` is
    ``dtype(float32(e4m3 byte b) * scale_inv[i, j])`` (the product ``fp8.dequantize`` computes)."""
    s = np.asarray(scale_inv, np.float32)
    with np.errstate(over="ignore"):  # an overflow is an Inf entry, which the callers look for and report
        prod = fp8._LUT[None, None, :] * s[:, :, None]  # float32 × float32 → float32, as in fp8.dequantize
        return prod if np.dtype(dtype) == np.float32 else prod.astype(dtype)


def dequantize_transposed_into(out: np.ndarray, w8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """``out[...] = fp8.dequantize(w8, scale_inv).T.astype(out.dtype)``, bit for bit, without the
    float32 intermediate: the e4m3 bytes are transposed (1-byte tiles) and mapped through each block's
    table. ``w8`` is ``[out, in]`` e4m3 (or its uint8 bits), ``out`` ``[in, out]`` bf16/f16/f32.
    Returns the ``[nb_out, nb_in, 256]`` tables (their non-finite entries say which bytes give NaN/Inf)."""
    n_out, n_in = w8.shape
    want = fp8.scale_shape(w8.shape)
    if tuple(scale_inv.shape) != want:
        raise fp8.FP8FormatError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, but a {w8.shape} weight "
                                 f"in 128x128 blocks needs {want} (fix: re-export the shard).")
    tables = block_tables(scale_inv, out.dtype)
    nb_out = want[0]
    bits = _UINT[out.dtype.itemsize]
    flat = np.ascontiguousarray(tables.transpose(1, 0, 2)).view(bits)  # [nb_in, nb_out, 256]
    # index = block_out * 256 + byte: the block along out's columns (the weight's output rows). uint16
    # indices while they fit (up to 256 blocks, i.e. 32,768 output rows): the add writes 2 bytes per
    # weight instead of 4 and the gather reads them as such (docs/design.md §Conversion speed)
    idx_type = np.uint16 if nb_out * 256 <= 1 << 16 else np.int32 if nb_out * 256 < 2**31 else np.int64
    offset = ((np.arange(n_out, dtype=np.int64) // fp8.BLOCK) * 256).astype(idx_type)
    u8 = w8.view(np.uint8)
    stripe = np.empty((fp8.BLOCK, n_out), np.uint8)
    idx = np.empty((fp8.BLOCK, n_out), idx_type)
    dst = out.view(bits)
    for j0 in range(0, n_in, fp8.BLOCK):  # one block column of the weight = 128 rows of out
        j1 = min(j0 + fp8.BLOCK, n_in)
        t = stripe[:j1 - j0]
        transpose_into(t, u8[:, j0:j1])
        ix = idx[:j1 - j0]
        np.add(t, offset, out=ix, casting="unsafe")
        np.take(flat[j0 // fp8.BLOCK].reshape(-1), ix, out=dst[j0:j1])
    return tables


_NAN_BYTES = (np.arange(256) & 0x7F) == 0x7F  # e4m3fn's two NaN encodings (it has no Inf)


def tables_finite(tables: np.ndarray) -> bool:
    """Whether every entry of ``block_tables`` other than the two NaN bytes' is finite: then a weight
    dequantised through them is finite exactly where its e4m3 bytes are not NaN, which
    ``has_nonfinite`` checks on the 1-byte source instead of the wider output."""
    return bool(np.isfinite(tables[..., ~_NAN_BYTES]).all())


# An all-ones exponent field marks NaN/Inf. Tested several values at a time in 64-bit words (SWAR):
# ``(word & M) + L`` sets a lane's top bit exactly when its field is all ones (M: the field in every
# lane, L: the field's lowest bit; field + lowest bit = the lane's top bit, so no carry leaves a lane).
_EXP_FIELD = {("e4m3", 1): 0x7F, ("bfloat16", 2): 0x7F80, ("float16", 2): 0x7C00, ("float32", 4): 0x7F800000,
              ("float64", 8): 0x7FF0000000000000}
_SWAR_WORDS = 1 << 16  # 512 KB of words per pass: the temporaries stay in L2


def _lanes(field: int, itemsize: int) -> tuple[np.uint64, np.uint64, np.uint64]:
    lane_bits = 8 * itemsize
    rep = sum(1 << (lane_bits * k) for k in range(8 // itemsize))  # 0x0101...01 for bytes, etc.
    low = field & -field
    return np.uint64(field * rep), np.uint64(low * rep), np.uint64((1 << (lane_bits - 1)) * rep)


def has_nonfinite(a: np.ndarray) -> bool:
    """Whether float ``a`` (bf16/f16/f32/f64, or e4m3) holds NaN/Inf, read once without a float copy:
    an all-ones exponent field in the bits, tested eight bytes at a time."""
    a = np.asarray(a)
    dt = np.dtype(a.dtype)
    kind = "e4m3" if dt == fp8.E4M3 else dt.name
    field = _EXP_FIELD.get((kind, dt.itemsize))
    if field is None or (dt.kind not in "fV" and kind != "e4m3"):
        return False
    u = a.view(_UINT[dt.itemsize]) if a.ndim else a.reshape(1).view(_UINT[dt.itemsize])
    if u.flags.c_contiguous:
        u = u.reshape(-1)
        n_words = u.nbytes // 8
        if n_words:
            words = u[:n_words * 8 // dt.itemsize].view(np.uint64)
            m, low, top = _lanes(field, dt.itemsize)
            tmp = np.empty(min(n_words, _SWAR_WORDS), np.uint64)
            for i in range(0, n_words, _SWAR_WORDS):
                w = words[i:i + _SWAR_WORDS]
                t = tmp[:len(w)]
                np.bitwise_and(w, m, out=t)
                np.add(t, low, out=t)
                np.bitwise_and(t, top, out=t)
                if t.any():
                    return True
            u = u[n_words * 8 // dt.itemsize:]  # the last few values that do not fill a word
    f = u.dtype.type(field)
    return bool(np.any(np.bitwise_and(u, f) == f))


__all__ = ["transpose_into", "dequantize_transposed_into", "block_tables", "tables_finite", "has_nonfinite"]
