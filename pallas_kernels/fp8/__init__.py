"""FP8 (e4m3) quantisation and block-scaled GEMM (docs/architecture.md §6). ``reference.py`` is the specification
and the CPU path; ``pallas_gpu.py`` (Triton) and ``pallas_tpu.py`` (Mosaic) are the kernels;
``ops.py`` dispatches by backend."""
from .ops import (BACKENDS, gemm_rowscaled, linear, matmul, quantize_activation, quantize_weight,
                  resolve_backend)
from .grouped import grouped_linear, quantize_experts
from .quant_array import QuantArray
from .reference import (BLOCK, E4M3_MAX, AMAX_MIN, dequantize_activation, dequantize_weight)

__all__ = ["QuantArray", "BACKENDS", "BLOCK", "E4M3_MAX", "AMAX_MIN", "linear", "grouped_linear", "quantize_experts", "matmul", "gemm_rowscaled",
           "quantize_activation", "quantize_weight", "dequantize_activation", "dequantize_weight",
           "resolve_backend"]
