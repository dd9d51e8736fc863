"""One config object: frozen dataclasses loaded from YAML + ``key=value`` overrides.

Values are cast to the field types (YAML reads ``1e-3`` as a string), and validated once, with
messages that name the field, the bad value and the fix (docs/design.md §One config object).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from .errors import ConfigError

__all__ = [
    "ConfigError", "RopeScaling", "ModelConfig", "RuntimeConfig", "load_config", "load_runtime",
    "split_overrides", "model_config_from_stored", "config_dir", "list_configs",
]




@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (docs/architecture.md §3). ``type='none'`` disables it."""

    type: str = "none"  # "yarn" or "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.type == "yarn"


_INT, _NUM, _NONE = (int,), (int, float), (type(None),)
# config.json field -> the JSON types it may have (checked before any cast: "yarn", "7", 7.5 or true are
# refused where an object or an integer belongs, never coerced or silently ignored)
_HF_TYPES = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                     "moe_intermediate_size", "first_k_dense_replace", "num_nextn_predict_layers"), _INT),
    **dict.fromkeys(("q_lora_rank", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group",
                     "topk_group"), _INT + _NONE),
    **dict.fromkeys(("rms_norm_eps", "routed_scaling_factor", "initializer_range"), _NUM),
    "rope_theta": _NUM + _NONE, "scoring_func": (str,), "topk_method": (str,), "norm_topk_prob": (bool,),
    "rope_scaling": (Mapping,) + _NONE, "rope_parameters": (Mapping,) + _NONE,
}
# What a field left out of config.json means: the default of transformers' config class for the model type
# (``DeepseekV3Config`` also for configs without one, e.g. Kimi-K2's), so a sparse config describes the
# model transformers would build from it. V3's class always routes sigmoid + noaux_tc; V2's always softmax.
_HF_DEFAULTS = {
    "deepseek_v3": dict(first_k_dense_replace=3, n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
                        moe_intermediate_size=2048, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, q_lora_rank=1536,
                        intermediate_size=18432, max_position_embeddings=4096),
    "deepseek_v2": dict(first_k_dense_replace=0, n_routed_experts=64, num_experts_per_tok=None, n_shared_experts=2,
                        moe_intermediate_size=1407, n_group=None, topk_group=None, routed_scaling_factor=1.0,
                        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, q_lora_rank=1536,
                        intermediate_size=11008, max_position_embeddings=2048),
}
_HF_ROPE_TYPES = {"type": (str,) + _NONE, "rope_type": (str,) + _NONE, "factor": _NUM,
                  "original_max_position_embeddings": _INT, "beta_fast": _NUM, "beta_slow": _NUM,
                  "mscale": _NUM + _NONE, "mscale_all_dim": _NUM + _NONE, "rope_theta": _NUM + _NONE}


