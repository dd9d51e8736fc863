"""The held-out documents of a checkpoint: the validation split of the run that trained it
(docs/design.md §Evaluation), so that ``dsv3 eval`` never scores text the model was trained on.

A training checkpoint records its run config (``train_state.json``): its ``data.path`` and
``data.val_fraction`` give the same validation documents the trainer evaluated on
(``split_document_ids`` depends on nothing else). A converted checkpoint records none: then the
standard library's validation split at ``DataConfig``'s default fraction is used, or ``--data``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..checkpoint.orbax_io import TRAIN_STATE, read_train_state
from ..data.pipeline import DataConfig, split_document_ids
from ..data.sources import STDLIB, open_source
from ..errors import DataError


def heldout_documents(checkpoint: str | Path, data_path: Optional[str] = None,
                      val_fraction: Optional[float] = None) -> tuple[Sequence[str], list[int], str]:
    """``(source, validation document indices, description)`` for ``checkpoint`` (see module doc)."""
    data = {}
    if (Path(checkpoint) / TRAIN_STATE).is_file():
        cfg = read_train_state(checkpoint).get("config")
        data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
    path = data_path or data.get("path") or STDLIB
    frac = val_fraction if val_fraction is not None else data.get("val_fraction", DataConfig.val_fraction)
    if not 0 < frac < 1:
        raise DataError(f"the held-out fraction is {frac!r}, so there are no held-out documents (fix: pass "
                        "--val-fraction 0.01, or a checkpoint trained with data.val_fraction > 0).")
    src = open_source(path, glob=data.get("glob", "**/*"), text_field=data.get("text_field", "text"))
    _, val = split_document_ids(len(src), frac)
    if len(val) == 0:
        raise DataError(f"{path} has {len(src)} document(s): too few for a held-out split (fix: evaluate on a "
                        "larger corpus with --data).")
    return src, [int(i) for i in val], f"{len(val)} held-out documents of {path} (val_fraction {frac})"


__all__ = ["heldout_documents"]
