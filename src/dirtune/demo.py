"""`dirtune demo`: the whole story offline on a CPU in a few minutes, from the project's own pieces.

1. make a small world (`dirtune.data.synthetic`): prose about it (source domain) and a question /
   profile-card task about it (downstream task), and a character-level tokenizer;
2. pretrain a tiny LLaMA-2-architecture model from scratch on the prose (`run_training`);
3. fine-tune that source model on the task twice, with identical data, seed, steps and
   evaluations: AdamW, and the method (BalancedAdamW: scale-balanced decay toward the
   pretrained weights, plus the decoupled weight direction penalty);
4. report steps to AdamW's best validation loss (method.md §3), the losses, forgetting (the rise
   of the loss on held-out source prose), a plot and a JSON file.

One seed and one fixed learning rate per method: an illustration, not a tuned comparison (that
is `dirtune bench`). The printed verdict is whatever the numbers say.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["run_demo", "DemoSizes", "FULL", "QUICK"]


@dataclass(frozen=True)
class DemoSizes:
    """Everything that makes the demo bigger or smaller."""

    n_people: int           # people in the world (the task has 11 records per person)
    n_source_train: int     # paragraphs of pretraining prose
    n_source_valid: int     # held-out paragraphs: source validation and forgetting
    hidden: int             # model width; heads are 4, MLP width ~2.7x
    layers: int
    source_steps: int       # pretraining steps
    source_len: int         # tokens (characters) per pretraining block
    source_eval_every: int
    task_steps: int         # fine-tuning budget, the same for both methods
    task_eval_every: int    # steps to target are resolved to this many steps
    batch_size: int


# FULL: 200 pretraining steps and 2 x 100 fine-tuning steps. The sizes before (300 and 2 x 150
# steps, checkpoints with optimizer state) took 72 s under `time` on an idle 2-core machine
# (38 s pretraining, 14 s per fine-tune: docs/demo/ at commit 3ca1023); this is about two
# thirds of that work (the budget: 90 s). QUICK (tests) ~9 s. Processes competing for the cores
# stretch every phase several times; the progress bars show it.
FULL = DemoSizes(n_people=48, n_source_train=1500, n_source_valid=60, hidden=96, layers=3,
                 source_steps=200, source_len=256, source_eval_every=50,
                 task_steps=100, task_eval_every=10, batch_size=16)
QUICK = DemoSizes(n_people=24, n_source_train=400, n_source_valid=30, hidden=64, layers=2,
                  source_steps=80, source_len=128, source_eval_every=40,
                  task_steps=30, task_eval_every=10, batch_size=8)

# One learning rate per method, each the one with the lowest best validation loss of a grid
# {3e-4, 1e-3, 3e-3, 1e-2} run once on the FULL demo's own source model, seed 0 (AdamW: 1e-3,
# the method: 3e-3): docs/demo/lr_grid.py and its output lr_grid.txt. Not swept per run: that is
# what `dirtune bench` does, with several seeds.
# Decay and turn strengths at the peak learning rate: a pull of eta*lambda*b_i = 0.03*b_i of the
# way back to the pretrained weights per step (b_i ~ 1, the scale balance) and a turn of about
# eta*lambda_dir = 0.03 of the angle to their direction per step.
SOURCE_LR = 3e-3
NOTE = ("one seed and one fixed learning rate per method: an illustration, not a tuned comparison "
        "(that is `dirtune bench`)")
METHODS = {
    "adamw": {
        "label": "AdamW",
        "overrides": ["optimizer.name=adamw", "optimizer.lr=1e-3", "optimizer.weight_decay=0.0"],
    },
    "method": {
        "label": "BalancedAdamW + direction penalty",
        "overrides": ["optimizer.name=balanced_adamw", "optimizer.lr=3e-3", "optimizer.anchor=init",
                      "optimizer.balance=scale", "optimizer.weight_decay=10",
                      "optimizer.anchor_dtype=fp32", "method.penalty=decoupled",
                      "method.direction_weight=10"],
    },
}


def _common_overrides(seed: int) -> list[str]:
    """What every demo run shares: CPU, fp32, full fine-tuning, a progress bar (steps, loss, ETA),
    re-runnable in place. Checkpoints hold the weights alone: the demo never resumes, and saving
    optimizer state at every improving evaluation would only cost time."""
    return [f"train.seed={seed}", "train.device=cpu", "train.progress=true", "train.report_to=[none]",
            "train.overwrite=true", "train.save_total_limit=1", "train.save_only_model=true",
            "model.dtype=fp32", "finetune.type=full", "finetune.train_embeddings=true", "train.drift_every=0"]


def task_overrides(run_dir: Path, files: dict, source_model: str, sizes: DemoSizes, seed: int) -> list[str]:
    """A fine-tuning run of the demo, less the method's own keys (METHODS)."""
    return _common_overrides(seed) + [
        f"model.path={source_model}",
        f"data.train_file={files['task_train']}", f"data.valid_file={files['task_valid']}",
        f"data.test_file={files['task_test']}", f"data.forget_file={files['source_valid']}",
        "data.format=alpaca", "data.template=plain", "data.max_length=256",
        f"train.output_dir={run_dir}", f"train.max_steps={sizes.task_steps}",
        f"train.batch_size={sizes.batch_size}", f"train.eval_batch_size={2 * sizes.batch_size}",
        f"train.eval_every={sizes.task_eval_every}", "train.warmup_steps=10",
        "train.lr_scheduler=cosine",
    ]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during one of the demo's runs: the run saved and stopped; so does the demo."""


