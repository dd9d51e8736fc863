"""``dsv3 plan``: compile the real program for a pod slice you do not have, and read its memory.

The train step (model, losses, backward, AdamW, bias update) or a serving step (prompt prefill or one
decode step over the latent cache) is built from shapes alone for a mesh over the devices of a TPU
topology (``jax.experimental.topologies``, via libtpu: no TPU needed), compiled by the real XLA:TPU
compiler (Mosaic kernels included), and the compiler's own accounting is reported per chip:

* measured by the compiler: argument / output / temporary bytes (``memory_analysis``), FLOPs
  (``cost_analysis``), the collectives in the optimised HLO and their result bytes, compile time;
* computed here from shapes: parameter and optimizer bytes per chip (the rules' layout);
* estimated: the step time if compute-bound at the chip's peak, and the MFU that would give.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding import DEFAULT_RULES, Rules, make_mesh
from sharding.ep_bytes import collective_bytes
from sharding.expert_parallel import resolve_strategy

from .config import ModelConfig, RuntimeConfig
from .errors import ConfigError, MeshError
from .info import model_info
from .model import DeepSeekV3, init_cache
from .train.config import TrainConfig
from .train.program import train_program
from .pipeline.config import PipelineConfig, validate_pipeline

STEPS = ("train", "prefill", "decode")

# Per chip: HBM bytes and dense bf16 peak FLOP/s (vendor figures).
CHIPS = {
    "TPU v4": (32 * 2**30, 275e12),
    "TPU v5 lite": (16 * 2**30, 197e12),   # v5e
    "TPU v5e": (16 * 2**30, 197e12),
    "TPU v5": (95.74 * 2**30, 459e12),     # v5p
    "TPU v5p": (95.74 * 2**30, 459e12),
    "TPU v6 lite": (32 * 2**30, 918e12),   # v6e (Trillium)
    "TPU v6e": (32 * 2**30, 918e12),
}


class PlanError(ConfigError):
    """The topology, mesh or step cannot be planned; the message says why and the fix."""


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology such as ``v5p:2x2x2`` (compile-only; libtpu must be installed)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - very old jax
        raise PlanError(f"this jax has no jax.experimental.topologies ({e}) (fix: upgrade jax).") from None
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("compiling for a TPU topology needs libtpu (fix: pip install 'dsv3-jax[tpu]', "
                        "or `make setup`, which installs the tpu extra).") from None
    if ":" not in topology:
        raise PlanError(f"topology {topology!r} is not NAME:SHAPE (fix: e.g. v5p:2x2x2, v5p:8x8x4, v6e:4x4).")
    _quiet_libtpu(topology)
    try:
        return list(topologies.get_topology_desc(topology, platform="tpu").devices)
    except Exception as e:  # libtpu's own message names what it could not parse
        raise PlanError(f"unknown TPU topology {topology!r}: {str(e).splitlines()[0][:200]} "
                        "(fix: e.g. v5p:2x2x2, v5p:8x8x4, v5e:4x4, v6e:4x4).") from None


def _quiet_libtpu(topology: str) -> None:
    """libtpu, loaded on a host without TPUs, logs that it cannot find its workers and accelerator type;
    for compiling only, tell it (unless the environment already does) so nothing is printed."""
    import os
    name, shape = topology.split(":", 1)
    try:
        chips = math.prod(int(d) for d in shape.lower().split("x"))
    except ValueError:
        return
    family = {"v5e": "v5litepod", "v5litepod": "v5litepod", "v6e": "v6e"}.get(name, name)
    cores = chips * (2 if family in ("v4", "v5p") else 1)   # megacore chips count two cores
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # compiling holds no chip: let several processes (parallel tests, notebooks) load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{family}-{cores}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _chip(device) -> tuple[float, float]:
    kind = getattr(device, "device_kind", "")
    for name, spec in CHIPS.items():
        if kind == name:
            return spec
    return (float("nan"), float("nan"))


def _per_chip_bytes(abstract, shardings) -> int:
    """Bytes of one device's shard of every array of ``abstract`` laid out by ``shardings``."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    return total


