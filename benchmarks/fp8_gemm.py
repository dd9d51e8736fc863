"""FP8 block-scaled GEMM throughput on DeepSeek-V3 linear shapes, against an XLA dot of the same shape.

For each ``M ∈ {4096, 128}`` and ``N×K`` in the V3 shapes (7168×2048, 2048×7168, 24576×1536,
7168×18432) this times ``pallas_kernels.fp8.matmul`` on pre-quantized operands (1×128 activation
scales, 128×128 weight scales; quantisation not timed) and, in the same run and interleaved, a plain
XLA dot of the same shape (bf16 operands on GPU/TPU — what FP8 replaces; fp32 on CPU, whose bf16 dot
is an emulated slow path). Prints one JSON line per shape: both TFLOPS (2·M·N·K / median time),
the ratio, and on a GPU the fraction of the H100 SXM dense FP8 peak (1979 TFLOPS, docs/architecture.md §10).

On CPU the op is the jnp reference and M is reduced (divided by ``--cpu-m-div``, default 64; the
JSON says ``m`` measured vs ``m_spec``): the figures there only show the reference runs, the GPU figures are
the ones that mean something.

    python benchmarks/fp8_gemm.py                       # auto backend
    python benchmarks/fp8_gemm.py --backend reference   # force the jnp reference
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels.fp8 as fp8  # noqa: E402

H100_FP8_PEAK_TFLOPS = 1979.0
SHAPES_NK = [(7168, 2048), (2048, 7168), (24576, 1536), (7168, 18432)]
SHAPES_M = [4096, 128]


def _time(fns: dict, repeats: int) -> dict:
    """Median seconds per call, candidates run round-robin so machine load falls on all alike."""
    times = {k: [] for k in fns}
    for name, fn in fns.items():  # warm-up (compile)
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="auto", choices=fp8.BACKENDS)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cpu-m-div", type=int, default=64, help="on CPU, M is divided by this (4096 → 64, 128 → 2)")
    ap.add_argument("--shapes", default=None, help="comma list of indices into the N×K shapes (default all)")
    args = ap.parse_args(argv)

    platform = jax.default_backend()
    impl = fp8.resolve_backend(args.backend)
    device = jax.devices()[0].device_kind
    on_cpu = platform == "cpu"
    repeats = args.repeats or (3 if on_cpu else 20)
    base_dtype = jnp.float32 if on_cpu else jnp.bfloat16
    picks = [SHAPES_NK[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES_NK

    for n, k in picks:
        kw, kx = jax.random.split(jax.random.key(n + k))
        w = (0.02 * jax.random.normal(kw, (n, k), jnp.float32)).astype(base_dtype)
        wq, ws = fp8.quantize_weight(w)
        w_kn = w.T  # XLA baseline in the model's [in, out] layout: y = x @ W
        for m_spec in SHAPES_M:
            m = max(1, m_spec // args.cpu_m_div) if on_cpu else m_spec
            x = jax.random.normal(kx, (m, k), jnp.float32).astype(base_dtype)
            xq, xs = fp8.quantize_activation(x)
            ours = jax.jit(lambda xq, xs, wq, ws: fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.bfloat16,
                                                             backend=args.backend))
            xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
            t = _time({"ours": lambda: ours(xq, xs, wq, ws), "xla": lambda: xla(x, w_kn)}, repeats)
            flops = 2.0 * m * n * k
            row = {
                "bench": "fp8_gemm", "device": device, "platform": platform, "backend": impl,
                "m": m, "m_spec": m_spec, "n": n, "k": k,
                "ours_tflops": round(flops / t["ours"] / 1e12, 4), "ours_ms": round(t["ours"] * 1e3, 3),
                "baseline": f"xla dot {jnp.dtype(base_dtype).name}",
                "baseline_tflops": round(flops / t["xla"] / 1e12, 4), "baseline_ms": round(t["xla"] * 1e3, 3),
                "ratio": round(t["xla"] / t["ours"], 4),
            }
            if platform == "gpu":
                row["fraction_of_h100_fp8_peak"] = round(flops / t["ours"] / 1e12 / H100_FP8_PEAK_TFLOPS, 4)
            if on_cpu and m != m_spec:
                row["note"] = f"CPU: jnp reference at reduced M={m} (spec M={m_spec})"
            print(json.dumps(row), flush=True)
        del w, wq, ws, w_kn


if __name__ == "__main__":
    main()
