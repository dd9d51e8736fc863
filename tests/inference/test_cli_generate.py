"""`dsv3 generate` end to end on a converted checkpoint."""
import json

import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.cli import main
from tests.hf_reference import write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = dsv3.load_config("tiny", ["num_layers=2", "first_k_dense=1"])
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    return model, write_checkpoint(model, tmp_path_factory.mktemp("gen") / "ckpt")


def test_generate_json_matches_python_api(checkpoint, capsys):
    model, ckpt = checkpoint
    args = ["generate", "--checkpoint", str(ckpt), "--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "6",
            "compute_dtype=float32", "--json"]
    assert main(args + ["--speculative", "mtp"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = dsv3.generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=6).tokens[0]
    assert out["token_ids"] == want and 0 <= out["acceptance_rate"] <= 1
    assert main(args[:-1]) == 0  # streaming ids to stdout
    assert capsys.readouterr().out.split() == [str(t) for t in want]
    assert main(args + ["--cache-dtype", "float32"]) == 0  # the exact cache: the Python API's fp32-cache tokens
    assert json.loads(capsys.readouterr().out)["token_ids"] == \
        dsv3.generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=6, cache_dtype="float32").tokens[0]
    assert main(args + ["--mesh", "expert=8"]) == 0  # sharded: same tokens
    assert json.loads(capsys.readouterr().out)["token_ids"] == want


def test_generate_bad_input(checkpoint, capsys, tmp_path):
    _, ckpt = checkpoint
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
