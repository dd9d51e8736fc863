"""Block-scaled FP8 GEMM as a Pallas TPU (Mosaic) kernel.

Grid ``(M/BM, N/BN, K/(KS·128))`` with K innermost and sequential ("arbitrary"): each step loads
``KS`` 128-wide K blocks of the e4m3 operands into VMEM, and for each block forms the partial
product on the MXU with fp32 accumulation, then adds it into an fp32 VMEM accumulator scaled by the
two operands' per-row scales of that block (docs/architecture.md §6; ``reference.matmul_rowscaled`` is the spec).
The operands are widened to bf16 inside the kernel — exact for e4m3 values — so the same kernel
runs on MXUs without native FP8.

Inputs arrive padded by ``ops.py``: M to a multiple of BM, N of BN, K of KS·128. Scales come as
``a_s [Kb, Mp, 1]`` and ``b_s [Kb, 1, Np]`` so every block is a legal (8, 128)-tiled VMEM window
that broadcasts straight against the ``[BM, BN]`` tile.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .reference import BLOCK


def _precision(*xs):
    """Mosaic contracts bf16/fp8 operands at default precision only; fp32 operands at full fp32 (a
    global ``jax_default_matmul_precision='highest'`` would otherwise ask for fp32 contraction of bf16)."""
    return (jax.lax.Precision.HIGHEST if all(x.dtype == jnp.float32 for x in xs) else jax.lax.Precision.DEFAULT)


def block_m(m: int) -> int:
    """Row tile: a multiple of 32 (8-bit operands pack 32 rows per (32, 128) VMEM tile), ≤ 256."""
    return 256 if m >= 256 else -(-m // 32) * 32


def block_n(n_padded: int) -> int:
    return 256 if n_padded % 256 == 0 else 128


def k_steps(kb: int) -> int:
    """128-blocks of K per grid step: the largest of 4, 2, 1 dividing ``kb``."""
    return next(s for s in (4, 2, 1) if kb % s == 0)


def _kernel(a_ref, as_ref, b_ref, bs_ref, o_ref, acc_ref, *, ks: int):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc = acc_ref[...]
    for s in range(ks):  # static: KS partial products per grid step
        a = a_ref[:, s * BLOCK:(s + 1) * BLOCK].astype(jnp.bfloat16)   # [BM, 128]
        b = b_ref[:, s * BLOCK:(s + 1) * BLOCK].astype(jnp.bfloat16)   # [BN, 128], K-major
        part = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a, b),
                                   preferred_element_type=jnp.float32)
        acc = acc + (part * as_ref[s]) * bs_ref[s]                     # [BM,1] and [1,BN] scales
    acc_ref[...] = acc

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "bm", "bn", "ks", "interpret"))
def matmul_padded(aq, as3, bq, bs3, *, out_dtype, bm: int, bn: int, ks: int, interpret=False):
    """aq ``[Mp, Kp]``, as3 ``[Kb, Mp, 1]``, bq ``[Np, Kp]``, bs3 ``[Kb, 1, Np]`` → ``[Mp, Np]``."""
    mp, kp = aq.shape
    np_ = bq.shape[0]
    bk = ks * BLOCK
    assert mp % bm == 0 and np_ % bn == 0 and kp % bk == 0
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return pl.pallas_call(
        functools.partial(_kernel, ks=ks),
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((ks, bm, 1), lambda i, j, k: (k, i, 0)),
            pl.BlockSpec((bn, bk), lambda i, j, k: (j, k)),
            pl.BlockSpec((ks, 1, bn), lambda i, j, k: (k, 0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret or False,
        name="fp8_block_scaled_matmul",
    )(aq, as3, bq, bs3)
