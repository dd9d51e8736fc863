"""One train step on 8 CPU devices as 1 process × 8 devices vs 2 processes × 4 devices (gloo over
127.0.0.1), and the host→device bytes of the batch each process sends per step.

Each case is the trainer's own step (``dsv3_jax.train.trainer.Trainer``: the demo config, its data
pipeline, ``--mesh data=2,expert=4``): the batch of a step is this process's rows of the global batch
(its virtual data shards) put into the global array with ``jax.make_array_from_process_local_data``, so
with N processes each sends 1/N of the global batch and no process ever holds all of it; the step's
cross-process collectives go over gloo. Timed: batch placement + step + reading the metrics back
(the data pipeline's own work is not timed), median over the timed steps, after warm-up steps that
compile.

Prints one JSON line per case and one comparing them:
  {"bench": "multiprocess", "processes", "devices_per_process", "step_s_median", "step_s_min",
   "batch_bytes_per_process", "global_batch_bytes", "fraction_of_global_batch", "device_batch_bytes", ...}
  {"bench": "multiprocess_ratio", "step_time_2x4_over_1x8", ...}

Usage: .venv/bin/python benchmarks/multiprocess.py [--steps N] [--warmup N] [--batch B] [--seq S]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, load_average, log, num_cores  # noqa: E402


def worker(a) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    from dsv3_jax import distributed
    if a.num_processes > 1:  # before anything touches a JAX backend
        distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id)
    import jax
    import numpy as np

    from dsv3_jax.train import load_run_config
    from dsv3_jax.train.trainer import Trainer
    run = load_run_config("demo", ["train.mesh=data=2,expert=4", f"data.batch_size={a.batch}", f"data.seq_len={a.seq}",
                                   f"data.tokenizer={a.tokenizer}", f"train.output_dir={a.out}", "train.progress=false",
                                   "train.tensorboard=false", f"steps={a.warmup + a.steps}"])
    tr = Trainer(run, log=lambda m: None)
    it = tr._dataset("train")
    poison = np.float32(0.0)
    times, host_bytes, device_bytes = [], [], []
    for i in range(a.warmup + a.steps):
        batch = {k: np.asarray(v, np.int32) for k, v in next(it).items()}
        t0 = time.perf_counter()
        put = tr._put(batch)
        tr.state, m = tr.train_step(tr.state, put, poison)
        distributed.host_value(m)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
            host_bytes.append(sum(v.nbytes for v in batch.values()))
            device_bytes.append(sum(s.data.nbytes for v in put.values() for s in v.addressable_shards))
    res = {"bench": "multiprocess", "processes": jax.process_count(), "devices_per_process": jax.local_device_count(),
           "mesh": dict(tr.mesh.shape), "batch": a.batch, "seq": a.seq, "timed_steps": a.steps,
           "step_s_median": statistics.median(times), "step_s_min": min(times),
           "batch_bytes_per_process": max(host_bytes), "device_batch_bytes_per_process": max(device_bytes),
           "global_batch_bytes": 5 * a.batch * a.seq * 4, "virtual_data_shards": it.num_shards,
           "data_shards_of_this_process": tr.data_shards}
    res["fraction_of_global_batch"] = res["batch_bytes_per_process"] / res["global_batch_bytes"]
    every = distributed.allgather(res, "bench")
    if distributed.is_primary():
        res["per_process"] = [{k: r[k] for k in ("batch_bytes_per_process", "device_batch_bytes_per_process",
                                                 "data_shards_of_this_process", "step_s_median")} for r in every]
        print(json.dumps(res), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, a, tok: Path, out: Path) -> dict:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}")
    procs = []
    for i in range(n):
        cmd = [sys.executable, __file__, "--worker", "--num-processes", str(n), "--process-id", str(i),
               "--port", str(port), "--tokenizer", str(tok), "--out", str(out / f"{n}x{8 // n}"),
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq", str(a.seq)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL if i else None, text=True))
    outs = [p.communicate()[0] for p in procs]
    for i, p in enumerate(procs):
        if p.returncode:
            raise SystemExit(f"process {i} of the {n}-process case exited {p.returncode}")
    return json.loads(next(line for line in outs[0].splitlines() if line.startswith("{")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    from dsv3_jax.data import iter_documents, stdlib_source, train_tokenizer
    with tempfile.TemporaryDirectory() as d:
        tok = Path(d) / "tok"
        train_tokenizer(iter_documents(stdlib_source(), range(200)), 512).save(tok)
        res = {}
        for n in (1, 2):
            log(f"{n} process(es) × {8 // n} devices: {a.warmup} warm-up + {a.steps} timed steps ...")
            res[n] = launch(n, a, tok, Path(d))
            res[n]["cores"], res[n]["load_average"] = num_cores(), load_average()
            emit(res[n])
    emit({"bench": "multiprocess_ratio", "step_time_2x4_over_1x8": res[2]["step_s_median"] / res[1]["step_s_median"],
          "batch_bytes_per_process_2x4_over_1x8": res[2]["batch_bytes_per_process"] / res[1]["batch_bytes_per_process"],
          "cores": num_cores(), "load_average": load_average()})


if __name__ == "__main__":
    main()
