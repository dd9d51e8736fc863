"""Weight names: Hugging Face / PyTorch state dict ⇄ this model's stacked parameter tree.

One table drives both directions. Each HF tensor is one *piece* of one of our parameters: our
parameters stack layers (and experts) on leading axes, so a piece is addressed by ``(path, index)``
where ``index`` selects the layer (and expert) slice. The streaming converter (``convert.py``) and
the in-memory ``hf_to_params``/``params_to_hf`` below share this table, ``fill_piece`` (one HF tensor →
our slice, FP8 kept or quantised) and ``hf_tensors`` (our slice → HF tensors); both read HF tensors
through ``HFSource`` (files or an in-memory dict: one FP8-scale pairing, one fused-expert split).

Layout conversions: PyTorch linears are ``[out, in]``; ours are ``[*in, *out]`` with heads kept as
an axis (``q_b_proj: [Q, H, Dqk]``, ``kv_b_proj: [L, H, Dn+Dv]``, ``o_proj: [H, Dv, D]``), so a
linear piece is ``w.T.reshape(our_shape)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import DeepSeekV3
from . import fp8, transcode
from .hf_source import HFSource, fused_parts, fused_slice
from .orbax_io import assign_flat, flat_arrays, fp8_scale_path

Path = tuple  # e.g. ("moe_layers", "attn", "q_b_proj", "kernel")

LINEAR, COPY = "linear", "copy"
DENSE, MOE = DeepSeekV3.STACKS
MTP = DeepSeekV3.MTP

# (HF name inside a decoder layer, our path inside a Block, transform)
_ATTN = [
    ("self_attn.q_a_proj.weight", ("attn", "q_a_proj", "kernel"), LINEAR),
    ("self_attn.q_a_layernorm.weight", ("attn", "q_a_norm", "scale"), COPY),
    ("self_attn.q_b_proj.weight", ("attn", "q_b_proj", "kernel"), LINEAR),
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), LINEAR),  # no q-LoRA (V2-Lite)
    ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "kv_a_proj", "kernel"), LINEAR),
    ("self_attn.kv_a_layernorm.weight", ("attn", "kv_a_norm", "scale"), COPY),
    ("self_attn.kv_b_proj.weight", ("attn", "kv_b_proj", "kernel"), LINEAR),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), LINEAR),
    ("input_layernorm.weight", ("attn_norm", "scale"), COPY),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), COPY),
]
_DENSE_MLP = [(f"mlp.{p}_proj.weight", ("mlp", f"{p}_proj", "kernel"), LINEAR) for p in ("gate", "up", "down")]
_MOE = [
    ("mlp.gate.weight", ("mlp", "router", "kernel"), LINEAR),
    ("mlp.gate.e_score_correction_bias", ("mlp", "router", "bias"), COPY),
] + [(f"mlp.shared_experts.{p}_proj.weight", ("mlp", "shared", f"{p}_proj", "kernel"), LINEAR)
     for p in ("gate", "up", "down")]
_EXPERT = [(f"{p}_proj.weight", ("mlp", "experts", p), LINEAR) for p in ("gate", "up", "down")]
# MTP-only tensors of layer ``num_layers + k`` (docs/architecture.md §5).
_MTP = [
    ("enorm.weight", ("enorm", "scale"), COPY),
    ("hnorm.weight", ("hnorm", "scale"), COPY),
    ("eh_proj.weight", ("eh_proj",), LINEAR),
    ("shared_head.norm.weight", ("norm", "scale"), COPY),
]
# Copies of the main model's embedding/head that the release stores again in the MTP layer.
MTP_SHARED = {"embed_tokens.weight": ("embed",), "shared_head.head.weight": ("lm_head",)}
_TOP = [
    ("model.embed_tokens.weight", ("embed",), COPY),
    ("model.norm.weight", ("final_norm", "scale"), COPY),
    ("lm_head.weight", ("lm_head",), LINEAR),
]


@dataclass(frozen=True)
class Piece:
    """HF tensor ``hf_name`` is ``params[path][index]`` (after ``transform``)."""
    hf_name: str
    path: Path
    index: tuple  # leading indices into our stacked parameter: (layer,), (layer, expert) or ()
    transform: str


def _block_pieces(cfg: ModelConfig, prefix: str, stack: Path, layer: int, moe: bool) -> Iterator[Piece]:
    for name, sub, tr in _ATTN:
        if "q_proj" in name and cfg.q_lora_rank is not None:
            continue
        if ("q_a_" in name or "q_b_" in name) and cfg.q_lora_rank is None:
            continue
        yield Piece(prefix + name, stack + sub, (layer,), tr)
    if not moe:
        for name, sub, tr in _DENSE_MLP:
            yield Piece(prefix + name, stack + sub, (layer,), tr)
        return
    for name, sub, tr in _MOE:
        if name.endswith("e_score_correction_bias") and cfg.topk_method != "noaux_tc":
            continue
        if "shared_experts" in name and not cfg.n_shared_experts:
            continue
        yield Piece(prefix + name, stack + sub, (layer,), tr)
    for e in range(cfg.n_routed_experts):
        for name, sub, tr in _EXPERT:
            yield Piece(f"{prefix}mlp.experts.{e}.{name}", stack + sub, (layer, e), tr)


def pieces(cfg: ModelConfig, include_mtp: bool = True) -> list[Piece]:
    """Every HF tensor of a model with this config, in HF layer order."""
    out = [Piece(n, p, (), t) for n, p, t in _TOP]
    for i in range(cfg.num_layers):
        moe = i >= cfg.first_k_dense
        stack, layer = ((MOE,), i - cfg.first_k_dense) if moe else ((DENSE,), i)
        out.extend(_block_pieces(cfg, f"model.layers.{i}.", stack, layer, moe))
    if include_mtp:
        for k in range(cfg.num_mtp_layers):
            prefix = f"model.layers.{cfg.num_layers + k}."
            out.extend(Piece(prefix + n, (MTP, k) + p, (), t) for n, p, t in _MTP)
            out.extend(_block_pieces(cfg, prefix, (MTP, k, "block"), 0, cfg.num_moe_layers > 0))
    return out


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple]:
    """Our stored arrays' shapes by path (FP8 storage: values and block scales), from the model's
    abstract state (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in flat_arrays(nnx.state(abstract)).items()}


