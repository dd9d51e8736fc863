"""`dsv3 info` figures (docs/architecture.md §1, exact) and the documented errors for bad configs and token ids."""
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.cli import main


def test_info_671b_matches_spec(capsys):
    assert main(["info", "--config", "deepseek_v3_671b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] == 671_026_419_200
    assert info["params_mtp"] == 11_610_068_224
    assert info["params_active"] == 37_552_297_472
    assert info["kv_cache_bytes_per_token"] == 70_272
    assert info["kv_cache_bytes_per_token_per_head_cache"] == 4_997_120
    # 6·(active − embedding) + causal attention at seq 4096 (see dsv3_jax/info.py)
    expected = 6 * (37_552_297_472 - 129280 * 7168) + 3 * 2 * 128 * (192 + 128) * 2048 * 61
    assert info["train_flops_per_token"] == expected


def test_info_v2_configs_are_expressible(capsys):
    assert main(["info", "--config", "deepseek_v2_236b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["params_total"] / 1e9) == 236 and round(info["params_active"] / 1e9) == 21


def test_info_text_and_console_script():
    out = subprocess.run([sys.executable, "-m", "dsv3_jax.cli", "info", "--config", "tiny"],
                         capture_output=True, text=True, check=True).stdout
    assert "params active / token" in out


def test_info_bad_config_exit_code(capsys):
    assert main(["info", "--config", "tiny", "num_experts_per_tok=99"]) == 2
    err = capsys.readouterr().err
    assert "num_experts_per_tok=99" in err and "fix" in err


def test_out_of_range_token_is_a_clear_error():
    cfg = dsv3.load_config("tiny")
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    tokens = np.zeros((2, 8), np.int32)
    tokens[1, 5] = cfg.vocab_size
    with pytest.raises(dsv3.TokenRangeError, match=r"id 512 at index \(1, 5\), outside the vocabulary \[0, 512\)"):
        model(jnp.asarray(tokens))
    with pytest.raises(dsv3.TokenRangeError, match="id -1"):
        model(np.full((1, 3), -1))
    with pytest.raises(dsv3.TokenRangeError, match="integer token ids"):
        model(np.zeros((1, 3), np.float32))
