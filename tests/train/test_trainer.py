"""The training loop end to end on a 2-layer tiny DeepSeek-V3: loss goes down, checkpoints restore in
``load_checkpoint``, non-finite steps are skipped and stop the run, kill -9 + resume is exact, and the
step under an 8-device mesh matches one device."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.train import Trainer, TrainingStopped
from dsv3_jax.checkpoint.orbax_io import CheckpointDirError, check_writable, read_train_state



def subprocess_env() -> dict:
    """Environment for `python -m dsv3_jax.cli train` children: same devices, precision and
    compilation cache as this process, so numbers (and compiled programs) match."""
    import os
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def kill_and_resume(cli, tmp_path: Path, checkpoint: int, min_records: int):
    """Run ``cli(out)`` once whole (``ref``) and once killed with SIGKILL after checkpoint ``checkpoint`` and
    ``min_records`` metric lines, then resumed to the end. Returns (resumed run's metrics by step, the whole
    run's, the resume's stderr, metric lines written before the kill)."""
    env = subprocess_env()
    ref, run = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cli(ref), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cli(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        marker = run / "checkpoints" / str(checkpoint) / "dsv3_checkpoint.json"
        while time.time() < deadline and proc.poll() is None:
            if marker.exists() and (run / "metrics.jsonl").exists() and len(_metrics(run)) >= min_records:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = len(_metrics(run))
    out = subprocess.run(cli(run), env=env, check=True, capture_output=True, text=True, timeout=600)
    got = {r["step"]: r for r in _metrics(run)}
    want = {r["step"]: r for r in _metrics(ref)}
    return got, want, out.stderr, killed_at


def test_short_run_lowers_loss_and_checkpoint_loads(make_run, tmp_path):
    run = make_run("steps=24", "checkpoint_every=12", "eval_every=12")
    tr = Trainer(run, log=lambda *a: None)
    res = tr.train()
    recs = _metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 25))
    first, last = np.mean([r["ce"] for r in recs[:3]]), np.mean([r["ce"] for r in recs[-3:]])
    assert last < first - 0.5, (first, last)
    assert recs[11]["eval_loss"] > res["eval_loss"]
    assert all(r["finite"] for r in recs) and res["skipped"] == 0
    # every logged term is present; the balance term sums Σ f·P (≈ 1 when even) over 2 routers (MoE + MTP)
    assert recs[-1]["mtp"] > 0 and recs[-1]["balance"] > 1.5 and len(recs[-1]["imbalance"]) == 1
    # the aux-loss-free bias moved, by multiples of γ
    assert recs[-1]["bias_absmean"][0] > 0
    # the checkpoint is the M2 format: load_checkpoint gives the trained variables, bias included
    ckpt = Path(res["checkpoint"])
    assert (ckpt / "dsv3_checkpoint.json").is_file() and (ckpt / "tokenizer.json").is_file()
    cfg, model = dsv3.load_checkpoint(ckpt)
    _, params, bias, _ = nnx.split(model, nnx.Param, RouterBias, ...)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tr.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(bias["moe_layers"]["mlp"]["router"]["bias"][...]),
                                  np.asarray(tr.state["bias"]["moe_layers"]["mlp"]["router"]["bias"][...]))
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [12, 24]


def test_nonfinite_steps_are_skipped_then_stop(make_run, tmp_path):
    """Steps 3 and 4 get a NaN loss (test hook): each update is skipped (state untouched), and the
    second in a row stops the run with a message; the last good checkpoint stays loadable."""
    run = make_run("steps=8", "checkpoint_every=1", "eval_every=100", "inject_nan_steps=3,4", "max_bad_steps=2")
    tr = Trainer(run, log=lambda *a: None)
    with pytest.raises(TrainingStopped, match=r"2 steps in a row.*last good checkpoint is .*checkpoints/3"):
        tr.train()
    recs = _metrics(tmp_path / "run")
    assert [r["finite"] for r in recs] == [True, True, False, False]
    assert [r["skipped"] for r in recs] == [0, 0, 1, 2]
    assert np.isnan(recs[2]["loss"])
    ck = tmp_path / "run" / "checkpoints"
    meta2, meta3 = read_train_state(ck / "2"), read_train_state(ck / "3")
    assert meta2["applied"] == 2 and meta3["applied"] == 2   # step 3 applied nothing
    _, m2 = dsv3.load_checkpoint(ck / "2")
    _, m3 = dsv3.load_checkpoint(ck / "3")
    for a, b in zip(jax.tree.leaves(nnx.state(m2)), jax.tree.leaves(nnx.state(m3))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not (ck / "4").exists()


def test_unwritable_checkpoint_dir_fails_before_training(make_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointDirError, match="not writable"):
        check_writable(blocker / "checkpoints", 1)
    with pytest.raises(CheckpointDirError, match="MiB free"):
        check_writable(tmp_path / "ok", 1 << 62)
    run = make_run("steps=2", out=blocker / "run")
    with pytest.raises(CheckpointDirError):
        Trainer(run, log=lambda *a: None)


def _cli(out: Path, tok: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv3_jax.cli", "train", "--config", "tiny", "--output-dir", str(out),
            "num_layers=2", "first_k_dense=1", "remat=none", "data.seq_len=32", "data.batch_size=8",
            "data.val_fraction=0.05", "train.lr=3e-3", "progress=false", "tensorboard=false",
            "eval_batches=1", "eval_every=100", f"data.tokenizer={tok}", "steps=30", "checkpoint_every=3", *extra]


def test_kill_and_resume_is_exact(tokenizer_dir, tmp_path):
    got, want, err, killed_at = kill_and_resume(lambda out: _cli(out, tokenizer_dir), tmp_path, 3, 5)
    assert killed_at >= 5
    assert "resumed from" in err
    assert sorted(got) == sorted(want) == list(range(1, 31))
    for s in want:  # bit-identical on the same CPU and config
        assert got[s]["loss"] == want[s]["loss"], (s, got[s]["loss"], want[s]["loss"])
        assert got[s]["grad_norm"] == want[s]["grad_norm"]


def test_mesh_step_matches_single_device(make_run, tmp_path):
    """`--mesh data=2,expert=4` (expert-parallel MoE, sharded state and batch) gives the single-device
    losses and the same aux-loss-free bias update from global counts. Tolerance: fp32 reductions in
    another order (1e-5 relative); the bias is compared exactly (integer counts, sign update)."""
    runs = {}
    for name, mesh in (("one", ""), ("mesh", "data=2,expert=4")):
        run = make_run("steps=2", "checkpoint_every=100", "eval_every=100",
                       f"train.mesh={mesh}", out=tmp_path / name)
        tr = Trainer(run, log=lambda *a: None)
        tr.train()
        runs[name] = (tr, _metrics(tmp_path / name))
    (t1, m1), (t8, m8) = runs["one"], runs["mesh"]
    assert t8.mesh.shape["expert"] == 4 and len(t8.state["params"]["embed"][...].sharding.device_set) == 8
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    b1 = np.asarray(t1.state["bias"]["moe_layers"]["mlp"]["router"]["bias"][...])
    b8 = np.asarray(t8.state["bias"]["moe_layers"]["mlp"]["router"]["bias"][...])
    np.testing.assert_array_equal(b8, b1)
    assert np.abs(b1).max() > 0