def _train(cfg) -> dict:
    from dirtune.train.runner import run_training

    summary = run_training(cfg)
    if summary.get("interrupted"):
        raise Interrupted(summary["interrupted"])
    return summary


def _write_source_init(init_dir: Path, sizes: DemoSizes, tokenizer) -> None:
    """config.json of the tiny LLaMA-2 model plus the tokenizer: what `model.from_scratch` reads."""
    from transformers import LlamaConfig

    inter = int(round(sizes.hidden * 8 / 3 / 8) * 8)  # LLaMA's 8/3 x hidden, a multiple of 8
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.hidden, intermediate_size=inter,
        num_hidden_layers=sizes.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"],
    )
    init_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)


def _curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(validation curve, forgetting curve) from a run's metrics.jsonl."""
    from dirtune.train.run_folder import read_metrics

    val, forget = [], []
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        if rec.get("kind") != "eval":
            continue
        if isinstance(rec.get("eval_loss"), (int, float)):
            val.append((int(rec["step"]), float(rec["eval_loss"])))
        if isinstance(rec.get("forget_loss"), (int, float)):
            forget.append((int(rec["step"]), float(rec["forget_loss"])))
    return val, forget


def _verdict(res: dict, target: float) -> str:
    """The plain sentence of the outcome, whichever way it falls."""
    a, m = res["adamw"], res["method"]
    sa, sm = a["steps_to_target"], m["steps_to_target"]
    if sm is None:
        return (f"The method did not reach AdamW's best validation loss ({target:.4f}) within "
                f"{m['final_step']} steps (its best: {m['best_eval_loss']:.4f}); AdamW got there in {sa} steps.")
    if sm == sa:
        return f"The method reached AdamW's best validation loss ({target:.4f}) in the same number of steps ({sm})."
    if sm == 0:
        return f"The method's loss was already at AdamW's best ({target:.4f}) before training (step 0)."
    ratio = sa / sm
    if ratio > 1:
        return (f"The method reached AdamW's best validation loss ({target:.4f}) in {sm} steps vs {sa}: "
                f"{ratio:.2f}x fewer.")
    return (f"The method needed more steps to reach AdamW's best validation loss ({target:.4f}): "
            f"{sm} vs {sa} ({1 / ratio:.2f}x more).")