def to_hf(piece: Piece, our_slice: np.ndarray, in_ndim: int) -> np.ndarray:
    """Our slice → HF tensor. ``in_ndim`` = number of leading input dims of our kernel slice."""
    if piece.transform == LINEAR:
        s = our_slice.shape
        return _transposed(our_slice.reshape(int(np.prod(s[:in_ndim])), -1))
    return our_slice


def _transposed(a: np.ndarray) -> np.ndarray:
    """A contiguous copy of 2-D ``a.T`` (tiled: ``transcode.transpose_into``)."""
    out = np.empty(a.shape[::-1], a.dtype)
    transcode.transpose_into(out, a)
    return out


def stored_scale_path(cfg: ModelConfig, path: Path, shapes: Mapping[Path, tuple]) -> Optional[Path]:
    """The block scales' path when ``cfg`` stores parameter ``path`` in FP8 (``fp8_weights``), else None
    (``shapes``: ``param_shapes(cfg)``; weights docs/architecture.md §6 keeps in high precision have no scales)."""
    if not cfg.fp8_weights:
        return None
    sp = fp8_scale_path(path)
    return sp if sp in shapes else None


def _as_shape(out: np.ndarray, shape: tuple) -> np.ndarray:
    """``out`` viewed with ``shape`` (never a copy: writes must land in ``out``)."""
    try:
        return np.reshape(out, shape, copy=False)  # numpy >= 2.1: raises ValueError where a copy is needed
    except TypeError:  # older numpy has no copy=; setting .shape raises instead (deprecated from 2.5)
        v = out.view()
        v.shape = shape
        return v


