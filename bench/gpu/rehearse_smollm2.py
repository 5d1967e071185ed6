"""Rehearse the SmolLM2 benches on the CPU before GPU time is spent on them.

    python bench/gpu/rehearse_smollm2.py [--methods adamw,full-method] [--pairs gsm8k,...] [--out runs/rehearsal] [--jobs 0]

Writes shrunken copies of bench/gpu/smollm2-lora.yaml and smollm2-full.yaml into --out and runs
them with `dirtune bench`: every pair (task files, splits, template, forget sets, the gsm8k
metric; --pairs for fewer) and the methods named (a bench skips those it does not have), on
the real model the bench files name (.gpu3/models/, made by converting the GGUF), with everything but the configuration made tiny: 2 steps of 1 example,
evaluation every step on 2 rows per set, one learning rate, 16 new tokens on 2 metric samples.
The appended overrides only shrink sizes (what a GPU run would not notice); nothing else of the
bench files is changed. Exit status 1 if any run failed (its error.txt is printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SHRINK = ["data.max_samples=4", "data.max_eval_samples=2", "data.max_length=128", "train.batch_size=1",
          "train.eval_batch_size=2", "train.warmup_steps=0", "train.drift_every=1", "train.log_every=1"]
# the test split is not cut, nor are the blocks of a held-out text document: keep them small
TEST = {"alpaca": ["data.test_ratio=0.005"],
        "shakespeare": ["data.test_ratio=0.005", "data.valid_ratio=0.005"]}


def shrink(name: str, methods: list[str], out: Path, jobs: int, pairs: list[str] | None = None) -> Path:
    bench = yaml.safe_load((HERE / f"{name}.yaml").read_text())
    bench["base"] = str(HERE / bench["base"])
    bench["overrides"] = list(bench.get("overrides", [])) + SHRINK
    bench["methods"] = [m for m in bench["methods"] if m["name"] in methods]
    if pairs:
        bench["pairs"] = [p for p in bench["pairs"] if p["name"] in pairs]
    tests = out / "data"
    tests.mkdir(parents=True, exist_ok=True)
    for pair in bench["pairs"]:
        extra = []
        extra += TEST.get(pair["name"], [])
        for item in pair["overrides"]:
            key, _, value = item.partition("=")
            if key == "data.test_file":  # the first 4 records (the metric reads the same file)
                small = tests / Path(value).name
                small.write_text("".join(Path(value).read_text().splitlines(keepends=True)[:4]))
                extra.append(f"data.test_file={small}")
        pair["overrides"] = list(pair["overrides"]) + extra
        if pair.get("metric", "none") != "none":
            pair.update(metric_samples=2, metric_max_new_tokens=16, metric_batch_size=2)
    bench.update(lrs=bench["lrs"][:1], max_grid_extensions=0, max_steps=2, eval_every=1, jobs=jobs, devices=["cpu"],
                 output_dir=str(out / name))
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(bench, sort_keys=False))
    return path


def report(folder: Path) -> int:
    """One line per finished run, the failed runs' errors; the number of problems."""
    name = folder.name
    runs = sorted((folder / "runs").glob("*/*/*"))
    errors = [r for r in runs if (r / "error.txt").is_file()]
    done = [r for r in runs if (r / "summary.json").is_file()]
    metrics = [json.loads((r / "metric.json").read_text())["value"] for r in runs if (r / "metric.json").is_file()]
    print(f"{name}: {len(done)} runs finished, {len(errors)} failed, gsm8k metric on {len(metrics)} runs")
    for r in done:
        s = json.loads((r / "summary.json").read_text())
        forget = " ".join(f"{k} {v['start']:.3f}->{v['end']:.3f}" for k, v in (s.get("forget") or {}).items())
        metric = (r / "metric.json").is_file() and json.loads((r / "metric.json").read_text())["value"]
        print(f"  {'/'.join(r.parts[-3:])}: steps {s['final_step']}, best {s['best_eval_loss']:.4f} at "
              f"{s['best_step']}, test {s['test_loss']:.4f}, epochs {s['epochs']:.2f}, forget {forget}"
              + (f", gsm8k {metric}" if metric is not False else ""))
    for r in errors:
        print(f"--- {r}/error.txt\n{(r / 'error.txt').read_text()[-1500:]}")
    return len(errors) + (len(done) == 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="adamw,full-method")
    ap.add_argument("--benches", default="smollm2-lora,smollm2-full")
    ap.add_argument("--pairs", default="", help="only these pairs (default: all)")
    ap.add_argument("--out", default="runs/rehearsal")
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="only list the runs already in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    failed = 0
    for name in args.benches.split(","):
        methods = [m for m in args.methods.split(",") if m]
        known = {m["name"] for m in yaml.safe_load((HERE / f"{name}.yaml").read_text())["methods"]}
        path = shrink(name, [m for m in methods if m in known], out, args.jobs,
                      [p for p in args.pairs.split(",") if p])
        if not args.report_only:
            print(f"== {name}: dirtune bench {path}", flush=True)
            subprocess.run([sys.executable, "-m", "dirtune.cli", "bench", str(path)], check=False)
        failed += report(out / name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
