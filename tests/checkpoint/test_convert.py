"""HF ⇄ Orbax conversion, ``load_checkpoint`` and ``dsv3 score``, end to end on tiny models.

Logit tolerance 1e-4 (fp32 both sides, differences from summation order only, as in
tests/model/test_parity.py). FP8 checks compare against transformers run on the *dequantised*
weights, so quantisation error is not part of the tolerance.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import dsv3_jax as dsv3
from dsv3_jax import cli
from dsv3_jax.checkpoint import convert, fp8, mapping, orbax_io
from dsv3_jax.checkpoint.safetensors_io import SafetensorsFile, load_file, save_file
from tests.hf_reference import hf_logits, hf_model, hf_state
from tests.model.test_parity import BASE

TOL = 1e-4
CFG = dsv3.load_config({**BASE, "num_mtp_layers": 1})
VOCAB_WORDS = [f"w{i}" for i in range(120)]


# ---- fixtures --------------------------------------------------------------------------------
def mtp_tensors(cfg, state, seed=7) -> dict[str, np.ndarray]:
    """Random MTP layer ``model.layers.{L}.*`` (enorm, hnorm, eh_proj, shared_head.norm, a full MoE
    block) plus the release's copies of the embedding and head."""
    rng = np.random.RandomState(seed)
    shapes = mapping.param_shapes(cfg)
    out = {}
    for p in mapping.pieces(cfg):
        if p.path[0] != "mtp":
            continue
        shape = mapping.hf_shape(p, shapes[p.path][len(p.index):])
        base = 1.0 if "norm" in p.hf_name else 0.0
        out[p.hf_name] = (base + 0.08 * rng.randn(*shape)).astype(np.float32)
    L = cfg.num_layers
    out[f"model.layers.{L}.embed_tokens.weight"] = state["model.embed_tokens.weight"].copy()
    out[f"model.layers.{L}.shared_head.head.weight"] = state["lm_head.weight"].copy()
    return out


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(VOCAB_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def dir_digest(path: Path) -> dict:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """save_pretrained of a random tiny HF model, plus MTP tensors and a tokenizer.json."""
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model = hf_model(CFG, seed=1)
    model.save_pretrained(d)
    state = hf_state(model)
    files = list(d.glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(files[0])
    mtp = mtp_tensors(CFG, state)
    tensors.update(mtp)
    save_file(tensors, files[0], metadata={"format": "pt"})
    write_tokenizer(d)
    return d, model, {**state, **mtp}


@pytest.fixture(scope="module")
def orb(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("orb") / "ckpt"
    assert cli.main(["convert", "hf-to-orbax", str(src[0]), str(dst), "--dtype", "float32", "--quiet"]) == 0
    return dst


def tokens(batch=2, seq=40, seed=0):
    return np.random.RandomState(seed).randint(0, CFG.vocab_size, (batch, seq)).astype(np.int32)


def score_logits(ckpt: Path, toks: np.ndarray, tmp: Path, *extra) -> np.ndarray:
    np.save(tmp / "ids.npy", toks)
    rc = cli.main(["score", "--checkpoint", str(ckpt), "--token-ids", str(tmp / "ids.npy"),
                   "--save-logits", str(tmp / "logits.npy"), "--json", *extra, "compute_dtype=float32"])
    assert rc == 0
    return np.load(tmp / "logits.npy")


# ---- HF → Orbax → score ----------------------------------------------------------------------
def test_score_equals_transformers(src, orb, tmp_path, capsys):
    toks = tokens()
    got = score_logits(orb, toks, tmp_path, "--save-mtp-logits", str(tmp_path / "mtp.npy"))
    want = hf_logits(src[1], toks)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= TOL
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # NLL from the saved logits
    logp = got[:, :-1] - np.log(np.exp(got[:, :-1]).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
    assert np.allclose(out["nll"], nll, atol=1e-4)
    assert out["perplexity"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)
    mtp = np.load(tmp_path / "mtp.npy")
    assert mtp.shape == (1,) + want.shape and np.isfinite(mtp).all()
    # the checkpoint is self-describing: config and tokenizer travel with it
    meta = json.loads((orb / orbax_io.MARKER).read_text())
    assert meta["config"]["num_layers"] == CFG.num_layers and meta["config"]["num_mtp_layers"] == 1
    assert (orb / "tokenizer.json").is_file()


def test_mtp_weights_land_in_mtp_module(src, orb):
    _, _, state = src
    cfg, model = dsv3.load_checkpoint(orb)
    ours = mapping.model_params(model)
    L = CFG.num_layers
    np.testing.assert_array_equal(ours[("mtp", 0, "eh_proj")], state[f"model.layers.{L}.eh_proj.weight"].T)
    np.testing.assert_array_equal(ours[("mtp", 0, "enorm", "scale")], state[f"model.layers.{L}.enorm.weight"])
    np.testing.assert_array_equal(ours[("mtp", 0, "hnorm", "scale")], state[f"model.layers.{L}.hnorm.weight"])
    np.testing.assert_array_equal(ours[("mtp", 0, "norm", "scale")], state[f"model.layers.{L}.shared_head.norm.weight"])
    np.testing.assert_array_equal(ours[("mtp", 0, "block", "mlp", "experts", "gate")][0, 3],
                                  state[f"model.layers.{L}.mlp.experts.3.gate_proj.weight"].T)
    np.testing.assert_array_equal(ours[("mtp", 0, "block", "mlp", "router", "bias")][0],
                                  state[f"model.layers.{L}.mlp.gate.e_score_correction_bias"])
    want = mapping.hf_to_params(state, CFG, names=set(state))
    for path, w in want.items():
        np.testing.assert_array_equal(ours[path], w, err_msg=str(path))


def test_text_uses_checkpoint_tokenizer(orb, capsys):
    rc = cli.main(["score", "--checkpoint", str(orb), "--text", "w1 w2 w3 w99 w5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seq"] == 5 and len(out["nll"][0]) == 4


def test_torch_state_dict_source(src, orb, tmp_path):
    """A PyTorch .bin (transformers-5 in-memory names: experts fused) converts to the same weights."""
    import torch
    d = tmp_path / "pt"
    d.mkdir()
    (d / "config.json").write_text((src[0] / "config.json").read_text())
    sd = {k: v for k, v in src[1].state_dict().items()}
    torch.save(sd, d / "pytorch_model.bin")
    dst = tmp_path / "from_pt"
    convert.hf_to_orbax(d, dst, dtype="float32", progress=False)
    a = orbax_io.read_params(dst)
    b = orbax_io.read_params(orb)
    assert not any(k[0] == "mtp" for k in a)  # no MTP tensors in the .bin → converted without MTP
    for k, v in a.items():
        np.testing.assert_array_equal(v, b[k], err_msg=str(k))


# ---- FP8 release format ----------------------------------------------------------------------
def test_dequantize_partial_blocks():
    rng = np.random.RandomState(0)
    w = rng.randn(300, 160).astype(np.float32)
    q, s = fp8.quantize(w)
    assert q.dtype == fp8.E4M3 and s.shape == (3, 2) and s.dtype == np.float32
    naive = q.astype(np.float32) * np.array([[s[i // 128, j // 128] for j in range(160)] for i in range(300)])
    np.testing.assert_array_equal(fp8.dequantize(q, s), naive)
    assert np.abs(fp8.dequantize(q, s) - w).max() <= np.abs(w).max() / 16  # e4m3: 3 mantissa bits


def quantize_like_release(state: dict) -> tuple[dict, dict]:
    """(release FP8 tensors with ``weight_scale_inv``, the same dequantised) for an HF state."""
    quant, deq = {}, {}
    for name, w in state.items():
        if convert._fp8_eligible(name) and w.ndim == 2:
            q, s = fp8.quantize(w)
            quant[name], quant[name + "_scale_inv"] = q, s
            deq[name] = fp8.dequantize(q, s)
        else:
            quant[name] = deq[name] = w.astype(np.float32)
    return quant, deq


def hf_from_tensors(cfg, tensors: dict, directory: Path):
    """transformers' model loaded from ``tensors`` (the reference on given weights)."""
    from transformers import DeepseekV3ForCausalLM
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg.to_hf()))
    return DeepseekV3ForCausalLM.from_pretrained(directory, dtype="float32", attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory):
    """Release-style FP8 (128×128 blocks, e4m3, weight_scale_inv), hidden 160 so blocks are partial,
    sharded with an index; plus transformers on the dequantised weights and the quantised tensors."""
    tmp_path = tmp_path_factory.mktemp("fp8src")
    cfg = dsv3.load_config({**BASE, "hidden_size": 160, "moe_intermediate_size": 136})
    quant, deq = quantize_like_release(hf_state(hf_model(cfg, seed=3)))
    assert any(v.dtype == fp8.E4M3 for v in quant.values())
    src = tmp_path / "fp8"
    src.mkdir()
    names = sorted(quant)
    half = len(names) // 2
    save_file({n: quant[n] for n in names[:half]}, src / "model-00001-of-00002.safetensors")
    save_file({n: quant[n] for n in names[half:]}, src / "model-00002-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}}))
    (src / "config.json").write_text(json.dumps(cfg.to_hf()))
    return src, hf_from_tensors(cfg, deq, tmp_path / "deq"), quant, deq


def test_fp8_checkpoint_equals_transformers_on_dequantised_weights(fp8_src, tmp_path):
    src, ref, _, _ = fp8_src
    dst = tmp_path / "orb"
    convert.hf_to_orbax(src, dst, dtype="float32", progress=False)
    toks = tokens(seed=4)
    got = score_logits(dst, toks, tmp_path)
    assert np.abs(got - hf_logits(ref, toks)).max() <= TOL


def test_keep_fp8_stores_release_bits_and_serves(fp8_src, tmp_path):
    """--keep-fp8: e4m3 + scales copied bit for bit; the model dequantises them exactly (logits equal
    transformers on the dequantised weights), runs them through the FP8 GEMM with quant=fp8, and
    orbax-to-hf --fp8 gives the source tensors back unchanged."""
    src, ref, quant, deq = fp8_src
    dst = tmp_path / "orb8"
    assert cli.main(["convert", "hf-to-orbax", str(src), str(dst), "--keep-fp8", "--dtype", "float32",
                     "--quiet"]) == 0
    cfg = orbax_io.checkpoint_config(dst)
    assert cfg.fp8_weights
    stored = orbax_io.read_params(dst)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    w = stored[("moe_layers", "0", "mlp", "experts", "down")][3]
    s = stored[("moe_layers", "0", "mlp", "experts", "down_scale")][3]
    assert w.dtype == fp8.E4M3 and w.tobytes() == np.ascontiguousarray(quant[name].T).tobytes()
    np.testing.assert_array_equal(s, quant[name + "_scale_inv"].T)
    q = stored[("moe_layers", "0", "attn", "q_b_proj", "kernel")]
    assert q.dtype == fp8.E4M3 and q.shape == (cfg.q_lora_rank, cfg.num_heads, cfg.qk_head_dim)
    for k in (("embed",), ("lm_head",), ("moe_layers", "0", "mlp", "router", "kernel")):
        assert stored[k].dtype == np.float32, k  # docs/architecture.md §6: kept in high precision
    f32_bytes = sum(v.nbytes for v in orbax_io.read_params(dst).values() if v.dtype != fp8.E4M3)
    assert sum(v.nbytes for v in stored.values()) < f32_bytes + sum(
        v.size for v in stored.values() if v.dtype == fp8.E4M3) + 1

    toks = tokens(seed=4)
    want = hf_logits(ref, toks)
    assert np.abs(score_logits(dst, toks, tmp_path) - want).max() <= TOL
    # restored into shards on an 8-device mesh (batch 2 over expert), experts (and their scales) expert-parallel
    assert np.abs(score_logits(dst, toks, tmp_path, "--mesh", "expert=2,tensor=4") - want).max() <= TOL
    # quant=fp8 on the stored FP8 weights (no re-quantisation) ≈ quant=fp8 on the dequantised float
    # checkpoint: re-quantising release blocks (amax at 448) gives back the same bits up to a 1-ulp
    # scale rounding, while FP8 activations move the logits by ~1 (random tiny model)
    got8 = score_logits(dst, toks, tmp_path, "quant=fp8")
    dst32 = tmp_path / "orb32"
    convert.hf_to_orbax(src, dst32, dtype="float32", progress=False)
    got8_f = score_logits(dst32, toks, tmp_path, "quant=fp8")
    assert np.abs(got8 - want).max() > 0.1  # activations really went through e4m3
    assert np.abs(got8 - got8_f).max() <= 1e-2 and np.median(np.abs(got8 - got8_f)) <= 1e-5

    hf8, hf32 = tmp_path / "hf8", tmp_path / "hf32"
    assert cli.main(["convert", "orbax-to-hf", str(dst), str(hf8), "--fp8", "--quiet"]) == 0
    back = {}
    for f in hf8.glob("*.safetensors"):
        back.update(load_file(f))
    assert back.keys() == quant.keys()
    for k, v in quant.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    convert.orbax_to_hf(dst, hf32, progress=False)  # without --fp8: dequantised floats
    out = {}
    for f in hf32.glob("*.safetensors"):
        out.update(load_file(f))
    np.testing.assert_array_equal(out[name], deq[name])


def test_keep_fp8_quantises_float_sources_and_is_inference_only(src, tmp_path):
    dst = tmp_path / "q"
    convert.hf_to_orbax(src[0], dst, dtype="float32", keep_fp8=True, progress=False)
    # float weights are quantised exactly like the release: equal to transformers on those weights
    main = {k: v for k, v in src[2].items() if not k.startswith(f"model.layers.{CFG.num_layers}.")}
    ref = hf_from_tensors(CFG, quantize_like_release(main)[1], tmp_path / "deq")
    toks = tokens(seed=6)
    got = score_logits(dst, toks, tmp_path)
    assert np.abs(got - hf_logits(ref, toks)).max() <= TOL
    assert np.abs(got - hf_logits(src[1], toks)).max() > 10 * TOL  # and they did change
    from dsv3_jax.config import ConfigError
    from dsv3_jax.train.config import load_run_config
    from dsv3_jax.train.trainer import Trainer
    run = load_run_config("demo", ["model.fp8_weights=true", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="fp8_weights"):
        Trainer(run)


# ---- Orbax → HF → Orbax, sharded restore -------------------------------------------------------
def test_roundtrip_bit_identical_and_transformers_loads_export(src, orb, tmp_path):
    from transformers import DeepseekV3ForCausalLM
    hf_dir = tmp_path / "hf"
    assert cli.main(["convert", "orbax-to-hf", str(orb), str(hf_dir), "--quiet", "--max-shard-size", "0.0005"]) == 0
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert f"model.layers.{CFG.num_layers}.eh_proj.weight" in index["weight_map"]
    back = tmp_path / "back"
    assert cli.main(["convert", "hf-to-orbax", str(hf_dir), str(back), "--dtype", "float32", "--quiet"]) == 0
    a, b = orbax_io.read_params(orb), orbax_io.read_params(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    # transformers loads the export (ignoring the MTP layer) and gives the same logits
    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype="float32", attn_implementation="eager").eval()
    toks = tokens(seed=5)
    assert np.abs(hf_logits(model, toks) - hf_logits(src[1], toks)).max() <= TOL


def test_v2_lite_flags_convert_score_and_export_as_deepseek_v2(tmp_path):
    """A transformers ``DeepseekV2ForCausalLM`` (V2-Lite's flags: softmax gates, greedy top-k, no q-LoRA)
    saved with save_pretrained converts and scores like transformers; the export says ``deepseek_v2``, so
    ``AutoModelForCausalLM`` rebuilds the same V2 model (its V3 class would gate with sigmoid)."""
    from transformers import AutoModelForCausalLM
    from tests.model.test_parity import V2
    cfg = dsv3.load_config({**BASE, **V2, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "q_lora_rank": None})
    ref = hf_model(cfg, seed=6)
    ref.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", "hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "orb"), "--dtype", "float32",
                     "--quiet"]) == 0
    stored, model = dsv3.load_checkpoint(tmp_path / "orb")
    assert (stored.scoring_func, stored.topk_method, stored.norm_topk_prob) == ("softmax", "greedy", False)
    toks = tokens(seed=6)
    want = hf_logits(ref, toks)
    assert np.abs(np.asarray(model(toks, mtp=False).logits) - want).max() <= TOL
    assert cli.main(["convert", "orbax-to-hf", str(tmp_path / "orb"), str(tmp_path / "out"), "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "deepseek_v2"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="float32", attn_implementation="eager").eval()
    assert type(back).__name__ == "DeepseekV2ForCausalLM"
    assert np.abs(hf_logits(back, toks) - want).max() <= TOL


def test_roundtrip_bf16_and_fp8_export(src, tmp_path):
    bf = tmp_path / "bf16"
    convert.hf_to_orbax(src[0], bf, dtype="bfloat16", progress=False)
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    convert.orbax_to_hf(bf, hf_dir, progress=False)
    with SafetensorsFile(next(hf_dir.glob("*.safetensors"))) as f:
        assert f.info("model.embed_tokens.weight")[0] == "BF16"
    convert.hf_to_orbax(hf_dir, back, dtype="bfloat16", progress=False)
    a, b = orbax_io.read_params(bf), orbax_io.read_params(back)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    # FP8 export: release format, and it converts back within e4m3 precision
    f8 = tmp_path / "fp8"
    convert.orbax_to_hf(bf, f8, fp8_weights=True, progress=False)
    cfg_json = json.loads((f8 / "config.json").read_text())
    assert cfg_json["quantization_config"]["weight_block_size"] == [128, 128]
    with SafetensorsFile(next(f8.glob("*.safetensors"))) as f:
        assert f.info("model.layers.1.mlp.experts.0.up_proj.weight")[0] == "F8_E4M3"
        assert f.info("model.layers.1.mlp.experts.0.up_proj.weight_scale_inv") == ("F32", (1, 1))
        for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                     "model.layers.0.input_layernorm.weight"):
            assert f.info(name)[0] == "BF16", name
        assert f.info("model.layers.1.mlp.gate.e_score_correction_bias")[0] == "F32"
    back8 = tmp_path / "back8"
    convert.hf_to_orbax(f8, back8, dtype="float32", progress=False)
    c = orbax_io.read_params(back8)
    k = ("moe_layers", "0", "mlp", "experts", "up")
    ref = a[k].astype(np.float32)
    assert np.abs(c[k] - ref).max() <= np.abs(ref).max() / 16


def test_restore_onto_8_device_mesh(orb):
    import sharding
    mesh = sharding.make_mesh("fsdp=8")  # restored with the project's logical-axis rules
    _, plain = dsv3.load_checkpoint(orb, runtime=["compute_dtype=float32"])
    _, sharded = dsv3.load_checkpoint(orb, mesh=mesh, runtime=["compute_dtype=float32"])
    emb = sharded.embed[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")  # 'embed' → fsdp; 48 % 8 == 0
    assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape == (300, 6)
    experts = sharded.moe_layers.mlp.experts.gate[...]
    assert experts.sharding.spec[0] is None and len({s.device for s in experts.addressable_shards}) == 8
    # the rules passed are the ones used
    _, other = dsv3.load_checkpoint(orb, mesh=mesh, rules=sharding.DEFAULT_RULES.with_(embed=None),
                                    runtime=["compute_dtype=float32"])
    assert other.embed[...].sharding.spec == jax.sharding.PartitionSpec(None, None)
    toks = tokens(batch=8, seed=6)  # built for the mesh: expert-parallel, the batch split over fsdp=8
    from dsv3_jax.inference.scoring import score
    a, b = score(plain, toks), score(sharded, toks)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)


# ---- bad input: clear errors, nothing lost --------------------------------------------------
def _copy(src_dir: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src_dir, dst)
    return dst


def _convert_fails(src_dir: Path, tmp_path: Path, capsys, *needles: str, extra=()):
    before = dir_digest(src_dir)
    dst = tmp_path / "out"
    rc = cli.main(["convert", "hf-to-orbax", str(src_dir), str(dst), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dirs left
    assert dir_digest(src_dir) == before
    return err


def _sharded_copy(src, tmp_path) -> Path:
    """The source split into two shards with an index."""
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((src[0] / "config.json").read_text())
    t = load_file(src[0] / "model.safetensors")
    names = sorted(t)
    save_file({n: t[n] for n in names[::2]}, d / "a.safetensors")
    save_file({n: t[n] for n in names[1::2]}, d / "b.safetensors")
    wm = {n: ("a" if i % 2 == 0 else "b") + ".safetensors" for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return d


def test_missing_shard(src, tmp_path, capsys):
    d = _sharded_copy(src, tmp_path)
    os.unlink(d / "b.safetensors")
    _convert_fails(d, tmp_path, capsys, "b.safetensors", "missing")


def test_truncated_shard(src, tmp_path, capsys):
    d = _sharded_copy(src, tmp_path)
    data = (d / "b.safetensors").read_bytes()
    (d / "b.safetensors").write_bytes(data[: len(data) - 1000])
    _convert_fails(d, tmp_path, capsys, "b.safetensors", "truncated")


def _rewrite_header(path: Path, edit):
    import struct
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_header_offsets_outside_file(src, tmp_path, capsys):
    d = _sharded_copy(src, tmp_path)

    def edit(h):
        k = next(k for k in h if k != "__metadata__")
        b, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b + 10**9, e + 10**9]
    _rewrite_header(d / "a.safetensors", edit)
    _convert_fails(d, tmp_path, capsys, "a.safetensors")


def test_unknown_dtype(src, tmp_path, capsys):
    d = _sharded_copy(src, tmp_path)

    def edit(h):
        k = next(k for k in h if k != "__metadata__")
        h[k]["dtype"] = "F4_WEIRD"
    _rewrite_header(d / "a.safetensors", edit)
    _convert_fails(d, tmp_path, capsys, "F4_WEIRD")


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_tensor_name_and_shape_errors(src, tmp_path, capsys, case):
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text((src[0] / "config.json").read_text())
    t = load_file(src[0] / "model.safetensors")
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    if case == "missing":
        del t[name]
        needles = ("missing", name)
    elif case == "unexpected":
        t["model.layers.1.mlp.experts.99.up_proj.weight"] = t["model.layers.1.mlp.experts.0.up_proj.weight"]
        needles = ("unexpected", "experts.99.up_proj")
    else:
        t[name] = t[name][:, :-1].copy()
        needles = (name, "shape")
    save_file(t, d / "model.safetensors")
    _convert_fails(d, tmp_path, capsys, *needles)


def test_config_errors(src, tmp_path, capsys):
    d = _copy(src[0], tmp_path / "src")
    hf = json.loads((d / "config.json").read_text())
    del hf["kv_lora_rank"]
    (d / "config.json").write_text(json.dumps(hf))
    _convert_fails(d, tmp_path, capsys, "kv_lora_rank")
    os.unlink(d / "config.json")
    _convert_fails(d, tmp_path, capsys, "config.json")


def test_fp8_weight_without_scales(src, tmp_path, capsys):
    d = tmp_path / "src"
    d.mkdir()
    (d / "config.json").write_text((src[0] / "config.json").read_text())
    t = load_file(src[0] / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    t[name] = t[name].astype(fp8.E4M3)
    save_file(t, d / "model.safetensors")
    _convert_fails(d, tmp_path, capsys, name, "weight_scale_inv")


def test_existing_destination_needs_overwrite(src, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc = cli.main(["convert", "hf-to-orbax", str(src[0]), str(dst), "--quiet", "--no-mtp"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert cli.main(["convert", "hf-to-orbax", str(src[0]), str(dst), "--quiet", "--no-mtp", "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists()
    cfg, model = dsv3.load_checkpoint(dst)
    assert cfg.num_mtp_layers == 0 and len(model.mtp) == 0 and cfg.param_dtype == "bfloat16"


def test_interrupted_conversion_leaves_nothing(src, tmp_path, monkeypatch):
    ocp = orbax_io.ocp()
    real = ocp.partial.save_async
    calls = []

    def flaky(path, tree, **kw):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # e.g. Ctrl-C midway
        return real(path, tree, **kw)

    monkeypatch.setattr(ocp.partial, "save_async", flaky)
    before = dir_digest(src[0])
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert.hf_to_orbax(src[0], dst, progress=False, group_bytes=1 << 16)
    assert len(calls) == 4 and not dst.exists() and list(tmp_path.iterdir()) == []
    assert dir_digest(src[0]) == before
    with pytest.raises(Exception, match="not a dsv3 checkpoint"):
        dsv3.load_checkpoint(dst)


def test_score_errors_exit_2(orb, tmp_path, capsys):
    bad = tokens()
    bad[1, 7] = CFG.vocab_size + 5
    np.save(tmp_path / "bad.npy", bad)
    rc = cli.main(["score", "--checkpoint", str(orb), "--token-ids", str(tmp_path / "bad.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and f"id {CFG.vocab_size + 5} at index (1, 7)" in err and "Traceback" not in err
    no_tok = tmp_path / "no_tok"
    import shutil
    shutil.copytree(orb, no_tok)
    os.unlink(no_tok / "tokenizer.json")
    rc = cli.main(["score", "--checkpoint", str(no_tok), "--text", "w1 w2"])
    assert rc == 2 and "tokenizer.json" in capsys.readouterr().err
    rc = cli.main(["score", "--checkpoint", str(tmp_path / "nope"), "--token-ids", str(tmp_path / "bad.npy")])
    assert rc == 2 and "not a dsv3 checkpoint" in capsys.readouterr().err


# ---- bounded memory --------------------------------------------------------------------------
def test_streaming_conversion_memory_is_bounded(tmp_path):
    """Small version of benchmarks/convert.py (~60 MB FP8 source, 16 layers, ~80 MB bf16 output):
    peak RSS growth during conversion stays well below the model size."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "convert.py"), "--small", "--phases", "convert",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, check=True, cwd=root)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["layers"] >= 16 and res["source_mb"] > 40
    # ~50 MB of the growth is fixed (Orbax/tensorstore threads and buffers); holding the model would be >= output_mb
    assert res["convert_rss_growth_mb"] < 0.75 * res["output_mb"], res