def fill_piece(source, piece: Piece, out: np.ndarray, scale_out: Optional[np.ndarray] = None,
               rows: Optional[tuple[int, int]] = None) -> None:
    """Write HF tensor ``piece.hf_name`` of ``source`` (an ``HFSource``) into ``out``, our slice
    ``params[path][index]`` (any float dtype, or e4m3), in one pass: transpose and cast straight into
    place from the source's mmap (``transcode``: tiled transposes, FP8 through per-block tables; the
    values are bit for bit those of dequantising to float32 and casting). With ``scale_out`` (block
    scales ``[ib, ob]``) the weight is stored in FP8: an FP8 source's e4m3 bits and scales are copied,
    transposed into our layout (nothing re-quantised); a float source is quantised like the release
    (docs/architecture.md §6). The written values are checked for NaN/Inf unless the source allows them.

    ``rows``: only rows ``r0:r1`` of a 2-D float (not FP8) HF tensor, so that several threads can fill
    one large tensor (the embedding, the head); the caller then drops its pages (``source.release``)."""
    name = piece.hf_name
    if rows is not None and (scale_out is not None or source.is_fp8(name) or len(source.shape(name)) != 2):
        raise ValueError(f"fill_piece: rows= is for 2-D float tensors, not {name}")
    if scale_out is not None and not source.is_fp8(name):
        w8, s_inv = fp8.quantize(source.get(name, np.float32))
        _as_shape(out, w8.shape[::-1])[...] = w8.T
        scale_out[...] = np.asarray(s_inv, np.float32).T
        return
    w, s_inv = source.view(name)
    check = out  # where NaN/Inf would show: the written values, or the e4m3 bytes they come from
    try:
        if scale_out is not None:  # FP8 kept: the release's bits, transposed
            transcode.transpose_into(_as_shape(out, w.shape[::-1]), w)
            scale_out[...] = s_inv.T
        elif s_inv is not None:
            tables = transcode.dequantize_transposed_into(_as_shape(out, w.shape[::-1]), w, s_inv)
            if transcode.tables_finite(tables):  # only a NaN byte can give NaN: check the 1-byte source
                check = w
        else:
            r0, r1 = rows or (0, w.shape[0])
            if piece.transform == LINEAR:  # our [in, out]: HF rows are our columns
                check = _as_shape(out, w.shape[::-1])[:, r0:r1]
            else:
                check = out if rows is None else _as_shape(out, w.shape)[r0:r1]
            w = w[r0:r1]
            if w.dtype == np.float64 and out.dtype != np.float32:
                w = w.astype(np.float32)  # float64 → float32 → out, the rounding of the float32 path
            if piece.transform == LINEAR:
                transcode.transpose_into(check, w)
            else:
                check[...] = w.reshape(check.shape)
        if not source.allow_nonfinite and transcode.has_nonfinite(check):
            # raised by the plain read, which names the first bad value by its index in the HF tensor
            source.get_fp8(name) if scale_out is not None else source.get(name)
            fp8.check_finite(check, name, source.where(name))  # finite in the source, not after the cast
    finally:
        if rows is None:
            source.release(name)


def to_hf_fp8(q_slice: np.ndarray, s_slice: np.ndarray, in_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``fill_piece``'s FP8 branch: our e4m3 slice and scales → release ``weight`` and
    ``weight_scale_inv`` (bits unchanged)."""
    s = q_slice.shape
    q = q_slice.reshape(int(np.prod(s[:in_ndim])), -1)
    return _transposed(q), np.ascontiguousarray(s_slice.T)


def kernel_in_ndim(path: Path) -> int:
    """How many leading dims of a (de-stacked) kernel are inputs: o_proj is ``[H, Dv, D]``."""
    return 2 if path[-2:] == ("o_proj", "kernel") else 1


def hf_tensors(piece: Piece, value: np.ndarray, scale: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Our slice of ``piece`` (and its block scales when stored in FP8) → the HF ``weight`` (and
    ``weight_scale_inv``, else None)."""
    if scale is not None:
        return to_hf_fp8(value, scale, kernel_in_ndim(piece.path))
    return to_hf(piece, value, kernel_in_ndim(piece.path)), None


def mtp_shared_tensors(cfg: ModelConfig, k: int, embed: np.ndarray, lm_head: np.ndarray
                       ) -> list[tuple[str, np.ndarray]]:
    """The release's copies of the embedding and head in MTP layer ``num_layers + k``."""
    prefix = f"model.layers.{cfg.num_layers + k}."
    return [(prefix + name, np.ascontiguousarray(lm_head.T) if path == ("lm_head",) else embed)
            for name, path in MTP_SHARED.items()]


def load_params(model, flat: Mapping[Path, np.ndarray]) -> None:
    """Write flat ``{path: array}`` (from ``hf_to_params``; the stored layout of ``flat_arrays``) into an
    NNX model in place. Arrays not given keep their values."""
    state = nnx.state(model)
    current = flat_arrays(state)
    unknown = [p for p in flat if p not in current]
    if unknown:
        raise MappingError(f"parameters {unknown[:3]} do not exist in the model (fix: build the model from the same config).")
    for path, value in flat.items():
        if tuple(current[path].shape) != tuple(value.shape):
            raise MappingError(f"{'/'.join(map(str, path))}: model has shape {current[path].shape}, weights {value.shape}.")
        current[path] = jnp.asarray(value, current[path].dtype)
    assign_flat(state, current)
    nnx.update(model, state)


def model_params(model) -> dict[Path, np.ndarray]:
    """Flat ``{path: numpy array}`` of every stored array (params, router bias, FP8 block scales)."""
    return {k: np.asarray(v) for k, v in flat_arrays(nnx.state(model)).items()}


def unfuse_transformers_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers-5 keeps experts fused in memory (``gate_up_proj [E, 2I, D]`` gate first,
    ``down_proj [E, D, I]``); return the hub's per-expert names instead (views, as ``HFSource`` reads them)."""
    out = {}
    for name, w in state.items():
        parts = fused_parts(name, w.shape)
        for hub, e, part in parts:
            out[hub] = fused_slice(w, e, part)
        if not parts:
            out[name] = w
    return out


class MappingError(CheckpointError):
    """HF tensors do not match the config: a tensor is missing, unexpected or has the wrong shape."""


def hf_shape(piece: Piece, piece_shape: tuple) -> tuple:
    """The HF tensor shape of ``piece`` whose slice of our parameter has ``piece_shape``."""
    if piece.transform == LINEAR:
        n_in = kernel_in_ndim(piece.path)
        return (int(np.prod(piece_shape[n_in:])), int(np.prod(piece_shape[:n_in])))
    return tuple(piece_shape)


def check_shape(piece: Piece, shape: tuple, piece_shape: tuple) -> None:
    """Raise ``MappingError`` naming the tensor when its HF ``shape`` disagrees with the config."""
    expect = hf_shape(piece, piece_shape)
    if tuple(shape) != tuple(expect):
        raise MappingError(f"{piece.hf_name} has shape {tuple(shape)}, but the config implies {expect} "
                           f"(for {'/'.join(map(str, piece.path))} {piece_shape}); fix: check that config.json "
                           "belongs to these weights.")


def check_names(cfg: ModelConfig, names: set, include_mtp: bool = True) -> None:
    """Raise ``MappingError`` naming missing and unexpected HF tensors. The MTP layer's copies of
    the embedding and head are allowed; with ``include_mtp=False`` the whole MTP layer is ignored."""
    expected = {p.hf_name for p in pieces(cfg, include_mtp)}
    missing = sorted(expected - names)
    if missing:
        raise MappingError(f"{len(missing)} tensor(s) the config needs are missing, e.g. {missing[:3]} "
                           "(fix: check that config.json belongs to these weights).")
    mtp_prefixes = tuple(f"model.layers.{cfg.num_layers + k}." for k in range(max(cfg.num_mtp_layers, 1) + 8))
    extra = sorted(n for n in names - expected
                   if not (n.startswith(mtp_prefixes) and (not include_mtp or n.split(".", 3)[3] in MTP_SHARED))
                   and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise MappingError(f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]} "
                           "(fix: the weights have layers or modules this config does not describe).")


