"""The trainer on a ``stage`` mesh (docs/design.md §Pipeline), end to end: ``train.mesh=stage=2,data=4``
runs the pipelined step (an uneven stage split) with evaluation, the host EMA and a checkpoint, and gives the
single-device run's losses; its checkpoint is the unsplit model's, so ``load_checkpoint`` reads it without any mesh."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.model.layers import RouterBias
from dsv3_jax.train import Trainer


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_trainer_with_stages_matches_one_device(make_run, tmp_path):
    """Tolerance: fp32 sums in another order — losses 1e-5 relative; parameters after 2 AdamW steps: 99.9%
    of each array within 3e-5 (1% of one step's lr 3e-3), all within one step's lr (Adam's m/sqrt(v) turns
    the rounding of a near-zero gradient into a step of up to lr either way); the router bias exactly
    (integer counts, sign update)."""
    runs = {}
    for name, mesh in (("one", ""), ("staged", "stage=2,data=4")):
        # 1 dense + 3 MoE layers: 2 stages split them unevenly ([2, 1] by cost, stored padded), so the run
        # also goes through the staged <-> model layout conversions (docs/design.md §Pipeline)
        run = make_run("num_layers=4", "steps=2", "checkpoint_every=2", "eval_every=2", "train.ema_every=1",
                       "pipeline.schedule=1f1b", f"train.mesh={mesh}", out=tmp_path / name)
        tr = Trainer(run, log=lambda *a: None)
        res = tr.train()
        runs[name] = (tr, res, _metrics(tmp_path / name))
    (t1, r1, m1), (ts, rs, ms) = runs["one"], runs["staged"]
    assert ts.mesh.shape["stage"] == 2 and "activations" in ms[-1]
    assert ts.prog.staged and ts.run.pipeline.layers_per_stage == (2, 1)
    assert [r["step"] for r in ms] == [1, 2]
    for a, b in zip(m1, ms):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(rs["eval_loss"], r1["eval_loss"], rtol=1e-5)
    # the staged checkpoint holds the unsplit model: read without a mesh, it equals the one-device run
    _, model = dsv3.load_checkpoint(Path(rs["checkpoint"]))
    _, params, bias, _ = nnx.split(model, nnx.Param, RouterBias, ...)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(t1.state["params"])):
        assert a.shape == b.shape
        diff = np.abs(np.asarray(a) - np.asarray(b))
        assert diff.max() <= 3e-3 and np.mean(diff <= 3e-5) >= 0.999, (diff.max(), np.mean(diff <= 3e-5))
    np.testing.assert_array_equal(np.asarray(bias["moe_layers"]["mlp"]["router"]["bias"][...]),
                                  np.asarray(t1.state["bias"]["moe_layers"]["mlp"]["router"]["bias"][...]))
    assert (Path(rs["checkpoint"]) / "ema").exists()