@dataclasses.dataclass
class Plan:
    topology: str
    chips: int
    chip: str
    mesh: dict
    step: str
    batch: int
    seq: int
    bytes_per_chip: dict
    hbm_bytes_per_chip: float
    fits: bool
    flops_per_step: float
    collective_bytes_per_step: int
    collectives: dict
    compile_seconds: float
    est_step_seconds: float
    est_mfu: float
    notes: list
    # with ``buffers=N``: the N largest buffers live at the compiler's peak (bytes, HLO name, shape, op)
    peak_buffers: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _collectives(hlo: str) -> dict:
    """How many of each collective (and Mosaic/Triton kernel calls) the optimised HLO holds."""
    kinds = ("all-gather", "reduce-scatter", "all-to-all", "all-reduce", "ragged-all-to-all",
             "collective-permute")
    out = {k: hlo.count(f" {k}(") + hlo.count(f" {k}-start(") for k in kinds}
    out["kernel-calls"] = hlo.count('custom_call_target="tpu_custom_call"') + hlo.count('__gpu$xla.gpu.triton')
    return out


def plan(cfg: ModelConfig, topology: str, mesh: str, *, step: str = "train", batch: Optional[int] = None,
         seq: int = 4096, runtime: Optional[RuntimeConfig] = None, train: Optional[TrainConfig] = None,
         rules: Rules = DEFAULT_RULES, context: int = 32768, devices: Optional[list] = None,
         hbm_gib: Optional[float] = None, buffers: int = 0, pipeline: Optional[PipelineConfig] = None) -> Plan:
    """Compile ``step`` of ``cfg`` for ``topology`` on ``mesh`` (``"expert=64,fsdp=4"``) and report it.

    ``batch``: sequences per step (default: one per batch shard); ``seq``: tokens per sequence (train and
    prefill); ``context``: the cache length for ``decode``. ``devices`` overrides the topology's devices
    (e.g. fake CPU devices in tests).

    ``hbm_gib``: compile against this much HBM per chip instead of the chip's (XLA:TPU then schedules and
    rematerialises to fit it, and ``fits`` is judged against it) — e.g. 85 to ask for headroom, or a
    small value for a quick "how much would it need" (the compiler stops early with the figure).
    ``buffers=N``: also report the N largest buffers live at the compiler's peak (from its buffer
    assignment; also for programs that do not fit). The runtime's default ``ep_strategy='auto'`` picks the
    exchange for the mesh as the trainer does (``sharding.expert_parallel.resolve_strategy``: ragged_a2a on
    an expert axis of 16 or more); the notes say which."""
    if step not in STEPS:
        raise PlanError(f"step={step!r} (fix: one of {list(STEPS)}).")
    runtime = runtime or RuntimeConfig()
    devs = devices if devices is not None else topology_devices(topology)
    try:
        m = make_mesh(mesh, devices=devs)
    except MeshError as e:
        raise MeshError(f"{e} — topology {topology} has {len(devs)} chips.") from None
    shards = rules.batch_shards(m)
    pp = m.shape.get("stage", 1)
    if step == "train" and pp > 1:  # the pipelined step (docs/design.md §Pipeline): one row per shard and micro-batch
        pipeline = (pipeline or PipelineConfig()).resolved(pp)
        batch = batch or shards * pipeline.microbatches
        pipeline = validate_pipeline(pipeline, cfg, pp, batch, shards, (train or TrainConfig()).grad_accum)
    batch = batch or shards
    rules.check_batch(batch, m, "--batch")
    hbm, peak = _chip(devs[0])
    notes = []
    if runtime.ep_strategy == "auto" and cfg.num_moe_layers and m.size > 1:
        notes.append(f"ep_strategy=auto: {resolve_strategy('auto', m)} for an expert axis of {m.shape.get('expert', 1)}")
    options, dump = {}, None
    if hbm_gib:
        if getattr(devs[0], "platform", "") != "tpu":
            raise PlanError("hbm_gib needs a TPU topology (fix: drop --hbm-gib, or plan for a TPU topology).")
        options["xla_tpu_max_hbm_size_mib"] = int(hbm_gib * 1024)
        hbm = hbm_gib * 2**30
        notes.append(f"compiled against an HBM budget of {hbm_gib:g} GiB per chip (hbm_gib)")
    if buffers:
        import tempfile
        dump = tempfile.mkdtemp(prefix="dsv3_plan_")
        options.update(xla_dump_to=dump, xla_dump_hlo_as_text=True)
    t0 = time.perf_counter()
    if step == "train":
        t = train or TrainConfig()
        prog = train_program(cfg, runtime, t, m, rules, donate=True, pipeline=pipeline)
        if pp > 1:
            notes.append(f"pipeline: {pipeline.schedule}, {pipeline.microbatches} micro-batches over {pp} stages, "
                         f"MoE layers per stage {list(prog.stage_map.counts)}")
        lowered = prog.lower(batch, seq)
        params = _per_chip_bytes(prog.abstract["params"], prog.shardings["params"])
        params += _per_chip_bytes(prog.abstract["bias"], prog.shardings["bias"])
        params += _per_chip_bytes(prog.abstract["rest"], prog.shardings["rest"])
        optimizer = _per_chip_bytes(prog.abstract["opt"], prog.shardings["opt"])
        tokens = batch * seq
        model_flops = model_info(cfg, seq)["train_flops_per_token"] * tokens
    else:
        lowered, params, tokens = _serving(cfg, runtime, m, rules, step, batch, seq, context)
        optimizer = 0
        info = model_info(cfg, seq)
        model_flops = 2 * info["params_active"] * tokens
    try:
        compiled = lowered.compile(compiler_options=options or None)
    except Exception as e:  # XLA:TPU refuses programs that cannot fit: that is an answer, not a failure
        if "RESOURCE_EXHAUSTED" not in str(e):
            _read_and_remove(dump, 0)
            raise
        p = _does_not_fit(str(e), topology, devs, m, step, batch, seq, params, optimizer, hbm,
                          time.perf_counter() - t0, notes, dump)
        p.peak_buffers = _read_and_remove(dump, buffers)
        return p
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))
    hlo = compiled.as_text()
    arg, out, tmp = (int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp"))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    total = arg + out + tmp - alias
    bytes_per_chip = {"params": params, "optimizer": optimizer, "arguments": arg, "temporaries": tmp,
                      "outputs": out, "aliased": alias, "total": total}
    fits = bool(total <= hbm) if not math.isnan(hbm) else False
    if math.isnan(hbm):
        notes.append(f"unknown chip {getattr(devs[0], 'device_kind', '?')!r}: no HBM/peak figures")
    # XLA's cost analysis counts a while loop's body once (the scanned layers: once) and custom calls
    # (Pallas kernels, ragged_dot) not at all, so the compiled FLOPs can fall far below the model's; then
    # the estimate uses the model's FLOPs (one recomputed forward under remat) and gives no MFU
    model_chip = model_flops / len(devs)
    work, basis = flops, "compiled FLOPs"
    if not flops >= model_chip:
        recompute = 4 / 3 if step == "train" and (runtime.remat != "none") else 1.0
        work, basis = model_chip * recompute, ("model FLOPs" + (" x 4/3 (remat)" if recompute > 1 else "")
                                               + "; XLA's count, which takes a scanned layer once and no "
                                               "kernel or ragged_dot, is lower; no MFU from it")
    est = work / peak if peak == peak and work == work else float("nan")
    mfu = model_chip / (est * peak) if est and est == est and basis == "compiled FLOPs" else float("nan")
    notes.append("bytes, FLOPs and collectives are the compiler's; params/optimizer from the sharding rules; "
                 f"step time and MFU are estimates ({basis}, at the chip's bf16 peak, compute-bound)")
    return Plan(topology, len(devs), getattr(devs[0], "device_kind", "?"), dict(m.shape), step, batch,
                seq if step != "decode" else 1, bytes_per_chip, hbm, fits, flops, collective_bytes(hlo),
                _collectives(hlo), round(seconds, 1), est, mfu, notes, _read_and_remove(dump, buffers))


_SIZE = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _does_not_fit(message, topology, devs, mesh, step, batch, seq, params, optimizer, hbm, seconds, notes,
                  dump=None):
    """The plan of a program the TPU compiler rejected for memory: it names what it needed, e.g.
    "the total memory required for HLO temporaries (10.20T) exceeds available HBM (95.74G)". That
    figure is the whole heap the program needs — its arguments (parameters, optimizer state, batch)
    included, as the buffer assignment shows — so it is the ``total``; the temporaries are the total
    less the arguments (from the buffer assignment with ``buffers``, else from the rules' bytes)."""
    import re
    found = re.search(r"required for ([\w ]+?) \(([\d.]+)([KMGTP]?)\)", message)
    need = float(found.group(2)) * _SIZE.get(found.group(3), 1) if found else float("nan")
    line = next((ln for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), message.splitlines()[0])
    notes = notes + [f"compiler: {line.strip()[:300]}"]
    args = _dumped_bytes(dump).get("parameter") if dump else None
    if args is None:
        args = params + optimizer
        notes.append("does not fit: total is the compiler's figure; temporaries = total - params - optimizer")
    bytes_per_chip = {"params": params, "optimizer": optimizer, "arguments": args, "temporaries": need - args,
                      "outputs": float("nan"), "aliased": float("nan"), "total": need}
    return Plan(topology, len(devs), getattr(devs[0], "device_kind", "?"), dict(mesh.shape), step, batch,
                seq if step != "decode" else 1, bytes_per_chip, hbm, False, float("nan"), 0, {}, round(seconds, 1),
                float("nan"), float("nan"), notes)


def _read_and_remove(dump: Optional[str], n: int) -> list:
    """``peak_buffers`` of a dump directory ``plan`` made, which is then deleted (hundreds of MB at 671B)."""
    if not dump:
        return []
    import shutil
    try:
        return peak_buffers(dump, n)
    finally:
        shutil.rmtree(dump, ignore_errors=True)


def _dump_file(dump: str, suffix: str) -> Optional[str]:
    """The largest module's ``*{suffix}`` file in an XLA dump directory (the step, not helper modules)."""
    import glob
    import os
    files = glob.glob(os.path.join(dump, f"*{suffix}"))
    return max(files, key=os.path.getsize) if files else None


def _dumped_bytes(dump: str) -> dict:
    """Bytes by kind ("parameter", "temp") in the default memory space, from the dumped buffer assignment."""
    import re
    path = _dump_file(dump, "after_optimizations-buffer-assignment.txt")
    out: dict = {}
    if not path:
        return out
    with open(path) as f:
        for line in f:
            m = re.match(r"allocation \d+: size (\d+), (.*)", line)
            if not m or m.group(2).startswith("color"):
                continue
            kind = "parameter" if m.group(2).startswith("parameter") else (
                "temp" if "preallocated-temp" in m.group(2) else "other")
            out[kind] = out.get(kind, 0) + int(m.group(1))
    return out


def peak_buffers(dump: str, n: int = 20) -> list:
    """The ``n`` largest buffers live at the peak of the compiled program's memory, from an XLA dump
    (``xla_dump_to`` + ``xla_dump_hlo_as_text``): ``{bytes, name, shape, op}`` where ``op`` is the JAX
    operation that made it (``op_name`` metadata) — the first thing to read when a step does not fit."""
    import re
    live = _dump_file(dump, "after_optimizations-live-range.txt")
    hlo = _dump_file(dump, "after_optimizations.txt")
    if not (live and hlo):
        return []
    info = {}
    with open(hlo) as f:
        for line in f:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+(?: \S+)*?) ([\w\-]+)\(", line)
            if m:
                op = re.search(r'op_name="([^"]*)"', line)
                info[m.group(1)] = (m.group(2), op.group(1) if op else m.group(3))
    with open(live) as f:
        text = f.read()
    block = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)(?:\n  \S|\Z)", text, re.S)
    rows = []
    for line in (block.group(1).splitlines() if block else []):
        m = re.match(r"\s*([\w.\-]+)(\{[\d,]*\})?: (\d+) bytes", line)
        if m:
            shape, op = info.get(m.group(1), ("?", "?"))
            if m.group(2) and m.group(2) != "{}" and shape.startswith("("):   # one element of a tuple
                shape = f"{shape[:80]}... element {m.group(2)}"
            for a, b in (("transpose(jvp())", "bwd"), ("jvp()", "fwd"), ("closed_call/", ""), ("checkpoint/", ""),
                         ("rematted_computation/", "remat/"), ("jit(step)/", "")):
                op = op.replace(a, b)
            rows.append({"bytes": int(m.group(3)), "name": m.group(1) + (m.group(2) or ""),
                         "shape": shape[:120], "op": op[-160:]})
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:n]


