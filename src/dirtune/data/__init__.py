"""Data: records.py (files, formats, checks), templates.py (prompts), tokenize.py (ids, masks,
packing, blocks, collation), splits.py (validation split), pipeline.py (`build_datasets`).

Names are imported on first use (PEP 562): `DataError` alone does not pull in torch or datasets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["DataBundle", "DataError", "build_datasets", "collate"]

_HOME = {
    "DataBundle": "dirtune.data.pipeline",
    "build_datasets": "dirtune.data.pipeline",
    "DataError": "dirtune.data.records",
    "collate": "dirtune.data.tokenize",
}

if TYPE_CHECKING:
    from dirtune.data.pipeline import DataBundle, build_datasets
    from dirtune.data.records import DataError
    from dirtune.data.tokenize import collate


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'dirtune.data' has no attribute {name!r}")
