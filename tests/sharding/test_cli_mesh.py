"""`--mesh` on the CLI: `dsv3 info` per-device bytes, and `dsv3 score` on 8 fake devices giving the
same logits as one device."""
import json

import numpy as np
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax.cli import main
from tests.hf_reference import write_checkpoint


def test_info_mesh_per_device_bytes(capsys):
    assert main(["info", "--config", "deepseek_v3_671b", "--mesh", "expert=64,fsdp=4", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["mesh"]
    assert m["devices"] == 256
    # Routed experts split 64 (expert) × 4 (fsdp) ways, everything else ZeRO-3 over fsdp × expert:
    # within 3% of a perfect 256-way split of the fp32 weights (main model + MTP, 682.6B).
    ideal = (671_026_419_200 + 11_610_068_224) * 4 / 256
    assert ideal <= m["param_bytes_per_device"] < 1.03 * ideal
    # two fp32 AdamW moments per trainable parameter (the router bias has none)
    assert 0.999 * 2 * m["param_bytes_per_device"] < m["optimizer_bytes_per_device"] < 2 * m["param_bytes_per_device"]
    # the release kept in FP8 (convert --keep-fp8): ~1 byte per linear weight, no optimizer state
    assert main(["info", "--config", "deepseek_v3_671b", "--mesh", "expert=32", "--json", "fp8_weights=true",
                 "param_dtype=bfloat16"]) == 0
    m8 = json.loads(capsys.readouterr().out)["mesh"]
    assert 640e9 / 32 < m8["param_bytes_per_device"] < 700e9 / 32 and m8["optimizer_bytes_per_device"] == 0
    assert main(["info", "--config", "deepseek_v3_671b", "--mesh", "expert=3"]) == 2
    assert "do not divide" in capsys.readouterr().err


def test_score_on_mesh_equals_single_device(tmp_path, capsys):
    cfg = dsv3.load_config("tiny", ["num_layers=2", "first_k_dense=1"])
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    write_checkpoint(model, tmp_path / "ckpt")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 12)).astype(np.int32)
    np.save(tmp_path / "ids.npy", tokens)
    base = ["score", "--checkpoint", str(tmp_path / "ckpt"), "--token-ids", str(tmp_path / "ids.npy"),
            "compute_dtype=float32"]  # HF configs carry no compute dtype; bf16 would hide differences
    assert main(base + ["--save-logits", str(tmp_path / "one.npy")]) == 0
    assert main(base + ["--save-logits", str(tmp_path / "mesh.npy"), "--mesh", "data=2,expert=4",
                        "--ep-strategy", "ragged_a2a"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "mesh.npy"), np.load(tmp_path / "one.npy"), atol=1e-5)
    capsys.readouterr()
    assert main(base + ["--mesh", "data=2,expert=3"]) == 2
    assert "6 devices but 8 are available" in capsys.readouterr().err
