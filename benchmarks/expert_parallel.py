"""Expert-parallel strategies on 8 fake CPU devices: bytes moved per MoE layer and token, against the
minimum the actual routing needs, and forward step time (issue M3).

* ``hlo_bytes``: result bytes of every collective in the compiled per-device program (all-gather,
  reduce-scatter, all-to-all, all-reduce; router statistics included), per token and MoE layer.
* ``program_bytes``: the same for the lowered program (the dtypes it asks to move; XLA:CPU's compile
  widens bf16 collectives to f32, a TPU/GPU does not).
* ``min_bytes``: what the routing that happened needs at the precision used: each token's hidden
  vector sent once to every *other* shard holding one of its experts (compute dtype, or e4m3 + 1×128
  f32 scales under ``quant=fp8``), and the partial result sent back (compute dtype).
On CPU the ragged strategy runs over a padded all-to-all emulation, so its HLO bytes are padded;
on GPU/TPU ``ragged_all_to_all`` moves the real counts (≈ min_bytes plus routing metadata).
* ``model_bytes``: bytes per token and layer crossing between shards under each strategy, from the
  routing (``sharding.ep_bytes.exchange_bytes_per_token``; own chunk excluded, so below hlo_bytes).
Also: how many shards a token reaches with group-limited routing (n_group = 8 = one group per
shard, topk_group = 2) vs unrestricted top-k. Precisions (group-limited routing): ``fp32``, ``bf16``
(compute and exchange in bf16) and ``fp8`` (bf16 compute, ``quant=fp8``: FP8 dispatch).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import emit, time_interleaved  # noqa: E402

import dsv3_jax as dsv3  # noqa: E402
import sharding  # noqa: E402
from sharding import ep_bytes, expert_parallel  # noqa: E402

N_DEV = 8
BATCH, SEQ = 16, 128
BASE = ["num_layers=2", "first_k_dense=1", "num_mtp_layers=0", "hidden_size=128", "n_routed_experts=32",
        "num_experts_per_tok=8", "moe_intermediate_size=64"]


# exchange precision: compute dtype, quant (docs/architecture.md §6: rows go out as e4m3 + 1×128 scales
# under quant=fp8, partial sums come home in the compute dtype)
PRECISIONS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "fp8": ("bfloat16", "fp8")}


def runtime(precision: str = "fp32", **kw) -> dsv3.RuntimeConfig:
    cdt, quant = PRECISIONS[precision]
    return dsv3.RuntimeConfig(compute_dtype=cdt, quant=quant, moe_block_size=64, **kw)


def main() -> None:
    for label, groups, precisions in (("group_limited", ["n_group=8", "topk_group=2"], ("fp32", "bf16", "fp8")),
                                      ("no_group_limit", ["n_group=1", "topk_group=1"], ("fp32",))):
        cfg = dsv3.load_config("tiny", BASE + groups)
        tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (BATCH, SEQ)))
        ref_model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime())
        # routing that actually happened in the MoE layer (bias 0, random init): [B, S, K] -> [T, K]
        experts = np.asarray(ref_model(tokens, mtp=False).router.experts[0]).reshape(-1, cfg.num_experts_per_tok)
        reached = ep_bytes.shards_per_token(experts, cfg.n_routed_experts, N_DEV)
        for precision in precisions:
            cdt, quant = PRECISIONS[precision]
            # token t lives on shard t // (T/N) (the default source_shard)
            model_bytes = ep_bytes.exchange_bytes_per_token(
                experts, n_experts=cfg.n_routed_experts, n_shards=N_DEV, hidden=cfg.hidden_size,
                dtype_bytes=np.dtype(cdt).itemsize, capacity_factor=1.25, fp8_dispatch=quant == "fp8")
            min_bytes_per_token = model_bytes["minimum"]
            fns, rows = {}, {}
            for strategy in expert_parallel.STRATEGIES:
                mesh = sharding.make_mesh(f"expert={N_DEV}")
                model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), mesh=mesh,
                                        runtime=runtime(precision, ep_strategy=strategy, capacity_factor=1.25))
                forward, state = dsv3.make_forward(model, mtp=False)
                state = sharding.DEFAULT_RULES.place(state, mesh)
                tok = jax.device_put(tokens, sharding.DEFAULT_RULES.batch_sharding(mesh))
                graphdef = nnx.graphdef(model)
                lowered = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, mtp=False)).lower(state, tok)
                hlo_bytes = ep_bytes.collective_bytes(lowered.compile().as_text())
                program_bytes = ep_bytes.lowered_collective_bytes(lowered.as_text())
                out = forward(state, tok)
                dropped = float(out.router.dropped.sum()) / (BATCH * SEQ * cfg.num_experts_per_tok)
                fns[strategy] = (lambda f=forward, s=state, t=tok: f(s, t).logits)
                tokens_per_device = BATCH * SEQ // N_DEV
                per = tokens_per_device * cfg.num_moe_layers
                rows[strategy] = {"hlo_bytes_per_token_layer": hlo_bytes / per,
                                  "program_bytes_per_token_layer": program_bytes / per,
                                  "model_bytes_per_token_layer": model_bytes[strategy], "dropped_fraction": dropped}
            times = time_interleaved(fns, warmup=1, repeats=5, sync={k: jax.block_until_ready for k in fns})
            for strategy, r in rows.items():
                emit({"bench": "expert_parallel", "routing": label, "precision": precision, "strategy": strategy,
                      "dispatch_dtype": "e4m3+1x128 f32 scales" if quant == "fp8" else cdt, "combine_dtype": cdt,
                      "devices": N_DEV, "hidden": cfg.hidden_size, "experts": cfg.n_routed_experts,
                      "top_k": cfg.num_experts_per_tok,
                      "mean_shards_per_token": float(reached.mean()), "max_shards_per_token": int(reached.max()),
                      "min_bytes_per_token_layer": min_bytes_per_token, **r,
                      "ragged_real_counts_bytes_per_token_layer": model_bytes["ragged_a2a"],
                      "ratio_to_min": r["hlo_bytes_per_token_layer"] / min_bytes_per_token,
                      "program_ratio_to_min": r["program_bytes_per_token_layer"] / min_bytes_per_token,
                      "model_ratio_to_min": r["model_bytes_per_token_layer"] / min_bytes_per_token,
                      "forward_ms": times[strategy]["median_s"] * 1e3,
                      "note": "CPU: ragged_a2a runs a padded all_to_all emulation (GPU/TPU move real counts); "
                              "program_bytes: the lowered program's collectives (XLA:CPU widens bf16 ones to f32 "
                              "in hlo_bytes)"})


if __name__ == "__main__":
    main()