def _serving(cfg, runtime, mesh, rules, step, batch, seq, context):
    """Lowered prefill (``seq`` prompt tokens into an empty cache) or decode (one token at ``context``)."""
    build = lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime, mesh=mesh, rules=rules)  # noqa: E731
    graphdef, state = nnx.split(nnx.eval_shape(build))
    shardings = rules.shardings(state, mesh)
    params = _per_chip_bytes(state, shardings)
    a_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    length = seq if step == "prefill" else context
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, length, jnp.bfloat16, mtp=False))
    csh = jax.tree.map(lambda c: NamedSharding(mesh, rules.spec(("layers", "batch", None, None)[-c.ndim:],
                                                                  c.shape, mesh)), cache)
    a_cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, csh)
    bsh = rules.batch_sharding(mesh)
    if step == "prefill":
        tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bsh)

        def fn(state, tokens, cache):
            out = nnx.merge(graphdef, state)(tokens, cache=cache)
            return out.logits[:, -1], out.cache
        return jax.jit(fn, donate_argnums=(2,)).lower(a_state, tokens, a_cache), params, batch * seq
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=bsh)
    pos = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=bsh)

    def fn(state, tokens, positions, cache):
        out = nnx.merge(graphdef, state)(tokens, positions=positions, cache=cache)
        return out.logits[:, -1], out.cache
    return jax.jit(fn, donate_argnums=(3,)).lower(a_state, tokens, pos, a_cache), params, batch


