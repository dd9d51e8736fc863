"""Read a Hugging Face DeepSeek checkpoint lazily: a model directory (``config.json`` +
``model.safetensors.index.json`` shards, or one ``model.safetensors``) or a PyTorch state dict
(``.bin`` / ``.pt``, ``torch.load(weights_only=True)``).

Everything that can be checked without reading tensor data is checked when the source is opened
(config fields, index ⇄ shard consistency, headers, dtypes, FP8 scale shapes), so a conversion fails
before it writes anything. Tensors are read one at a time from mmaps; ``get`` returns an owned copy
(dequantised from FP8 when the tensor has a ``weight_scale_inv``) and drops the mapped pages, so
resident memory follows what is in flight, not the model size.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from ..config import ConfigError, ModelConfig
from ..errors import CheckpointError
from . import fp8
from .safetensors_io import SUPPORTED_DTYPES, SafetensorsError, SafetensorsFile, dtype_to_str

SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" + "_scale_inv"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


# ---- transformers-5 fused experts (the one implementation: files, torch state dicts, in-memory dicts)
def fused_parts(raw: str, shape: tuple) -> list[tuple[str, int, Optional[str]]]:
    """Hub names held by a transformers-5 fused expert tensor ``raw`` of ``shape`` (``gate_up_proj
    [E, 2I, D]`` gate first, ``down_proj [E, D, I]``) as ``(name, expert, part)``; [] when not fused."""
    m = _FUSED.match(raw)
    if not m:
        return []
    base, kind = m.groups()
    out = []
    for e in range(shape[0]):
        if kind == "down_proj":
            out.append((f"{base}.{e}.down_proj.weight", e, None))
        else:
            out += [(f"{base}.{e}.gate_proj.weight", e, "gate"), (f"{base}.{e}.up_proj.weight", e, "up")]
    return out


def fused_shape(shape: tuple, part: Optional[str]) -> tuple:
    """Shape of one expert (``part``: gate/up half) of a fused tensor of ``shape``."""
    shape = tuple(shape[1:])
    return ((shape[0] // 2,) + shape[1:]) if part is not None else shape


def fused_slice(a, expert: int, part: Optional[str]):
    """One expert (and gate/up half) of a fused tensor: a view, nothing copied."""
    a = a[expert]
    if part is not None:
        half = a.shape[0] // 2
        a = a[:half] if part == "gate" else a[half:]
    return a


class _Entry:
    """Where a logical (hub-named) tensor lives: a raw tensor, optionally one expert of a fused one."""
    __slots__ = ("reader", "raw", "expert", "part")

    def __init__(self, reader, raw: str, expert: Optional[int] = None, part: Optional[str] = None):
        self.reader, self.raw, self.expert, self.part = reader, raw, expert, part


def _torch_load_problem(e: Exception) -> str:
    """torch.load's (long, multi-paragraph) error as a short reason."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return (f"it contains the Python object {m.group(1)}, which is not loaded: unpickling it could run code "
                "(state dicts are read with torch.load(weights_only=True): tensors and containers only)")
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    why = " ".join((m.group(1) if m else text).split())[:200] or type(e).__name__
    return f"it is not a readable PyTorch state dict ({why})"


