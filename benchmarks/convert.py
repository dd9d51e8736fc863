"""Streaming conversion benchmark: HF FP8 checkpoint → Orbax (and back), against plain reading of the same files.

Generates a synthetic release-format checkpoint (F8_E4M3 linears with 128×128 ``weight_scale_inv``,
BF16 embedding/head/norms/gate, FP32 correction bias; sharded safetensors + index) for a made-up
wide config, then in fresh subprocesses (so each peak RSS is its own), alternating after a warm-up
read, with other processes' CPU use measured before and during (``common.LoadMonitor``: ``quiet``):
  * read:        every tensor copied out of the mmapped shards (the I/O floor),
  * copy:        the read plus writing the same bytes to files next to DST, fsynced (the floor of any
                 converter that writes what it reads: ``ratio_copy`` bounds ``ratio_keep_fp8``),
  * convert:     ``hf_to_orbax --dtype bfloat16`` (dequantise, transpose, write Orbax layer by layer),
  * convert_fp8: ``hf_to_orbax --keep-fp8`` (e4m3 bits and scales transposed, written),
  * export:      ``orbax_to_hf`` of the bf16 checkpoint (its bytes per second).
Prints one JSON line: MB/s of each (source bytes / wall time), ``ratio`` (bf16 convert / read),
``ratio_copy`` (copy / read), ``convert_vs_copy`` and ``keep_fp8_vs_copy`` (each conversion against the copy),
``ratio_keep_fp8`` and ``ratio_export`` (export MB/s / read MB/s), ``convert_write_vs_copy`` and
``keep_fp8_write_vs_copy`` (output bytes written per second against the copy's: 1.0 is the disk's write
rate; a bf16 output is ~2x its FP8 source), and each one's peak RSS growth over
its RSS before starting (must stay bounded by ~a write group, not the model size).

    python benchmarks/convert.py                 # ≥3 GB, 16 layers (a few minutes on 2 cores)
    python benchmarks/convert.py --small         # ~40 MB, 16 layers (used by the test suite)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_config(small: bool, layers: int = 16) -> dict:
    """A made-up wide DeepSeek-V3-shaped config (HF config.json fields) with ``layers`` layers."""
    from dsv3_jax.config import ModelConfig
    if small:
        kw = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=layers, first_k_dense=1,
                  num_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                  moe_intermediate_size=256, n_group=4, topk_group=2, num_mtp_layers=1)
    else:
        kw = dict(vocab_size=32768, hidden_size=2048, intermediate_size=8192, num_layers=layers, first_k_dense=1,
                  num_heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128, n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1,
                  moe_intermediate_size=1024, n_group=4, topk_group=2, num_mtp_layers=1)
    return ModelConfig(name="bench_wide", **kw).to_hf()


def generate(dst: Path, small: bool, shard_bytes: int, layers: int = 16) -> int:
    """Write the synthetic FP8 checkpoint shard by shard; returns its size in bytes."""
    from dsv3_jax.checkpoint import fp8, mapping
    from dsv3_jax.checkpoint.safetensors_io import SUPPORTED_DTYPES, save_file
    from dsv3_jax.config import ModelConfig
    hf = make_config(small, layers)
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]}
    cfg = ModelConfig.from_hf(hf)
    shapes = mapping.param_shapes(cfg)
    rng = np.random.default_rng(0)
    bf16 = SUPPORTED_DTYPES["BF16"]
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(hf, indent=1))
    names = [p for p in mapping.pieces(cfg)]
    extra = [(f"model.layers.{cfg.num_layers}.{n}", ("embed",) if "embed" in n else ("lm_head",))
             for n in mapping.MTP_SHARED]
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, dst / name, metadata={"format": "pt"})
            files.append(name)
            for t in shard:
                weight_map[t] = name
            shard, size = {}, 0

    def add(name, arr):
        nonlocal size, total
        shard[name] = arr
        size += arr.nbytes
        total += arr.nbytes
        if size >= shard_bytes:
            flush()

    todo = [(p.hf_name, p, mapping.hf_shape(p, shapes[p.path][len(p.index):])) for p in names]
    todo += [(n, None, mapping.hf_shape(mapping.Piece(n, path, (), mapping.COPY if path == ("embed",) else
                                                      mapping.LINEAR), shapes[path])) for n, path in extra]
    for name, p, shape in todo:
        fp8_ok = (name.endswith("proj.weight") and p is not None and p.transform == mapping.LINEAR)
        if fp8_ok:
            bits = rng.integers(0, 0x7E, size=shape, dtype=np.uint8) | (rng.integers(0, 2, size=shape,
                                                                                   dtype=np.uint8) << 7)
            add(name, bits.view(fp8.E4M3))
            add(name + "_scale_inv", (rng.random(fp8.scale_shape(shape), np.float32) * 1e-3).astype(np.float32))
        elif name.endswith("e_score_correction_bias"):
            add(name, rng.standard_normal(shape).astype(np.float32) * 0.01)
        else:
            add(name, (rng.standard_normal(shape, np.float32) * 0.02).astype(bf16))
    flush()
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(mode: str, src: str, dst: str) -> None:
    """Runs in a fresh process; prints {seconds, rss_before_mb, peak_mb}."""
    from dsv3_jax.checkpoint import convert  # noqa: F401  (imports jax/orbax before measuring)
    from dsv3_jax.checkpoint.hf_source import HFSource
    from dsv3_jax.checkpoint.orbax_io import ocp
    ocp()  # (the Orbax import, before measuring)
    before = _rss_kb("VmRSS")
    # reset the high-water mark so VmHWM measures this phase only
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    if mode == "read":
        with HFSource(src) as s:
            n = 0
            for e in sorted(s._entries):
                a = s._raw(e)
                b = np.array(a)
                n += b.nbytes
                s._entries[e].reader.release(s._entries[e].raw)
                del a, b
    elif mode == "copy":  # the read, plus writing the same bytes out (fsynced per file, as TensorStore does)
        Path(dst).mkdir(parents=True, exist_ok=True)
        with HFSource(src) as s:
            by_file: dict = {}
            for e in sorted(s._entries):
                by_file.setdefault(s._entries[e].reader.path, []).append(e)
            for path, names in by_file.items():
                with open(Path(dst) / Path(path).name, "wb") as f:
                    for e in names:
                        a = s._raw(e)
                        f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
                        s._entries[e].reader.release(s._entries[e].raw)
                    f.flush()
                    os.fsync(f.fileno())
    elif mode == "export":
        convert.orbax_to_hf(src, dst, progress=False, overwrite=True, max_shard_bytes=1 << 30)
    else:
        convert.hf_to_orbax(src, dst, dtype="bfloat16", keep_fp8=mode == "convert_fp8", progress=False,
                            overwrite=True, group_bytes=int(os.environ["GROUP_BYTES"]))
    secs = time.perf_counter() - t0
    peak = max(_rss_kb("VmHWM"), _rss_kb("VmRSS"))
    print(json.dumps({"seconds": secs, "rss_before_mb": before / 1024, "peak_mb": peak / 1024}))


def run_child(mode: str, src: Path, dst: Path, group_bytes: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(src), str(dst)],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                              "GROUP_BYTES": str(group_bytes)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_mb(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="~40 MB model instead of >=3 GB")
    ap.add_argument("--layers", type=int, default=16, help="layers of the synthetic model")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds of every phase (median reported)")
    ap.add_argument("--phases", default="copy,convert,convert_fp8,export",
                    help="what to time besides the plain read (comma list of copy, convert, convert_fp8, export)")
    ap.add_argument("--workdir", help="where to generate (default: a temporary directory, removed after)")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    from common import LoadMonitor, num_cores

    from dsv3_jax.checkpoint import convert as convert_mod
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsv3_bench_convert_"))
    try:
        src, dst, dst8, hf, cp = (work / "hf_fp8", work / "orbax", work / "orbax_fp8", work / "hf_export",
                                  work / "copy")
        if not (src / "model.safetensors.index.json").exists():
            shutil.rmtree(src, ignore_errors=True)
            generate(src, args.small, shard_bytes=(8 << 20) if args.small else (1 << 30), layers=args.layers)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        for d in (dst, dst8, hf, cp):
            shutil.rmtree(d, ignore_errors=True)
        # the small model is a handful of default-size groups: scale the group down with it
        group = (4 << 20) if args.small else convert_mod.GROUP_BYTES
        run_child("read", src, dst, group)  # warm-up: the source in the page cache for every phase alike
        mon = LoadMonitor()
        mon.before()
        phases = ["read"] + [p for p in ("copy", "convert", "convert_fp8", "export") if p in args.phases.split(",")]
        if "export" in phases and "convert" not in phases:
            ap.error("--phases: export needs convert (it exports the bf16 checkpoint)")
        where = {"read": (src, dst), "copy": (src, cp), "convert": (src, dst), "convert_fp8": (src, dst8),
                 "export": (dst, hf)}
        runs: dict[str, list[dict]] = {p: [] for p in phases}
        with mon:  # the phases alternate, so load from other processes falls on all of them alike
            for _ in range(args.rounds):
                for p in phases:
                    if p != "read":  # a previous round's output is removed outside the timed region
                        shutil.rmtree(where[p][1], ignore_errors=True)
                    runs[p].append(run_child(p, *where[p], group))
                    if p == "copy":
                        shutil.rmtree(cp, ignore_errors=True)
        secs = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        mb = size / 2**20
        read_mb_s = mb / secs["read"]

        def growth(p):
            return round(runs[p][-1]["peak_mb"] - runs[p][-1]["rss_before_mb"], 1)
        res = {"benchmark": "convert_hf_fp8_to_orbax", "source_mb": round(mb, 1),
               "layers": make_config(args.small, args.layers)["num_hidden_layers"],
               "read_mb_s": round(read_mb_s, 1), "read_rss_growth_mb": growth("read")}
        if "copy" in runs:
            res.update({"copy_mb_s": round(mb / secs["copy"], 1), "ratio_copy": round(secs["read"] / secs["copy"], 3)})
            for p, key in (("convert", "convert_vs_copy"), ("convert_fp8", "keep_fp8_vs_copy")):
                if p in runs:  # how close each conversion comes to the copy floor of the same run
                    res[key] = round(secs["copy"] / secs[p], 3)
        # output bytes written per second, also against the copy's (the disk's fsynced write rate): a bf16
        # output is ~2x its FP8 source, so the source-bytes ratio understates how busy the disk is
        written = {p: _dir_mb(d) / secs[p] for p, d in (("convert", dst), ("convert_fp8", dst8)) if p in runs}
        if "copy" in runs:
            for p, key in (("convert", "convert_write_vs_copy"), ("convert_fp8", "keep_fp8_write_vs_copy")):
                if p in written:
                    res[key] = round(written[p] / (mb / secs["copy"]), 3)
        if "convert" in runs:
            out_mb = written["convert"] * secs["convert"]
            res.update({"convert_mb_s": round(mb / secs["convert"], 1), "ratio": round(secs["read"] / secs["convert"], 3),
                        "convert_rss_growth_mb": growth("convert"), "output_mb": round(out_mb, 1),
                        "convert_write_mb_s": round(written["convert"], 1)})
        if "convert_fp8" in runs:
            res.update({"convert_keep_fp8_mb_s": round(mb / secs["convert_fp8"], 1),
                        "ratio_keep_fp8": round(secs["read"] / secs["convert_fp8"], 3),
                        "convert_keep_fp8_rss_growth_mb": growth("convert_fp8"),
                        "output_keep_fp8_mb": round(written["convert_fp8"] * secs["convert_fp8"], 1),
                        "convert_keep_fp8_write_mb_s": round(written["convert_fp8"], 1)})
        if "export" in runs:  # orbax-to-hf of the bf16 checkpoint: its bytes per second, against the same read
            res.update({"export_mb_s": round(out_mb / secs["export"], 1),
                        "ratio_export": round(out_mb / secs["export"] / read_mb_s, 3),
                        "export_rss_growth_mb": growth("export")})
        res.update({"group_mb": group / 2**20, "rounds": args.rounds, "workers": max(1, min(4, num_cores())),
                    **mon.record()})
        print(json.dumps(res))
        return res
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
