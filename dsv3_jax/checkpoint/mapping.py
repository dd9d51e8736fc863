"""Weight names: Hugging Face / PyTorch state dict ⇄ this model's stacked parameter tree.

One table drives both directions. Each HF tensor is one *piece* of one of our parameters: our
parameters stack layers (and experts) on leading axes, so a piece is addressed by ``(path, index)``
where ``index`` selects the layer (and expert) slice. M2's streaming converter writes pieces as they
are read; ``hf_to_params``/``params_to_hf`` below do it all in memory for small models.

Layout conversions: PyTorch linears are ``[out, in]``; ours are ``[*in, *out]`` with heads kept as
an axis (``q_b_proj: [Q, H, Dqk]``, ``kv_b_proj: [L, H, Dn+Dv]``, ``o_proj: [H, Dv, D]``), so a
linear piece is ``w.T.reshape(our_shape)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import numpy as np

from ..config import ModelConfig
from ..errors import CheckpointError
from . import fp8

Path = tuple  # e.g. ("moe_layers", "attn", "q_b_proj", "kernel")

LINEAR, COPY = "linear", "copy"

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
# MTP-only tensors of layer ``num_layers + k`` (SPEC §5).
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
        stack, layer = (("moe_layers",), i - cfg.first_k_dense) if moe else (("dense_layers",), i)
        out.extend(_block_pieces(cfg, f"model.layers.{i}.", stack, layer, moe))
    if include_mtp:
        for k in range(cfg.num_mtp_layers):
            prefix = f"model.layers.{cfg.num_layers + k}."
            out.extend(Piece(prefix + n, ("mtp", k) + p, (), t) for n, p, t in _MTP)
            out.extend(_block_pieces(cfg, prefix, ("mtp", k, "block"), 0, cfg.num_moe_layers > 0))
    return out


def param_shapes(cfg: ModelConfig) -> dict[Path, tuple]:
    """Our parameter shapes by path, from the model's abstract state (nothing allocated)."""
    from flax import nnx
    from ..model import DeepSeekV3
    abstract = nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract))
    return {tuple(k): tuple(v.shape) for k, v in flat}


def to_ours(piece: Piece, hf_array: np.ndarray, piece_shape: tuple) -> np.ndarray:
    """HF tensor → our slice ``params[path][index]`` of shape ``piece_shape``."""
    if piece.transform == LINEAR:
        return np.ascontiguousarray(hf_array.T).reshape(piece_shape)
    return hf_array.reshape(piece_shape)


def to_hf(piece: Piece, our_slice: np.ndarray, in_ndim: int) -> np.ndarray:
    """Our slice → HF tensor. ``in_ndim`` = number of leading input dims of our kernel slice."""
    if piece.transform == LINEAR:
        s = our_slice.shape
        return np.ascontiguousarray(our_slice.reshape(int(np.prod(s[:in_ndim])), -1).T)
    return our_slice


def fp8_scale_path(path: Path) -> Path:
    """Where the block scales of an FP8-stored weight live (``fp8_weights``): ``.../kernel_scale``
    beside a Linear's ``kernel``, ``experts/<proj>_scale`` beside a routed expert weight."""
    return path[:-1] + ((f"{path[-1]}_scale",) if len(path) > 1 and path[-2] == "experts" else ("kernel_scale",))


def stored_scale_path(cfg: ModelConfig, path: Path, shapes: Mapping[Path, tuple]) -> Optional[Path]:
    """The block scales' path when ``cfg`` stores parameter ``path`` in FP8 (``fp8_weights``), else None
    (``shapes``: ``param_shapes(cfg)``; weights SPEC §6 keeps in high precision have no scales)."""
    if not cfg.fp8_weights:
        return None
    sp = fp8_scale_path(path)
    return sp if sp in shapes else None