class _TorchReader:
    """A torch state dict behind the same small API as ``SafetensorsFile``."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is optional
            raise CheckpointError(f"{path}: reading PyTorch state dicts needs torch "
                                  "(fix: pip install torch, or convert the weights to safetensors).") from None
        self.path = path
        # weights_only=True: tensors and plain containers only; a pickle that would construct any other
        # object (i.e. run code) is refused by torch's restricted unpickler, never executed.
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:  # noqa: BLE001 - any failure to read the file is the file's problem
            raise CheckpointError(f"{path}: {_torch_load_problem(e)} (fix: convert the weights to safetensors, or "
                                  "re-export them with torch.save(model.state_dict())).") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a state dict (name → tensor), got {type(sd).__name__}.")
        self._t = {k: v for k, v in sd.items() if hasattr(v, "dtype") and hasattr(v, "shape")}
        self._names = {
            torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            getattr(torch, "float8_e4m3fn", None): "F8_E4M3",
        }

    def keys(self):
        return sorted(self._t)

    def info(self, name):
        t = self._t[name]
        return self._names.get(t.dtype, str(t.dtype)), tuple(t.shape)

    def nbytes(self, name):
        t = self._t[name]
        return t.numel() * t.element_size()

    def get(self, name):
        import torch
        t = self._t[name].contiguous()
        kind = self._names.get(t.dtype)
        if kind == "BF16":
            return t.view(torch.int16).numpy().view(SUPPORTED_DTYPES["BF16"])
        if kind == "F8_E4M3":
            return t.view(torch.uint8).numpy().view(fp8.E4M3)
        return t.numpy()

    def release(self, name):
        """Nothing to release: a torch state dict is already fully loaded (mmap'ed by torch)."""

    def close(self):
        self._t = {}


class _DictReader:
    """In-memory ``{name: array}`` (e.g. a transformers state dict as numpy) behind the same API."""
    path = "<in-memory state dict>"

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = tensors

    def keys(self):
        return sorted(self._t)

    def info(self, name):
        a = self._t[name]
        try:
            kind = dtype_to_str(np.dtype(a.dtype))
        except (TypeError, ValueError, KeyError, SafetensorsError):
            kind = str(a.dtype)
        return kind, tuple(a.shape)

    def nbytes(self, name):
        return int(np.asarray(self._t[name]).nbytes)

    def get(self, name):
        return np.asarray(self._t[name])

    def release(self, name):
        """Nothing to release: the arrays belong to the caller."""

    def close(self):
        self._t = {}


MAX_JSON_BYTES = 64 << 20  # config.json / the index: a real one is < 10 MB


def _read_json(path: Path, what: str) -> dict:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {what} is {size} bytes, more than any real one "
                                  f"({MAX_JSON_BYTES >> 20} MiB) (fix: point SRC at the model directory).")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing (fix: point SRC at a complete model directory).") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: {what} is a directory (fix: point SRC at a complete model directory).") from None
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e}); fix: re-download it.") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e}) (fix: check its permissions).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(data).__name__} (fix: re-download it).")
    return data


def _shard_name_problem(fname) -> Optional[str]:
    """Why an index entry cannot name a shard inside the model directory (None: it can)."""
    if not isinstance(fname, str) or not fname:
        return f"is {fname!r}, not a file name"
    if "\0" in fname or "\\" in fname:
        return "is not a plain file name"
    if fname.startswith("/") or os.path.isabs(fname):
        return "is an absolute path; shards must be inside the model directory"
    if ".." in fname.split("/"):
        return "points outside the model directory ('..')"
    if not fname.endswith(".safetensors"):
        return "is not a .safetensors file"
    return None


def read_index(index: Path) -> dict[str, list[str]]:
    """``model.safetensors.index.json`` → ``{shard file name: [tensor names]}``, every entry checked:
    names are strings, shards are ``.safetensors`` files named relative to the model directory and
    inside it (no absolute paths, no ``..``). ``CheckpointError`` naming the entry otherwise.
    Nothing is opened."""
    data = _read_json(index, "model.safetensors.index.json")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no 'weight_map' object (fix: re-download the index).")
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        problem = _shard_name_problem(fname)
        if problem:
            raise CheckpointError(f"{index}: the shard of tensor {name!r} {problem} ({fname!r}) (fix: re-download "
                                  "the index; it must name shards in the same directory).")
        by_file.setdefault(os.path.normpath(fname), []).append(name)
    return by_file


