"""MLA attention kernels: absorbed decode bandwidth and flash-prefill memory (docs/architecture.md §2, §10).

**decode** — one step of absorbed decode over the latent cache (V3: 128 heads, c_kv 512 + k_rope 64)
for a batch of sequences of ``--context`` tokens. Our figure: ``pallas_kernels.mla.decode`` (auto
backend: the Triton kernel on GPU, the Mosaic kernel on TPU, the jnp reference on CPU); bytes of cache
read per step = ``B · context · (512 + 64) · itemsize``, achieved GB/s = bytes / median time. On a GPU
this is compared with the H100 HBM peak (3,350 GB/s) and FlashMLA's published 3,000 GB/s; on CPU
those comparisons mean nothing (``"no_gpu": true``). Baseline measured in the same run: plain
per-head attention over a re-expanded per-head K/V cache (what a non-absorbed decode reads: 128·(192+128)
values per token instead of 576), same queries; ratio = baseline time / ours.

**prefill** — compiled peak temporary memory (``memory_analysis().temp_size_in_bytes``; compile only,
nothing runs) of the reference (``O(S²)`` scores) vs flash attention (``backend`` = the platform's
kernel, ``blockwise`` jnp on CPU), forward and forward+backward, at V3 head dims and long S;
plus forward time at a moderate S.

    python benchmarks/mla.py                    # both sections
    python benchmarks/mla.py --only decode --context 4096 --batch 8
"""
from __future__ import annotations

import argparse

from common import emit, load_average, log, time_interleaved  # noqa: E402 (adds the repo root to sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels.mla as mla  # noqa: E402

H100_HBM_GBS = 3350.0
FLASHMLA_GBS = 3000.0
L, R, DN, DV = 512, 64, 128, 128


