"""Bad input on every `dsv3` subcommand and on the Python API is a user error, never a crash, a lie or
lost data: exit code 2 and one line on stderr, `dsv3 <cmd>: <message>`, naming the input (and, for the
inputs this file adds, the fix) — never a traceback; the Python API raises the documented `Dsv3Error`
subclass. Anything else is a bug: exit code 1, the traceback, and a line asking for a report.
Also: the defined results that replaced silent nonsense (score pads a batch to the mesh), and the
relative-path forms of the README's commands (score, generate, tokenizer, train; the converter's are in
tests/checkpoint). (Issues M12 item 7 and M16.)"""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import dsv3_jax as dsv3
from dsv3_jax import cli
from dsv3_jax.cli import main
from dsv3_jax.config import config_dir
from dsv3_jax.data import train_tokenizer
from dsv3_jax.errors import DataNotFoundError
from dsv3_jax.inference import Generator
from tests.hf_reference import write_checkpoint

MODEL = ["num_layers=2", "first_k_dense=1", "num_mtp_layers=0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny checkpoint (no tokenizer.json) and a copy with a tokenizer (`ckpt_tok`), token-id files,
    text files and a corpus: built once for the whole module."""
    root = tmp_path_factory.mktemp("cli_errors")
    cfg = dsv3.load_config("tiny", MODEL)
    write_checkpoint(dsv3.DeepSeekV3(cfg, rngs=nnx.Rngs(0)), root / "ckpt")
    shutil.copytree(root / "ckpt", root / "ckpt_tok")
    train_tokenizer(["def f(x):\n    return x\n" * 20, "hello world"], 300, min_frequency=1).save(root / "ckpt_tok")
    np.save(root / "ids.npy", np.arange(16, dtype=np.int32).reshape(2, 8))
    np.save(root / "big_ids.npy", np.full((1, 4), cfg.vocab_size, np.int32))
    np.save(root / "neg_ids.npy", np.array([[1, -1, 2]], np.int32))
    np.save(root / "float_ids.npy", np.zeros((1, 4), np.float32))
    np.save(root / "ids_3d.npy", np.zeros((1, 2, 4), np.int32))
    np.save(root / "one_token.npy", np.array([[5]], np.int32))
    np.save(root / "empty_seq.npy", np.zeros((1, 0), np.int32))
    np.save(root / "no_rows.npy", np.zeros((0, 4), np.int32))
    np.save(root / "too_long.npy", np.zeros((1, cfg.max_position_embeddings + 1), np.int32))
    np.save(root / "objects.npy", np.array([[1, 2]], object), allow_pickle=True)
    np.savez(root / "ids.npz", ids=np.zeros((1, 4), np.int32))
    (root / "not_npy.npy").write_text("hello")
    (root / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    (root / "empty.yaml").write_text("")
    (root / "bad_utf8.txt").write_bytes(b"ab\xffcd")
    (root / "empty.txt").write_text("")
    (root / "corpus.txt").write_text("def f(x):\n    return x\n" * 20)
    return {"ckpt": str(root / "ckpt"), "ckpt_tok": str(root / "ckpt_tok"), "tmp": str(root),
            "vocab": str(cfg.vocab_size), "ctx": str(cfg.max_position_embeddings)}


G = ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1,2"]       # a good generate command to spoil
S = ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids.npy"]  # a good score command to spoil
T = ["tokenizer", "train", "--output", "{tmp}/tok", "--data", "{tmp}/corpus.txt", "--vocab-size", "300"]

# (id, argv with {ckpt}/{ckpt_tok}/{tmp}/{vocab}/{ctx} placeholders, substrings the one error line must contain)
CASES = [
    # info: configs, overrides, meshes
    ("info-unknown-config", ["info", "--config", "no_such_config"], ["no_such_config", "known configs"]),
    ("info-config-file-missing", ["info", "--config", "{tmp}/nope.yaml"], ["nope.yaml", "does not exist", "fix"]),
    ("info-config-binary", ["info", "--config", "{tmp}/binary.yaml"], ["binary.yaml", "not UTF-8", "fix"]),
    ("info-config-empty", ["info", "--config", "{tmp}/empty.yaml"], ["empty.yaml", "mapping"]),
    ("info-bad-override-key", ["info", "--config", "tiny", "n_routed_expertz=3"],
     ["'n_routed_expertz'", "fix: did you mean n_routed_experts"]),
    ("info-bad-nested-override-key", ["info", "rope_scaling.factr=3"],
     ["'rope_scaling.factr'", "did you mean rope_scaling.factor"]),
    ("info-bad-override-value", ["info", "--config", "tiny", "n_routed_experts=abc"], ["n_routed_experts='abc'"]),
    ("info-override-not-finite", ["info", "rope_theta=nan"], ["rope_theta=nan", "finite", "fix"]),
    ("info-override-nested-not-finite", ["info", "rope_scaling.factor=inf"], ["rope_scaling.factor=inf", "finite"]),
    ("info-override-eps-zero", ["info", "rms_norm_eps=0"], ["rms_norm_eps=0", "fix"]),
    ("info-invalid-override", ["info", "--config", "tiny", "num_experts_per_tok=99"], ["num_experts_per_tok=99", "fix"]),
    ("info-runtime-override", ["info", "quant=fp8"], ["quant", "runtime"]),
    ("info-override-not-key-value", ["info", "--config", "tiny", "--json", "oops"], ["unrecognized", "oops"]),
    ("info-mesh-negative", ["info", "--config", "tiny", "--mesh", "expert=-2"], ["expert=-2", "positive", "fix"]),
    ("info-mesh-zero", ["info", "--mesh", "expert=0"], ["expert=0", "positive", "fix"]),
    ("info-mesh-not-int", ["info", "--config", "tiny", "--mesh", "expert=x"], ["expert", "'x'", "fix"]),
    ("info-mesh-not-axis-eq-n", ["info", "--mesh", "data"], ["'data' is not AXIS=N", "fix"]),
    ("info-mesh-unknown-axis", ["info", "--mesh", "dta=2"], ["unknown mesh axis 'dta'", "fix"]),
    ("info-mesh-axis-twice", ["info", "--mesh", "data=2,data=2"], ["'data' is given twice", "fix"]),
    ("info-mesh-two-free-axes", ["info", "--mesh", "data=-1,expert=-1"], ["only one axis may be -1", "fix"]),
    ("info-mesh-experts-do-not-divide", ["info", "--config", "deepseek_v3_671b", "--mesh", "expert=3"],
     ["expert=3", "do not divide"]),
    ("info-flag-bad-type", ["info", "--seq-len", "many"], ["--seq-len", "'many'"]),
    ("info-seq-len-zero", ["info", "--seq-len", "0"], ["--seq-len", "0 must be >= 1", "fix"]),
    ("info-moment-bytes-choice", ["info", "--moment-bytes", "3"], ["--moment-bytes", "invalid choice"]),
    # overrides after the flags reach the config (not "unrecognized arguments")
    ("info-override-after-flags", ["info", "n_routed_experts=32", "--json", "--seq-len", "64", "n_group=5"],
     ["n_group=5"]),
    # the top-level parser
    ("unknown-subcommand", ["frobnicate"], ["frobnicate", "invalid choice"]),
    ("no-subcommand", [], ["required"]),
    # train
    ("train-unknown-config", ["train", "--config", "no_such_run"], ["no_such_run"]),
    ("train-bad-override-key", ["train", "--config", "tiny", "train.lrr=1"], ["lrr", "train.lr"]),
    ("train-unknown-override-key", ["train", "--config", "tiny", "fooo=1"], ["'fooo'", "fix"]),
    ("train-bad-override-value", ["train", "--config", "tiny", "steps=abc"], ["train.steps='abc'"]),
    ("train-steps-negative", ["train", "--config", "tiny", "steps=-1"], ["train.steps=-1", "fix"]),
    ("train-lr-nan", ["train", "--config", "tiny", "train.lr=nan"], ["train.lr=nan", "fix"]),
    ("train-lr-inf", ["train", "--config", "tiny", "lr=inf"], ["train.lr=inf", "fix"]),
    ("train-weight-decay-nan", ["train", "--config", "tiny", "train.weight_decay=nan"], ["train.weight_decay=nan"]),
    ("train-runtime-bad-value", ["train", "--config", "tiny", "runtime.quant=fp9"], ["quant='fp9'"]),
    ("train-runtime-capacity-nan", ["train", "--config", "tiny", "capacity_factor=nan"], ["capacity_factor=nan"]),
    ("train-model-invalid", ["train", "--config", "tiny", "model.n_group=3"], ["n_group=3", "fix"]),
    ("train-data-bad-value", ["train", "--config", "tiny", "data.seq_len=0"], ["seq_len", "0"]),
    ("train-data-path-missing", ["train", "--config", "tiny", "data.path={tmp}/no_corpus"],
     ["no_corpus", "does not exist", "fix"]),
    ("train-mesh-does-not-divide-devices", ["train", "--config", "tiny", "steps=1", "--mesh", "data=3",
                                            "train.output_dir={tmp}/run"], ["3 devices", "8 are available"]),
    ("train-mesh-zero", ["train", "--config", "tiny", "--mesh", "expert=0"], ["expert=0", "fix"]),
    ("train-mesh-not-int", ["train", "--config", "tiny", "--mesh", "data=x"], ["data='x'", "fix"]),
    ("train-output-dir-unwritable", ["train", "--config", "tiny", "steps=1", "train.output_dir=/proc/dsv3_run"],
     ["/proc/dsv3_run", "not writable"]),
    ("train-output-dir-is-a-file", ["train", "--config", "tiny", "steps=1", "train.output_dir={tmp}/corpus.txt"],
     ["corpus.txt", "fix"]),
    ("train-unknown-flag", ["train", "--config", "tiny", "--stepz", "3"], ["--stepz"]),
    # convert (the command line only; the converter's own checks are tests/checkpoint's)
    ("convert-missing-src", ["convert", "hf-to-orbax", "{tmp}/no_such_src", "{tmp}/out"], ["no_such_src"]),
    ("convert-stray-argument", ["convert", "hf-to-orbax", "{tmp}/a", "{tmp}/b", "k=v"], ["unrecognized", "k=v"]),
    ("convert-missing-checkpoint", ["convert", "orbax-to-hf", "{tmp}/no_such_ckpt", "{tmp}/hf"],
     ["no_such_ckpt"]),
    ("convert-bad-dtype", ["convert", "hf-to-orbax", "{tmp}/a", "{tmp}/b", "--dtype", "float16"],
     ["--dtype", "invalid choice"]),
    ("convert-shard-size-not-a-number", ["convert", "orbax-to-hf", "{ckpt}", "{tmp}/hf", "--max-shard-size", "big"],
     ["--max-shard-size", "'big'"]),
    ("convert-no-direction", ["convert"], ["required", "{{hf-to-orbax,orbax-to-hf}}"]),
    # score
    ("score-missing-checkpoint", ["score", "--checkpoint", "{tmp}/no_such_ckpt", "--token-ids", "{tmp}/ids.npy"],
     ["no_such_ckpt", "does not exist"]),
    ("score-text-missing-checkpoint", ["score", "--checkpoint", "{tmp}/no_such_ckpt", "--text", "hi"],
     ["no_such_ckpt", "does not exist"]),
    ("score-checkpoint-is-hf-dir", ["score", "--checkpoint", "{ckpt}_hf", "--token-ids", "{tmp}/ids.npy"],
     ["ckpt_hf", "not a dsv3 checkpoint", "fix"]),
    ("score-ids-file-missing", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/nope.npy"],
     ["--token-ids", "nope.npy", "does not exist"]),
    ("score-ids-file-not-npy", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/not_npy.npy"],
     ["--token-ids", "not_npy.npy", "not a .npy file", "fix"]),
    ("score-ids-file-binary", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/binary.dat"],
     ["binary.dat", "not a .npy file"]),
    ("score-ids-file-npz", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids.npz"], [".npz archive"]),
    ("score-ids-file-objects", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/objects.npy"],
     ["objects.npy", "Python objects"]),
    ("score-ids-file-is-dir", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}"], ["is a directory"]),
    ("score-ids-float", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/float_ids.npy"],
     ["float_ids.npy", "float32"]),
    ("score-ids-3d", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/ids_3d.npy"], ["(1, 2, 4)"]),
    ("score-ids-outside-vocab", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/big_ids.npy"],
     ["id {vocab}", "outside the vocabulary"]),
    ("score-ids-negative", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/neg_ids.npy"],
     ["neg_ids.npy", "id -1"]),
    ("score-one-token", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/one_token.npy", "--json"],
     ["one_token.npy", "1 token(s)", "at least 2", "fix"]),
    ("score-empty-sequence", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/empty_seq.npy"],
     ["empty_seq.npy", "0 token(s)", "at least 2"]),
    ("score-no-sequences", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/no_rows.npy"],
     ["no_rows.npy", "no sequences"]),
    ("score-longer-than-context", ["score", "--checkpoint", "{ckpt}", "--token-ids", "{tmp}/too_long.npy"],
     ["too_long.npy", "context of {ctx}", "fix"]),
    ("score-text-without-tokenizer", ["score", "--checkpoint", "{ckpt}", "--text", "hello"], ["tokenizer.json"]),
    ("score-text-one-token", ["score", "--checkpoint", "{ckpt_tok}", "--text", "a"], ["--text", "at least 2"]),
    ("score-text-not-utf8", ["score", "--checkpoint", "{ckpt_tok}", "--text", "ab\udcffcd"],
     ["--text", "not UTF-8", "fix"]),
    ("score-text-file-not-utf8", ["score", "--checkpoint", "{ckpt_tok}", "--text-file", "{tmp}/bad_utf8.txt"],
     ["--text-file", "bad_utf8.txt", "not UTF-8", "byte 2"]),
    ("score-text-file-missing", ["score", "--checkpoint", "{ckpt_tok}", "--text-file", "{tmp}/nope.txt"],
     ["--text-file", "nope.txt", "does not exist"]),
    ("score-save-logits-no-dir", S + ["--save-logits", "{tmp}/no_dir/logits.npy"],
     ["--save-logits", "no_dir", "does not exist", "fix"]),
    ("score-save-logits-is-dir", S + ["--save-logits", "{tmp}"], ["--save-logits", "is a directory"]),
    ("score-mesh-does-not-divide-devices", S + ["--mesh", "data=3"], ["3 devices", "8 are available"]),
    ("score-mesh-bad", S + ["--mesh", "data=0"], ["data=0", "fix"]),
    ("score-no-mtp-module", S + ["--save-mtp-logits", "{tmp}/mtp.npy"], ["no MTP module"]),
    ("score-bad-runtime-override", S + ["compute_dtype=float99"], ["compute_dtype"]),
    ("score-unknown-runtime-override", S + ["foo=1"], ["'runtime.foo'"]),
    ("score-model-override", S + ["n_routed_experts=3"], ["'runtime.n_routed_experts'"]),
    # generate
    ("generate-missing-checkpoint", ["generate", "--checkpoint", "{tmp}/no_such_ckpt", "--prompt-ids", "1"],
     ["no_such_ckpt", "does not exist"]),
    ("generate-temperature-nan", G + ["--temperature", "nan"], ["--temperature", "nan", "finite", "fix"]),
    ("generate-temperature-negative", G + ["--temperature", "-1"], ["--temperature", "-1", ">= 0"]),
    ("generate-temperature-inf", G + ["--temperature", "inf"], ["--temperature", "inf", "finite"]),
    ("generate-top-p-nan", G + ["--top-p", "nan"], ["--top-p", "nan", "(0, 1]"]),
    ("generate-top-p-zero", G + ["--top-p", "0"], ["--top-p", "(0, 1]"]),
    ("generate-top-p-above-one", G + ["--top-p", "1.5"], ["--top-p", "1.5"]),
    ("generate-top-k-negative", G + ["--top-k", "-5"], ["--top-k", "-5", ">= 0", "fix"]),
    ("generate-max-new-tokens-zero", G + ["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    ("generate-max-new-tokens-not-int", G + ["--max-new-tokens", "ten"], ["--max-new-tokens", "'ten'"]),
    ("generate-seed-not-int", G + ["--seed", "1.5"], ["--seed", "'1.5'"]),
    ("generate-too-long-for-context", G + ["--max-new-tokens", "5000"],
     ["--max-new-tokens 5000", "context of {ctx}", "fix"]),
    ("generate-checkpoint-is-a-file", ["generate", "--checkpoint", "{tmp}/ids.npy", "--prompt-ids", "1"],
     ["ids.npy", "not a dsv3 checkpoint", "fix"]),
    ("generate-prompt-missing-checkpoint", ["generate", "--checkpoint", "{tmp}/no_such_ckpt", "--prompt", "hi"],
     ["no_such_ckpt", "does not exist"]),
    ("generate-prompt-ids-outside-vocab", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1,{vocab}"],
     ["--prompt-ids", "id {vocab}", "outside the vocabulary"]),
    ("generate-prompt-ids-negative", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "-1"],
     ["--prompt-ids", "id -1"]),
    ("generate-prompt-ids-empty", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", ""], ["at least one token"]),
    ("generate-prompt-ids-not-ints", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1,x"],
     ["--prompt-ids", "'1,x'"]),
    ("generate-prompt-ids-empty-item", ["generate", "--checkpoint", "{ckpt}", "--prompt-ids", "1,,2"],
     ["--prompt-ids", "item 2 is an empty item", "fix"]),
    ("generate-stop-ids-not-ints", G + ["--stop-ids", "a,b"], ["--stop-ids", "'a,b'"]),
    ("generate-stop-ids-outside-vocab", G + ["--stop-ids", "1,99999"], ["--stop-ids", "id 99999", "outside"]),
    ("generate-prompt-without-tokenizer", ["generate", "--checkpoint", "{ckpt}", "--prompt", "hi"],
     ["no tokenizer.json", "--prompt-ids"]),
    ("generate-prompt-not-utf8", ["generate", "--checkpoint", "{ckpt_tok}", "--prompt", "ab\udcffcd"],
     ["--prompt", "not UTF-8", "fix"]),
    ("generate-prompt-file-not-utf8", ["generate", "--checkpoint", "{ckpt_tok}", "--prompt-file",
                                       "{tmp}/bad_utf8.txt"], ["--prompt-file", "bad_utf8.txt", "not UTF-8"]),
    ("generate-prompt-file-missing", ["generate", "--checkpoint", "{ckpt_tok}", "--prompt-file", "{tmp}/nope.txt"],
     ["--prompt-file", "nope.txt", "does not exist"]),
    ("generate-prompt-file-empty", ["generate", "--checkpoint", "{ckpt_tok}", "--prompt-file", "{tmp}/empty.txt"],
     ["--prompt-file", "empty.txt", "no tokens"]),
    ("generate-speculative-without-mtp", G + ["--speculative", "mtp"], ["MTP module"]),
    ("generate-mesh-does-not-divide-devices", G + ["--mesh", "expert=3"], ["3 devices", "8 are available"]),
    ("generate-unknown-runtime-override", G + ["foo=1"], ["'runtime.foo'"]),
    ("generate-bad-runtime-override", G + ["quant=fp9"], ["quant='fp9'"]),
    # tokenizer
    ("tokenizer-vocab-too-small", T[:-1] + ["10"], ["vocab_size 10", "too small", "fix"]),
    ("tokenizer-vocab-zero", T[:-1] + ["0"], ["--vocab-size", ">= 1"]),
    ("tokenizer-vocab-not-int", T[:-1] + ["lots"], ["--vocab-size", "'lots'"]),
    ("tokenizer-min-frequency-negative", T + ["--min-frequency", "-1"], ["--min-frequency", "-1"]),
    ("tokenizer-max-documents-zero", T + ["--max-documents", "0"], ["--max-documents", ">= 1"]),
    ("tokenizer-missing-data", ["tokenizer", "train", "--output", "{tmp}/tok", "--data", "{tmp}/no_corpus"],
     ["no_corpus", "does not exist", "fix"]),
    ("tokenizer-empty-data", ["tokenizer", "train", "--output", "{tmp}/tok", "--data", "{tmp}/empty.txt"],
     ["--data", "empty.txt", "no text", "fix"]),
    ("tokenizer-binary-data", ["tokenizer", "train", "--output", "{tmp}/tok", "--data", "{tmp}/binary.dat"],
     ["binary.dat", "not UTF-8", "fix"]),
    ("tokenizer-glob-matches-nothing", ["tokenizer", "train", "--output", "{tmp}/tok", "--data", "{tmp}",
                                        "--glob", "*.zzz"], ["'*.zzz'", "fix"]),
    ("tokenizer-output-is-a-file", ["tokenizer", "train", "--output", "{tmp}/corpus.txt", "--data",
                                    "{tmp}/corpus.txt"], ["--output", "corpus.txt", "is a file", "fix"]),
    ("tokenizer-output-unwritable", ["tokenizer", "train", "--output", "/proc/dsv3_tok", "--data", "{tmp}/corpus.txt"],
     ["--output", "/proc/dsv3_tok", "fix"]),
    ("tokenizer-override-not-accepted", T + ["k=v"], ["unrecognized", "k=v"]),
    ("tokenizer-missing-output", ["tokenizer", "train", "--vocab-size", "300"], ["--output"]),
    ("tokenizer-no-action", ["tokenizer"], ["required", "{{train}}"]),
    # a subcommand's flags before its name (argparse alone says "invalid choice: 'C'")
    ("eval-flags-before-task", ["eval", "--checkpoint", "C", "--ema", "ppl", "--json"],
     ["--checkpoint is a flag of `dsv3 eval ppl`", "fix: name the subcommand first: `dsv3 eval ppl --checkpoint C "
      "--ema --json`"]),
    ("convert-flags-before-direction", ["convert", "--dtype", "bfloat16", "hf-to-orbax", "a", "b"],
     ["--dtype is a flag of `dsv3 convert hf-to-orbax`", "`dsv3 convert hf-to-orbax --dtype bfloat16 a b`"]),
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
    cmd = "dsv3" if not argv or argv[0].startswith("frob") else f"dsv3 {argv[0]}"
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


@pytest.fixture(scope="module")
def model():
    return dsv3.DeepSeekV3(dsv3.load_config("tiny", MODEL), rngs=nnx.Rngs(0))


def _forward(model, tokens):
    forward, state = dsv3.make_forward(model, mtp=False)
    return forward(state, tokens)


def _score(model, tokens, **kw):
    from dsv3_jax.inference.scoring import score
    return score(model, tokens, **kw)


def _data(files, name):
    from dsv3_jax.data import DataConfig, load_tokenizer, make_dataset
    cfg = DataConfig(path=f"{files['tmp']}/{name}", seq_len=8, batch_size=2, val_fraction=0.0, read_threads=0)
    return next(iter(make_dataset(cfg, load_tokenizer(files["ckpt_tok"], require=()), vocab_size=512,
                                  shard_index=0, shard_count=1)))


V = 512  # the tiny config's vocabulary
# (id, call(model, files), the documented exception type, substrings of its message)
API_CASES = [
    ("load_config-unknown-name", lambda m, f: dsv3.load_config("no_such_config"), dsv3.ConfigError,
     ["no_such_config", "known configs"]),
    ("load_config-typo", lambda m, f: dsv3.load_config("tiny", ["n_grup=4"]), dsv3.ConfigError,
     ["'n_grup'", "fix: did you mean n_group"]),
    ("load_config-runtime-key", lambda m, f: dsv3.load_config("tiny", ["quant=fp8"]), dsv3.ConfigError,
     ["quant", "RuntimeConfig"]),
    ("load_config-binary-file", lambda m, f: dsv3.load_config(f"{f['tmp']}/binary.yaml"), dsv3.ConfigError,
     ["binary.yaml", "not UTF-8"]),
    ("load_config-not-finite", lambda m, f: dsv3.load_config("tiny", {"rope_theta": float("nan")}),
     dsv3.ConfigError, ["rope_theta=nan", "finite"]),
    ("model-1d-tokens", lambda m, f: m(np.array([1, 2, 3], np.int32)), dsv3.TokenRangeError,
     ["[batch, seq]", "shape (3,)", "tokens[None]"]),
    ("model-3d-tokens", lambda m, f: m(np.zeros((1, 1, 3), np.int32)), dsv3.TokenRangeError,
     ["[batch, seq]", "(1, 1, 3)"]),
    ("model-float-tokens", lambda m, f: m(np.zeros((1, 3), np.float32)), dsv3.TokenRangeError,
     ["dtype float32", "int32"]),
    ("model-list-tokens", lambda m, f: m([[1, 2, 3]]), dsv3.TokenRangeError, ["got a list", "jnp.asarray"]),
    ("model-id-outside-vocab", lambda m, f: m(np.array([[1, V]], np.int32)), dsv3.TokenRangeError,
     [f"id {V} at index (0, 1)"]),
    ("make_forward-1d-tokens", lambda m, f: _forward(m, np.array([1, 2], np.int32)), dsv3.TokenRangeError,
     ["[batch, seq]", "tokens[None]"]),
    ("make_forward-list", lambda m, f: _forward(m, [[1, 2]]), dsv3.TokenRangeError, ["got a list"]),
    ("make_forward-float", lambda m, f: _forward(m, np.zeros((1, 2), np.float64)), dsv3.TokenRangeError,
     ["float64"]),
    ("make_forward-id-outside-vocab", lambda m, f: _forward(m, np.array([[1, 2, V]], np.int32)),
     dsv3.TokenRangeError, [f"id {V} at index (0, 2)"]),
    ("score-3d", lambda m, f: _score(m, np.zeros((1, 2, 3), np.int32)), dsv3.TokenRangeError, ["[batch, seq]"]),
    ("score-one-token", lambda m, f: _score(m, [[7]]), dsv3.TokenRangeError, ["1 token(s)", "at least 2"]),
    ("score-empty", lambda m, f: _score(m, []), dsv3.TokenRangeError, ["0 token(s)", "at least 2"]),
    ("score-ragged-list", lambda m, f: _score(m, [[1, 2, 3], [4, 5]]), dsv3.TokenRangeError,
     ["different lengths [2, 3]"]),
    ("score-float", lambda m, f: _score(m, [[1.5, 2.0]]), dsv3.TokenRangeError, ["float64"]),
    ("score-text", lambda m, f: _score(m, "hello"), dsv3.TokenRangeError, ["got text"]),
    ("score-longer-than-context", lambda m, f: _score(m, np.zeros((1, 1025), np.int32)), dsv3.TokenRangeError,
     ["1025 tokens", "context of 1024"]),
    ("score-id-outside-vocab", lambda m, f: _score(m, [[1, V]]), dsv3.TokenRangeError, [f"id {V}"]),
    ("score-mtp-without-module", lambda m, f: _score(m, np.zeros((1, 3), np.int32), mtp=True), dsv3.ConfigError,
     ["no MTP module"]),
    ("generate-flat-list", lambda m, f: dsv3.generate(m, [1, 2, 3]), dsv3.GenerationError,
     ["flat list of 3 token ids", "[[1, 2, 3]]"]),
    ("generate-text", lambda m, f: dsv3.generate(m, "hello"), dsv3.GenerationError, ["got text", "encode"]),
    ("generate-1d-array", lambda m, f: dsv3.generate(m, np.array([1, 2], np.int32)), dsv3.GenerationError,
     ["[batch, seq]", "(2,)", "ids[None]"]),
    ("generate-float-array", lambda m, f: dsv3.generate(m, np.zeros((1, 2), np.float32)), dsv3.GenerationError,
     ["float32", "astype"]),
    ("generate-float-id", lambda m, f: dsv3.generate(m, [[1, 2.5]]), dsv3.GenerationError,
     ["prompt 0 token 1 is 2.5"]),
    ("generate-empty-prompt", lambda m, f: dsv3.generate(m, [[1], []]), dsv3.GenerationError,
     ["prompt 1 is empty"]),
    ("generate-no-prompts", lambda m, f: dsv3.generate(m, []), dsv3.GenerationError, ["no prompts"]),
    ("generate-temperature-nan", lambda m, f: dsv3.generate(m, [[1]], temperature=float("nan")),
     dsv3.GenerationError, ["temperature=nan", "finite"]),
    ("generate-temperature-negative", lambda m, f: dsv3.generate(m, [[1]], temperature=-1.0), dsv3.GenerationError,
     ["temperature=-1.0"]),
    ("generate-top-p-zero", lambda m, f: dsv3.generate(m, [[1]], top_p=0.0), dsv3.GenerationError,
     ["top_p=0.0", "(0, 1]"]),
    ("generate-top-p-nan", lambda m, f: dsv3.generate(m, [[1]], top_p=float("nan")), dsv3.GenerationError,
     ["top_p=nan"]),
    ("generate-top-k-negative", lambda m, f: dsv3.generate(m, [[1]], top_k=-5), dsv3.GenerationError, ["top_k=-5"]),
    ("generate-max-new-tokens-zero", lambda m, f: dsv3.generate(m, [[1]], max_new_tokens=0), dsv3.GenerationError,
     ["max_new_tokens=0"]),
    ("generate-seed-float", lambda m, f: dsv3.generate(m, [[1]], seed=1.5), dsv3.GenerationError, ["seed=1.5"]),
    ("generate-stop-outside-vocab", lambda m, f: dsv3.generate(m, [[1]], stop_tokens=[V]), dsv3.TokenRangeError,
     ["stop_tokens", f"id {V}"]),
    ("generate-stop-not-int", lambda m, f: dsv3.generate(m, [[1]], stop_tokens=["a"]), dsv3.GenerationError,
     ["stop_tokens holds 'a'"]),
    ("generate-not-a-model", lambda m, f: dsv3.generate(m.cfg, [[1]]), dsv3.GenerationError,
     ["ModelConfig", "DeepSeekV3"]),
    ("Generator-temperature-inf", lambda m, f: Generator(m)([[1]], temperature=float("inf")),
     dsv3.GenerationError, ["temperature=inf"]),
    ("make_mesh-zero", lambda m, f: __import__("sharding").make_mesh("expert=0"), dsv3.MeshError,
     ["expert=0", "fix"]),
    ("data-empty-corpus", lambda m, f: _data(f, "empty.txt"), dsv3.DataError, ["empty.txt", "empty", "fix"]),
    ("data-binary-corpus", lambda m, f: _data(f, "binary.dat"), dsv3.DataError, ["binary.dat", "not UTF-8"]),
    ("data-missing-corpus", lambda m, f: _data(f, "no_corpus"), DataNotFoundError, ["no_corpus", "fix"]),
    ("train_tokenizer-no-text", lambda m, f: train_tokenizer(["", "  \n"], 300), dsv3.DataError,
     ["2 document(s) hold no text"]),
]


@pytest.mark.parametrize("call, exc, needles", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_python_api_bad_input(call, exc, needles, model, files):
    """The Python API raises the documented Dsv3Error subclass, naming the input and (mostly) the fix."""
    with pytest.raises(exc) as e:
        call(model, files)
    assert isinstance(e.value, dsv3.Dsv3Error) and isinstance(e.value, ValueError)
    for n in needles:
        assert n in str(e.value), f"{n!r} not in {str(e.value)!r}"


def test_score_defined_results(model, files, tmp_path, capsys):
    """`score` pads a batch to the mesh's batch shards and drops the padding rows (2 sequences on
    data=2,expert=4 = 8 shards give the single-device numbers); a 1-D sequence is a batch of one."""
    base = ["score", "--checkpoint", files["ckpt"], "--token-ids", f"{files['tmp']}/ids.npy", "compute_dtype=float32"]
    assert main(base + ["--save-logits", str(tmp_path / "one.npy"), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(base + ["--save-logits", str(tmp_path / "mesh.npy"), "--json", "--mesh", "data=2,expert=4"]) == 0
    mesh = json.loads(capsys.readouterr().out)
    assert mesh["batch"] == 2 and np.shape(mesh["nll"]) == (2, 7) and math.isfinite(mesh["mean_nll"])
    np.testing.assert_allclose(mesh["nll"], one["nll"], atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "mesh.npy"), np.load(tmp_path / "one.npy"), atol=1e-5)
    assert np.load(tmp_path / "mesh.npy").shape[0] == 2
    ids = np.load(f"{files['tmp']}/ids.npy")
    flat, batched = _score(model, ids[0]), _score(model, ids[:1].tolist())
    assert flat.nll.shape == (1, 7)
    np.testing.assert_array_equal(flat.nll, batched.nll)


def test_relative_paths_of_readme_commands(files, tmp_path, monkeypatch, capsys):
    """The README's score / generate / tokenizer / info commands with paths relative to the working
    directory (`--checkpoint ckpt/`, `--token-ids ids.npy`, `--save-logits logits.npy`, `--output tok/`)."""
    for name in ("ckpt", "ckpt_tok"):
        (tmp_path / name).symlink_to(files[name], target_is_directory=True)
    shutil.copy(f"{files['tmp']}/ids.npy", tmp_path / "ids.npy")
    shutil.copy(f"{files['tmp']}/corpus.txt", tmp_path / "corpus.txt")
    shutil.copy(config_dir() / "tiny.yaml", tmp_path / "my_model.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--checkpoint", "ckpt/", "--token-ids", "ids.npy", "--save-logits", "logits.npy"]) == 0
    assert np.load(tmp_path / "logits.npy").shape == (2, 8, 512)
    assert main(["score", "--checkpoint", "ckpt_tok", "--text", "def f(x):", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["scored_tokens"] >= 1
    assert main(["generate", "--checkpoint", "ckpt/", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 2
    assert main(["generate", "--checkpoint", "ckpt_tok", "--prompt", "def f", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert main(["tokenizer", "train", "--output", "tok/", "--vocab-size", "300", "--data", "corpus.txt"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert main(["info", "--config", "my_model.yaml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["config"] == "my_model"


def test_train_with_relative_paths_then_score_its_checkpoint(tmp_path, monkeypatch, capsys):
    """README: `dsv3 train ... data.path=corpus/ train.output_dir=runs/x`, then `dsv3 score --checkpoint
    runs/x/checkpoints/N --text ...`, every path relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        (tmp_path / "corpus" / f"f{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 8)
    argv = ["train", "--config", "tiny", "steps=1", "data.path=corpus/", "train.output_dir=runs/x", "data.seq_len=16",
            "data.batch_size=2", "train.eval_batches=0", "train.tensorboard=false",
            "train.progress=false", "train.async_checkpoint=false", *(f"model.{o}" for o in MODEL)]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out.splitlines()[-1])
    ckpt = tmp_path / "runs" / "x" / "checkpoints" / "1"
    assert res["step"] == 1 and (ckpt / "dsv3_checkpoint.json").is_file()
    assert main(["score", "--checkpoint", "runs/x/checkpoints/1", "--text", "def f(x):", "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["mean_nll"])
