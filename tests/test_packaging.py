"""Packaging and import layering (M12 item 8; docs/design.md §Layers, §Packaging).

- A non-editable install (the wheel pip builds from a copy of the sources) ships every module and the
  YAML configs, and works from a directory outside the repository in a fresh venv that sees the dev
  environment's third-party packages but not its editable install: ``dsv3 info --config
  deepseek_v3_671b`` and ``dsv3 train --config demo steps=2`` (configs resolved by NAME).
- ``sharding`` and ``pallas_kernels`` import nothing from ``dsv3_jax`` (and ``pallas_kernels`` nothing
  from ``sharding``), at any depth; library modules do not import project modules inside functions.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import site as sitemod
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dsv3_jax", "sharding", "pallas_kernels")
SHIPPED = ("pyproject.toml", "README.md", "configs", *PACKAGES)     # what the build reads


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def _files(root: Path, pattern: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.glob(pattern) if "__pycache__" not in p.parts}


# ---------------------------------------------------------------------------------------------------
# (a) non-editable install
# ---------------------------------------------------------------------------------------------------
def test_non_editable_install_runs_info_and_train_outside_the_repo(tmp_path):
    # Build from a copy: an in-tree build would write build/ and *.egg-info into the shared checkout
    # (and a stale build/lib could ship modules that no longer exist).
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SHIPPED:
        s = REPO / name
        shutil.copytree(s, src / name, ignore=ignore) if s.is_dir() else shutil.copy2(s, src / name)
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile",
          "--disable-pip-version-check", "--target", str(site), str(src)], cwd=tmp_path, env=os.environ.copy())

    # the wheel holds every module of the three packages and the configs as dsv3_jax/configs/*.yaml
    for pkg in PACKAGES:
        missing = _files(src, f"{pkg}/**/*.py") - _files(site, f"{pkg}/**/*.py")
        assert not missing, f"not in the wheel (add the package to pyproject.toml [tool.setuptools] packages): {sorted(missing)}"
    yamls = {Path(p).name for p in _files(src, "configs/*.yaml")}
    assert yamls and yamls == {Path(p).name for p in _files(site, "dsv3_jax/configs/*.yaml")}
    assert "dsv3 = dsv3_jax.cli:main" in next(site.glob("dsv3_jax-*.dist-info")).joinpath("entry_points.txt").read_text()

    # A fresh venv whose only link to the dev environment is a .pth file naming its site directories:
    # directories added by a .pth are not scanned for .pth files, so the editable install's import hook
    # stays off and the installed copy (listed first) is the only dsv3_jax there is.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=os.environ.copy())
    py = venv / "bin" / "python"
    venv_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=tmp_path, env=os.environ.copy()).strip())
    deps = [*sitemod.getsitepackages(), *([sitemod.getusersitepackages()] if sitemod.ENABLE_USER_SITE else [])]
    (venv_site / "dsv3_test_paths.pth").write_text("".join(f"{p}\n" for p in [site, *deps]))

    work = tmp_path / "work"                       # cwd outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DSV3_CONFIG_DIR", "VIRTUAL_ENV")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".jax_cache")      # as tests/conftest.py
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"

    where = json.loads(_run([py, "-c", (
        "import json, dsv3_jax, sharding, pallas_kernels; from dsv3_jax.config import config_dir, list_configs; "
        "print(json.dumps({'files': [m.__file__ for m in (dsv3_jax, sharding, pallas_kernels)], "
        "'config_dir': str(config_dir()), 'configs': list_configs()}))")], cwd=work, env=env))
    for f in where["files"]:
        assert Path(f).resolve().is_relative_to(site.resolve()), f"imported {f}, not the installed copy under {site}"
    assert Path(where["config_dir"]).resolve() == (site / "dsv3_jax" / "configs").resolve()
    assert {"deepseek_v3_671b", "demo", "tiny"} <= set(where["configs"])

    out = _run([py, "-m", "dsv3_jax.cli", "info", "--config", "deepseek_v3_671b"], cwd=work, env=env)
    assert "671,026,419,200" in out, out

    # the demo run config by name, shrunk to a couple of seconds of work: a 20-document tokenizer,
    # 2 sequences of 32 tokens, no evaluation / TensorBoard, a synchronous checkpoint at step 2
    run_dir = tmp_path / "run"
    out = _run([py, "-m", "dsv3_jax.cli", "train", "--config", "demo", "steps=2", f"train.output_dir={run_dir}",
                "train.tokenizer_documents=20", "data.seq_len=32", "data.batch_size=2", "train.eval_batches=0",
                "train.progress=false", "train.tensorboard=false", "train.checkpoint_every=2",
                "train.async_checkpoint=false"], cwd=work, env=env)
    final = json.loads(out.strip().splitlines()[-1])
    assert final["step"] == 2, out
    ckpt = Path(final["checkpoint"])
    assert ckpt.is_dir() and ckpt.resolve().is_relative_to(run_dir.resolve()) and any(ckpt.iterdir()), out
    assert not (work / "runs").exists() and not any(work.iterdir()), "train wrote into the working directory"


# ---------------------------------------------------------------------------------------------------
# (b) import layering
# ---------------------------------------------------------------------------------------------------
# Entry points: nothing imports them (checked below), so their imports cannot close a cycle; the CLI
# imports each subcommand's modules when that subcommand runs, so that `dsv3 --help` does not load jax.
ENTRY_POINTS = ("dsv3_jax/cli.py", "dsv3_jax/cli/", "dsv3_jax/inference/cli.py", "dsv3_jax/demo.py",
                "dsv3_jax/post_train_demo.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """``(lineno, absolute module names, inside a function?)`` for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                yield child.lineno, [a.name for a in child.names], in_function
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module
                # `from pkg import sub` may import the submodule pkg.sub
                yield child.lineno, [mod] + [f"{mod}.{a.name}" for a in child.names], in_function
            yield from visit(child, local)
    yield from visit(tree, False)


def _sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package, forbidden", [("sharding", {"dsv3_jax"}),
                                                ("pallas_kernels", {"dsv3_jax", "sharding"})])
def test_lower_layers_do_not_import_upper_ones(package, forbidden):
    bad = [f"{p.relative_to(REPO)}:{line}: {names[0]}" for p in _sources(package)
           for line, names, _ in _imports(p) if _top(names[0]) in forbidden]
    assert not bad, f"{package} must import nothing from {sorted(forbidden)} (docs/design.md §Layers):\n" + "\n".join(bad)


def _is_entry_point(path: Path) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == e or (e.endswith("/") and rel.startswith(e)) for e in ENTRY_POINTS)


def test_entry_points_are_imported_by_no_library_module():
    entry = {_module_name(p) for p in _sources(*PACKAGES) if _is_entry_point(p)}
    bad = [f"{p.relative_to(REPO)}:{line}: {n}" for p in _sources(*PACKAGES) if not _is_entry_point(p)
           for line, names, _ in _imports(p) for n in names if n in entry]
    assert not bad, "library modules import the CLI/demo entry points:\n" + "\n".join(bad)


def test_no_function_local_project_imports():
    """A project import inside a function hides a dependency (often one that would close a cycle at
    module level). Only entry points may defer imports; third-party ones (torch, matplotlib, ...) may be local."""
    bad = [f"{p.relative_to(REPO)}:{line}: {names[0]}" for p in _sources(*PACKAGES) if not _is_entry_point(p)
           for line, names, local in _imports(p) if local and _top(names[0]) in PACKAGES]
    assert not bad, "function-local imports of project modules (move them to the top of the module):\n" + "\n".join(bad)