def to_ours_fp8(w8: np.ndarray, scale_inv: np.ndarray, piece_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Release FP8 ``weight [out, in]`` + ``weight_scale_inv [ob, ib]`` → our e4m3 slice (``[in, out]``
    reshaped like the kernel) and scales ``[ib, ob]``: a transpose, nothing re-quantised."""
    return np.ascontiguousarray(w8.T).reshape(piece_shape), np.ascontiguousarray(np.asarray(scale_inv, np.float32).T)


def to_hf_fp8(q_slice: np.ndarray, s_slice: np.ndarray, in_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``to_ours_fp8``: our e4m3 slice and scales → release ``weight`` and ``weight_scale_inv``."""
    s = q_slice.shape
    q = q_slice.reshape(int(np.prod(s[:in_ndim])), -1)
    return np.ascontiguousarray(q.T), np.ascontiguousarray(s_slice.T)


def kernel_in_ndim(path: Path) -> int:
    """How many leading dims of a (de-stacked) kernel are inputs: o_proj is ``[H, Dv, D]``."""
    return 2 if path[-2:] == ("o_proj", "kernel") else 1


def load_params(model, flat: Mapping[Path, np.ndarray]) -> None:
    """Write flat ``{path: array}`` (from ``hf_to_params``) into an NNX model in place."""
    import jax.numpy as jnp
    from flax import nnx
    state = nnx.state(model)
    flat_state = dict(nnx.to_flat_state(state))
    unknown = [p for p in flat if p not in flat_state]
    if unknown:
        raise MappingError(f"parameters {unknown[:3]} do not exist in the model (fix: build the model from the same config).")
    for path, value in flat.items():
        var = flat_state[path]
        if tuple(var.shape) != tuple(value.shape):
            raise MappingError(f"{'/'.join(map(str, path))}: model has shape {var.shape}, weights {value.shape}.")
        var.set_value(jnp.asarray(value, var.dtype))
    nnx.update(model, nnx.from_flat_state(flat_state))


def model_params(model) -> dict[Path, np.ndarray]:
    """Flat ``{path: numpy array}`` of every variable (params and router bias) of an NNX model."""
    from flax import nnx
    return {tuple(k): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def unfuse_transformers_experts(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers-5 keeps experts fused in memory (``gate_up_proj [E, 2I, D]`` gate first,
    ``down_proj [E, D, I]``); return the hub's per-expert names instead."""
    out = {}
    for name, w in state.items():
        m = _FUSED.match(name)
        if not m:
            out[name] = w
            continue
        base, kind = m.groups()
        for e in range(w.shape[0]):
            if kind == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = w[e]
            else:
                gate, up = np.split(w[e], 2, axis=0)
                out[f"{base}.{e}.gate_proj.weight"] = gate
                out[f"{base}.{e}.up_proj.weight"] = up
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


def hf_to_params(get: Callable[[str], np.ndarray] | Mapping[str, np.ndarray], cfg: ModelConfig, *,
                 include_mtp: bool = True, names: Optional[set] = None,
                 dtype=np.float32) -> dict[Path, np.ndarray]:
    """Assemble our stacked parameters (flat ``{path: array}``) from HF tensors (in memory).

    ``get`` is a mapping or a function name → array. With ``names`` (all available names), missing
    and unexpected tensors are reported by name.
    """
    if isinstance(get, Mapping):
        names = set(get) if names is None else names
        get = get.__getitem__
    shapes = param_shapes(cfg)
    plist = pieces(cfg, include_mtp)
    if names is not None:
        check_names(cfg, names, include_mtp)
    out: dict[Path, np.ndarray] = {}
    for p in plist:
        full = shapes[p.path]
        scale_path = stored_scale_path(cfg, p.path, shapes)
        fp8_stored = scale_path is not None
        if p.path not in out:
            out[p.path] = np.zeros(full, fp8.E4M3 if fp8_stored else dtype)
            if fp8_stored:
                out[scale_path] = np.zeros(shapes[scale_path], np.float32)
        piece_shape = full[len(p.index):]
        w = np.asarray(get(p.hf_name))
        check_shape(p, tuple(w.shape), piece_shape)
        if fp8_stored:  # FP8 storage: quantised like the release (exact for release-quantised weights)
            out[p.path][p.index], out[scale_path][p.index] = to_ours_fp8(*fp8.quantize(w), piece_shape)
        else:
            out[p.path][p.index] = to_ours(p, w.astype(dtype), piece_shape)
    return out


def params_to_hf(params: Mapping[Path, np.ndarray], cfg: ModelConfig, *, include_mtp: bool = True
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every HF tensor, in HF order; the MTP layer also gets the
    release's copies of the embedding and head."""
    for p in pieces(cfg, include_mtp):
        yield p.hf_name, to_hf(p, np.asarray(params[p.path][p.index]), kernel_in_ndim(p.path))
    if include_mtp:
        for k in range(cfg.num_mtp_layers):
            for name, path in MTP_SHARED.items():
                w = np.asarray(params[path])
                yield f"model.layers.{cfg.num_layers + k}.{name}", (w.T.copy() if path == ("lm_head",) else w)
