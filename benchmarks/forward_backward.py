"""Training-step throughput: forward + backward tokens/s, ours (jitted JAX) vs transformers (PyTorch eager).

Both sides hold the same weights (transformers' random init copied into our model through the HF
mapping), see the same batch, compute in fp32, and differentiate the same loss: mean cross-entropy
of the logits against the next token. MTP is off (transformers has none). Our step is one
``jax.jit``-ed pure function of ``(params, rest, tokens)`` built with ``nnx.split`` (docs/design.md
§Functional at the boundary); the gradient covers every ``nnx.Param``. Both sides run on the same
threads: PyTorch on all cores (``common.set_threads``), as XLA:CPU. The candidates are timed
round-robin after a warm-up (``common.side_by_side``) and other processes' CPU use is measured before
and during the run: ``"quiet": false`` marks a run on a busy machine (not quoted). MFU is against this
CPU's FMA peak (``common.fma_peak``), with the jnp-matmul figure beside it.

Prints one JSON line per config:
  {"bench": "forward_backward", "config", "params", "batch", "seq", "tokens_per_s_ours",
   "tokens_per_s_transformers", "ratio", ...}
``ratio`` = ours / transformers (> 1: we are faster). Extra keys report our other variants
(``remat='save_dots_except_mla_up'``, the GPU/TPU policy), PyTorch on one thread (information only: the ratio is at equal threads), and the
loss both sides computed (a check that the comparison is like for like).

Usage: .venv/bin/python benchmarks/forward_backward.py [--configs tiny,100m] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# common also puts the repository root on sys.path (dsv3_jax, tests.hf_reference)
from common import (emit, fma_peak, log, loss_and_grad_step, num_cores, set_threads,  # noqa: E402
                    side_by_side)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dsv3_jax as dsv3  # noqa: E402

# A ~100M-parameter DeepSeek-V3 (params_total 100.1M as `dsv3 info` counts them): every V3 feature
# (q-LoRA MLA, YaRN, 1 dense + 7 MoE layers, sigmoid group-limited routing, shared expert).
CONFIG_100M = dict(
    name="bench_100m", vocab_size=32000, hidden_size=512, intermediate_size=1536,
    num_layers=8, first_k_dense=1, num_heads=8, q_lora_rank=256, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=320,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=4096,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    num_mtp_layers=0, init_std=0.02,
)

# (config, batch, seq, timed steps per side, torch thread counts, MoE block rows): a step takes ~0.1 s (tiny) and a
# few seconds (100m) on 2 cores; the whole script stays within a few minutes. PyTorch runs with all
# cores (None, the thread count XLA uses: the ratio) and, for the tiny model, also single-threaded
# (reported beside it: its many small ops can be faster without OpenMP). MoE block rows are fixed (16: what the
# tiny config ran with, 128: the old default) rather than chosen automatically, so figures stay comparable.
# They apply to moe_impl=blocked only: the CPU default, looped, sizes its rounds from the batch.
CASES = {
    "tiny": ("tiny", 8, 128, 7, (None, 1), 16),
    "100m": (CONFIG_100M, 4, 256, 3, (None,), 128),
}


def build_config(spec, overrides=()) -> dsv3.ModelConfig:
    return dsv3.load_config(spec, overrides=["num_mtp_layers=0", *overrides])  # HF has no MTP


def build_runtime(moe_block_size: int, **kw) -> dsv3.RuntimeConfig:
    """fp32 compute on both sides; ``kw``: other RuntimeConfig fields (moe_impl, remat)."""
    return dsv3.RuntimeConfig(compute_dtype="float32", moe_block_size=moe_block_size, **kw)


# ---------------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------------
def our_model(cfg, state, runtime: dsv3.RuntimeConfig):
    """Our model holding the HF ``state``'s weights. Built abstractly (``nnx.eval_shape``) and then
    filled: eager random initialisation would only be overwritten, and costs more than the compile."""
    from flax import nnx

    from dsv3_jax.checkpoint import mapping
    model = nnx.eval_shape(lambda: dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime))
    mapping.load_params(model, mapping.hf_to_params(state, cfg, include_mtp=False, names=set(state)))
    missing = [k for k, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        raise RuntimeError(f"no weights for {missing[:3]}: the HF state does not cover the model")
    return model


def prepare_ours(cfg, state, tokens, runtime: dsv3.RuntimeConfig):
    """Our model with ``state``'s weights; returns (loss, step) with ``step()`` one compiled call."""
    model = our_model(cfg, state, runtime)
    params, rest, step = loss_and_grad_step(model)
    toks = jnp.asarray(tokens, jnp.int32)
    compiled = jax.jit(step).lower(params, rest, toks).compile()
    loss, _ = compiled(params, rest, toks)
    return float(loss), lambda: compiled(params, rest, toks)


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def hf_model(cfg, seed=0):
    """transformers' DeepseekV3ForCausalLM with its own random init (std = init_std, the way training
    starts), eager attention."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    from tests.hf_reference import hf_config
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).float().train()
    with torch.no_grad():  # a non-zero routing bias, so the bias path is exercised on both sides
        g = torch.Generator().manual_seed(seed)
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                b = mod.e_score_correction_bias
                b.copy_(0.05 * (2 * torch.rand(b.shape, generator=g) - 1))
    return model


def prepare_hf(model, tokens, threads):
    """Returns (loss, step) with ``step()`` one zero-grad + forward + backward of the HF model on
    ``threads`` intra-op threads."""
    import torch
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)

    def step():
        torch.set_num_threads(threads)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss

    return float(step().detach()), step


# ---------------------------------------------------------------------------------------------
def run_case(name, spec, batch, seq, repeats, variants, moe_impl, hf_threads, block):
    from dsv3_jax.info import model_info
    from dsv3_jax.model.grouped_gemm import resolve_impl
    from tests.hf_reference import hf_state

    cfg = build_config(spec)
    info = model_info(cfg, seq)
    n_params = info["params_total"]
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    ntok = batch * seq

    log(f"[{name}] building transformers model and compiling ours ({', '.join(variants)}) ...")
    ref = hf_model(cfg)
    state = hf_state(ref)
    fns, sync, losses = {}, {}, {}
    hf_threads = [num_cores() if n is None else n for n in hf_threads]
    for n in dict.fromkeys(hf_threads):
        losses[f"hf{n}"], fns[f"hf{n}"] = prepare_hf(ref, tokens, n)
    for remat in variants:
        rt = build_runtime(block, moe_impl=moe_impl, remat=remat)
        losses[remat], fns[remat] = prepare_ours(cfg, state, tokens, rt)
        sync[remat] = jax.block_until_ready
    log(f"[{name}] timing {repeats} interleaved steps each ...")
    t, load = side_by_side(fns, warmup=1, repeats=repeats, sync=sync)

    main_v = variants[0]
    same = f"hf{num_cores()}"  # PyTorch on the threads XLA uses
    t["hf"], losses["hf"] = t[same], losses[same]
    fma = fma_peak()
    from dsv3_jax.train.trainer import measure_matmul_peak
    matmul_peak = measure_matmul_peak(jnp.float32)  # the trainer's progress-bar figure, beside the FMA peak
    achieved = ntok / t[main_v]["median_s"] * info["train_flops_per_token"]  # forward + backward: 3× forward
    rec = {
        "bench": "forward_backward", "config": cfg.name, "params": n_params, "batch": batch, "seq": seq,
        "tokens_per_s_ours": ntok / t[main_v]["median_s"],
        "tokens_per_s_transformers": ntok / t["hf"]["median_s"],
        "ratio": t["hf"]["median_s"] / t[main_v]["median_s"],
        "remat": main_v, "moe_impl": resolve_impl(moe_impl), "dtype": "float32",
        "step_s_ours": t[main_v]["median_s"], "step_s_transformers": t["hf"]["median_s"],
        "loss_ours": losses[main_v], "loss_transformers": losses["hf"],
        "achieved_flops_ours": achieved, **fma, "mfu_ours": achieved / fma["fma_peak_flops"],
        "matmul_peak_flops": matmul_peak, "mfu_ours_vs_matmul": achieved / matmul_peak,
    }
    for v in variants[1:]:
        rec[f"tokens_per_s_ours_remat_{v}"] = ntok / t[v]["median_s"]
        rec[f"ratio_remat_{v}"] = t["hf"]["median_s"] / t[v]["median_s"]
    rec["threads_ours"] = rec["threads_transformers"] = num_cores()
    for n in dict.fromkeys(hf_threads):
        rec[f"tokens_per_s_transformers_{n}_threads"] = ntok / t[f"hf{n}"]["median_s"]
    rec.update({"repeats": repeats, **load})
    emit(rec)


def main(argv=None):
    set_threads()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,100m", help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed steps per side, interleaved (median reported); default per config")
    ap.add_argument("--remat", default="auto,save_dots_except_mla_up",
                    help="comma list of our remat variants; the first is the headline figure (the config default: "
                         "auto, none on CPU)")
    ap.add_argument("--moe-impl", default="auto", help="auto (looped on CPU) | looped | blocked | ragged")
    args = ap.parse_args(argv)
    variants = args.remat.split(",")
    for name in args.configs.split(","):
        spec, batch, seq, repeats, hf_threads, block = CASES[name]
        run_case(name, spec, batch, seq, args.repeats or repeats, variants, args.moe_impl, hf_threads, block)


if __name__ == "__main__":
    main()
