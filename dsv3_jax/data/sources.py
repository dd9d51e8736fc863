"""Document sources: random-access, deterministic lists of documents (``str``).

A source is a ``Sequence[str]`` (``len(src)``, ``src[i]``), which is what ``grain.MapDataset.source``
wants; documents are read lazily on access. Order is fixed: files sorted by their path relative to the
root, JSONL lines in file order.

- ``TextFileSource``: one UTF-8 text file = one document.
- ``JsonlSource``: one JSON object per line, the document is ``obj[text_field]`` (dots reach into nested
  objects: ``"meta.body"``). Blank lines are skipped.
- ``stdlib_source()``: the default corpus, no download needed: the ``.py`` files of this Python's
  standard library (``sysconfig.get_paths()["stdlib"]``), without ``site-packages`` and test directories
  (the tests hold deliberately non-UTF-8 and malformed files). About 730 files / 12 MB of real code.
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from dsv3_jax.errors import DataError, DataNotFoundError

STDLIB = "stdlib"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def list_files(root: Union[str, os.PathLike], glob: str = "**/*") -> list[Path]:
    """Files under ``root`` matching ``glob`` (recursive with ``**``), sorted by relative path.
    Hidden files/directories (``.name``) and ``__pycache__`` are skipped."""
    root = Path(root)
    out = []
    for p in root.glob(glob):
        rel = p.relative_to(root).parts
        if p.is_file() and not any(part.startswith(".") or part in _SKIP_DIRS for part in rel):
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files(include_tests: bool = False) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = list_files(root, "**/*.py")
    if not include_tests:
        files = [p for p in files if not _TEST_DIRS.intersection(p.relative_to(root).parts[:-1])]
    if not files:
        raise DataNotFoundError(f"no Python standard library sources (*.py) found under {root}; "
                                "pass a data path instead of 'stdlib'.")
    return files


class TextFileSource(Sequence[str]):
    """Each file is one document, read as UTF-8 on access."""

    def __init__(self, files: Sequence[Union[str, os.PathLike]]):
        self.files = [Path(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        path = self.files[index]
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}) (fix: use UTF-8 text or "
                            "JSONL files; in a directory, select them with the glob option, e.g. "
                            "'**/*.py').") from None
        except OSError as e:
            raise DataError(f"{path} cannot be read: {e.strerror or e} (fix: check the file and its "
                            "permissions).") from None

    def describe(self, index: int) -> str:
        return str(self.files[index])

    def __repr__(self) -> str:
        return f"TextFileSource({len(self)} files)"


def _field(obj, text_field: str, where: str) -> str:
    value = obj
    for key in text_field.split("."):
        if not isinstance(value, dict) or key not in value:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{where}: no text field {text_field!r} (record keys: {keys}); "
                             "set the JSONL text field option.")
        value = value[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string.")
    return value


class JsonlSource(Sequence[str]):
    """One document per non-blank JSONL line; the text is ``record[text_field]``.
    Construction scans the files once to index line offsets (no JSON parsing)."""

    def __init__(self, files: Sequence[Union[str, os.PathLike]], text_field: str = "text"):
        self.files = [Path(f) for f in files]
        self.text_field = text_field
        index: list[tuple[int, int, int]] = []   # (file number, byte offset, line number)
        for fi, path in enumerate(self.files):
            try:
                with open(path, "rb") as f:
                    offset = 0
                    for lineno, line in enumerate(f, start=1):
                        if line.strip():
                            index.append((fi, offset, lineno))
                        offset += len(line)
            except OSError as e:
                raise DataError(f"{path} cannot be read: {e.strerror or e} (fix: check the file and its "
                                "permissions).") from None
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        fi, offset, lineno = self._index[index]
        where = f"{self.files[fi]}:{lineno}"
        with open(self.files[fi], "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not a JSON line ({e})") from e
        return _field(obj, self.text_field, where)

    def describe(self, index: int) -> str:
        fi, _, lineno = self._index[index]
        return f"{self.files[fi]}:{lineno}"

    def __repr__(self) -> str:
        return f"JsonlSource({len(self)} records in {len(self.files)} files, text_field={self.text_field!r})"


def stdlib_source(include_tests: bool = False) -> TextFileSource:
    return TextFileSource(stdlib_files(include_tests))


def check_path(path: Union[str, os.PathLike]) -> None:
    """``DataNotFoundError`` unless ``path`` is ``"stdlib"``, a file or a directory (cheap: nothing is read)."""
    p = Path(path)
    if str(path) != STDLIB and not (p.is_file() or p.is_dir()):
        raise DataNotFoundError(f"data path {str(path)!r} does not exist (fix: use a file, a directory, or "
                                f"{STDLIB!r} for the Python standard library sources).")


def open_source(path: Union[str, os.PathLike], *, glob: str = "**/*",
                text_field: str = "text") -> Union[TextFileSource, JsonlSource]:
    """``"stdlib"``, a file, or a directory (files selected by ``glob``). ``.jsonl``/``.ndjson`` files are
    read as JSONL records, any other file as one text document; a directory must not mix the two."""
    if str(path) == STDLIB:
        return stdlib_source()
    check_path(path)
    p = Path(path)
    if p.is_file():
        files = [p]
    else:
        files = list_files(p, glob)
        if not files:
            raise DataNotFoundError(f"no files match {glob!r} under {p} (fix: change the glob option, e.g. "
                                    "'**/*.py', or point at a directory with files).")
    is_jsonl = [f.suffix in JSONL_SUFFIXES for f in files]
    if all(is_jsonl):
        return JsonlSource(files, text_field)
    if any(is_jsonl):
        raise DataError(f"{p} mixes JSONL and plain text files; pick one kind with the glob option "
                         "(e.g. '**/*.jsonl').")
    return TextFileSource(files)


def iter_documents(source: Sequence[str], indices: Optional[Sequence[int]] = None) -> Iterator[str]:
    """Documents of ``source`` in order (or at ``indices``)."""
    for i in (range(len(source)) if indices is None else indices):
        yield source[int(i)]
