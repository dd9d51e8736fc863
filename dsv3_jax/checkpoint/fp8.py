"""The released checkpoint's FP8 weight format (docs/architecture.md §6).

A linear weight is stored as ``weight`` float8_e4m3fn ``[out, in]`` plus ``weight_scale_inv`` float32
``[ceil(out/128), ceil(in/128)]``; the real weight is ``w[i, j] * scale_inv[i // 128, j // 128]``.
Dimensions need not be multiples of 128 (the last block row/column is partial).
"""
from __future__ import annotations

import math
from typing import Optional

import ml_dtypes
import numpy as np

from pallas_kernels.fp8 import AMAX_MIN, BLOCK, E4M3_MAX  # the one home of the FP8 constants (docs/architecture.md §6)

from ..errors import CheckpointError

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)  # numpy's view of the e4m3 dtype (host-side conversion)

# e4m3 bit pattern -> float32, so dequantisation is one table lookup (fast) instead of a cast.
_LUT = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)


class FP8FormatError(CheckpointError):
    """An FP8 weight and its ``weight_scale_inv`` do not fit together, or the scales are invalid."""


class NonFiniteError(CheckpointError):
    """A weight or scale holds NaN/Inf (refused unless ``allow_nonfinite``)."""


def nonfinite(a: np.ndarray) -> tuple[int, Optional[tuple]]:
    """``(count, first index)`` of the NaN/Inf values of ``a`` (float or e4m3; ``(0, None)`` when all
    are finite). One read of ``a`` when it is clean: its sum is finite only if every value is (an
    overflowing sum of finite values falls through to the exact pass, which also names the culprits)."""
    a = np.asarray(a)
    if a.dtype == E4M3:
        bad = (a.view(np.uint8) & 0x7F) == 0x7F  # e4m3fn has NaN (S.1111.111) and no Inf
    elif a.dtype.kind not in "fcV" and a.dtype != ml_dtypes.bfloat16 and not str(a.dtype).startswith("float8"):
        return 0, None
    else:
        with np.errstate(all="ignore"):
            acc = a.dtype if a.dtype in (np.float32, np.float64) else np.float32
            if a.size == 0 or np.isfinite(np.add.reduce(a, axis=None, dtype=acc)):
                return 0, None
        bad = ~np.isfinite(a.astype(np.float32) if a.dtype.kind == "V" else a)
    n = int(np.count_nonzero(bad))
    if not n:
        return 0, None
    return n, tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))


def check_finite(a: np.ndarray, name: str, where: str = "", flag: str = "--allow-nonfinite") -> None:
    """``CheckpointError`` naming tensor ``name`` when ``a`` holds NaN/Inf."""
    n, first = nonfinite(a)
    if n:
        raise NonFiniteError(f"{name}{' (' + where + ')' if where else ''}: {n} of {a.size} values are NaN/Inf "
                             f"(first at index {first}); the weights are corrupt (fix: re-download or re-export "
                             f"them, or pass {flag} to convert them anyway).")


def check_scales(s: np.ndarray, name: str, allow_nonfinite: bool = False, where: str = "") -> None:
    """FP8 block scales must be float32, positive and (unless ``allow_nonfinite``) finite: a zero or
    negative scale silently zeroes or flips a block of 128×128 weights."""
    at = f" ({where})" if where else ""
    if np.asarray(s).dtype != np.float32:
        raise FP8FormatError(f"{name}{at}: block scales are {np.asarray(s).dtype}, not float32; they would "
                             "be misread (fix: re-export the checkpoint with float32 weight_scale_inv).")
    if not allow_nonfinite:
        check_finite(s, name, where)
    with np.errstate(invalid="ignore"):
        bad = s <= 0
    n = int(np.count_nonzero(bad))
    if n:
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), s.shape))
        raise FP8FormatError(f"{name}{at}: {n} of {s.size} block scales are <= 0 (first at index {first}: "
                             f"{float(s[first])}); a scale must be positive (fix: re-download or re-export the "
                             "weights).")


def scale_shape(shape: tuple) -> tuple:
    out, inn = shape
    return (math.ceil(out / BLOCK), math.ceil(inn / BLOCK))


def dequantize(w8: np.ndarray, scale_inv: np.ndarray, dtype=np.float32, name: str = "weight") -> np.ndarray:
    """``w8 [out, in]`` e4m3 × block scales ``[ceil(out/128), ceil(in/128)]`` → ``dtype`` ``[out, in]``.

    """
    if w8.ndim != 2:
        raise FP8FormatError(f"{name}: FP8 weights must be 2-D [out, in], got shape {w8.shape}.")
    want = scale_shape(w8.shape)
    if tuple(scale_inv.shape) != want:
        raise FP8FormatError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}, but a "
                             f"{w8.shape} weight in 128x128 blocks needs {want} (fix: re-export the shard).")
    out, inn = w8.shape
    x = np.take(_LUT, w8.view(np.uint8))  # float32 [out, in]
    s = np.asarray(scale_inv, np.float32)
    with np.errstate(over="ignore"):  # an overflowing product is Inf, which the converter's check reports
        if out % BLOCK == 0 and inn % BLOCK == 0:
            x.reshape(want[0], BLOCK, want[1], BLOCK)[...] *= s[:, None, :, None]
        else:
            for b in range(want[0]):  # partial blocks: one block row at a time
                x[b * BLOCK:(b + 1) * BLOCK] *= np.repeat(s[b], BLOCK)[:inn]
        return x if np.dtype(dtype) == np.float32 else x.astype(dtype)


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Release-style quantisation: per 128×128 block ``scale = max(amax, 1e-4) / 448``;
    returns ``(w8 e4m3 [out, in], scale_inv float32 [ceil(out/128), ceil(in/128)])``."""
    w = np.asarray(w, np.float32)
    out, inn = w.shape
    nb0, nb1 = scale_shape(w.shape)
    padded = np.zeros((nb0 * BLOCK, nb1 * BLOCK), np.float32)
    padded[:out, :inn] = w
    blocks = padded.reshape(nb0, BLOCK, nb1, BLOCK)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 3)), AMAX_MIN) / E4M3_MAX
    q = (blocks / scale[:, None, :, None]).reshape(nb0 * BLOCK, nb1 * BLOCK)[:out, :inn]
    return np.ascontiguousarray(q).astype(E4M3), scale.astype(np.float32)
