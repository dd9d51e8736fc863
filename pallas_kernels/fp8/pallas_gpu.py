"""Block-scaled FP8 GEMM as a Pallas GPU kernel, Triton-lowered (Hopper/Ada: sm_89+).

One program computes a ``[BM, BN]`` output tile; it walks K in steps of 128 (the scaling
granularity): loads the e4m3 tiles ``a [BM, 128]`` and ``b [BN, 128]`` — both **K-major**, which
is the operand layout FP8 tensor cores (wgmma) take — multiplies them on the tensor cores with an
fp32 accumulator, and promotes the partial sum into the fp32 running total scaled by the two
operands' per-row scales of that K block (docs/architecture.md §6; ``reference.matmul_rowscaled`` is the spec).

Inputs arrive padded by ``ops.py``: M to a multiple of BM, N of BN, K of 128; scales transposed to
``[Kb, M]`` / ``[Kb, N]`` so each K step reads one contiguous row. Triton wants power-of-2 tiles:
BM ∈ {16..128}, BN = 128, BK = 128.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .reference import BLOCK

BN = 128


def block_m(m: int) -> int:
    """Power-of-2 row tile: ≥ 16 (smallest tensor-core M), ≤ 128."""
    return int(min(128, max(16, pl.next_power_of_2(m))))


def _kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, *, kb: int):
    bm, bn = o_ref.shape

    def body(k, acc):
        a = a_ref[:, pl.ds(k * BLOCK, BLOCK)]          # [BM, 128] e4m3
        b = b_ref[:, pl.ds(k * BLOCK, BLOCK)]          # [BN, 128] e4m3, K-major
        part = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        sa = as_ref[k, :]                               # [BM] f32
        sb = bs_ref[k, :]                               # [BN] f32
        return acc + (part * sa[:, None]) * sb[None, :]

    acc = jax.lax.fori_loop(0, kb, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "bm", "interpret", "num_warps", "num_stages"))
def matmul_padded(aq, as_t, bq, bs_t, *, out_dtype, bm: int, interpret: bool = False,
                  num_warps: int | None = None, num_stages: int = 3):
    """aq ``[Mp, Kp]``, as_t ``[Kb, Mp]``, bq ``[Np, Kp]``, bs_t ``[Kb, Np]`` → ``[Mp, Np]``.

    Two fp32 ``[BM, 128]`` register tiles live per program (the running sum and the current K
    block's partial product), so the 128-row tile gets 8 warps (one warpgroup pair) by default."""
    if num_warps is None:
        num_warps = 8 if bm >= 128 else 4
    mp, kp = aq.shape
    np_ = bq.shape[0]
    kb = kp // BLOCK
    assert mp % bm == 0 and np_ % BN == 0 and kp % BLOCK == 0
    return pl.pallas_call(
        functools.partial(_kernel, kb=kb),
        grid=(mp // bm, np_ // BN),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((kb, bm), lambda i, j: (0, i)),
            pl.BlockSpec((BN, kp), lambda i, j: (j, 0)),
            pl.BlockSpec((kb, BN), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, BN), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="fp8_block_scaled_matmul",
    )(aq, as_t, bq, bs_t)


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
