"""`build_datasets_cached`: build_datasets, remembered per process for the runs that follow.

A bench worker trains run after run on the same (checkpoint, task) pair, where only the
learning rate, the seed and the method differ: the data (files, splits, template, tokenizer) is
the same, and reading, rendering and tokenising it again costs a second or more of host time
per run. The key is everything the result depends on: the data config, the tokenizer (its path,
size and chat template) and each file's size and modification time, so an edited file is read
again. The datasets are never modified by training, so a cached bundle can be shared.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dirtune.data.forget import parse_forget_files
from dirtune.data.pipeline import DataBundle, build_datasets

KEEP = 4  # bundles remembered (a worker usually meets one pair at a time)
_CACHE: "OrderedDict[str, DataBundle]" = OrderedDict()


def _files(cfg_data: Any) -> list[str]:
    """Every data path the config names (train/valid/test may each be a list of them)."""
    named = [path for _, path in parse_forget_files(getattr(cfg_data, "forget_files", None) or [])]
    out = []
    for value in (cfg_data.train_file, cfg_data.valid_file, cfg_data.test_file, cfg_data.forget_file, *named):
        out += [str(v) for v in (value if isinstance(value, list) else [value]) if v]
    return out


def _stat(path: str) -> list:
    """[path, size, mtime] of a file, or of every file in a folder (a saved dataset)."""
    p = Path(path).expanduser()
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    except OSError:
        return [str(path), None]  # build_datasets will say what is wrong with it


def cache_key(cfg_data: Any, tokenizer: Any) -> str:
    config = dataclasses.asdict(cfg_data) if dataclasses.is_dataclass(cfg_data) else dict(vars(cfg_data))
    tok = [getattr(tokenizer, "name_or_path", None), len(tokenizer), type(tokenizer).__name__,
           getattr(tokenizer, "chat_template", None)]
    return json.dumps([config, tok, [_stat(f) for f in _files(cfg_data)]], sort_keys=True, default=str)


def build_datasets_cached(cfg_data: Any, tokenizer: Any) -> DataBundle:
    """build_datasets(cfg_data, tokenizer), or the bundle this process built for the same key.
    A tokenizer not loaded from a folder (no name_or_path) is never cached: nothing names it."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name or not Path(name).exists():
        return build_datasets(cfg_data, tokenizer)
    key = cache_key(cfg_data, tokenizer)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    bundle = build_datasets(cfg_data, tokenizer)
    _CACHE[key] = bundle
    while len(_CACHE) > KEEP:
        _CACHE.popitem(last=False)
    return bundle


def clear() -> None:
    _CACHE.clear()