class HFSource:
    """Lazy view of a Hugging Face / PyTorch DeepSeek checkpoint. ``names`` are hub names (per
    expert, without ``weight_scale_inv``); ``get(name)`` returns a float array."""

    def __init__(self, src: str | os.PathLike, allow_nonfinite: bool = False):
        src = Path(os.path.expanduser(os.fspath(src))).absolute()
        if not src.exists():
            raise CheckpointError(f"{src}: no such file or directory (fix: check SRC).")
        self.allow_nonfinite = allow_nonfinite
        self.root = src if src.is_dir() else src.parent
        self.hf_config = _read_json(self.root / "config.json", "config.json")
        try:
            self.cfg: ModelConfig = ModelConfig.from_hf(self.hf_config, name=self.root.resolve().name or "hf")
        except ConfigError as e:
            raise ConfigError(f"{self.root / 'config.json'}: {e}") from None
        self._readers: list = []
        self._entries: dict[str, _Entry] = {}
        try:
            if src.is_dir():
                self._open_dir(src)
            elif src.suffix in TORCH_SUFFIXES:
                self._add_reader(_TorchReader(str(src)))
            elif src.suffix == ".safetensors":
                self._add_reader(SafetensorsFile(src))
            else:
                raise CheckpointError(f"{src}: unknown weights file type (fix: pass a model directory, a "
                                      ".safetensors file or a PyTorch .bin/.pt state dict).")
            self._check_dtypes()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                     allow_nonfinite: bool = False) -> "HFSource":
        """An in-memory state dict (hub or transformers-5 fused names, FP8 with ``weight_scale_inv`` or
        float) read through the same checks and FP8/fused-expert handling as files on disk."""
        self = cls.__new__(cls)
        self.root, self.hf_config, self.cfg = None, cfg.to_hf(), cfg
        self.allow_nonfinite = allow_nonfinite
        self._readers, self._entries = [], {}
        self._add_reader(_DictReader(tensors))
        self._check_dtypes()
        return self

    # -- opening -------------------------------------------------------------------------------
    def _open_dir(self, d: Path) -> None:
        index = d / "model.safetensors.index.json"
        if index.exists():
            for fname, names in sorted(read_index(index).items()):
                path = d / fname
                if not path.is_file():
                    raise CheckpointError(f"{path}: shard listed in model.safetensors.index.json is missing "
                                          f"({len(names)} tensors, e.g. {names[0]!r}); fix: download it.")
                reader = SafetensorsFile(path)
                self._readers.append(reader)
                absent = [n for n in names if n not in reader]
                if absent:
                    raise CheckpointError(f"{path}: the index says it holds {absent[:3]}, but it does not "
                                          "(fix: re-download the shard and the index together).")
                for n in names:
                    self._add(n, reader)
            return
        files = sorted(d.glob("*.safetensors"))
        if files:
            for f in files:
                self._add_reader(SafetensorsFile(f))
            return
        torch_files = sorted(p for p in d.iterdir() if p.suffix in TORCH_SUFFIXES)
        if torch_files:
            for f in torch_files:
                self._add_reader(_TorchReader(str(f)))
            return
        raise CheckpointError(f"{d}: no model.safetensors.index.json, *.safetensors or PyTorch .bin/.pt "
                              "weights found (fix: point SRC at the model directory).")

    def _add_reader(self, reader) -> None:
        self._readers.append(reader)
        for n in reader.keys():
            self._add(n, reader)

    def _check_fused(self, raw: str, reader) -> None:
        """A fused expert tensor's shape against the config, before it is split into per-expert entries
        (a header declaring 2·10⁶ experts must not cost 4·10⁶ of them)."""
        c = self.cfg
        dtype, shape = reader.info(raw)
        want = ((c.n_routed_experts, 2 * c.moe_intermediate_size, c.hidden_size) if raw.endswith("gate_up_proj")
                else (c.n_routed_experts, c.hidden_size, c.moe_intermediate_size))
        if tuple(shape) != want:
            raise CheckpointError(f"{reader.path}: {raw} has shape {tuple(shape)}, but the config implies {want} "
                                  f"(n_routed_experts={c.n_routed_experts}, moe_intermediate_size="
                                  f"{c.moe_intermediate_size}, hidden_size={c.hidden_size}) (fix: check that "
                                  "config.json belongs to these weights).")

    def _add(self, raw: str, reader) -> None:
        if _FUSED.match(raw):
            self._check_fused(raw, reader)
        parts = fused_parts(raw, reader.info(raw)[1]) if _FUSED.match(raw) else []
        for name, e, part in parts:  # transformers-5 layout: experts fused on a leading axis
            self._put(name, _Entry(reader, raw, e, part))
        if not parts:
            self._put(raw, _Entry(reader, raw))

    def _put(self, name: str, entry: _Entry) -> None:
        if name in self._entries:
            raise CheckpointError(f"tensor {name!r} appears twice (in {self._entries[name].reader.path} and "
                                  f"{entry.reader.path}); fix: remove the duplicate shard.")
        self._entries[name] = entry

    def _check_dtypes(self) -> None:
        self.scales: dict[str, str] = {}
        for name in list(self._entries):
            if name.endswith(SCALE_SUFFIX):
                self.scales[name[: -len(SCALE_SUFFIX)]] = name
        for name, scale in self.scales.items():
            if name not in self._entries:
                raise CheckpointError(f"{scale} has no matching {name} (fix: re-download the shard).")
        for name in self.names:
            dtype, shape = self.raw_info(name)
            if dtype.startswith("F8"):
                if name not in self.scales:
                    raise CheckpointError(f"{name} is {dtype} but has no {name}{SCALE_SUFFIX} block scales "
                                          "(fix: the shard holding the scales is missing or incomplete).")
                if dtype != "F8_E4M3":
                    raise CheckpointError(f"{name}: FP8 format {dtype} is not the release's F8_E4M3.")
                s_dtype, s_shape = self.raw_info(self.scales[name])
                in_memory = isinstance(self._entries[self.scales[name]].reader, _DictReader)
                if s_dtype != "F32" and not (in_memory and s_dtype in FLOAT_DTYPES):
                    raise CheckpointError(f"{self.scales[name]} ({self.where(self.scales[name])}) has dtype {s_dtype}; "
                                          "FP8 block scales must be F32 (read as anything else they would give "
                                          "wrong weights) (fix: re-export the checkpoint with float32 weight_scale_inv).")
                if len(shape) != 2 or tuple(s_shape) != fp8.scale_shape(shape):
                    raise CheckpointError(f"{name}: weight_scale_inv has shape {tuple(s_shape)}, but a {shape} "
                                          f"weight in 128x128 blocks needs {fp8.scale_shape(shape) if len(shape) == 2 else '2-D'}.")
            elif dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{name} ({self.where(name)}) has dtype {dtype}; weights must be F32, BF16, "
                                      "F16 or F8_E4M3 with weight_scale_inv (fix: re-export the checkpoint).")
            elif name in self.scales:
                raise CheckpointError(f"{self.scales[name]} ({self.where(self.scales[name])}) scales {name}, which "
                                      f"is {dtype}, not F8_E4M3 (fix: re-export the checkpoint; only FP8 weights "
                                      "have block scales).")

    # -- reading -------------------------------------------------------------------------------
    @property
    def names(self) -> set[str]:
        """Hub tensor names, without the FP8 ``weight_scale_inv`` companions."""
        return {n for n in self._entries if not n.endswith(SCALE_SUFFIX)}

    def raw_info(self, name: str) -> tuple[str, tuple]:
        e = self._entries[name]
        dtype, shape = e.reader.info(e.raw)
        return dtype, fused_shape(shape, e.part) if e.expert is not None else tuple(shape)

    def shape(self, name: str) -> tuple:
        return self.raw_info(name)[1]

    def is_fp8(self, name: str) -> bool:
        return name in self.scales

    def nbytes(self, name: str) -> int:
        """Bytes read from disk for this tensor (its scales included)."""
        dtype, shape = self.raw_info(name)
        n = int(np.prod(shape)) * SUPPORTED_DTYPES[dtype].itemsize if dtype in SUPPORTED_DTYPES else 0
        if name in self.scales:
            n += int(np.prod(self.raw_info(self.scales[name])[1])) * 4
        return n

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names)

    def _raw(self, name: str) -> np.ndarray:
        e = self._entries[name]
        a = e.reader.get(e.raw)
        return fused_slice(a, e.expert, e.part) if e.expert is not None else a

    def where(self, name: str) -> str:
        """The file holding tensor ``name`` (for messages)."""
        return str(getattr(self._entries[name].reader, "path", "?"))

    def _scales(self, name: str) -> np.ndarray:
        s_name = self.scales[name]
        s = np.array(self._raw(s_name), np.float32)  # F32 on disk (checked on open); in-memory floats are cast
        fp8.check_scales(s, s_name, self.allow_nonfinite, self.where(s_name))
        self._entries[s_name].reader.release(self._entries[s_name].raw)
        return s

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """An owned ``dtype`` copy of tensor ``name`` (FP8 dequantised with its block scales), checked
        for NaN/Inf unless ``allow_nonfinite`` (the tensor and its file are named)."""
        e = self._entries[name]
        try:
            if name in self.scales:
                out = fp8.dequantize(self._raw(name), self._scales(name), dtype=dtype, name=name)
            else:
                out = np.array(self._raw(name), dtype=dtype)
            if not self.allow_nonfinite:
                fp8.check_finite(out, name, self.where(name))
        except (OSError, ValueError) as err:  # e.g. SIGBUS-free short reads surface as errors
            if isinstance(err, (SafetensorsError, CheckpointError, fp8.FP8FormatError)):
                raise
            raise CheckpointError(f"{getattr(e.reader, 'path', '?')}: reading {name!r} failed ({err}).") from None
        e.reader.release(e.raw)
        return out

    def get_fp8(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Owned copies of an FP8 tensor as stored: e4m3 ``[out, in]`` and its float32
        ``weight_scale_inv`` ``[ceil(out/128), ceil(in/128)]`` (for ``--keep-fp8``)."""
        e = self._entries[name]
        try:
            w8 = np.array(self._raw(name)).view(fp8.E4M3)
            s = self._scales(name)
            if not self.allow_nonfinite:
                fp8.check_finite(w8, name, self.where(name))
        except (OSError, ValueError) as err:
            if isinstance(err, (SafetensorsError, CheckpointError)):
                raise
            raise CheckpointError(f"{getattr(e.reader, 'path', '?')}: reading {name!r} failed ({err}).") from None
        if w8.ndim != 2 or s.shape != fp8.scale_shape(w8.shape):
            raise fp8.FP8FormatError(f"{name}: weight_scale_inv has shape {s.shape}, but a {w8.shape} weight in "
                                     f"128x128 blocks needs {fp8.scale_shape(w8.shape) if w8.ndim == 2 else '2-D'} "
                                     "(fix: re-export the shard).")
        e.reader.release(e.raw)
        return w8, s

    def view(self, name: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Tensor ``name`` as stored, without a copy (an mmap view; ``release`` it after use), and for
        an FP8 tensor its checked float32 block scales (else None). For converters that transpose,
        cast or dequantise straight into their output (``transcode``)."""
        e = self._entries[name]
        try:
            raw = self._raw(name)
            s = self._scales(name) if name in self.scales else None
        except (OSError, ValueError) as err:
            if isinstance(err, (SafetensorsError, CheckpointError)):
                raise
            raise CheckpointError(f"{getattr(e.reader, 'path', '?')}: reading {name!r} failed ({err}).") from None
        if s is not None:
            raw = raw.view(fp8.E4M3) if raw.dtype != fp8.E4M3 else raw
            if raw.ndim != 2 or s.shape != fp8.scale_shape(raw.shape):
                raise fp8.FP8FormatError(f"{name}: weight_scale_inv has shape {s.shape}, but a {raw.shape} weight in "
                                         f"128x128 blocks needs {fp8.scale_shape(raw.shape) if raw.ndim == 2 else '2-D'} "
                                         "(fix: re-export the shard).")
        return raw, s

    def release(self, name: str) -> None:
        """Drop the mapped pages of tensor ``name`` (after ``view``)."""
        e = self._entries[name]
        e.reader.release(e.raw)

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []

    def __enter__(self) -> "HFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenizer_files(self) -> list[Path]:
        if self.root is None:
            return []
        return [self.root / f for f in TOKENIZER_FILES if (self.root / f).is_file()]


__all__ = ["HFSource", "CheckpointError", "read_index", "TOKENIZER_FILES", "ConfigError", "fused_parts", "fused_shape", "fused_slice"]
