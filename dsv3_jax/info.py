"""Model size figures computed from the model's own abstract parameter tree (``jax.eval_shape``:
nothing is allocated), as ``dsv3 info`` prints them (docs/architecture.md §1)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from flax import nnx

from sharding import DEFAULT_RULES, MeshConfig, Rules

from .config import ModelConfig, to_dict
from .errors import MeshError
from .model import DeepSeekV3
from .model.transformer import CACHE_DTYPE


def abstract_state(cfg: ModelConfig):
    return nnx.state(nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0))))


def _count(flat) -> int:
    return sum(math.prod(v.shape) for _, v in flat)


def model_info(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, Any]:
    """Parameter counts, KV-cache bytes and training FLOPs per token.

    * ``params_total``: main model (embedding and head included, MTP excluded), router bias included
      as in the release's counts.
    * ``params_active``: minus the routed experts a token does not use in each MoE layer.
    * ``train_flops_per_token``: ``6 × (active params − embedding)`` for the matmuls of forward and
      backward, plus causal attention ``3 × 2 × H × (Dqk + Dv) × seq_len / 2`` per layer
      (scores and weighted sum; the mean causal context is seq_len/2). MTP excluded.
    """
    # FP8 storage (``fp8_weights``): a variable's shape is its values' shape (the block scales are
    # storage, not parameters), so counts match the float model
    flat = list(nnx.to_flat_state(abstract_state(cfg)))
    mtp = [(k, v) for k, v in flat if k[0] == DeepSeekV3.MTP]
    main = [(k, v) for k, v in flat if k[0] != DeepSeekV3.MTP]
    total, n_mtp = _count(main), _count(mtp)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unused = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    active = total - unused
    embedding = cfg.vocab_size * cfg.hidden_size
    attn_flops = 3 * 2 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len / 2) * cfg.num_layers
    item = np.dtype(CACHE_DTYPE).itemsize  # the dtype generation's latent cache uses by default
    kv_bytes = cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * item
    per_head_kv = cfg.num_layers * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * item
    return {
        "config": cfg.name,
        "params_total": total,
        "params_mtp": n_mtp,
        "params_active": active,
        "params_embedding": embedding,
        "kv_cache_bytes_per_token": kv_bytes,
        "kv_cache_bytes_per_token_per_head_cache": per_head_kv,
        "train_flops_per_token": int(6 * (active - embedding) + attn_flops),
        "train_flops_seq_len": seq_len,
        "layers": {"dense": cfg.first_k_dense, "moe": cfg.num_moe_layers, "mtp": cfg.num_mtp_layers},
        "model": to_dict(cfg),
    }


def mesh_memory(cfg: ModelConfig, mesh: str | Mapping[str, int], moment_bytes: int = 2,
                rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
    """Per-device bytes of the model's variables (each at its dtype) and of the AdamW moments
    (``moment_bytes`` per element, two per trainable parameter) under ``sharding/rules.py``, for a mesh
    of any size given as ``"expert=64,fsdp=4"`` or ``{"expert": 64, "fsdp": 4}`` (abstract shapes only:
    no devices needed). ``fp8_weights`` models are inference-only: no optimizer state."""
    if isinstance(mesh, str):
        mc = MeshConfig.parse(mesh)
        sizes = {a: getattr(mc, a) for a in ("data", "fsdp", "expert", "tensor")}
    else:
        sizes = {a: int(mesh.get(a, 1)) for a in ("data", "fsdp", "expert", "tensor")}
    if -1 in sizes.values():
        raise MeshError(f"mesh {mesh}: give every axis size explicitly (no device count to fill -1).")
    bad = {a: n for a, n in sizes.items() if n < 1}
    if bad:
        raise MeshError(f"mesh {mesh}: axis sizes must be positive integers, got {bad} (fix: e.g. expert=8).")
    if cfg.num_moe_layers and cfg.n_routed_experts % sizes["expert"]:
        raise MeshError(f"mesh {mesh}: {cfg.n_routed_experts} experts do not divide over expert={sizes['expert']} "
                          f"(fix: choose an expert axis size that divides {cfg.n_routed_experts}).")
    state = abstract_state(cfg)
    trainable = 0 if cfg.fp8_weights else rules.per_device_elements(state, sizes, kind=nnx.Param)
    return {"axes": sizes, "devices": math.prod(sizes.values()),
            "param_bytes_per_device": rules.per_device_bytes(state, sizes),
            "optimizer_bytes_per_device": 2 * moment_bytes * trainable}


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"config                 {info['config']}",
        f"layers                 {info['layers']['dense']} dense + {info['layers']['moe']} MoE (+{info['layers']['mtp']} MTP)",
        f"params (main model)    {info['params_total']:,}  ({_human(info['params_total'])})",
        f"params (MTP module)    {info['params_mtp']:,}  ({_human(info['params_mtp'])})",
        f"params active / token  {info['params_active']:,}  ({_human(info['params_active'])})",
        f"latent KV cache        {info['kv_cache_bytes_per_token']:,} bytes/token ({CACHE_DTYPE}; per-head cache would be "
        f"{info['kv_cache_bytes_per_token_per_head_cache']:,})",
        f"train FLOPs / token    {info['train_flops_per_token']:.4e}  (seq {info['train_flops_seq_len']})",
    ]
    return "\n".join(lines)
