"""The released checkpoint's FP8 weight format (SPEC §6).

A linear weight is stored as ``weight`` float8_e4m3fn ``[out, in]`` plus ``weight_scale_inv`` float32
``[ceil(out/128), ceil(in/128)]``; the real weight is ``w[i, j] * scale_inv[i // 128, j // 128]``.
Dimensions need not be multiples of 128 (the last block row/column is partial).
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from pallas_kernels.fp8 import AMAX_MIN, BLOCK, E4M3_MAX  # the one home of the FP8 constants (SPEC §6)

from ..errors import CheckpointError

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)  # numpy's view of the e4m3 dtype (host-side conversion)

# e4m3 bit pattern -> float32, so dequantisation is one table lookup (fast) instead of a cast.
_LUT = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)


class FP8FormatError(CheckpointError):
    """An FP8 weight and its ``weight_scale_inv`` do not fit together."""


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
