"""Test setup: 8 fake CPU devices (before the first jax use) and exact fp32 matmuls."""
import os

# LLVM -O0 for XLA:CPU code generation halves compile time, which dominates these tiny tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare fp32 logits at 1e-4; keep XLA from using reduced-precision passes.
jax.config.update("jax_default_matmul_precision", "highest")

# Identical programs compiled by different tests (same config, same shapes) are compiled once.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