def format_plan(p: Plan) -> str:
    g = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    b = p.bytes_per_chip
    lines = [
        f"{p.step} step of {p.batch} x {p.seq} tokens on {p.topology} ({p.chips} x {p.chip}), mesh {p.mesh}",
        f"per chip (compiler)   arguments {g(b['arguments'])}  temporaries {g(b['temporaries'])}  "
        f"outputs {g(b['outputs'])}  aliased {g(b['aliased'])}",
        f"  of which (rules)    params {g(b['params'])}  optimizer {g(b['optimizer'])}",
        f"total per chip        {g(b['total'])} of {g(p.hbm_bytes_per_chip)} HBM: "
        f"{'fits' if p.fits else 'DOES NOT FIT'}",
        f"compiled FLOPs/step   {p.flops_per_step:.4g} per chip;  collectives {p.collectives}, "
        f"{p.collective_bytes_per_step / 2**20:.1f} MiB",
        f"estimated             {p.est_step_seconds * 1e3:.1f} ms/step if compute-bound, MFU {p.est_mfu:.1%}",
        f"compile time          {p.compile_seconds:.1f} s",
        *(f"note: {n}" for n in p.notes),
    ]
    if p.peak_buffers:
        lines.append("largest buffers live at the peak (compiler's buffer assignment):")
        lines += [f"  {r['bytes'] / 2**30:8.3f} GiB  {r['shape'][:60]:60s}  {r['op'][-90:]}" for r in p.peak_buffers]
    return "\n".join(lines)


__all__ = ["plan", "Plan", "PlanError", "format_plan", "peak_buffers", "topology_devices", "CHIPS", "STEPS"]
