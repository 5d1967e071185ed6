"""The bench file: loading, resolution of run configs, and errors that name what is wrong."""

from pathlib import Path

import pytest
import yaml

from dirtune.bench.config import load_bench_config, run_config
from dirtune.train.config import ConfigError

BASE = {"model": {"path": "runs/demo/source"}, "data": {"train_file": "train.jsonl"},
        "train": {"max_steps": 500, "eval_every": 50}}


def _bench(**over):
    d = {"name": "t", "base": "base.yaml", "lrs": [1e-4, 3e-4], "seeds": [0, 1, 2],
         "pairs": [{"name": "p", "overrides": ["data.valid_file=valid.jsonl"]}],
         "methods": [{"name": "adamw"},
                     {"name": "l2sp", "overrides": ["optimizer.name=balanced_adamw",
                                                    "optimizer.anchor=init", "optimizer.balance=none",
                                                    "optimizer.weight_decay=0.1"]}]}
    d.update(over)
    return d


def _write(tmp_path: Path, bench: dict) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump(bench))
    return p


def test_loads_defaults_and_resolves_base_relative_to_bench_file(tmp_path):
    cfg = load_bench_config(_write(tmp_path, _bench()), ["jobs=0", "devices=cpu"])
    assert cfg.base == str((tmp_path / "base.yaml").resolve())
    assert cfg.baseline == "adamw" and cfg.tune_seeds == [0] and cfg.jobs == 0
    assert cfg.devices == ["cpu"] and cfg.lrs == [1e-4, 3e-4]
    assert cfg.output_dir == str(Path("bench/results/t"))
    assert [m.name for m in cfg.methods] == ["adamw", "l2sp"]


def test_run_config_layers_overrides_and_owned_keys(tmp_path):
    cfg = load_bench_config(_write(tmp_path, _bench(max_steps=40, overrides=["train.batch_size=2"])))
    run = run_config(cfg, cfg.pairs[0], cfg.methods[1], 3e-4, 7, tmp_path / "r", "cpu")
    assert run.optimizer.lr == 3e-4 and run.train.seed == 7
    assert run.optimizer.name == "balanced_adamw" and run.optimizer.balance == "none"
    assert run.train.max_steps == 40 and run.train.eval_every == 50  # bench budget, base interval
    assert run.train.batch_size == 2 and run.data.valid_file == "valid.jsonl"
    assert run.train.output_dir == str(tmp_path / "r") and run.train.device == "cpu"
    assert run.train.target_loss is None and run.train.overwrite and run.train.resume is None


@pytest.mark.parametrize("bench, message", [
    (_bench(lr=[1e-4]), r"unknown key 'lr' \(did you mean 'lrs'\?\); accepted: name, base"),
    (_bench(methods=[{"name": "adamw", "lrs": [1e-3]}]), r"methods\[0\]\.lrs: a per-method"),
    (_bench(methods=[{"name": "adamw", "overides": []}]),
     r"unknown key 'methods\[0\]\.overides'.*accepted: name, overrides"),
    (_bench(methods=[{"name": "adamw", "overrides": ["optimizer.lr=1e-3"]}]),
     r"methods\[0\]\.overrides: 'optimizer\.lr=1e-3' sets a key the bench owns; use the bench's lrs"),
    (_bench(overrides=["train.max_steps=9"]), r"overrides: .*use the bench's max_steps"),
    (_bench(seeds=[0, 1]), r"seeds: \[0, 1\] is not valid; expected at least 3"),
    (_bench(lrs=[]), r"lrs: \[\] is not valid"),
    (_bench(baseline="sgd"), r"baseline: 'sgd' is not one of the methods \(adamw, l2sp\)"),
    (_bench(pairs=[{"name": "a/b"}]), r"pairs\[0\]\.name: 'a/b' is not valid"),
    (_bench(methods=[{"name": "adamw"}, {"name": "adamw"}]), r"methods\[1\]\.name: 'adamw' is used twice"),
    (_bench(pairs=[{"name": "p", "metric": "gsm8k"}]), r"metric 'gsm8k' needs metric_file"),
    (_bench(pairs=[{"name": "p", "metric": "bleu"}]), r"pairs\[0\]\.metric: 'bleu' is not valid; expected 'none'"),
    (_bench(methods=[{"name": "x", "overrides": ["optimizer.name=sgd"]}], baseline="x"),
     r"optimizer\.name: 'sgd' is not valid"),
    (_bench(jobs=-1), r"jobs: -1 is not valid"),
    (_bench(max_grid_extensions=-1), r"max_grid_extensions: -1 is not valid; expected an integer >= 0"),
    (_bench(grid_step=1.0), r"grid_step: 1\.0 is not valid; expected null or a number > 1"),
    (_bench(lrs=[1e-3]), r"grid_step: None is not valid; expected a number > 1 with a one-rate grid"),
    (_bench(base="missing.yaml"), r"missing\.yaml: train config file not found"),
])
def test_errors_name_file_key_and_accepted(tmp_path, bench, message):
    p = _write(tmp_path, bench)
    with pytest.raises(ConfigError, match=message) as e:
        load_bench_config(p)
    assert str(p) in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="bench file not found"):
        load_bench_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ is not valid YAML"):
        load_bench_config(bad)


def test_grid_extension_keys(tmp_path):
    cfg = load_bench_config(_write(tmp_path, _bench()))
    assert cfg.max_grid_extensions == 2 and cfg.grid_step is None  # on by default
    one = load_bench_config(_write(tmp_path, _bench(lrs=[1e-3])), ["max_grid_extensions=0"])
    assert one.lrs == [1e-3]
    stepped = load_bench_config(_write(tmp_path, _bench(lrs=[1e-3], grid_step=3)))
    assert stepped.grid_step == 3


def test_metric_file_satisfies_metric(tmp_path):
    cfg = load_bench_config(_write(tmp_path, _bench(
        pairs=[{"name": "p", "metric": "gsm8k", "metric_file": "g.jsonl", "metric_samples": 5}])))
    assert cfg.pairs[0].metric_samples == 5


def test_shipped_cpu_smoke_bench_loads():
    repo = Path(__file__).resolve().parents[3]
    cfg = load_bench_config(repo / "bench" / "cpu-smoke.yaml")
    assert len(cfg.seeds) >= 3 and cfg.baseline in [m.name for m in cfg.methods]


REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted(p for p in [*(REPO / "bench").glob("*.yaml"), *(REPO / "bench" / "gpu").glob("*.yaml")]
                 if p.name != "base.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_bench_gives_a_valid_config_for_every_run(path):
    from dirtune.bench.config import run_config

    cfg = load_bench_config(path)
    assert cfg.baseline in [m.name for m in cfg.methods] and len(cfg.seeds) >= 3
    for pair in cfg.pairs:
        for method in cfg.methods:
            run = run_config(cfg, pair, method, cfg.lrs[0], cfg.seeds[0], "/tmp/x", "cpu")
            assert run.optimizer.lr == cfg.lrs[0] and run.train.max_steps == cfg.max_steps
