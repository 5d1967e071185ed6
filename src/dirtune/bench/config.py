"""The bench file: which (checkpoint, task) pairs, which methods, one learning-rate grid, seeds.

    dirtune bench bench/cpu-smoke.yaml [key=value ...]

YAML -> BenchConfig (same error style as the train config: the file, the dotted key, the bad
value and what is accepted). Every run of the bench is the base train YAML plus, in order, the
bench `overrides`, the pair's, the method's, and then the keys the bench owns (learning rate,
seed, step budget, evaluation interval, run folder, device). Those owned keys may not appear in
any overrides list: one grid and one budget for every method is what makes the comparison fair
(method.md §3). `base` is relative to the bench file; paths inside overrides and metric_file
are read by the runs, relative to the working directory (as for `dirtune train`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml

from dirtune.train.config import (
    Config, ConfigError, TrainConfig, apply_overrides, build_section, option, from_dict, read_yaml,
)


@dataclass
class PairSpec:
    name: str = option("", "folder-safe name of this (source checkpoint, task) pair")
    overrides: list[str] = option([], "train overrides: model.path=..., data.train_file=..., data.forget_file=...")
    metric: Literal["none", "gsm8k"] = option("none", "downstream metric on the best checkpoint of each final run")
    metric_file: Optional[str] = option(None, "records the metric is computed on (default: the run's data.test_file)")
    metric_samples: int = option(200, "first N records of metric_file; more is slower and less noisy")
    metric_max_new_tokens: int = option(256, "greedy generation length per answer")
    metric_batch_size: int = option(16, "prompts generated together (left padding)")


@dataclass
class MethodSpec:
    name: str = option("", "folder-safe method name, e.g. adamw, l2sp, wdp")
    overrides: list[str] = option([], "train overrides that define the method (optimizer.*, method.*, finetune.*)")


@dataclass
class BenchConfig:
    name: str = option("bench", "name of the bench (report title)")
    base: str = option("", "train YAML every run starts from, relative to the bench file ('': train defaults)")
    overrides: list[str] = option([], "train overrides applied to every run")
    pairs: list[PairSpec] = option([], "(source checkpoint, task) pairs")
    methods: list[MethodSpec] = option([], "methods compared; each gets the same lrs grid")
    baseline: str = option("adamw", "method whose best validation loss sets the target T")
    lrs: list[float] = option([], "learning-rate grid, the same for every method (a pair's grid may "
                          "grow at its edges, see max_grid_extensions)")
    max_grid_extensions: int = option(2, "per pair and side: while a method's chosen lr is the grid's "
                                  "smallest/largest, add one rate beyond it (for every method), "
                                  "at most this many times; still on the edge after that = FAILED")
    grid_step: Optional[float] = option(None, "ratio between a grid edge and the rate added beyond it "
                                    "(> 1; null: the ratio of the two rates at that edge)")
    tune_seeds: list[int] = option([0], "seeds of the learning-rate sweep (tuning)")
    seeds: list[int] = option([0, 1, 2], "seeds of the final runs at each chosen lr (>= 3)")
    max_steps: Optional[int] = option(None, "step budget of every run (null: the base config's)")
    eval_every: Optional[int] = option(None, "validation interval k (null: the base config's)")
    jobs: int = option(1, "parallel worker processes; 0 runs in this process (tests, debugging)")
    devices: list[str] = option(["auto"], "devices handed to workers round-robin: cpu, cuda:0, ...")
    output_dir: str = option("", "results folder (default: bench/results/<name>)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Train keys the bench sets itself; in an overrides list they would break the fairness rules.
OWNED = {
    "optimizer.lr": "lrs (one grid for every method)",
    "train.seed": "tune_seeds / seeds",
    "train.max_steps": "max_steps (one budget for every method)",
    "train.eval_every": "eval_every",
    "train.output_dir": "output_dir (runs go to <output_dir>/runs/<pair>/<method>/)",
    "train.device": "devices",
    "train.target_loss": "nothing: an early stop would cut the curves the target is read from",
}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _list_of(cls: type, items, where: str) -> list:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of mappings, got {items!r}")
    return [build_section(cls, item, f"{where}[{i}]") for i, item in enumerate(items)]


def _check_overrides(overrides: list[str], where: str) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in OWNED:
            raise ConfigError(f"{where}: {item!r} sets a key the bench owns; use the bench's {OWNED[key]}")


def bench_from_dict(data: dict, source: str = "bench", base_dir: Path = Path(".")) -> BenchConfig:
    """Build and validate a BenchConfig; `base` is resolved against `base_dir` (absolute)."""
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"the top level must be a mapping of keys, got {data!r}")
        data = dict(data)
        for i, m in enumerate(data.get("methods") or []):
            if isinstance(m, dict) and "lrs" in m:
                raise ConfigError(f"methods[{i}].lrs: a per-method learning-rate grid is not allowed; "
                                  "every method is tuned on the bench's one `lrs` grid (fairness, "
                                  "method.md §3)")
        pairs = _list_of(PairSpec, data.pop("pairs", None), "pairs")
        methods = _list_of(MethodSpec, data.pop("methods", None), "methods")
        cfg = build_section(BenchConfig, data, "")
        cfg.pairs, cfg.methods = pairs, methods
        if cfg.base:
            cfg.base = str((base_dir / cfg.base).resolve())
        cfg.output_dir = cfg.output_dir or str(Path("bench") / "results" / cfg.name)
        validate_bench(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def validate_bench(cfg: BenchConfig) -> BenchConfig:
    """Checks types cannot express, then a dry resolution of every (pair, method) run config."""
    if cfg.base and not Path(cfg.base).is_file():
        raise ConfigError(f"base: {cfg.base}: train config file not found")
    for kind, items in (("pairs", cfg.pairs), ("methods", cfg.methods)):
        if not items:
            raise ConfigError(f"{kind}: at least one is required")
        names = [x.name for x in items]
        for i, n in enumerate(names):
            if not _SAFE_NAME.fullmatch(n):
                raise ConfigError(f"{kind}[{i}].name: {n!r} is not valid; expected letters, digits, "
                                  "'_', '.', '+', '-' (it names a folder)")
            if names.index(n) != i:
                raise ConfigError(f"{kind}[{i}].name: {n!r} is used twice")
    if cfg.baseline not in [m.name for m in cfg.methods]:
        raise ConfigError(f"baseline: {cfg.baseline!r} is not one of the methods "
                          f"({', '.join(m.name for m in cfg.methods)})")
    checks = [
        (len(cfg.lrs) >= 1 and all(lr > 0 for lr in cfg.lrs) and len(set(cfg.lrs)) == len(cfg.lrs),
         "lrs", cfg.lrs, "a list of distinct numbers > 0"),
        (cfg.max_grid_extensions >= 0, "max_grid_extensions", cfg.max_grid_extensions,
         "an integer >= 0 (0: never extend the grid)"),
        (cfg.grid_step is None or cfg.grid_step > 1, "grid_step", cfg.grid_step, "null or a number > 1"),
        (len(cfg.lrs) != 1 or cfg.grid_step is not None or cfg.max_grid_extensions == 0, "grid_step",
         cfg.grid_step, "a number > 1 with a one-rate grid (there is no neighbouring ratio to use), "
         "or max_grid_extensions: 0"),
        (len(cfg.tune_seeds) >= 1, "tune_seeds", cfg.tune_seeds, "at least one seed"),
        (len(cfg.seeds) >= 3 and len(set(cfg.seeds)) == len(cfg.seeds), "seeds", cfg.seeds,
         "at least 3 distinct seeds (method.md §3)"),
        (cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", cfg.max_steps, "null or >= 1"),
        (cfg.eval_every is None or cfg.eval_every >= 1, "eval_every", cfg.eval_every, "null or >= 1"),
        (cfg.jobs >= 0, "jobs", cfg.jobs, "an integer >= 0 (0 = in this process)"),
        (len(cfg.devices) >= 1, "devices", cfg.devices, "at least one device"),
    ]
    for ok, key, value, accepted in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is not valid; expected {accepted}")
    _check_overrides(cfg.overrides, "overrides")
    for i, p in enumerate(cfg.pairs):
        _check_overrides(p.overrides, f"pairs[{i}].overrides")
        for key in ("metric_samples", "metric_max_new_tokens", "metric_batch_size"):
            if getattr(p, key) < 1:
                raise ConfigError(f"pairs[{i}].{key}: {getattr(p, key)!r} is not valid; expected >= 1")
    for i, m in enumerate(cfg.methods):
        _check_overrides(m.overrides, f"methods[{i}].overrides")
    for p in cfg.pairs:  # fail now, not after hours of runs
        for m in cfg.methods:
            run = run_config(cfg, p, m, cfg.lrs[0], cfg.seeds[0], "runs/check", cfg.devices[0])
            if p.metric != "none" and not (p.metric_file or run.data.test_file):
                raise ConfigError(f"pairs {p.name!r}: metric {p.metric!r} needs metric_file "
                                  "or a data.test_file in its overrides")
    return cfg


def run_config(cfg: BenchConfig, pair: PairSpec, method: MethodSpec, lr: float, seed: int,
               output_dir: str | Path, device: str) -> Config:
    """The train Config of one run: base YAML, bench/pair/method overrides, then the owned keys."""
    data: dict = {}
    if cfg.base:
        data = read_yaml(cfg.base, "base train config")
    # resume/overwrite: the bench decides per run (grid.execute) whether to continue or restart
    owned = [f"optimizer.lr={lr!r}", f"train.seed={seed}", f"train.output_dir={output_dir}",
             "train.target_loss=null", "train.progress=false", "train.resume=null",
             "train.overwrite=true"]
    if cfg.max_steps is not None:
        owned.append(f"train.max_steps={cfg.max_steps}")
    if cfg.eval_every is not None:
        owned.append(f"train.eval_every={cfg.eval_every}")
    if "device" in {f.name for f in dataclasses.fields(TrainConfig)}:
        owned.append(f"train.device={device}")
    where = f"{cfg.base or 'train defaults'} + pair {pair.name!r} + method {method.name!r}"
    apply_overrides(data, cfg.overrides + pair.overrides + method.overrides + owned)
    return from_dict(data, where)


def load_bench_config(path: str | Path, overrides: list[str] | None = None) -> BenchConfig:
    """Read a bench YAML, apply top-level `key=value` overrides (e.g. jobs=4), validate."""
    p = Path(path)
    data = read_yaml(p, "bench file")
    if isinstance(data, dict):
        apply_overrides(data, overrides or [])
    return bench_from_dict(data, str(p), p.parent)
