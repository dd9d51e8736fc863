"""Streaming conversion between Hugging Face weights and our Orbax checkpoints.

``hf_to_orbax``: validate everything that can be checked without reading data (config, names,
shapes, dtypes, FP8 scales), then read a group of tensors (mmap, FP8 dequantised or kept), write each
into its slice of our layout with ``mapping.fill_piece`` (the in-memory ``mapping.hf_to_params`` uses
the same function) and append the group to the checkpoint's ``params/`` with Orbax's
``partial.save`` (one key per layer: ``orbax_io``'s layout, which the trainer writes too). Peak
memory is about two groups. ``orbax_to_hf`` reads one layer at a time and writes safetensors shards
(optionally FP8 with 128×128 ``weight_scale_inv`` as released).

Both write into a temporary directory next to DST and rename it at the end (``orbax_io.atomic_dir``,
the trainer's commit protocol too): an interrupted or failed conversion leaves nothing that loads as
a checkpoint, and SRC is only ever read.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import DeepSeekV3
from . import fp8, mapping, orbax_io, transcode
from .hf_source import TOKENIZER_FILES, HFSource
from .host_buffers import BufferPool, frozen_gc
from .orbax_io import atomic_dir
from .safetensors_io import SUPPORTED_DTYPES, save_file

GROUP_BYTES = 128 << 20  # output bytes per partial save (bounds memory: ~2 groups)
SPLIT_BYTES = 32 << 20   # a float tensor larger than this is filled by several threads, in row ranges
DTYPES = {"bfloat16": SUPPORTED_DTYPES["BF16"], "float32": np.dtype(np.float32)}


def _progress(total: int, desc: str, enabled: Optional[bool]):
    from tqdm import tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _write_context():
    """Orbax's write context without its defensive copy of every host array: each group's arrays are
    built for the save and never touched again (the copy cost a fifth of the conversion time and
    doubled the group's memory; docs/design.md §Conversion speed)."""
    ctx = orbax_io.write_context()
    ctx.memory_options.deepcopy_host_arrays = False
    return ctx


# ---- paths --------------------------------------------------------------------------------------
def resolve_paths(src: str | os.PathLike, dst: str | os.PathLike, what: str = "SRC") -> tuple[Path, Path]:
    """SRC and DST as absolute paths (``~`` expanded, relative to the working directory), checked so a
    conversion can never touch its source: DST must not be SRC, be inside SRC, or contain SRC (symlinks
    resolved, so a link to SRC is SRC). Returns ``(src resolved, dst absolute)``."""
    src_p = Path(os.path.expanduser(os.fspath(src)))
    dst_p = Path(os.path.expanduser(os.fspath(dst)))
    if not src_p.exists():
        raise CheckpointError(f"{src_p}: no such file or directory (fix: check {what}).")
    src_real = src_p.resolve()
    dst_abs = Path(os.path.abspath(dst_p))
    dst_real = dst_abs.resolve()
    same = src_real == dst_real
    if not same and dst_abs.exists():
        try:
            same = os.path.samefile(src_real, dst_abs)
        except OSError:
            pass
    if same:
        why = "is SRC"
    elif dst_real.is_relative_to(src_real):
        why = "is inside SRC"
    elif src_real.is_relative_to(dst_real):
        why = "contains SRC"
    else:
        return src_real, dst_abs
    raise CheckpointError(f"DST {dst_abs} {why} ({src_real}); writing there would delete or change the source "
                          "(fix: choose a DST outside SRC, e.g. a sibling directory).")


def _finite(name: str, a: np.ndarray, allow: bool, where: str) -> None:
    """Refuse NaN/Inf in an output tensor (``--allow-nonfinite`` to write it anyway)."""
    if not allow and transcode.has_nonfinite(a):  # one pass over the bits; the count and index only when bad
        fp8.check_finite(a, name, where)


# ---- HF → Orbax --------------------------------------------------------------------------------
def _units(cfg: ModelConfig, include_mtp: bool) -> list[tuple[tuple, list[mapping.Piece]]]:
    """HF pieces grouped into write units: each top-level tensor alone, one unit per layer (experts
    included), one per MTP depth. In HF order."""
    units: dict[tuple, list] = {}
    for p in mapping.pieces(cfg, include_mtp):
        n = orbax_io.stack_len(p.path)
        if p.path[0] == DeepSeekV3.MTP:
            key = p.path[:2]
        elif n:
            key = (p.path[0], p.index[0])
        else:
            key = p.path
        units.setdefault(key, []).append(p)
    return list(units.items())


def _groups(units, nbytes, budget: int = GROUP_BYTES) -> Iterator[list[mapping.Piece]]:
    """Write groups: per unit, everything but the routed experts, then each expert parameter
    (all experts of one projection) on its own, so a group of a big model is at most ~1/3 of a
    layer; consecutive groups are merged up to ``budget`` output bytes (few saves for small models)."""
    def split():
        for _, plist in units:
            rest = [p for p in plist if p.path[-2:-1] != ("experts",)]
            if rest:
                yield rest
            for proj in ("gate", "up", "down"):
                grp = [p for p in plist if p.path[-2:] == ("experts", proj)]
                if grp:
                    yield grp
    acc, size = [], 0
    for grp in split():
        n = sum(nbytes(p) for p in grp)
        if acc and size + n > budget:
            yield acc
            acc, size = [], 0
        acc, size = acc + grp, size + n
    if acc:
        yield acc


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bfloat16",
                include_mtp: bool = True, keep_fp8: bool = False, overwrite: bool = False,
                progress: Optional[bool] = None, group_bytes: int = GROUP_BYTES,
                allow_nonfinite: bool = False) -> ModelConfig:
    """Convert a Hugging Face DeepSeek checkpoint (directory or PyTorch state dict) to a
    self-describing Orbax checkpoint at ``dst``. Returns the stored config.

    Memory: about two write groups of ``group_bytes`` output bytes (one being written while the
    next is assembled) plus Orbax's buffers; a routed-expert projection of one layer is the
    smallest group, so for the 671B release the bound is ~1/3 of a layer.

    ``keep_fp8``: the linear weights docs/architecture.md §6 runs in FP8 are stored as e4m3 + 128×128 block scales
    (``fp8_weights`` in the stored config): FP8 source tensors are copied bit for bit (transposed into
    our layout), others are quantised like the release. ``dtype`` then applies to the rest.

    Paths may be relative; DST may not be, contain or lie inside SRC. Every tensor is checked for
    NaN/Inf (and FP8 scales for being finite and positive) as it is copied; ``allow_nonfinite`` writes
    non-finite values anyway."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: must be one of {list(DTYPES)}.")
    src, dst = resolve_paths(src, dst)
    with HFSource(src, allow_nonfinite=allow_nonfinite) as source:
        cfg = source.cfg
        if not include_mtp or not cfg.num_mtp_layers:
            include_mtp = False
        elif not any(n.startswith(f"model.layers.{cfg.num_layers}.") for n in source.names):
            # transformers drops the MTP layer on save_pretrained; the config still says it exists
            print(f"note: {src} has no MTP weights (model.layers.{cfg.num_layers}.*); converting without MTP.",
                  file=sys.stderr)
            include_mtp = False
        stored_cfg = cfg.replace(param_dtype=dtype, num_mtp_layers=cfg.num_mtp_layers if include_mtp else 0,
                                 fp8_weights=keep_fp8)
        # 1. Check names and shapes of everything before writing anything.
        _, abstract, _ = orbax_io.abstract_state(stored_cfg)  # (one trace of the model gives shapes and dtypes)
        stored = orbax_io.flat_arrays(abstract)
        shapes = {p: tuple(a.shape) for p, a in stored.items()}
        dtypes = {p: np.dtype(a.dtype) for p, a in stored.items()}
        mapping.check_source(cfg, source, include_mtp, shapes)
        units = _units(cfg, include_mtp)
        total = sum(source.nbytes(pc.hf_name) for _, plist in units for pc in plist)
        expected = {k for p, s in shapes.items() for k in orbax_io.disk_keys(p, s)}
        written: set = set()
        ocp = orbax_io.ocp()
        t0 = time.time()

        def scale_path(path: tuple):  # FP8-stored weight → its block scales (None: stored as float)
            return mapping.stored_scale_path(stored_cfg, path, shapes)

        def fill(arrays: dict, pc: mapping.Piece, rows: Optional[tuple[int, int]]) -> int:
            key, sub = orbax_io.disk_path(pc.path, pc.index)
            sp = scale_path(pc.path)
            mapping.fill_piece(source, pc, arrays[key][sub],
                               None if sp is None else arrays[orbax_io.disk_path(sp, pc.index)[0]][sub], rows)
            n = source.nbytes(pc.hf_name)
            return n if rows is None else n * (rows[1] - rows[0]) // source.shape(pc.hf_name)[0]

        def out_bytes(pc: mapping.Piece) -> int:
            return int(np.prod(shapes[pc.path][len(pc.index):])) * dtypes[pc.path].itemsize

        def tasks(group) -> list[tuple[mapping.Piece, Optional[tuple[int, int]]]]:
            """A group's pieces; a large float tensor (embedding, head) as row ranges, one per thread."""
            out = []
            for pc in group:
                shape = source.shape(pc.hf_name)
                if out_bytes(pc) < SPLIT_BYTES or len(shape) != 2 or source.is_fp8(pc.hf_name) or scale_path(pc.path):
                    out.append((pc, None))
                    continue
                parts = math.ceil(out_bytes(pc) / SPLIT_BYTES)
                step = math.ceil(shape[0] / parts / transcode.TILE_ROWS) * transcode.TILE_ROWS
                out += [(pc, (r, min(r + step, shape[0]))) for r in range(0, shape[0], step)]
            return out

        orbax_io.check_free_space(dst, sum(out_bytes(pc) for _, plist in units for pc in plist))
        with atomic_dir(dst, overwrite) as tmp, _progress(total, f"convert {src.name}", progress) as bar, \
                ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool, _write_context(), frozen_gc():
            params_dir = tmp / orbax_io.PARAMS_DIR
            buffers = BufferPool()
            pending = None  # the save in flight
            filling: list = []  # the fill tasks in flight

            def start(group) -> tuple[dict, list]:
                """Allocate a group's arrays (recycled from the group before last) and start filling them."""
                arrays: dict[tuple, np.ndarray] = {}
                for pc in group:
                    per_layer = bool(orbax_io.stack_len(pc.path) and pc.index)
                    # the model's dtype: --dtype (e4m3 with --keep-fp8); the router bias stays fp32 (docs/architecture.md §6)
                    for path in (pc.path, scale_path(pc.path)):
                        k = path and orbax_io.disk_path(path, pc.index)[0]
                        if path is not None and k not in arrays:
                            full = shapes[path]
                            arrays[k] = buffers.take(full[1:] if per_layer else full, dtypes[path])
                buffers.drop()
                return arrays, [pool.submit(fill, arrays, pc, rows) for pc, rows in tasks(group)]

            def split_names(group) -> set:
                return {pc.hf_name for pc, rows in tasks(group) if rows is not None}

            def _write_groups():
                # Group k is saved (Orbax/TensorStore threads) while group k+1 is filled on the worker
                # threads; k+1 reuses k-1's arrays, whose save has finished: two groups in memory.
                nonlocal pending, filling
                groups = list(_groups(units, out_bytes, group_bytes))
                arrays, filling = start(groups[0])
                saving: dict = {}
                for i, group in enumerate(groups):
                    for f in filling:
                        bar.update(f.result())
                    for name in split_names(group):  # (the others dropped their pages when filled)
                        source.release(name)
                    if pending is not None:
                        pending.result()
                        buffers.give(saving.values())
                    nxt, filling = start(groups[i + 1]) if i + 1 < len(groups) else (None, [])
                    pending = ocp.partial.save_async(params_dir, orbax_io.nest(arrays))
                    written.update(arrays)
                    saving, arrays = arrays, nxt
                pending.result()

            try:
                _write_groups()
            except BaseException:
                for f in filling:
                    f.cancel()
                with contextlib.suppress(BaseException):  # let in-flight work finish before the temp dir goes
                    for f in filling:
                        f.exception()
                    if pending is not None:
                        pending.result()
                raise
            if written != expected:  # a bug, not bad input: never finalize an incomplete tree
                raise CheckpointError(f"internal error: wrote {len(written)} arrays, expected {len(expected)}; "
                                      f"e.g. missing {sorted(expected - written)[:3]}")
            ocp.partial.finalize(params_dir)
            for f in source.tokenizer_files():
                shutil.copy2(f, tmp / f.name)
            (tmp / "hf_config.json").write_text(json.dumps(source.hf_config, indent=1))
            orbax_io.write_marker(tmp, stored_cfg, dtype=dtype, source=str(src.resolve()),
                                  source_fp8=bool(source.scales), seconds=round(time.time() - t0, 3))
    return stored_cfg