def _rand(shape, dtype, seed, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def bench_decode(batch: int, heads: int, context: int, dtype, repeats: int, on_gpu: bool) -> None:
    scale = (DN + R) ** -0.5
    ckv, krope = _rand((batch, context, L), dtype, 1), _rand((batch, context, R), dtype, 2)
    q_lat, q_rope = _rand((batch, heads, L), dtype, 3, 0.05), _rand((batch, heads, R), dtype, 4)
    w_kvb = _rand((L, heads, DN + DV), dtype, 5, L ** -0.5)
    lengths = jnp.full((batch,), context, jnp.int32)
    # baseline's cache: per-head keys [c_kv·W_k | k_rope] and values c_kv·W_v, materialised once
    k_nope = jnp.einsum("btl,lhn->bthn", ckv, w_kvb[..., :DN])
    k_full = jnp.concatenate([k_nope, jnp.broadcast_to(krope[:, :, None], k_nope.shape[:3] + (R,))], -1)
    v_full = jnp.einsum("btl,lhn->bthn", ckv, w_kvb[..., DN:])
    q_full = jnp.concatenate([_rand((batch, heads, DN), dtype, 6), q_rope], -1)

    ours = jax.jit(lambda *a: mla.decode(*a, scale=scale))

    @jax.jit
    def expanded(q, k, v, lengths):
        s = jnp.einsum("bhd,bthd->bht", q, k, preferred_element_type=jnp.float32) * scale
        s = jnp.where(jnp.arange(k.shape[1])[None, None] < lengths[:, None, None], s, -jnp.inf)
        return jnp.einsum("bht,bthn->bhn", jax.nn.softmax(s, -1).astype(v.dtype), v,
                          preferred_element_type=jnp.float32)

    t = time_interleaved({"ours": lambda: ours(q_lat, q_rope, ckv, krope, lengths),
                          "baseline": lambda: expanded(q_full, k_full, v_full, lengths)},
                         repeats=repeats, sync={"ours": jax.block_until_ready, "baseline": jax.block_until_ready})
    item = jnp.dtype(dtype).itemsize
    bytes_ours = batch * context * (L + R) * item
    bytes_base = (k_full.size + v_full.size) * item
    gbs = bytes_ours / t["ours"]["median_s"] / 1e9
    rec = {"bench": "mla_decode", "backend": mla.resolve_backend("auto"), "device": jax.devices()[0].device_kind,
           "batch": batch, "heads": heads, "context": context, "dtype": jnp.dtype(dtype).name,
           "cache_bytes_per_step": bytes_ours, "ours_s": t["ours"]["median_s"], "ours_GBps": gbs,
           "baseline": "per-head expanded K/V attention", "baseline_bytes_per_step": bytes_base,
           "baseline_s": t["baseline"]["median_s"],
           "baseline_GBps": bytes_base / t["baseline"]["median_s"] / 1e9,
           "speedup_vs_baseline": t["baseline"]["median_s"] / t["ours"]["median_s"], "load_avg": load_average()}
    if on_gpu:
        rec.update(frac_of_hbm_peak=gbs / H100_HBM_GBS, ratio_vs_flashmla_3000=gbs / FLASHMLA_GBS)
    else:
        rec.update(no_gpu=True, note="CPU: jnp reference; HBM-peak and FlashMLA comparisons need a GPU")
    emit(rec)


def _temp_bytes(fn, *shapes) -> int:
    return int(jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes)


def bench_prefill(batch: int, heads: int, seq: int, time_seq: int, dtype, repeats: int, on_gpu: bool) -> None:
    flash = "auto" if on_gpu else "blockwise"
    scale = (DN + R) ** -0.5
    S = jax.ShapeDtypeStruct
    qk, v = S((batch, seq, heads, DN + R), dtype), S((batch, seq, heads, DV), dtype)

    def fwd(backend):
        return lambda q, k, v: mla.prefill(q, k, v, scale=scale, backend=backend)

    def fwd_bwd(backend):
        return jax.grad(lambda q, k, v: jnp.sum(mla.prefill(q, k, v, scale=scale, backend=backend)
                                                .astype(jnp.float32)), argnums=(0, 1, 2))

    for name, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        ref_b, ours_b = _temp_bytes(make("reference"), qk, qk, v), _temp_bytes(make(flash), qk, qk, v)
        emit({"bench": "mla_prefill_memory", "pass": name, "flash_backend": mla.resolve_backend(flash),
              "batch": batch, "heads": heads, "seq": seq, "dtype": jnp.dtype(dtype).name,
              "ours_temp_bytes": ours_b, "reference_temp_bytes": ref_b, "reference_over_ours": ref_b / max(ours_b, 1)})

    q, k = _rand((batch, time_seq, heads, DN + R), dtype, 1), _rand((batch, time_seq, heads, DN + R), dtype, 2)
    vv = _rand((batch, time_seq, heads, DV), dtype, 3)
    f_ours, f_ref = jax.jit(fwd(flash)), jax.jit(fwd("reference"))
    t = time_interleaved({"ours": lambda: f_ours(q, k, vv), "reference": lambda: f_ref(q, k, vv)}, repeats=repeats,
                         sync={"ours": jax.block_until_ready, "reference": jax.block_until_ready})
    emit({"bench": "mla_prefill_time", "flash_backend": mla.resolve_backend(flash), "batch": batch, "heads": heads,
          "seq": time_seq, "dtype": jnp.dtype(dtype).name, "ours_s": t["ours"]["median_s"],
          "reference_s": t["reference"]["median_s"], "speedup": t["reference"]["median_s"] / t["ours"]["median_s"],
          "load_avg": load_average()})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["decode", "prefill"], default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None, help="decode heads (V3: 128; CPU default 32)")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--seq", type=int, default=8192, help="prefill S for the memory figures (compile only)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() in ("gpu", "tpu")
    dtype = jnp.bfloat16 if on_gpu else jnp.float32   # CPU bf16 dots are an emulated slow path
    repeats = args.repeats or (20 if on_gpu else 3)
    if args.only in (None, "decode"):
        log("decode ...")
        bench_decode(args.batch or (64 if on_gpu else 4), args.heads or (128 if on_gpu else 32),
                     args.context or (4096 if on_gpu else 2048), dtype, repeats, on_gpu)
    if args.only in (None, "prefill"):
        log("prefill ...")
        bench_prefill(1, 128 if on_gpu else 16, args.seq, 4096 if on_gpu else 1024, dtype, repeats, on_gpu)


if __name__ == "__main__":
    main()