def _forgetting_verdict(res: dict) -> str:
    """The plain sentence about forgetting: the rise of the source-prose loss of each run."""
    fa, fm = res["adamw"]["forgetting"], res["method"]["forgetting"]
    if fa is None or fm is None:
        return "Forgetting was not measured."
    text = (f"Forgetting (rise of the loss on held-out source prose): AdamW {fa:+.4f}, "
            f"the method {fm:+.4f}")
    if fa > 0 and fm < fa:
        return text + f": {100 * (1 - fm / fa):.0f}% less."
    if fm > fa:
        return text + ": the method forgot more."
    return text + "."


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(res: dict) -> str:
    rows = [("method", "lr", "steps to target", "best val loss", "final val loss", "forgetting")]
    for key in ("adamw", "method"):
        r = res[key]
        steps = "not reached" if r["steps_to_target"] is None else str(r["steps_to_target"])
        rows.append((r["label"], _fmt(r["lr"], "g"), steps, _fmt(r["best_eval_loss"], ".4f"),
                     _fmt(r["final_eval_loss"], ".4f"), _fmt(r["forgetting"], "+.4f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = _figure(res)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure(res: dict):
    """Left: task validation loss of both runs, the target and where each first reaches it;
    right: the loss on held-out source prose, whose rise is the forgetting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, colour in (("adamw", "tab:blue"), ("method", "tab:red")):
        r = res[key]
        if r["curve"]:
            ax1.plot(*zip(*r["curve"]), marker=".", color=colour, label=r["label"])
        if r["forget_curve"]:
            ax2.plot(*zip(*r["forget_curve"]), marker=".", color=colour, label=r["label"])
        if r["steps_to_target"] is not None:
            ax1.axvline(r["steps_to_target"], color=colour, lw=0.8, ls=":",
                        label=f"{r['label']} first at the target (step {r['steps_to_target']})")
    ax1.axhline(res["target"], color="gray", ls="--", lw=1, label=f"target = AdamW's best, {res['target']:.3f}")
    ax1.set_yscale("log")  # the race to the target happens in the tail
    plain = FuncFormatter(lambda y, _: f"{y:g}")
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    ax1.set(xlabel="step", ylabel="task validation loss (log scale)", title="fine-tuning: validation loss")
    ax2.set(xlabel="step", ylabel="loss on held-out source prose",
            title="forgetting: source-prose loss (higher = more forgotten)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"dirtune demo: {NOTE}", fontsize=9)
    fig.tight_layout()
    return fig


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, quick: bool = False) -> dict:
    """Run the demo into `out_dir`, print the table and the verdict, return the numbers.

    Writes out_dir/{data, source_init, source, adamw, method}/, demo_loss.png and
    demo_result.json (the returned dict).
    """
    started = time.perf_counter()
    sizes = QUICK if quick else FULL
    # the demo prints its own progress; transformers' per-file bars would bury it
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run(Path(out_dir), seed, quick, sizes, started)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _run(out: Path, seed: int, quick: bool, sizes: DemoSizes, started: float) -> dict:
    """setup (the data and the source model's config) -> the source pretrained -> the two
    fine-tunings -> the comparison, printed and written."""
    from dirtune.data.synthetic import char_tokenizer, write_demo_data

    print(f"dirtune demo ({'quick' if quick else 'full'}, seed {seed}) -> {out}")
    print(f"      writing a world of {sizes.n_people} people: {sizes.n_source_train} paragraphs of prose "
          "(the source domain) and a question-answer task about it", flush=True)
    files = write_demo_data(out / "data", seed=seed, n_people=sizes.n_people,
                            n_source_train=sizes.n_source_train, n_source_valid=sizes.n_source_valid)
    tokenizer = char_tokenizer()
    _write_source_init(out / "source_init", sizes, tokenizer)
    source = _pretrain_source(out, files, sizes, seed)
    results = {key: _fine_tune(out, key, spec, files, source["dir"], sizes, seed)
               for key, spec in METHODS.items()}
    result = _compare(results, source, sizes, seed, quick)
    result["wall_time_s"] = time.perf_counter() - started
    _plot(result, out / "demo_loss.png")
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    _print_result(result, sizes, out)
    return result


def _pretrain_source(out: Path, files: dict, sizes: DemoSizes, seed: int) -> dict:
    """Step 1: the source model, pretrained from scratch on the world's prose."""
    from dirtune.train.config import load_config

    print(f"[1/3] pretraining a {sizes.layers}-layer, width-{sizes.hidden} LLaMA-2-architecture model "
          f"from scratch on the world's prose ({sizes.source_steps} steps)", flush=True)
    src_cfg = load_config(None, _common_overrides(seed) + [
        f"model.path={out / 'source_init'}", "model.from_scratch=true",
        f"data.train_file={files['source_train']}", f"data.valid_file={files['source_valid']}",
        "data.format=text", f"data.max_length={sizes.source_len}",
        "optimizer.name=adamw", f"optimizer.lr={SOURCE_LR}", "optimizer.weight_decay=0.0",
        f"train.output_dir={out / 'source'}", f"train.max_steps={sizes.source_steps}",
        f"train.batch_size={sizes.batch_size}", f"train.eval_batch_size={2 * sizes.batch_size}",
        f"train.eval_every={sizes.source_eval_every}", "train.warmup_steps=20",
        "train.lr_scheduler=cosine",
    ])
    src = _train(src_cfg)
    src_curve, _ = _curves(out / "source")
    source = {"dir": src["best_checkpoint"], "untrained_valid_loss": src_curve[0][1] if src_curve else None,
              "valid_loss": src["best_eval_loss"], "steps": src["final_step"], "curve": src_curve,
              "wall_time_s": src["wall_time_s"]}
    print(f"      source prose validation loss: {_fmt(source['untrained_valid_loss'], '.3f')} untrained -> "
          f"{_fmt(source['valid_loss'], '.3f')} pretrained ({src['wall_time_s']:.0f} s)")
    return source


def _fine_tune(out: Path, key: str, spec: dict, files: dict, source_model: str, sizes: DemoSizes,
               seed: int) -> dict:
    """Steps 2 and 3: one fine-tuning of the source model on the task, and its numbers."""
    from dirtune.train.config import load_config

    print(f"[{list(METHODS).index(key) + 2}/3] fine-tuning on the task with {spec['label']} "
          f"({sizes.task_steps} steps)", flush=True)
    cfg = load_config(None, task_overrides(out / key, files, source_model, sizes, seed) + spec["overrides"])
    summary = _train(cfg)
    curve, forget_curve = _curves(out / key)
    start, end = summary["forget_loss_start"], summary["forget_loss_end"]
    return {
        "label": spec["label"], "lr": cfg.optimizer.lr, "overrides": spec["overrides"],
        "curve": curve, "forget_curve": forget_curve,
        "best_eval_loss": summary["best_eval_loss"], "best_step": summary["best_step"],
        "final_eval_loss": summary["final_eval_loss"], "final_step": summary["final_step"],
        "test_loss": summary.get("test_loss"),
        "forget_loss_start": start, "forget_loss_end": end,
        "forgetting": None if start is None or end is None else end - start,
        "wall_time_s": summary["wall_time_s"],
    }


def _compare(results: dict, source: dict, sizes: DemoSizes, seed: int, quick: bool) -> dict:
    """The demo's result: steps to the target (method.md §3: the baseline's best validation
    loss within the budget), the speedup and the two verdicts."""
    from dirtune.bench.metrics import steps_to_target

    target = results["adamw"]["best_eval_loss"]
    for r in results.values():
        r["steps_to_target"] = steps_to_target(r["curve"], target)
    sa, sm = results["adamw"]["steps_to_target"], results["method"]["steps_to_target"]
    return {
        "seed": seed, "quick": quick, "sizes": dataclasses.asdict(sizes), "target": target,
        "source": source, **results,
        "speedup": sa / sm if sa is not None and sm else None,
        "verdict": _verdict(results, target),
        "forgetting_verdict": _forgetting_verdict(results),
        "note": NOTE,
    }


def _print_result(result: dict, sizes: DemoSizes, out: Path) -> None:
    print()
    print(_table(result))
    print()
    print(f"target = AdamW's best task validation loss; steps counted at evaluations every "
          f"{sizes.task_eval_every} steps; forgetting = change of the loss on held-out source prose.")
    print(result["verdict"])
    print(result["forgetting_verdict"])
    print(f"Note: {NOTE}.")
    print(f"Wrote {out / 'demo_loss.png'} and {out / 'demo_result.json'} ({result['wall_time_s']:.0f} s).")
