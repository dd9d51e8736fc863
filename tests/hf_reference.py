"""Build a random tiny Hugging Face DeepseekV3ForCausalLM and the same weights in our model."""
from __future__ import annotations

import numpy as np

import dsv3_jax as dsv3
from dsv3_jax.checkpoint import mapping


def _classes(model_type: str):
    """transformers' (config class, model class) for ``model_type``: V3, or V2 (softmax gating)."""
    import transformers
    v = {"deepseek_v2": "V2", "deepseek_v3": "V3"}[model_type]
    return getattr(transformers, f"Deepseek{v}Config"), getattr(transformers, f"Deepseek{v}ForCausalLM")


def hf_config(cfg: dsv3.ModelConfig):
    """transformers' config for ``cfg``, of the class its ``to_hf`` names: ``DeepseekV3Config``, or
    ``DeepseekV2Config`` for softmax gating (the V2 family)."""
    hf = cfg.to_hf()
    kw = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "rope_scaling")}
    c = _classes(hf["model_type"])[0](**kw)
    c._attn_implementation = "eager"
    return c


def randomize(model, seed: int, bias_scale: float = 0.05):
    """Random weights with norm scales near 1 and a non-zero correction bias."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(bias_scale * (2 * torch.rand(mod.e_score_correction_bias.shape, generator=g) - 1))
    return model


def hf_model(cfg: dsv3.ModelConfig, seed: int = 0):
    """A random ``DeepseekV3ForCausalLM`` for ``cfg`` (``DeepseekV2ForCausalLM`` for softmax gating)."""
    import torch
    torch.manual_seed(seed)
    c = hf_config(cfg)
    return randomize(_classes(c.model_type)[1](c).eval(), seed)


def hf_state(model) -> dict[str, np.ndarray]:
    """The hub's names (per-expert), as save_pretrained writes them."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return mapping.unfuse_transformers_experts(sd)


def our_model(cfg: dsv3.ModelConfig, state: dict[str, np.ndarray], include_mtp: bool = False,
              runtime: dsv3.RuntimeConfig | None = None):
    from flax import nnx
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime)
    flat = mapping.hf_to_params(state, cfg, include_mtp=include_mtp, names=set(state))
    mapping.load_params(model, flat)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def write_checkpoint(model, directory, dtype: str = "float32"):
    """Our model → HF safetensors + config.json → ``dsv3 convert`` → checkpoint directory."""
    import json
    from pathlib import Path

    from dsv3_jax.checkpoint import convert
    from dsv3_jax.checkpoint.safetensors_io import save_file
    directory = Path(directory)
    hf = directory.parent / (directory.name + "_hf")
    hf.mkdir(parents=True)
    save_file(dict(mapping.params_to_hf(mapping.model_params(model), model.cfg)), hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(model.cfg.to_hf()))
    convert.hf_to_orbax(hf, directory, dtype=dtype, progress=False)
    return directory