def check_source(cfg: ModelConfig, source: HFSource, include_mtp: bool, shapes: Mapping[Path, tuple],
                 names: Optional[set] = None) -> list[Piece]:
    """Check names and shapes of every HF tensor against ``cfg`` before anything is read or written;
    returns the pieces (``MappingError`` naming the tensor otherwise)."""
    check_names(cfg, source.names if names is None else set(names), include_mtp)
    plist = pieces(cfg, include_mtp)
    for pc in plist:
        check_shape(pc, source.shape(pc.hf_name), shapes[pc.path][len(pc.index):])
    return plist


def hf_to_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, *, include_mtp: bool = True,
                 names: Optional[set] = None, dtype=np.float32) -> dict[Path, np.ndarray]:
    """Assemble our stacked parameters (flat ``{path: array}``) from an in-memory HF state dict
    (hub or fused transformers-5 names; FP8 tensors with ``weight_scale_inv`` are dequantised), with
    the streaming converter's checks and ``fill_piece``. ``names``: the names to check for missing and
    unexpected tensors (default: all of ``state``). With ``cfg.fp8_weights`` the FP8 linears are stored
    as e4m3 + block scales, as ``convert --keep-fp8`` stores them."""
    source = HFSource.from_tensors(state, cfg)
    shapes = param_shapes(cfg)
    out: dict[Path, np.ndarray] = {}
    for p in check_source(cfg, source, include_mtp, shapes, names):
        sp = stored_scale_path(cfg, p.path, shapes)
        if p.path not in out:
            out[p.path] = np.zeros(shapes[p.path], fp8.E4M3 if sp is not None else dtype)
            if sp is not None:
                out[sp] = np.zeros(shapes[sp], np.float32)
        fill_piece(source, p, out[p.path][p.index], None if sp is None else out[sp][p.index])
    return out


def params_to_hf(params: Mapping[Path, np.ndarray], cfg: ModelConfig, *, include_mtp: bool = True
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every HF tensor, in HF order (FP8-stored weights as the release's
    e4m3 ``weight`` + ``weight_scale_inv``); the MTP layer also gets the release's copies of the
    embedding and head."""
    for p in pieces(cfg, include_mtp):
        sp = stored_scale_path(cfg, p.path, params)
        w, s = hf_tensors(p, np.asarray(params[p.path][p.index]),
                          None if sp is None else np.asarray(params[sp][p.index]))
        yield p.hf_name, w
        if s is not None:
            yield p.hf_name + "_scale_inv", s
    if include_mtp:
        for k in range(cfg.num_mtp_layers):
            yield from mtp_shared_tensors(cfg, k, np.asarray(params[("embed",)]), np.asarray(params[("lm_head",)]))
