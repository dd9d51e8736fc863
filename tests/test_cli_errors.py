"""Bad input on every `dsv3` subcommand is a user error: exit code 2 and one line on stderr,
`dsv3 <cmd>: <message>`, naming the input — never a traceback. Anything else is a bug: exit code 1,
the traceback, and a line asking for a report. (Issues M12 item 7 and M16; M16 grows this table.)"""
import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax import cli
from dsv3_jax.cli import main
from tests.hf_reference import write_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint (no tokenizer.json), token-id files and a text corpus."""
    root = tmp_path_factory.mktemp("cli_errors")
    cfg = dsv3.load_config("tiny", ["num_layers=2", "first_k_dense=1", "num_mtp_layers=0"])
    write_checkpoint(dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0)), root / "ckpt")
    np.save(root / "ids.npy", np.arange(16, dtype=np.int32).reshape(2, 8))
    np.save(root / "big_ids.npy", np.full((1, 4), cfg.vocab_size, np.int32))
    np.save(root / "float_ids.npy", np.zeros((1, 4), np.float32))
    np.save(root / "ids_3d.npy", np.zeros((1, 2, 4), np.int32))
    (root / "not_npy.npy").write_text("hello")
    (root / "corpus.txt").write_text("def f(x):\n    return x\n" * 20)
    return {"ckpt": str(root / "ckpt"), "tmp": str(root), "vocab": str(cfg.vocab_size)}


# (id, argv with {ckpt}/{tmp}/{vocab} placeholders, substrings the one error line must contain)
CASES = [
    # info: configs, overrides, meshes
    ("info-unknown-config", ["info", "--config", "no_such_config"], ["no_such_config", "known configs"]),
    ("info-bad-override-key", ["info", "--config", "tiny", "n_routed_expertz=3"], ["n_routed_expertz"]),
    ("info-bad-override-value", ["info", "--config", "tiny", "n_routed_experts=abc"], ["n_routed_experts='abc'"]),
    ("info-invalid-override", ["info", "--config", "tiny", "num_experts_per_tok=99"], ["num_experts_per_tok=99", "fix"]),
    ("info-override-not-key-value", ["info", "--config", "tiny", "--json", "oops"], ["unrecognized", "oops"]),
    ("info-mesh-negative", ["info", "--config", "tiny", "--mesh", "expert=-2"], ["expert=-2", "positive"]),
    ("info-mesh-not-int", ["info", "--config", "tiny", "--mesh", "expert=x"], ["expert", "'x'"]),
    ("info-mesh-experts-do-not-divide", ["info", "--config", "deepseek_v3_671b", "--mesh", "expert=3"],
     ["expert=3", "do not divide"]),
    ("info-flag-bad-type", ["info", "--seq-len", "many"], ["--seq-len", "'many'"]),
    # overrides after the flags reach the config (not "unrecognized arguments")
    ("info-override-after-flags", ["info", "n_routed_experts=32", "--json", "--seq-len", "64", "n_group=5"],
     ["n_group=5"]),
    # the top-level parser
    ("unknown-subcommand", ["frobnicate"], ["frobnicate", "invalid choice"]),
    # train
    ("train-unknown-config", ["train", "--config", "no_such_run"], ["no_such_run"]),
    ("train-bad-override-key", ["train", "--config", "tiny", "train.lrr=1"], ["lrr", "train.lr"]),
    ("train-mesh-does-not-divide-devices", ["train", "--config", "tiny", "steps=1", "--mesh", "data=3",
                                            f"train.output_dir={{tmp}}/run"], ["3 devices", "8 are available"]),
    ("train-unknown-flag", ["train", "--config", "tiny", "--stepz", "3"], ["--stepz"]),
    # convert
    ("convert-missing-src", ["convert", "hf-to-orbax", "{tmp}/no_such_src", "{tmp}/out"], ["no_such_src"]),
    ("convert-stray-argument", ["convert", "hf-to-orbax", "{tmp}/a", "{tmp}/b", "k=v"], ["unrecognized", "k=v"]),
    ("convert-missing-checkpoint", ["convert", "orbax-to-hf", "{tmp}/no_such_ckpt", "{tmp}/hf"],
     ["no_such_ckpt", "not a dsv3 checkpoint"]),
    # score
    ("score-missing-checkpoint", ["score", "--checkpoint", "{tmp}/no_such_ckpt", "--token-ids", "{tmp}/ids.npy"],
     ["no_such_ckpt", "does not exist"]),
    ("score-ids-file-missing", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/nope.npy"],
     ["--token-ids", "nope.npy"]),
    ("score-ids-file-not-npy", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/not_npy.npy"],
     ["--token-ids", "not_npy.npy"]),
    ("score-ids-float", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/float_ids.npy"],
     ["float_ids.npy", "float32"]),
    ("score-ids-3d", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids_3d.npy"], ["(1, 2, 4)"]),
    ("score-ids-outside-vocab", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/big_ids.npy"],
     ["id {vocab}", "outside the vocabulary"]),
    ("score-text-without-tokenizer", ["score", "--checkpoint", "{ckpt}", "--text", "hello"], ["tokenizer.json"]),
    ("score-mesh-does-not-divide-devices", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids.npy",
                                            "--mesh", "data=3"], ["3 devices", "8 are available"]),
    ("score-batch-does-not-divide-mesh", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids.npy",
                                          "--mesh", "data=8"], ["batch size 2", "8 batch shards"]),
    ("score-no-mtp-module", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids.npy",
                             "--save-mtp-logits", "{tmp}/mtp.npy"], ["no MTP module"]),
    ("score-bad-runtime-override", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids.npy",
                                    "compute_dtype=float99"], ["compute_dtype"]),
    # generate
    ("generate-missing-checkpoint", ["generate", "--checkpoint", "{tmp}/no_such_ckpt", "--prompt-ids", "1"],
     ["no_such_ckpt", "does not exist"]),
    ("generate-prompt-ids-outside-vocab", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1,{vocab}"],
     ["id {vocab}", "outside the vocabulary"]),
    ("generate-prompt-ids-empty", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", ""], ["at least one token"]),
    ("generate-prompt-ids-not-ints", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1,x"],
     ["--prompt-ids", "'1,x'"]),
    ("generate-stop-ids-not-ints", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1", "--stop-ids", "a,b"],
     ["--stop-ids", "'a,b'"]),
    ("generate-prompt-without-tokenizer", ["generate", "--checkpoint", "{ckpt}", "--prompt", "hi"],
     ["no tokenizer.json", "--prompt-ids"]),
    ("generate-speculative-without-mtp", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1,2",
                                          "--speculative", "mtp"], ["MTP module"]),
    ("generate-mesh-does-not-divide-devices", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1",
                                               "--mesh", "expert=3"], ["3 devices", "8 are available"]),
    # tokenizer
    ("tokenizer-vocab-too-small", ["tokenizer", "train", "--output", "{tmp}/tok", "--vocab-size", "10",
                                   "--data", "{tmp}/corpus.txt"], ["vocab_size 10", "too small"]),
    ("tokenizer-missing-data", ["tokenizer", "train", "--output", "{tmp}/tok", "--data", "{tmp}/no_corpus"],
     ["no_corpus", "does not exist"]),
    ("tokenizer-missing-output", ["tokenizer", "train", "--vocab-size", "300"], ["--output"]),
    ("tokenizer-no-action", ["tokenizer"], ["required", "{{train}}"]),
    ("convert-no-direction", ["convert"], ["required", "{{hf-to-orbax,orbax-to-hf}}"]),
]


def _fill(items, files):
    return [s.format(**files) for s in items]


@pytest.mark.parametrize("argv, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, needles, files, capsys):
    argv, needles = _fill(argv, files), _fill(needles, files)
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    cmd = "dsv3" if argv[0].startswith("frob") else f"dsv3 {argv[0]}"
    assert lines[0].startswith(cmd) and ": " in lines[0], err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def test_overrides_before_between_and_after_flags(capsys):
    argv = ["train", "--config", "c.yaml", "steps=3", "--mesh", "data=8", "lr=1e-3", "--balance", "none", "a.b=2"]
    args = cli.parse_args(argv)
    assert args.overrides == ["steps=3", "lr=1e-3", "a.b=2"] and args.mesh == "data=8" and args.balance == "none"
    args = cli.parse_args(["generate", "compute_dtype=float32", "--checkpoint", "x", "--prompt-ids", "1", "quant=none"])
    assert args.overrides == ["compute_dtype=float32", "quant=none"] and args.checkpoint == "x"
    assert main(["info", "n_routed_experts=32", "--json", "--config", "tiny", "n_group=4", "--seq-len", "64"]) == 0
    info = json.loads(capsys.readouterr().out)
    from dsv3_jax.info import model_info
    assert info == model_info(dsv3.load_config("tiny", ["n_routed_experts=32", "n_group=4"]), seq_len=64)
    assert info != model_info(dsv3.load_config("tiny"), seq_len=64)


def test_a_bug_is_a_traceback_exit_1_and_a_report_line(monkeypatch, capsys):
    import dsv3_jax.info

    def broken(*a, **k):
        raise ZeroDivisionError("internal")

    monkeypatch.setattr(dsv3_jax.info, "model_info", broken)
    assert main(["info", "--config", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: internal" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dsv3 info: ZeroDivisionError") and cli.REPORT in last
    assert "please report it at the project's issue tracker with the command you ran" in cli.REPORT


def test_console_entry_point_exit_codes():
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsv3_jax.cli", *a], capture_output=True, text=True)  # noqa: E731
    bad = run("info", "--config", "no_such_config")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("dsv3 info: ") and "no_such_config" in bad.stderr
    ok = run("--help")
    assert ok.returncode == 0 and "tokenizer" in ok.stdout
    assert run("tokenizer", "train", "--help").returncode == 0


def test_one_error_family():
    """Every user error is a Dsv3Error and still a ValueError (old `except ValueError` keeps working);
    sharding (below the model) raises the same MeshError."""
    import sharding
    from dsv3_jax import errors
    from dsv3_jax.checkpoint.fp8 import FP8FormatError
    from dsv3_jax.checkpoint.mapping import MappingError
    from dsv3_jax.checkpoint.safetensors_io import MissingTensorError, SafetensorsError
    from dsv3_jax.config import ConfigError
    from dsv3_jax.inference import GenerationError
    from dsv3_jax.model import TokenRangeError
    assert sharding.Dsv3Error is dsv3.Dsv3Error and sharding.MeshError is dsv3.MeshError
    assert ConfigError is dsv3.ConfigError and TokenRangeError is dsv3.TokenRangeError
    assert GenerationError is dsv3.GenerationError
    for e in (errors.ConfigError, errors.CheckpointError, errors.MeshError, errors.TokenRangeError,
              errors.GenerationError, errors.DataError, errors.DataNotFoundError, FP8FormatError, MappingError,
              SafetensorsError, MissingTensorError):
        assert issubclass(e, dsv3.Dsv3Error) and issubclass(e, ValueError), e
    assert issubclass(MissingTensorError, KeyError) and issubclass(errors.DataNotFoundError, FileNotFoundError)


def test_python_api_token_errors():
    """The functional forward checks ids on the host (under jit the model's own check sees tracers)."""
    cfg = dsv3.load_config("tiny", ["num_layers=1", "first_k_dense=1", "num_mtp_layers=0"])
    model = dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0))
    forward, state = dsv3.make_forward(model, mtp=False)
    with pytest.raises(dsv3.TokenRangeError, match=rf"id {cfg.vocab_size} at index \(0, 2\)"):
        forward(state, np.array([[1, 2, cfg.vocab_size]], np.int32))
    from dsv3_jax.inference.scoring import score
    with pytest.raises(dsv3.TokenRangeError, match=r"\[batch, seq\]"):
        score(model, np.zeros((1, 2, 3), np.int32))
    with pytest.raises(dsv3.ConfigError, match="no MTP module"):
        score(model, np.zeros((1, 3), np.int32), mtp=True)
