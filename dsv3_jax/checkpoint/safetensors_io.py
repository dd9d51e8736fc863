"""Minimal, torch-free safetensors reader/writer (numpy + ml_dtypes only).

The ``safetensors`` package cannot load ``F8_E4M3`` / ``BF16`` tensors into
numpy without torch, but DeepSeek-V3 ships its weights as ``float8_e4m3fn``
with float32 ``weight_scale_inv`` blocks. This module implements the format
directly:

    [u64 little-endian N][N bytes UTF-8 JSON header][data buffer]

The header maps tensor names to ``{"dtype", "shape", "data_offsets"}`` (offsets
relative to the data buffer) plus an optional ``"__metadata__"`` str->str map.
Reading is zero-copy via ``mmap``; every header is validated and problems are
reported as :class:`SafetensorsError` naming the file, the problem and a fix.
"""
from __future__ import annotations

import difflib
import json
import math
import mmap
import os
import secrets
import struct
import sys
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

__all__ = [
    "SafetensorsError", "MissingTensorError", "SafetensorsFile",
    "save_file", "load_file", "dtype_to_str", "str_to_dtype", "SUPPORTED_DTYPES",
]

MAX_HEADER_SIZE = 100_000_000  # same limit as the reference implementation
_MAX_NDIM = 32
_CORRUPT = "the file is corrupt or not a safetensors file; re-download or re-export it"

#: safetensors dtype string -> numpy dtype (all little-endian on disk).
SUPPORTED_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_TO_STR = {dt.newbyteorder("="): s for s, dt in SUPPORTED_DTYPES.items()}


class SafetensorsError(CheckpointError):
    """A safetensors file (or a tensor handed to :func:`save_file`) is invalid."""


