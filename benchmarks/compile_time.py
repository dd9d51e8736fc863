"""Compile time vs depth: ``jax.jit(step).lower(...).compile()`` of the forward + backward for a narrow
model with 61 layers (3 dense + 58 MoE, the V3 layout) vs 4 layers (1 dense + 3 MoE), same widths.

Layers are stacked and scanned (docs/design.md §Scan the stack), so the program — and its compile time —
should not grow with depth: the ratio should be near 1. The baseline is the same measurement at
4 layers, taken in the same run. Parameters are abstract (``nnx.eval_shape``): nothing is allocated.

Prints one JSON line:
  {"bench": "compile_time", "layers_61_s", "layers_4_s", "ratio", ...}
``ratio`` = layers_61_s / layers_4_s; ``hlo_ops_*`` count the optimised program's instructions. With ``--unrolled`` it also times ``scan_layers=False`` at both
depths (slow: the unrolled 61-layer program takes minutes to compile).

Usage: .venv/bin/python benchmarks/compile_time.py [--repeats 3] [--unrolled]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, load_average, log, loss_and_grad_step, timed  # noqa: E402  (repo root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import dsv3_jax as dsv3  # noqa: E402

# Narrow widths (the tiny config with 8 experts), MTP off; only the depth changes.
NARROW = ["n_routed_experts=8", "num_experts_per_tok=2", "n_group=4", "topk_group=2", "num_mtp_layers=0"]
DEPTHS = {61: 3, 4: 1}  # num_layers: first_k_dense
BATCH, SEQ = 2, 64


def config(num_layers: int, first_k_dense: int) -> dsv3.ModelConfig:
    return dsv3.load_config("tiny", overrides=[*NARROW, f"num_layers={num_layers}", f"first_k_dense={first_k_dense}"])


def runtime(scan: bool = True) -> dsv3.RuntimeConfig:
    """fp32 compute (the tiny config's parameter dtype), 16-row MoE blocks, the default remat;
    ``scan=False`` unrolls the layer stacks."""
    return dsv3.RuntimeConfig(moe_block_size=16, scan_layers=scan)


def compile_seconds(cfg: dsv3.ModelConfig, rt: dsv3.RuntimeConfig) -> tuple[float, float, int]:
    """(trace + lower seconds, XLA compile seconds, instructions in the optimised HLO) of a fresh
    ``jax.jit`` of the training step."""
    model = nnx.eval_shape(lambda: dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=rt))
    params, rest, step = loss_and_grad_step(model)
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    lowered, t_lower = timed(lambda: jax.jit(step).lower(params, rest, tokens))
    compiled, t_compile = timed(lowered.compile)
    hlo_ops = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
    return t_lower, t_compile, hlo_ops


def summarize(runs: list[tuple[float, float, int]]) -> dict[str, float]:
    return {"total": statistics.median(a + b for a, b, _ in runs),
            "lower": statistics.median(a for a, _, _ in runs),
            "compile": statistics.median(b for _, b, _ in runs),
            "hlo_ops": runs[-1][2]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="compiles per depth (median reported)")
    ap.add_argument("--unrolled", action="store_true", help="also time scan_layers=False (minutes)")
    args = ap.parse_args(argv)

    # First-use costs (backend start-up, imports reached by tracing) are paid here, by neither depth.
    jax.jit(lambda x: x + 1).lower(jnp.zeros(2)).compile()
    nnx.eval_shape(lambda: dsv3.DeepSeekV3(config(4, 1), rngs=nnx.Rngs(0), runtime=runtime()))
    runs = {n: [] for n in DEPTHS}
    for _ in range(args.repeats):  # depths alternate, so load from other processes falls on both alike
        for n, k in DEPTHS.items():
            runs[n].append(compile_seconds(config(n, k), runtime()))  # a fresh jax.jit each time: no cache hits
    med = {n: summarize(r) for n, r in runs.items()}
    rec = {
        "bench": "compile_time",
        "layers_61_s": med[61]["total"], "layers_4_s": med[4]["total"],
        "ratio": med[61]["total"] / med[4]["total"],
        "lower_61_s": med[61]["lower"], "lower_4_s": med[4]["lower"],
        "xla_compile_61_s": med[61]["compile"], "xla_compile_4_s": med[4]["compile"],
        # program size: equal up to the length-1 dense scan, which XLA inlines at 4 layers
        "hlo_ops_61": med[61]["hlo_ops"], "hlo_ops_4": med[4]["hlo_ops"],
        "scan_layers": True, "repeats": args.repeats, "batch": BATCH, "seq": SEQ,
        "config": "tiny widths, 8 experts top-2, MTP off; 61 = 3 dense + 58 MoE, 4 = 1 dense + 3 MoE",
    }
    if args.unrolled:
        log("unrolled (scan_layers=False) ...")
        u61 = summarize([compile_seconds(config(61, 3), runtime(scan=False))])
        u4 = summarize([compile_seconds(config(4, 1), runtime(scan=False))])
        rec.update({"unrolled_layers_61_s": u61["total"], "unrolled_layers_4_s": u4["total"],
                    "unrolled_ratio": u61["total"] / u4["total"]})
    rec["load_avg_1m"] = load_average()
    emit(rec)


if __name__ == "__main__":
    main()