def _check_hf_types(hf: Mapping[str, Any]) -> None:
    """``ConfigError`` naming the first config.json field (``rope_scaling.factor`` for nested ones) whose
    JSON type is wrong; YaRN scaling needs its ``factor``."""
    def check(key, value, types_):
        if isinstance(value, bool) and bool not in types_ or not isinstance(value, types_):
            names = "/".join("an object" if t is Mapping else "null" if t is type(None) else
                             {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false"}[t.__name__]
                             for t in types_)
            raise ConfigError(f"config.json field {key}={value!r}: must be {names}, not {type(value).__name__} "
                              "(fix: correct config.json; it does not match the DeepSeek-V3 config format).")
    for key, types_ in _HF_TYPES.items():
        if key in hf:
            check(key, hf[key], types_)
    for outer in ("rope_scaling", "rope_parameters"):
        rs = hf.get(outer)
        if isinstance(rs, Mapping):
            for key, types_ in _HF_ROPE_TYPES.items():
                if key in rs:
                    check(f"{outer}.{key}", rs[key], types_)
            if rs.get("type", rs.get("rope_type")) == "yarn" and "factor" not in rs:
                raise ConfigError(f"config.json field {outer}: YaRN scaling needs a 'factor' (fix: add it, e.g. 40).")


# config.json flags the DeepSeek-V2/V3 architecture fixes: a value other than these changes the model in a
# way this implementation does not express, so converting would give a different model without saying so
_HF_FIXED = {
    "hidden_act": (("silu", "swish"), "SwiGLU experts and FFNs"),
    "attention_bias": ((False,), "attention projections without biases"),
    "mlp_bias": ((False,), "FFN projections without biases"),
    "tie_word_embeddings": ((False,), "an output head separate from the embedding"),
    "rope_interleave": ((True,), "the release's interleaved rope channels"),
    "moe_layer_freq": ((1,), "every layer after first_k_dense_replace an MoE layer"),
}


def _check_hf_flags(hf: Mapping[str, Any]) -> None:
    sparse = [k for k in ("index_topk", "index_n_heads", "index_head_dim") if k in hf]
    if sparse or hf.get("model_type") == "deepseek_v32":
        raise ConfigError(f"config.json is a DeepSeek-V3.2 config ({', '.join(sparse) or 'model_type deepseek_v32'}): its "
                          "sparse attention (the lightning indexer) is not implemented here, and dropping it would "
                          "give a different model (fix: use a DeepSeek-V3 / V3.1 / R1 or V2 checkpoint).")
    for key, (allowed, what) in _HF_FIXED.items():
        if key in hf and hf[key] is not None and hf[key] not in allowed:
            raise ConfigError(f"config.json field {key}={hf[key]!r}: dsv3-jax implements DeepSeek-V2/V3 as released, "
                              f"with {what} ({key}={allowed[0]!r}); this checkpoint is a different model (fix: use a "
                              "DeepSeek-V2/V3-architecture checkpoint, or correct the field if it was edited by hand).")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V3-family model (docs/architecture.md §1). Defaults are the 671B release."""

    name: str = "deepseek_v3_671b"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN
    num_layers: int = 61
    first_k_dense: int = 3
    num_heads: int = 128
    q_lora_rank: Optional[int] = 1536  # None: no q-LoRA (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling(
        type="yarn", factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    # DeepSeekMoE (docs/architecture.md §4)
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3, biased group top-k) | "group_limited_greedy" (V2) | "greedy"
    norm_topk_prob: bool = True
    # MTP (docs/architecture.md §5)
    num_mtp_layers: int = 1
    # Storage (what a checkpoint holds; execution choices are in RuntimeConfig)
    init_std: float = 0.006
    param_dtype: str = "float32"
    # Store linear weights as the release does (e4m3 + 128×128 block scales, docs/architecture.md §6): half the
    # memory of bf16, for inference (``dsv3 convert hf-to-orbax --keep-fp8``). Not trainable.
    fp8_weights: bool = False

    # ---- derived ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5 * mscale²`` with the YaRN attention temperature (docs/architecture.md §2–§3)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs.enabled and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    def replace(self, **kw) -> "ModelConfig":
        return validate(dataclasses.replace(self, **kw))

    # ---- Hugging Face interop ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], name: str = "hf") -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (release spelling ``rope_scaling`` +
        ``rope_theta`` or transformers-5 ``rope_parameters``)."""
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
        if not isinstance(hf, Mapping):
            raise ConfigError(f"config.json must be a JSON object, got {type(hf).__name__} (fix: point at the "
                              "model's own config.json).")
        _check_hf_types(hf)
        _check_hf_flags(hf)
        missing = [k for k in required if k not in hf]
        if missing:
            raise ConfigError(f"config.json is missing required field(s) {missing}; it does not look "
                              "like a DeepSeek-V2/V3 config (fix: point at the model's own config.json).")
        rope_theta = hf.get("rope_theta")
        rs_src = hf.get("rope_scaling")
        params = hf.get("rope_parameters")
        if isinstance(params, Mapping):
            rope_theta = params.get("rope_theta", rope_theta)
            if rs_src is None and params.get("rope_type", params.get("type", "default")) != "default":
                rs_src = params
        rs = RopeScaling(type="none")
        if isinstance(rs_src, Mapping):
            kind = rs_src.get("type", rs_src.get("rope_type", "none"))
            if kind == "yarn":
                rs = RopeScaling(
                    type="yarn", factor=float(rs_src["factor"]),
                    original_max_position_embeddings=int(rs_src.get("original_max_position_embeddings", 4096)),
                    beta_fast=float(rs_src.get("beta_fast", 32)), beta_slow=float(rs_src.get("beta_slow", 1)),
                    mscale=float(rs_src.get("mscale", 1) or 1), mscale_all_dim=float(rs_src.get("mscale_all_dim", 0) or 0))
            elif kind not in ("default", "none", None):
                raise ConfigError(f"rope scaling type {kind!r} is not supported (fix: use 'yarn' or none).")
        d = _HF_DEFAULTS.get(hf.get("model_type"), _HF_DEFAULTS["deepseek_v3"])

        def get(key):  # the field, or transformers' default for this model type when config.json omits it
            return hf[key] if key in hf else d.get(key)
        n_routed = get("n_routed_experts") or 0
        n_layers = int(hf["num_hidden_layers"])
        kw = dict(
            name=name, vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(get("intermediate_size")), num_layers=n_layers,
            first_k_dense=int(get("first_k_dense_replace") or 0) if n_routed else n_layers,
            num_heads=int(hf["num_attention_heads"]), q_lora_rank=get("q_lora_rank"),
            kv_lora_rank=int(hf["kv_lora_rank"]), qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]), v_head_dim=int(hf["v_head_dim"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(get("max_position_embeddings")),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0), rope_scaling=rs,
            n_routed_experts=int(n_routed) or 1, num_experts_per_tok=int(get("num_experts_per_tok") or 1),
            n_shared_experts=int(get("n_shared_experts") or 0),
            moe_intermediate_size=int(get("moe_intermediate_size")),
            n_group=int(get("n_group") or 1), topk_group=int(get("topk_group") or 1),
            routed_scaling_factor=float(get("routed_scaling_factor")),
            scoring_func=str(get("scoring_func")), topk_method=str(get("topk_method")),
            norm_topk_prob=bool(get("norm_topk_prob")),
            num_mtp_layers=int(hf.get("num_nextn_predict_layers", 0)),
            init_std=float(hf.get("initializer_range", 0.006)),
        )
        return validate(cls(**kw))

    def to_hf(self) -> dict:
        """The Hugging Face config fields (release spelling, plus ``rope_parameters``): ``DeepseekV3Config``'s,
        or ``DeepseekV2Config``'s for softmax gating (the V2 family, which transformers' V3 class would run
        with sigmoid gates)."""
        rs = self.rope_scaling
        v2 = self.scoring_func == "softmax"
        out = {
            "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v2" if v2 else "deepseek_v3",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers, "num_nextn_predict_layers": self.num_mtp_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_heads,
            "n_shared_experts": self.n_shared_experts, "n_routed_experts": self.n_routed_experts,
            "routed_scaling_factor": self.routed_scaling_factor, "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "qk_nope_head_dim": self.qk_nope_head_dim,
            "topk_method": self.topk_method, "n_group": self.n_group, "topk_group": self.topk_group,
            "num_experts_per_tok": self.num_experts_per_tok, "first_k_dense_replace": self.first_k_dense,
            "norm_topk_prob": self.norm_topk_prob, "scoring_func": self.scoring_func,
            "hidden_act": "silu", "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.init_std, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "attention_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": False, "rope_interleave": True, "use_cache": True,
            "bos_token_id": 0, "eos_token_id": 1,
        }
        if rs.enabled:
            scaling = {"type": "yarn", "factor": rs.factor,
                       "original_max_position_embeddings": rs.original_max_position_embeddings,
                       "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow,
                       "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim}
            out["rope_scaling"] = scaling
            out["rope_parameters"] = {**scaling, "rope_type": "yarn", "rope_theta": self.rope_theta}
        else:
            out["rope_scaling"] = None
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return out


RUNTIME_DOC = "execution settings (RuntimeConfig), never stored in checkpoints"


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How a model runs, as opposed to what it is (``ModelConfig``): kernels, dtypes of the
    computation, rematerialisation, FP8 GEMMs and the expert-parallel strategy. Never written into a
    checkpoint, so the same checkpoint can be scored in fp32, trained with ``quant='fp8'`` or served
    expert-parallel without conversion (docs/design.md §Config split)."""

    compute_dtype: Optional[str] = None  # None: the parameters' dtype (a float32 checkpoint computes in float32)
    attention_impl: str = "auto"  # pallas_kernels.mla backend: "auto" | "reference" | "blockwise" | "pallas" | "pallas_gpu" | "pallas_tpu"
    moe_impl: str = "auto"        # "auto" | "ragged" (jax.lax.ragged_dot) | "looped" (CPU) | "blocked" (block-padded GEMM)
    moe_block_size: int = 0       # rows per block of the blocked GEMM; 0: from the expected rows per expert
    # "auto" | "none" | "full" | "save_dots" | "save_dots_except_mla_up"; auto: none on CPU (memory is plentiful
    # there and recomputing costs a third of the step), save_dots_except_mla_up on GPU/TPU (docs/design.md §Remat)
    remat: str = "auto"
    scan_layers: bool = True
    quant: str = "none"           # "none" | "fp8": every Linear's three GEMMs in FP8 (docs/architecture.md §6)
    interpret: bool = False       # run the Pallas kernels in the Pallas interpreter (any platform; tests)
    # expert parallelism, used when the model is built for a mesh (DeepSeekV3(..., mesh=mesh))
    # "auto" (ragged_a2a on a TPU/GPU expert axis >= 16, else allgather: sharding.expert_parallel.resolve_strategy)
    # | "allgather" | "ragged_a2a" | "a2a_capacity"
    ep_strategy: str = "auto"
    capacity_factor: float = 1.25   # a2a_capacity only
    emulate_ragged: Optional[bool] = None  # None: emulate ragged_all_to_all on CPU only

    def resolved(self, cfg: "ModelConfig") -> "RuntimeConfig":
        """Concrete values for ``cfg``: ``compute_dtype=None`` becomes the parameters' dtype."""
        return self if self.compute_dtype else dataclasses.replace(self, compute_dtype=cfg.param_dtype)

    def replace(self, **kw) -> "RuntimeConfig":
        return validate_runtime(dataclasses.replace(self, **kw))


RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(RuntimeConfig))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature ``0.1·mscale·ln(s) + 1`` (docs/architecture.md §3)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
_CHOICES = {
    "scoring_func": ("sigmoid", "softmax"),
    "topk_method": ("noaux_tc", "group_limited_greedy", "greedy"),
    "param_dtype": ("float32", "bfloat16", "float16"),
}
_RUNTIME_CHOICES = {
    "compute_dtype": (None, "float32", "bfloat16", "float16"),
    "moe_impl": ("auto", "ragged", "looped", "blocked"),
    "attention_impl": ("auto", "reference", "blockwise", "pallas", "pallas_gpu", "pallas_tpu"),
    "remat": ("auto", "none", "full", "save_dots", "save_dots_except_mla_up"),
    "quant": ("none", "fp8"),
    "ep_strategy": ("auto", "allgather", "ragged_a2a", "a2a_capacity"),
}