class MissingTensorError(SafetensorsError, KeyError):
    """The requested tensor name is not in the file (also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def str_to_dtype(name: str) -> np.dtype:
    """Map a safetensors dtype string (e.g. ``"F8_E4M3"``) to a numpy dtype."""
    try:
        return SUPPORTED_DTYPES[name]
    except (KeyError, TypeError):
        raise SafetensorsError(
            f"unknown safetensors dtype {name!r}; supported: {', '.join(SUPPORTED_DTYPES)}") from None


def dtype_to_str(dtype: np.dtype | type) -> str:
    """Map a numpy / ml_dtypes dtype (any byte order) to its safetensors dtype string."""
    dt = np.dtype(dtype)
    try:
        return _DTYPE_TO_STR[dt.newbyteorder("=")]
    except KeyError:
        raise SafetensorsError(
            f"numpy dtype {dt} has no safetensors equivalent; supported: "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES.values())}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:  # linear: a header with 10⁶ keys must not cost 10¹² comparisons
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


class SafetensorsFile:
    """Read-only, memory-mapped view of one ``.safetensors`` file.

    The header is read and fully validated on construction; tensor data is only
    touched when :meth:`get` is called, which returns a read-only numpy view
    backed by the mmap (no copy). Use as a context manager or call :meth:`close`.
    Views obtained from :meth:`get` stay valid after ``close()``: the mapping is
    then released when the last view is garbage collected.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._parse_header(f, size)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def _err(self, what: str, fix: str = _CORRUPT) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: {what}; {fix}")

    def _parse_header(self, f, size: int) -> None:
        if size < 8:
            raise self._err(f"file is {size} bytes, shorter than the 8-byte header length prefix")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_SIZE:
            raise self._err(f"header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
        if 8 + n > size:
            raise self._err(f"truncated: expected at least {8 + n} bytes, file has {size} (header "
                            f"length {n})", "re-download the shard")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as e:  # JSON/Unicode errors are ValueErrors
            raise self._err(f"header is not valid UTF-8 JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._err(f"header must be a JSON object, got {type(header).__name__}")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._err("'__metadata__' must be an object mapping strings to strings")
        self.metadata: dict[str, str] = meta
        self._data_start, data_len = 8 + n, size - 8 - n
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self._entries[name] = self._check_entry(name, e)
        max_end = max((e[3] for e in self._entries.values()), default=0)
        if max_end > data_len:
            raise self._err(f"truncated: expected at least {self._data_start + max_end} bytes, "
                            f"file has {size}", "re-download the shard")
        spans = sorted((b, e, k) for k, (_, _, b, e) in self._entries.items() if e > b)
        for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._err(f"tensors {k0!r} and {k1!r} overlap in the data buffer")

    def _check_entry(self, name: str, e) -> tuple[str, tuple[int, ...], int, int]:
        where = f"tensor {name!r}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise self._err(f"{where}: entry must be an object with 'dtype', 'shape', 'data_offsets'")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str):
            raise self._err(f"{where}: 'dtype' must be a string, got {dtype!r}")
        if dtype not in SUPPORTED_DTYPES:
            raise self._err(f"{where}: unknown dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}",
                            "convert the tensor to a supported dtype")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(
                _is_int(d) and d >= 0 for d in shape):
            raise self._err(f"{where}: 'shape' must be a list of at most {_MAX_NDIM} non-negative "
                            f"integers, got {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise self._err(f"{where}: 'data_offsets' must be [begin, end] integers with "
                            f"0 <= begin <= end, got {offs!r}")
        itemsize = SUPPORTED_DTYPES[dtype].itemsize
        if math.prod(max(d, 1) for d in shape) * itemsize > sys.maxsize:
            raise self._err(f"{where}: shape {shape} is too large to address")
        nbytes = math.prod(shape) * itemsize
        if nbytes != offs[1] - offs[0]:
            raise self._err(f"{where}: shape {shape} x {dtype} needs {nbytes} bytes but data_offsets "
                            f"{offs} span {offs[1] - offs[0]}")
        return dtype, tuple(shape), offs[0], offs[1]

    # -- mapping-like API ---------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), self._entries, n=3)
            hint = f"did you mean {close}?" if close else f"the file has {len(self._entries)} tensors"
            raise MissingTensorError(f"{self.path}: no tensor named {name!r}; {hint}") from None

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype_str, shape)`` of a tensor, without touching its data."""
        dtype, shape, _, _ = self._entry(name)
        return dtype, shape

    def nbytes(self, name: str) -> int:
        """Size in bytes of a tensor's data."""
        _, _, begin, end = self._entry(name)
        return end - begin

    def get(self, name: str) -> np.ndarray:
        """Zero-copy, read-only numpy view of tensor ``name`` backed by the mmap."""
        dtype, shape, begin, _ = self._entry(name)
        if self._mm is None:
            raise SafetensorsError(f"{self.path}: file is closed; reopen it with SafetensorsFile()")
        dt = SUPPORTED_DTYPES[dtype]
        count = math.prod(shape)
        if count == 0:
            arr = np.empty(shape, dt)
            arr.flags.writeable = False
            return arr
        return np.frombuffer(self._mm, dt, count, self._data_start + begin).reshape(shape)

    def release(self, name: str) -> None:
        """Drop this process's resident pages of tensor ``name`` (``madvise(MADV_DONTNEED)``).

        Streaming readers call it after copying a tensor out, so resident memory stays bounded by
        what is in flight rather than growing to the file size. Views stay valid: touching them
        again faults the pages back in from the page cache. A no-op where unsupported.
        """
        _, _, begin, end = self._entry(name)
        if self._mm is None or end <= begin or not hasattr(self._mm, "madvise") \
                or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = (self._data_start + begin) // page * page
        stop = min(len(self._mm), -(-(self._data_start + end) // page) * page)
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Release the mapping (deferred until outstanding views are collected)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views from get() still alive: they keep the mmap open
                pass

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self)} tensors)"


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in safetensors format.

    Tensors are laid out by decreasing itemsize, then name (as the reference
    implementation does, so every tensor is aligned to its itemsize given the
    8-byte-padded header), and streamed one at a time. The data goes to a
    temporary file in the same directory that is fsynced and ``os.replace``-d
    onto ``path``, so an interrupted write never leaves a complete-looking file.
    """
    path = os.fspath(path)
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise SafetensorsError("metadata must be a mapping of str to str")
    arrays = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"invalid tensor name {name!r}: must be a str other than '__metadata__'")
        arr = np.asarray(t)
        dtype_to_str(arr.dtype)  # raises for unsupported dtypes before anything is written
        arrays[name] = arr
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {"dtype": dtype_to_str(arr.dtype), "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for name in order:
                arr = np.ascontiguousarray(arrays[name]).reshape(-1)  # 1-D so .view works for 0-d
                if arr.dtype.byteorder == ">":
                    arr = arr.astype(arr.dtype.newbyteorder("<"))
                f.write(memoryview(arr.view(np.uint8)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of ``path`` into owned, writeable numpy arrays (copies)."""
    with SafetensorsFile(path) as f:
        return {name: np.array(f.get(name)) for name in f.keys()}