# ---- Orbax → HF --------------------------------------------------------------------------------
def _fp8_eligible(name: str) -> bool:
    """Linear weights other than embedding, head, norms and the MoE gate (docs/architecture.md §6)."""
    if not name.endswith(".weight") or "norm" in name or name.endswith("mlp.gate.weight"):
        return False
    return not any(s in name for s in ("embed_tokens", "lm_head", "shared_head.head"))


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, fp8_weights: bool = False,
                include_mtp: bool = True, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                progress: Optional[bool] = None, allow_nonfinite: bool = False) -> None:
    """Write our checkpoint as a Hugging Face model directory: sharded safetensors + index +
    ``config.json``. With ``fp8_weights`` linear weights are e4m3 + 128×128 ``weight_scale_inv``.
    Paths may be relative; DST may not be, contain or lie inside SRC; tensors with NaN/Inf are refused
    unless ``allow_nonfinite``."""
    if not max_shard_bytes > 0:
        raise CheckpointError(f"--max-shard-size {max_shard_bytes / 2**30:g}: must be > 0 GiB (fix: use e.g. 5).")
    src, dst = resolve_paths(src, dst)
    meta = orbax_io.read_marker(src)
    cfg = orbax_io.checkpoint_config(src)
    if not include_mtp:
        cfg_out = cfg.replace(num_mtp_layers=0)
    else:
        cfg_out = cfg
    shapes = mapping.param_shapes(cfg_out)
    units = _units(cfg_out, include_mtp)
    total = sum(int(np.prod(shapes[pc.path][len(pc.index):])) * 4 for _, pl in units for pc in pl)
    out_itemsize = 1 if fp8_weights else (2 if meta.get("dtype") == "bfloat16" else 4)
    orbax_io.check_free_space(dst, total // 4 * out_itemsize)
    with atomic_dir(dst, overwrite) as tmp, _progress(total, f"export {src.name}", progress) as bar:
        shard: dict[str, np.ndarray] = {}
        shard_bytes = 0
        files: list[tuple[str, list[str]]] = []

        def flush():
            nonlocal shard, shard_bytes
            if not shard:
                return
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, shard_bytes = {}, 0

        out_dtype = DTYPES["bfloat16"] if meta.get("dtype") == "bfloat16" else np.dtype(np.float32)

        def prepare(name: str, w: np.ndarray, scale_inv: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
            """The HF tensors of one weight (checked; dequantised or quantised as asked). On a worker thread."""
            if scale_inv is not None:
                fp8.check_scales(np.asarray(scale_inv), name + "_scale_inv", allow_nonfinite, f"from {src}")
            _finite(name, w, allow_nonfinite, f"from {src}")
            if scale_inv is not None and not fp8_weights:  # FP8-stored checkpoint exported as float
                w, scale_inv = fp8.dequantize(w, scale_inv, dtype=out_dtype, name=name), None
            if scale_inv is not None:  # stored FP8 goes out bit for bit
                return {name: w, name + "_scale_inv": scale_inv}
            if fp8_weights and _fp8_eligible(name) and w.ndim == 2:
                q, s = fp8.quantize(np.asarray(w, np.float32))
                return {name: q, name + "_scale_inv": s}
            return {name: np.ascontiguousarray(w)}

        def emit(tensors: dict[str, np.ndarray]):
            nonlocal shard_bytes
            size = sum(t.nbytes for t in tensors.values())
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard.update(tensors)
            shard_bytes += size

        def scale_path(path: tuple):
            return mapping.stored_scale_path(cfg, path, shapes)

        def unit_keys(plist):
            return {orbax_io.disk_path(p, pc.index)[0]
                    for pc in plist for p in (pc.path, scale_path(pc.path)) if p is not None}

        def piece_tensors(arrays, pc) -> dict[str, np.ndarray]:
            key, sub = orbax_io.disk_path(pc.path, pc.index)
            sp = scale_path(pc.path)
            w, s_inv = mapping.hf_tensors(pc, arrays[key][sub],
                                          None if sp is None else arrays[orbax_io.disk_path(sp, pc.index)[0]][sub])
            return prepare(pc.hf_name, w, s_inv)

        # the next unit is read (Orbax/TensorStore) while this one is transposed on worker threads and
        # written: memory is two units plus the open shard
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            ahead = reader.submit(orbax_io.read_params, src, unit_keys(units[0][1])) if units else None
            for i, (_, plist) in enumerate(units):
                arrays = ahead.result()
                ahead = reader.submit(orbax_io.read_params, src, unit_keys(units[i + 1][1])) \
                    if i + 1 < len(units) else None
                for pc, tensors in zip(plist, pool.map(lambda pc: piece_tensors(arrays, pc), plist)):
                    emit(tensors)
                    bar.update(int(np.prod(shapes[pc.path][len(pc.index):])) * 4)
                if plist[0].path[0] == DeepSeekV3.MTP:  # the release stores embedding and head again in the MTP layer
                    top = orbax_io.read_params(src, [("embed",), ("lm_head",)])
                    for name, w in mapping.mtp_shared_tensors(cfg, plist[0].path[1], top[("embed",)],
                                                              top[("lm_head",)]):
                        emit(prepare(name, w))
                del arrays
                if shard_bytes > max_shard_bytes:
                    flush()
        flush()
        n = len(files)
        weight_map, total_size = {}, 0
        for i, (name, names) in enumerate(files, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(tmp / name, tmp / final)
            for t in names:
                weight_map[t] = final
            total_size += (tmp / final).stat().st_size
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf = cfg_out.to_hf()
        hf["torch_dtype"] = hf["dtype"] = "bfloat16" if meta.get("dtype") == "bfloat16" else "float32"
        if fp8_weights:
            hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                         "quant_method": "fp8", "weight_block_size": [fp8.BLOCK, fp8.BLOCK]}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for f in src.iterdir():
            if f.name in TOKENIZER_FILES:
                shutil.copy2(f, tmp / f.name)


__all__ = ["hf_to_orbax", "orbax_to_hf", "atomic_dir", "DTYPES"]