def _fail(field: str, value: Any, why: str, fix: str) -> None:
    raise ConfigError(f"{field}={value!r}: {why} (fix: {fix}).")


def _check_choices(cfg, choices_by_field: Mapping[str, tuple], prefix: str = "") -> None:
    for f, choices in choices_by_field.items():
        v = getattr(cfg, f)
        if v not in choices:
            names = [c for c in choices if c is not None]
            close = difflib.get_close_matches(str(v), names, n=1)
            _fail(prefix + f, v, f"must be one of {names}", f"use {close[0]!r}" if close else f"pick one of {names}")


def validate_runtime(rt: RuntimeConfig) -> RuntimeConfig:
    _check_choices(rt, _RUNTIME_CHOICES)
    if rt.moe_block_size < 0:
        _fail("moe_block_size", rt.moe_block_size, "cannot be negative", "use 0 (automatic) or e.g. 128")
    if not 0 < rt.capacity_factor < math.inf:
        _fail("capacity_factor", rt.capacity_factor, "must be a finite number > 0", "use e.g. 1.25")
    return rt


def validate(cfg: ModelConfig) -> ModelConfig:
    for prefix, obj in (("", cfg), ("rope_scaling.", cfg.rope_scaling)):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                _fail(prefix + f.name, v, "must be a finite number", f"give {prefix + f.name} a finite value")
    if not cfg.rms_norm_eps > 0:
        _fail("rms_norm_eps", cfg.rms_norm_eps, "must be > 0 (it keeps RMSNorm from dividing by zero)", "use 1e-6")
    positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "num_experts_per_tok", "n_group", "topk_group"]
    for f in positive:
        v = getattr(cfg, f)
        if v <= 0:
            _fail(f, v, "must be a positive integer", f"set {f} to a value > 0")
    _check_choices(cfg, _CHOICES)
    if cfg.q_lora_rank is not None and cfg.q_lora_rank <= 0:
        _fail("q_lora_rank", cfg.q_lora_rank, "must be positive or null", "use null to disable q-LoRA")
    if cfg.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", cfg.qk_rope_head_dim, "RoPE rotates pairs of channels, so it must be even",
              f"use {cfg.qk_rope_head_dim + 1}")
    if not 0 <= cfg.first_k_dense <= cfg.num_layers:
        _fail("first_k_dense", cfg.first_k_dense, f"must be between 0 and num_layers={cfg.num_layers}",
              "set it to the number of leading dense FFN layers")
    if cfg.first_k_dense > 0 and cfg.intermediate_size <= 0:
        _fail("intermediate_size", cfg.intermediate_size, "dense layers need a positive FFN width",
              "set intermediate_size > 0 or first_k_dense=0")
    if cfg.num_moe_layers > 0:
        if cfg.moe_intermediate_size <= 0:
            _fail("moe_intermediate_size", cfg.moe_intermediate_size, "MoE layers need a positive expert FFN width",
                  "set moe_intermediate_size > 0")
        if cfg.num_experts_per_tok > cfg.n_routed_experts:
            _fail("num_experts_per_tok", cfg.num_experts_per_tok,
                  f"top-k cannot exceed n_routed_experts={cfg.n_routed_experts}",
                  f"use num_experts_per_tok <= {cfg.n_routed_experts}")
        if cfg.n_routed_experts % cfg.n_group:
            _fail("n_group", cfg.n_group, f"must divide n_routed_experts={cfg.n_routed_experts}",
                  "pick a divisor of n_routed_experts (e.g. 8 for 256 experts)")
        if cfg.topk_group > cfg.n_group:
            _fail("topk_group", cfg.topk_group, f"cannot exceed n_group={cfg.n_group}",
                  f"use topk_group <= {cfg.n_group}")
        per_group = cfg.n_routed_experts // cfg.n_group
        if cfg.topk_method == "noaux_tc" and cfg.n_group > 1 and per_group < 2:
            _fail("n_group", cfg.n_group, "group scores sum each group's top-2 experts, so groups need >= 2 experts",
                  "use fewer groups")
        if cfg.n_group > 1 and cfg.topk_group * per_group < cfg.num_experts_per_tok:
            _fail("topk_group", cfg.topk_group,
                  f"the kept groups hold {cfg.topk_group * per_group} experts, fewer than top-k={cfg.num_experts_per_tok}",
                  "raise topk_group or lower num_experts_per_tok")
    if cfg.num_mtp_layers < 0:
        _fail("num_mtp_layers", cfg.num_mtp_layers, "cannot be negative", "use 0 (no MTP) or 1 (V3)")
    rs = cfg.rope_scaling
    if rs.type not in ("yarn", "none"):
        _fail("rope_scaling.type", rs.type, "must be 'yarn' or 'none'", "use 'yarn' for the V3 context extension")
    if rs.enabled and rs.factor < 1:
        _fail("rope_scaling.factor", rs.factor, "YaRN stretches the context, so the factor must be >= 1", "use e.g. 40")
    if cfg.rope_theta <= 1:
        _fail("rope_theta", cfg.rope_theta, "must be > 1", "use 10000")
    return cfg


