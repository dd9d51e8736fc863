"""Bad input to the converter, checkpoints and resume (M16 part B): every case is refused with exit
code 2 (or the documented exception), one line naming the input and the fix, no traceback, and the
source (and any existing destination) byte-for-byte unchanged.

The sources are synthetic tiny HF directories written with ``safetensors_io`` (no transformers), so
the whole file runs in seconds: failing cases stop before any write.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import dsv3_jax as dsv3
from dsv3_jax import cli
from dsv3_jax.checkpoint import convert, fp8, mapping, orbax_io
from dsv3_jax.checkpoint.safetensors_io import load_file, save_file
from dsv3_jax.errors import CheckpointError, ConfigError
from dsv3_jax.train import load_run_config
from dsv3_jax.train.trainer import check_resume, config_changes

CFG = dsv3.load_config({
    "name": "bad", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
    "first_k_dense": 1, "num_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "moe_intermediate_size": 16, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 128, "num_mtp_layers": 0})
W = "model.layers.1.self_attn.o_proj.weight"        # a linear weight (FP8 in the FP8 source)
FUSED = "model.layers.1.mlp.experts.gate_up_proj"
HAS_TORCH = importlib.util.find_spec("torch") is not None


# ---- synthetic sources ---------------------------------------------------------------------------
def hf_tensors(fp8_linears: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    shapes = mapping.param_shapes(CFG)
    out = {}
    for p in mapping.pieces(CFG):
        shape = mapping.hf_shape(p, shapes[p.path][len(p.index):])
        w = (rng.randn(*shape) * 0.05 + (1.0 if "norm" in p.hf_name else 0.0)).astype(np.float32)
        if fp8_linears and convert._fp8_eligible(p.hf_name) and w.ndim == 2:
            out[p.hf_name], out[p.hf_name + "_scale_inv"] = fp8.quantize(w)
        else:
            out[p.hf_name] = w
    return out


def write_src(d: Path, tensors: dict, config: dict | None = None) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(CFG.to_hf() if config is None else config))
    return d


def sharded(d: Path, tensors: dict) -> Path:
    """Two shards + model.safetensors.index.json."""
    d.mkdir(parents=True)
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[::2]}, d / "a.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, d / "b.safetensors")
    wm = {n: ("a" if i % 2 == 0 else "b") + ".safetensors" for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (d / "config.json").write_text(json.dumps(CFG.to_hf()))
    return d


def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def digest(*paths: Path) -> dict:
    """sha256 of every file under ``paths`` (symlinks as their targets' names)."""
    out = {}
    for root in paths:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        files = [root] if not root.is_dir() else sorted(root.rglob("*"))
        for f in files:
            if f.is_symlink():
                out[str(f)] = "->" + os.readlink(f)
            elif f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A float source, an FP8 source and an Orbax checkpoint converted from the float one."""
    root = tmp_path_factory.mktemp("bad_input")
    t = hf_tensors()
    src = write_src(root / "src", t)
    src8 = write_src(root / "src8", hf_tensors(fp8_linears=True))
    ckpt = root / "ckpt"
    convert.hf_to_orbax(src, ckpt, dtype="float32", progress=False)
    return {"src": src, "src8": src8, "ckpt": ckpt, "tensors": t}


@pytest.fixture
def work(base, tmp_path, monkeypatch):
    """A fresh working directory (the cwd) with copies ``src``, ``src8``, ``ckpt`` to break."""
    for k in ("src", "src8", "ckpt"):
        shutil.copytree(base[k], tmp_path / k)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- the table -----------------------------------------------------------------------------------
# Each setup edits the copies in ``w`` (the cwd) and returns (argv after `dsv3 convert`, needles, paths
# that must be byte-for-byte unchanged). Paths in argv are relative, as a user types them.
def _src_is_dst(w):
    return ["hf-to-orbax", "src", "src", "--overwrite"], ["is SRC", "src"], ["src"]


def _dst_inside_src(w):
    return ["hf-to-orbax", "src", "src/out", "--overwrite"], ["inside SRC"], ["src"]


def _dst_contains_src(w):
    return ["hf-to-orbax", "src", ".", "--overwrite"], ["contains SRC"], ["src", "src8", "ckpt"]


def _dst_symlink_to_src(w):
    os.symlink(w / "src", w / "link")
    return ["hf-to-orbax", "src", "link", "--overwrite"], ["is SRC"], ["src", "link"]


def _dst_dotdot_is_src(w):
    (w / "sub").mkdir()
    return ["hf-to-orbax", "src", "sub/../src", "--overwrite"], ["is SRC"], ["src"]


def _file_src_dst_is_its_dir(w):
    return ["hf-to-orbax", "src/model.safetensors", "src", "--overwrite"], ["contains SRC"], ["src"]


def _export_to_itself(w):
    return ["orbax-to-hf", "ckpt", "ckpt", "--overwrite"], ["is SRC", "ckpt"], ["ckpt"]


def _export_into_ckpt(w):
    return ["orbax-to-hf", "ckpt", "ckpt/params/hf", "--overwrite"], ["inside SRC"], ["ckpt"]


def _export_over_parent(w):
    return ["orbax-to-hf", "ckpt", ".", "--overwrite"], ["contains SRC"], ["ckpt", "src"]


def _dst_exists(w):
    (w / "out").mkdir()
    (w / "out" / "keep.txt").write_text("mine")
    return ["hf-to-orbax", "src", "out"], ["already exists", "--overwrite"], ["src", "out"]


def _dst_is_a_file(w):
    (w / "out").write_text("mine")
    return ["hf-to-orbax", "src", "out", "--overwrite"], ["not a directory"], ["src", "out"]


def _missing_src(w):
    return ["hf-to-orbax", "nope", "out"], ["nope", "no such file"], ["src"]


def _scale_int32(w):
    t = load_file(w / "src8" / "model.safetensors")
    t[W + "_scale_inv"] = np.ones_like(t[W + "_scale_inv"], np.int32)
    save_file(t, w / "src8" / "model.safetensors")
    return ["hf-to-orbax", "src8", "out"], [W + "_scale_inv", "I32", "F32"], ["src8"]


def _nan_weight(w):
    t = load_file(w / "src" / "model.safetensors")
    t[W][3, 5] = np.nan
    save_file(t, w / "src" / "model.safetensors")
    return ["hf-to-orbax", "src", "out"], [W, "NaN/Inf", "(3, 5)", "--allow-nonfinite"], ["src"]


def _inf_norm(w):
    name = "model.norm.weight"
    t = load_file(w / "src" / "model.safetensors")
    t[name][0] = -np.inf
    save_file(t, w / "src" / "model.safetensors")
    return ["hf-to-orbax", "src", "out"], [name, "NaN/Inf"], ["src"]


def _inf_scale(w):
    t = load_file(w / "src8" / "model.safetensors")
    t[W + "_scale_inv"][0, 0] = np.inf
    save_file(t, w / "src8" / "model.safetensors")
    return ["hf-to-orbax", "src8", "out"], [W + "_scale_inv", "NaN/Inf"], ["src8"]


def _zero_scale(w):
    t = load_file(w / "src8" / "model.safetensors")
    t[W + "_scale_inv"][0, 0] = 0.0
    save_file(t, w / "src8" / "model.safetensors")
    return ["hf-to-orbax", "src8", "out"], [W + "_scale_inv", "<= 0"], ["src8"]


def _nan_fp8_bits_keep_fp8(w):
    t = load_file(w / "src8" / "model.safetensors")
    t[W].view(np.uint8)[1, 2] = 0x7F  # e4m3fn NaN
    save_file(t, w / "src8" / "model.safetensors")
    return ["hf-to-orbax", "src8", "out", "--keep-fp8"], [W, "NaN/Inf", "(1, 2)"], ["src8"]


def _nan_fp8_bits(w):  # dequantised: found on the 1-byte source, named by its index there
    t = load_file(w / "src8" / "model.safetensors")
    t[W].view(np.uint8)[1, 2] = 0xFF  # e4m3fn -NaN
    save_file(t, w / "src8" / "model.safetensors")
    return ["hf-to-orbax", "src8", "out"], [W, "NaN/Inf", "(1, 2)"], ["src8"]


def _overflowing_scale(w):  # finite bytes and scale whose float32 product is Inf: found on the output
    t = load_file(w / "src8" / "model.safetensors")
    t[W + "_scale_inv"][0, 0] = 3e38
    t[W].view(np.uint8)[0, 0] = 0x48  # e4m3fn 4.0: 4 * 3e38 overflows (the first of the block that does)
    save_file(t, w / "src8" / "model.safetensors")
    return ["hf-to-orbax", "src8", "out"], [W, "NaN/Inf", "(0, 0)"], ["src8"]


def _scale_on_bf16_weight(w):
    t = load_file(w / "src" / "model.safetensors")
    t[W + "_scale_inv"] = np.ones((1, 1), np.float32)
    save_file(t, w / "src" / "model.safetensors")
    return ["hf-to-orbax", "src", "out"], [W + "_scale_inv", "not F8_E4M3"], ["src"]


def _index_dotdot(w):
    d = sharded(w / "sh", load_file(w / "src" / "model.safetensors"))
    shutil.copy(d / "b.safetensors", w / "outside.safetensors")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return ["hf-to-orbax", "sh", "out"], ["../outside.safetensors", "outside the model directory", k], ["sh"]


def _index_absolute(w):
    d = sharded(w / "sh", load_file(w / "src" / "model.safetensors"))
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = str(d / "a.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return ["hf-to-orbax", "sh", "out"], ["absolute path", k], ["sh"]


def _index_not_object(w):
    d = sharded(w / "sh", load_file(w / "src" / "model.safetensors"))
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    return ["hf-to-orbax", "sh", "out"], ["model.safetensors.index.json", "JSON object"], ["sh"]


def _index_not_safetensors(w):
    d = sharded(w / "sh", load_file(w / "src" / "model.safetensors"))
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "config.json"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return ["hf-to-orbax", "sh", "out"], ["not a .safetensors file", k], ["sh"]


def _edit_config(**fields):
    def setup(w):
        hf = json.loads((w / "src" / "config.json").read_text())
        hf.update(fields)
        (w / "src" / "config.json").write_text(json.dumps(hf))
        return ["hf-to-orbax", "src", "out"], ["config.json", next(iter(fields))], ["src"]
    return setup


def _config_not_object(w):
    (w / "src" / "config.json").write_text("[]")
    return ["hf-to-orbax", "src", "out"], ["config.json", "JSON object"], ["src"]


def _yarn_without_factor(w):
    hf = json.loads((w / "src" / "config.json").read_text())
    hf["rope_scaling"] = {"type": "yarn"}
    hf.pop("rope_parameters", None)
    (w / "src" / "config.json").write_text(json.dumps(hf))
    return ["hf-to-orbax", "src", "out"], ["rope_scaling", "factor"], ["src"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


def _pickle_with_code(w):
    d = w / "pt"
    d.mkdir()
    shutil.copy(w / "src" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Evil(str(w / "PWNED"))}, protocol=2))
    return ["hf-to-orbax", "pt", "out"], ["pytorch_model.bin", "could run code" if HAS_TORCH else "torch"], ["pt"]


def _torch_zip_with_code(w):
    torch = pytest.importorskip("torch")
    d = w / "pt"
    d.mkdir()
    shutil.copy(w / "src" / "config.json", d)
    torch.save({W: torch.zeros(2), "x": _Evil(str(w / "PWNED"))}, d / "model.pt")
    return ["hf-to-orbax", "pt/model.pt", "out"], ["model.pt", "could run code"], ["pt"]


def _bin_garbage(w):
    d = w / "pt"
    d.mkdir()
    shutil.copy(w / "src" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(os.urandom(300))
    return ["hf-to-orbax", "pt", "out"], ["pytorch_model.bin", "not a readable" if HAS_TORCH else "torch"], ["pt"]


def _fused_2e6_experts(w):
    d = w / "fused"
    d.mkdir()
    shutil.copy(w / "src" / "config.json", d)
    h = {FUSED: {"dtype": "F32", "shape": [2_000_000, 0, 32], "data_offsets": [0, 0]}}
    hb = json.dumps(h).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb)
    return ["hf-to-orbax", "fused", "out"], [FUSED, "2000000", "config implies"], ["fused"]


def _fused_scalar(w):
    d = w / "fused"
    d.mkdir()
    shutil.copy(w / "src" / "config.json", d)
    h = {FUSED: {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}
    hb = json.dumps(h).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + b"\0" * 4)
    return ["hf-to-orbax", "fused", "out"], [FUSED, "config implies"], ["fused"]


def _truncated(w):
    p = w / "src" / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return ["hf-to-orbax", "src", "out"], ["model.safetensors", "truncated"], ["src"]


def _header_longer_than_file(w):
    p = w / "src" / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 10**7) + raw[8:])
    return ["hf-to-orbax", "src", "out"], ["model.safetensors", "truncated"], ["src"]


def _offsets_lie(w):
    def edit(h):
        b, e = h[W]["data_offsets"]
        h[W]["data_offsets"] = [b + 10**12, e + 10**12]
    rewrite_header(w / "src" / "model.safetensors", edit)
    return ["hf-to-orbax", "src", "out"], ["model.safetensors", "truncated"], ["src"]


def _shape_lies(w):
    def edit(h):
        h[W]["shape"] = [2**20, 2**20]
    rewrite_header(w / "src" / "model.safetensors", edit)
    return ["hf-to-orbax", "src", "out"], ["model.safetensors", W, "bytes"], ["src"]


def _wrong_shape(w):
    t = load_file(w / "src" / "model.safetensors")
    t[W] = t[W][:, :-1].copy()
    save_file(t, w / "src" / "model.safetensors")
    return ["hf-to-orbax", "src", "out"], [W, "config implies"], ["src"]


def _not_a_checkpoint(w):
    return ["orbax-to-hf", "src", "out"], ["src", "not a dsv3 checkpoint"], ["src"]


def _marker_not_object(w):
    (w / "ckpt" / orbax_io.MARKER).write_text("[]")
    return ["orbax-to-hf", "ckpt", "out"], [orbax_io.MARKER, "JSON object"], ["ckpt"]


def _max_shard_zero(w):
    return ["orbax-to-hf", "ckpt", "out", "--max-shard-size", "0"], ["--max-shard-size"], ["ckpt"]


def _max_shard_nan(w):
    return ["orbax-to-hf", "ckpt", "out", "--max-shard-size", "nan"], ["--max-shard-size"], ["ckpt"]


def _export_nan_checkpoint(w):
    t = load_file(w / "src" / "model.safetensors")
    t[W][0, 0] = np.nan
    save_file(t, w / "src" / "model.safetensors")
    convert.hf_to_orbax(w / "src", w / "nanckpt", dtype="float32", progress=False, allow_nonfinite=True)
    return ["orbax-to-hf", "nanckpt", "out"], [W, "NaN/Inf", "--allow-nonfinite"], ["nanckpt", "src"]


CASES = {
    "src-is-dst": _src_is_dst, "dst-inside-src": _dst_inside_src, "dst-contains-src": _dst_contains_src,
    "dst-symlink-to-src": _dst_symlink_to_src, "dst-dotdot-is-src": _dst_dotdot_is_src,
    "file-src-dst-is-its-dir": _file_src_dst_is_its_dir, "export-to-itself": _export_to_itself,
    "export-into-ckpt": _export_into_ckpt, "export-over-parent": _export_over_parent,
    "dst-exists": _dst_exists, "dst-is-a-file": _dst_is_a_file, "missing-src": _missing_src,
    "fp8-scale-int32": _scale_int32, "nan-weight": _nan_weight, "inf-norm": _inf_norm, "inf-scale": _inf_scale,
    "zero-scale": _zero_scale, "nan-fp8-bits-keep-fp8": _nan_fp8_bits_keep_fp8,
    "nan-fp8-bits": _nan_fp8_bits, "overflowing-scale": _overflowing_scale,
    "scale-on-float-weight": _scale_on_bf16_weight,
    "index-dotdot": _index_dotdot, "index-absolute": _index_absolute, "index-not-object": _index_not_object,
    "index-not-safetensors": _index_not_safetensors,
    "rope-scaling-string": _edit_config(rope_scaling="yarn"),
    "rope-parameters-string": _edit_config(rope_parameters="yarn"),
    "hidden-size-string": _edit_config(hidden_size="32"),
    "num-layers-float": _edit_config(num_hidden_layers=2.5),
    "norm-topk-prob-string": _edit_config(norm_topk_prob="yes"),
    "rope-factor-string": _edit_config(rope_scaling={"type": "yarn", "factor": "40"}),
    "config-not-object": _config_not_object, "yarn-without-factor": _yarn_without_factor,
    "pickle-with-code": _pickle_with_code, "torch-zip-with-code": _torch_zip_with_code,
    "bin-garbage": _bin_garbage,
    "fused-2e6-experts": _fused_2e6_experts, "fused-scalar": _fused_scalar,
    "truncated": _truncated, "header-longer-than-file": _header_longer_than_file, "offsets-lie": _offsets_lie,
    "shape-lies": _shape_lies, "wrong-shape": _wrong_shape,
    "export-not-a-checkpoint": _not_a_checkpoint, "export-marker-not-object": _marker_not_object,
    "export-max-shard-zero": _max_shard_zero, "export-max-shard-nan": _max_shard_nan,
    "export-nan-checkpoint": _export_nan_checkpoint,
}


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dsv3 convert"), err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_convert_refuses_bad_input(case, work, capsys):
    argv, needles, keep = CASES[case](work)
    before = digest(*[work / k for k in keep])
    capsys.readouterr()
    rc = cli.main(["convert", *argv, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = _one_line_error(err)
    for needle in needles:
        assert needle in line, (needle, line)
    assert digest(*[work / k for k in keep]) == before  # SRC (and an existing DST) untouched
    if "out" not in keep:
        assert not (work / "out").exists()
    assert not [p for p in work.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no leftovers
    assert not (work / "PWNED").exists()  # no pickle code ran


def test_allow_nonfinite_converts_knowingly(work, capsys):
    t = load_file(work / "src" / "model.safetensors")
    t[W][3, 5] = np.nan
    save_file(t, work / "src" / "model.safetensors")
    assert cli.main(["convert", "hf-to-orbax", "src", "out", "--quiet", "--allow-nonfinite", "--dtype", "float32"]) == 0
    w = orbax_io.read_params("out", [("moe_layers", "0", "attn", "o_proj", "kernel")])
    assert np.isnan(np.asarray(next(iter(w.values())))).sum() == 1


def test_tiny_header_with_huge_fused_tensor_is_cheap(work):
    """The 120-byte header declaring 2·10⁶ fused experts is refused before any per-expert work."""
    _fused_2e6_experts(work)
    assert (work / "fused" / "model.safetensors").stat().st_size < 128
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="config implies"):
        convert.hf_to_orbax("fused", "out", progress=False)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert dt < 2.0 and peak < 16 << 20, (dt, peak)


# ---- writes that fail: full disk, permissions, interruptions -------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["orbax-write", "safetensors-write", "staging-mkdir", "free-space"])
def test_unwritable_destination_is_one_line(where, work, monkeypatch, capsys):
    if where == "orbax-write":
        monkeypatch.setattr(orbax_io.ocp().partial, "save_async", _enospc)
        argv, needle = ["hf-to-orbax", "src", "out"], "No space left on device"
    elif where == "safetensors-write":
        monkeypatch.setattr(convert, "save_file", _enospc)
        argv, needle = ["orbax-to-hf", "ckpt", "out"], "No space left on device"
    elif where == "staging-mkdir":
        def denied(dst):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        monkeypatch.setattr(orbax_io, "staging_dir", denied)
        argv, needle = ["hf-to-orbax", "src", "out"], "Permission denied"
    else:
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1000))
        argv, needle = ["hf-to-orbax", "src", "out"], "MiB free"
    before = digest(work / "src", work / "ckpt")
    rc = cli.main(["convert", *argv, "--quiet"])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and needle in line and str(work / "out") in line and "fix:" in line
    assert digest(work / "src", work / "ckpt") == before
    assert sorted(p.name for p in work.iterdir()) == ["ckpt", "src", "src8"]  # nothing left behind


def test_real_full_disk_is_one_line(base, tmp_path):
    """A real 32 KiB tmpfs (root only): the Orbax error and its thread noise become one line."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code = ("import sys; from dsv3_jax import cli; from dsv3_jax.checkpoint import orbax_io; "
                "orbax_io.check_free_space = lambda *a, **k: None; "  # get past the up-front check
                f"sys.exit(cli.main(['convert', 'hf-to-orbax', {str(base['src'])!r}, {str(mnt / 'ckpt')!r}, '--quiet']))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0], r.stderr
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_conversion_are_removed_or_reported(work, capsys):
    dead, alive = _dead_pid(), os.getpid()
    killed = work / f".out.tmp-{dead}-0123abcd"
    (killed / "params").mkdir(parents=True)
    running = work / f".out.tmp-{alive}-4567cdef"
    running.mkdir()
    other = work / f".other.tmp-{dead}-89abcdef"
    other.mkdir()
    assert cli.main(["convert", "hf-to-orbax", "src", "out", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"removed {killed}" in err and f"{running} belongs to a running process (pid {alive})" in err
    assert not killed.exists() and running.exists() and other.exists()  # only this DST's leftovers
    dsv3.load_checkpoint("out")


def test_replace_killed_between_renames_is_undone(work, capsys):
    """Killed after DST was moved aside but before the new one took its place: the next run puts the
    previous version back instead of deleting it."""
    shutil.copytree(work / "ckpt", work / "out")
    before = digest(work / "out")
    os.rename(work / "out", work / f".out.old-{_dead_pid()}-0123abcd")
    with pytest.raises(CheckpointError, match="already exists"):
        convert.hf_to_orbax("src", "out", progress=False)
    assert "restored" in capsys.readouterr().err
    assert digest(work / "out") == before


def test_interrupted_export_leaves_nothing(work, monkeypatch):
    real = convert.save_file
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(convert, "save_file", flaky)
    before = digest(work / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        convert.orbax_to_hf("ckpt", "out", max_shard_bytes=4096, progress=False)
    assert sorted(p.name for p in work.iterdir()) == ["ckpt", "src", "src8"]
    assert digest(work / "ckpt") == before


# ---- relative paths: every README convert command as typed -----------------------------------------
def test_readme_convert_commands_with_relative_paths(base, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    shutil.copytree(base["src"], home / "DeepSeek-V3")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    # $ dsv3 convert hf-to-orbax ~/DeepSeek-V3 ckpt/v3   (~ unexpanded, as from a script or the API)
    assert cli.main(["convert", "hf-to-orbax", "~/DeepSeek-V3", "ckpt/v3", "--quiet"]) == 0
    assert f"wrote {cwd / 'ckpt' / 'v3'}" in capsys.readouterr().out
    # $ dsv3 convert orbax-to-hf ckpt/v3 hf_out/
    assert cli.main(["convert", "orbax-to-hf", "ckpt/v3", "hf_out/", "--quiet"]) == 0
    assert (cwd / "hf_out" / "config.json").is_file()
    # cfg, model = dsv3.load_checkpoint("ckpt/v3")
    cfg, _ = dsv3.load_checkpoint("ckpt/v3")
    assert cfg.num_layers == CFG.num_layers
    # ./ and ../ forms, and a relative SRC for hf-to-orbax from a sibling directory
    (cwd / "sub").mkdir()
    monkeypatch.chdir(cwd / "sub")
    assert cli.main(["convert", "orbax-to-hf", "../ckpt/v3", "./hf2", "--quiet"]) == 0
    assert cli.main(["convert", "hf-to-orbax", "./hf2", "../ckpt/v3b", "--quiet", "--dtype", "float32"]) == 0
    assert sorted(os.listdir(cwd)) == ["ckpt", "hf_out", "sub"]
    assert sorted(os.listdir(cwd / "ckpt")) == ["v3", "v3b"]


# ---- resume ----------------------------------------------------------------------------------------
RUN = ["num_layers=2", "first_k_dense=1", "data.seq_len=32", "data.batch_size=8", "train.lr=3e-3"]


def _fake_run_dir(tmp_path: Path, *overrides: str) -> tuple[Path, object]:
    """A run directory whose latest checkpoint was written by the run config ``RUN + overrides``
    (marker + train_state.json; the arrays are not needed to decide whether it may be resumed)."""
    out = tmp_path / "run"
    run = load_run_config("tiny", [*RUN, f"train.output_dir={out}", *overrides])
    step = out / "checkpoints" / "3"
    (step / orbax_io.PARAMS_DIR).mkdir(parents=True)
    orbax_io.write_marker(step, run.model, step=3)
    (step / orbax_io.TRAIN_STATE).write_text(json.dumps({"step": 3, "config": run.to_dict()}, default=str))
    return out, run


RESUME_CASES = [
    # (changed settings, refused?, fields the message must name)
    (["model.hidden_size=96"], True, ["model.hidden_size 64 → 96"]),
    (["model.num_layers=3"], True, ["model.num_layers"]),
    (["model.n_routed_experts=32"], True, ["model.n_routed_experts 16 → 32"]),
    (["model.param_dtype=bfloat16"], True, ["model.param_dtype"]),
    (["train.lr=1e-3"], False, ["train.lr", "0.003", "0.001"]),
    (["data.seq_len=64"], False, ["data.seq_len"]),
    (["train.b2=0.99", "data.seed=5"], False, ["train.b2", "data.seed"]),
    (["model.rope_theta=50000"], False, ["model.rope_theta"]),
    (["runtime.quant=fp8"], False, ["runtime.quant"]),
]


@pytest.mark.parametrize("changed,refused,needles", RESUME_CASES)
def test_resume_with_changed_settings(tmp_path, changed, refused, needles):
    out, _ = _fake_run_dir(tmp_path)
    run = load_run_config("tiny", [*RUN, f"train.output_dir={out}", *changed])
    logged = []
    if refused:
        with pytest.raises(ConfigError) as e:
            check_resume(run, out / "checkpoints", logged.append)
        msg = str(e.value)
        assert str(out / "checkpoints" / "3") in msg and "fix:" in msg and "\n" not in msg
    else:
        assert check_resume(run, out / "checkpoints", logged.append) == 3
        assert len(logged) == 1 and logged[0].startswith("warning:")
        msg = logged[0]
    for n in needles:
        assert n in msg, (n, msg)


def test_resume_quiet_settings_and_fresh_runs(tmp_path):
    out, run = _fake_run_dir(tmp_path)
    moved = load_run_config("tiny", [*RUN, f"train.output_dir={tmp_path / 'moved'}", "train.checkpoint_every=7",
                                     "train.progress=false", "remat=none"])
    assert config_changes(json.loads(json.dumps(run.to_dict(), default=str)), moved) == {}
    logged = []
    assert check_resume(moved, out / "checkpoints", logged.append) == 3 and logged == []
    assert check_resume(run, tmp_path / "empty", logged.append) is None and logged == []


def test_train_cli_refuses_other_model_shape(tmp_path, capsys):
    out, _ = _fake_run_dir(tmp_path)
    rc = cli.main(["train", "--config", "tiny", *RUN, f"train.output_dir={out}", "model.hidden_size=96",
                   "train.progress=false"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "model.hidden_size 64 → 96" in lines[0] and str(out / "checkpoints" / "3") in lines[0]


def test_damaged_train_state_is_one_line(tmp_path):
    out, run = _fake_run_dir(tmp_path)
    (out / "checkpoints" / "3" / orbax_io.TRAIN_STATE).write_text("{not json")
    with pytest.raises(CheckpointError, match="train_state.json: not valid JSON"):
        check_resume(run, out / "checkpoints")