# ---------------------------------------------------------------------------------------------
# loading: YAML file + key=value overrides, cast to field types
# ---------------------------------------------------------------------------------------------
def config_dir() -> Path:
    """Directory of the shipped YAML configs: ``$DSV3_CONFIG_DIR`` when set; else the package data
    ``dsv3_jax/configs/`` of an installed wheel (pyproject.toml maps the top-level ``configs/`` there);
    else ``configs/`` at the root of a repository checkout (editable install or ``PYTHONPATH``)."""
    env = os.environ.get("DSV3_CONFIG_DIR")
    if env:
        return Path(env)
    shipped = resources.files("dsv3_jax") / "configs"
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(__file__).resolve().parent.parent / "configs"


def list_configs() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def _resolve_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():   # a path; anything else is a NAME in config_dir()
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (fix: check the path).")
        return p
    cand = config_dir() / f"{name_or_path}.yaml"
    if not cand.exists():
        names = list_configs()
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known configs: {names}"
        raise ConfigError(f"no config named {str(name_or_path)!r} in {config_dir()} ({hint}); "
                          "pass a NAME from configs/ or a path to a .yaml file.")
    return cand


def read_config_text(path: Path) -> str:
    """A config file's text; ``ConfigError`` (naming the file) when it is not readable UTF-8 text."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a YAML config: not UTF-8 text ({e.reason} at byte {e.start}) (fix: pass "
                          "a config NAME or a .yaml file).") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e} (fix: check the path and its "
                          "permissions).") from None


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _cast(value: Any, typ: Any, field: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _cast(value, args[0], field)
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}: expected a mapping of {typ.__name__} fields, got {value!r}.")
        return _build(typ, value, prefix=f"{field}.")
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}={value!r}: expected {getattr(typ, '__name__', typ)} "
                          f"(fix: give a {getattr(typ, '__name__', typ)} value).") from None
    return value


def _build(cls, data: Mapping[str, Any], prefix: str = ""):
    types_ = _field_types(cls)
    kw = {}
    for key, value in data.items():
        if cls is ModelConfig and key in RUNTIME_FIELDS:
            raise ConfigError(f"{prefix}{key} is one of the {RUNTIME_DOC}, not part of the model architecture "
                              f"(fix: pass it as runtime.{key}=..., or RuntimeConfig({key}=...) in Python).")
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f"fix: did you mean {prefix}{close[0]}?" if close else f"fix: use one of {sorted(types_)}"
            raise ConfigError(f"unknown config key {prefix + str(key)!r} ({hint}).")
        kw[key] = _cast(value, types_[key], prefix + key)
    return cls(**kw)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (fix: write e.g. n_routed_experts=32).")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def load_config(name_or_path: str | os.PathLike | Mapping | ModelConfig = "tiny",
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> ModelConfig:
    """Load a ``ModelConfig`` from a name in ``configs/``, a YAML path, a dict or a config,
    apply ``key=value`` overrides (dotted keys reach nested fields: ``rope_scaling.factor=8``;
    a leading ``model.`` is accepted), cast to field types, and validate."""
    if isinstance(name_or_path, ModelConfig):
        data: dict = _to_dict(name_or_path)
    elif isinstance(name_or_path, Mapping):
        data = dict(name_or_path)
    else:
        path = _resolve_path(name_or_path)
        try:
            loaded = yaml.safe_load(read_config_text(path))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping of config fields, got {type(loaded).__name__}.")
        data = dict(loaded.get("model", loaded))
        data.setdefault("name", path.stem)
    items = overrides.items() if isinstance(overrides, Mapping) else (_parse_override(o) for o in overrides)
    for key, value in items:
        keys = key.split(".") if isinstance(key, str) else list(key)
        if keys and keys[0] == "model":
            keys = keys[1:]
        node = data
        for k in keys[:-1]:
            sub = node.get(k)
            if dataclasses.is_dataclass(sub):
                sub = _to_dict(sub)
            node[k] = dict(sub) if isinstance(sub, Mapping) else {}
            node = node[k]
        node[keys[-1]] = value
    return validate(_build(ModelConfig, data))


def _to_dict(cfg) -> dict:
    return {f.name: (_to_dict(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name))
                     else getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def to_dict(cfg: ModelConfig) -> dict:
    """Plain nested dict (YAML/JSON-safe) — what checkpoints store."""
    return _to_dict(cfg)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key=value`` overrides → (model overrides, runtime overrides). A key goes to the runtime when
    it is spelled ``runtime.FIELD`` or names a ``RuntimeConfig`` field (``compute_dtype=float32``)."""
    model, runtime = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        head = key.split(".")[0]
        (runtime if head == "runtime" or key in RUNTIME_FIELDS else model).append(item)
    return model, runtime


def load_runtime(overrides: Sequence[str] | Mapping[str, Any] = (),
                 base: Optional[RuntimeConfig | Mapping[str, Any]] = None) -> RuntimeConfig:
    """A ``RuntimeConfig`` from ``base`` (a config or a mapping, e.g. a run config's ``runtime:``
    section) and ``key=value`` overrides (``quant=fp8`` or ``runtime.quant=fp8``), cast and validated."""
    if isinstance(base, RuntimeConfig):
        data: dict = _to_dict(base)
    elif base is None:
        data = {}
    elif isinstance(base, Mapping):
        data = dict(base)
    else:
        raise ConfigError(f"runtime: expected a mapping of RuntimeConfig fields, got {base!r}.")
    items = overrides.items() if isinstance(overrides, Mapping) else (_parse_override(o) for o in overrides)
    for key, value in items:
        keys = key.split(".") if isinstance(key, str) else list(key)
        if keys and keys[0] == "runtime":
            keys = keys[1:]
        if len(keys) != 1:
            raise ConfigError(f"runtime override {'.'.join(keys)!r}: runtime fields are not nested "
                              "(fix: write runtime.FIELD=VALUE, e.g. runtime.quant=fp8).")
        data[keys[0]] = value
    return validate_runtime(_build(RuntimeConfig, data, prefix="runtime."))


def model_config_from_stored(data: Mapping[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint stored. Checkpoints written before the config split also hold
    execution settings (``compute_dtype``, ``remat``, ...); they are dropped — the runtime is chosen
    when the checkpoint is loaded, never by the file."""
    return load_config({k: v for k, v in data.items() if k not in RUNTIME_FIELDS})
