"""Where the time of one training run goes, outside the model's forward and backward.

    python bench/gpu/profile_run.py [--config base.yaml] [--cprofile FILE] [--json FILE] -- key=value ...

Runs `run_training` once in this process with timers around every piece of a run: setup (model,
tokenizer, data, penalty, manifest, Trainer), per step (forward + loss, backward, clipping, the
optimizer step, the scheduler, each callback, logging), per evaluation (each evaluated set,
keeping the best weights: checkpoint folder or memory copy) and the end (best weights back,
test loss, final/, plot). Prints one table: calls, total seconds, share of the run's wall time,
milliseconds per call. Timers nest (an evaluation's forward passes are inside "evaluate"), so
the rows do not add up; the indented rows are parts of the row above them.

On a CPU the kernels run on the calling thread, so forward/backward hold their compute here;
the other rows are host work that a GPU run pays too (on the GPU, also the syncs they force).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

TIMES: dict[str, list[float]] = defaultdict(list)


def _timed(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - t0)
    wrapper.__profiled__ = True
    return wrapper


def _patch(owner, name: str, label: str) -> None:
    fn = getattr(owner, name, None)
    if fn is None or getattr(fn, "__profiled__", False):
        return
    setattr(owner, name, _timed(label, fn))


# (label, indent, owner path, attribute): owners are imported lazily; a missing one is skipped
# (the row then reads 0 calls), so the script runs on the code before and after a change.
ROWS = [
    ("setup: model + tokenizer (+LoRA)", 0, "dirtune.train.runner", "build_model"),
    ("setup: data (read, render, tokenise)", 0, "dirtune.train.runner", "build_datasets|build_datasets_cached"),
    ("setup: penalty / drift references", 0, "dirtune.train.runner", "build_penalty"),
    ("setup: manifest (hashes, git)", 0, "dirtune.train.run_folder", "write_manifest"),
    ("setup: Trainer()", 0, "dirtune.train.trainer", "DirtuneTrainer.__init__"),
    ("train loop (trainer.train)", 0, "transformers", "Trainer.train"),
    ("step: forward + backward (+ coupled penalty)", 1, "transformers", "Trainer.training_step"),
    ("coupled penalty (forward)", 2, "dirtune.models.direction", "DirectionPenalty.forward"),
    ("backward", 2, "accelerate", "Accelerator.backward"),
    ("step: clip gradients", 1, "transformers", "Trainer._clip_grad_norm"),
    ("step: optimizer (AdamW)", 1, "torch.optim", "AdamW.step"),
    ("step: optimizer (BalancedAdamW)", 1, "dirtune.method.balanced_adamw", "BalancedAdamW.step"),
    ("step: next batch (collate)", 1, "transformers", "Trainer.get_batch_samples"),
    ("step: FLOP count (Trainer)", 1, "transformers", "Trainer.floating_point_ops"),
    ("cb: NaN/Inf guard", 1, "dirtune.train.callbacks", "FaultGuard.on_pre_optimizer_step"),
    ("cb: drift/angle meter", 1, "dirtune.train.callbacks", "DriftMeter._collect"),
    ("cb: step clock", 1, "dirtune.train.distributed", "StepClock.on_step_end"),
    ("cb: progress", 1, "dirtune.train.callbacks", "Progress.on_step_end"),
    ("log (train lines)", 1, "dirtune.train.trainer", "DirtuneTrainer.log"),
    ("metrics.jsonl writes", 2, "dirtune.train.run_folder", "MetricsLog.write"),
    ("evaluate (each set)", 1, "transformers", "Trainer.evaluation_loop"),
    ("eval forward passes", 2, "transformers", "Trainer.prediction_step"),
    ("eval records / target stop", 2, "dirtune.train.callbacks", "EvalRecorder.on_evaluate"),
    ("best weights: checkpoint folder", 1, "dirtune.train.atomic_save", "AtomicCheckpoints._save_checkpoint"),
    ("best weights: memory copy (per eval set)", 1, "dirtune.train.callbacks", "BestInMemory.on_evaluate"),
    ("end: best weights back (disk)", 1, "transformers", "Trainer._load_best_model"),
    ("end: best weights back (memory)", 0, "dirtune.train.callbacks", "BestInMemory.restore"),
    ("end: test loss", 0, "", "test"),
    ("end: final/ written", 0, "dirtune.train.runner", "save_model_atomically"),
    ("end: loss.png", 0, "dirtune.train.runner", "plot_run"),
]


def _evaluation_loop(fn):
    """Trainer.evaluation_loop runs once per evaluated set: the test set is an end cost."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        label = "end: test loss" if prefix == "eval_test" else "evaluate (each set)"
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - t0)
    wrapper.__profiled__ = True
    return wrapper


def install() -> None:
    import importlib

    import transformers

    loop = transformers.Trainer.evaluation_loop
    if not getattr(loop, "__profiled__", False):
        transformers.Trainer.evaluation_loop = _evaluation_loop(loop)
    for label, _, module, attr in ROWS:
        if not module or attr == "Trainer.evaluation_loop":
            continue
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        for one in attr.split("|"):  # alternatives: the name before or after a change
            *path, name = one.split(".")
            target = owner
            for part in path:
                target = getattr(target, part, None)
                if target is None:
                    break
            if target is not None:
                _patch(target, name, label)


def table(wall: float, steps: int, evals: int) -> str:
    lines = [f"wall {wall:.2f} s, {steps} optimizer steps, {evals} evaluations "
             f"(timers nest: indented rows are inside the row above)",
             f"{'':46} {'calls':>6} {'total s':>9} {'% wall':>7} {'ms/call':>9}"]
    for label, indent, _, _ in ROWS:
        ts = TIMES.get(label, [])
        total = sum(ts)
        per = 1e3 * total / len(ts) if ts else 0.0
        lines.append(f"{'  ' * indent + label:46} {len(ts):6d} {total:9.3f} {100 * total / wall:6.1f}% {per:9.1f}")
    return "\n".join(lines)


def make_skeleton(model_dir: str, out: str, hidden: int = 72, intermediate: int = 192) -> None:
    """A copy of `model_dir`'s architecture (layers, heads, tied embeddings) made narrow, with
    the 100-character tokenizer of the tests and random weights: its kernels cost next to
    nothing on a CPU, so a step's time is the host work (Python, dispatch, autograd) that
    launches them on a GPU. (With SmolLM2's 49,152-token vocabulary the logits alone would
    dominate a CPU step.)"""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from dirtune.data.synthetic import char_tokenizer

    tok = char_tokenizer()
    cfg = AutoConfig.from_pretrained(model_dir)
    heads = cfg.num_attention_heads
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = hidden, intermediate, hidden // heads
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id = len(tok), tok.bos_token_id, tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


class OpCounter:
    """Counts the aten operations one optimizer step dispatches (each is about one kernel launch
    on a GPU): a TorchDispatchMode entered at step begin and left at step end."""

    def __init__(self, every: int = 0):
        from torch.utils._python_dispatch import TorchDispatchMode
        from transformers import TrainerCallback

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                return func(*args, **(kwargs or {}))

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == counter.at and counter.mode is None:
                    counter.ops, counter.mode = 0, Mode()
                    counter.mode.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if counter.mode is not None:
                    counter.mode.__exit__(None, None, None)
                    counter.mode, counter.result = None, counter.ops

        self.at, self.ops, self.mode, self.result = every, 0, None, None
        self.callback = Callback()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="train YAML the overrides apply to")
    ap.add_argument("--cprofile", default=None, help="also write a cProfile dump here (+ top 40 printed)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--skeleton", nargs=2, metavar=("MODEL", "OUT"), default=None,
                    help="write a narrow random copy of MODEL's architecture to OUT and exit")
    ap.add_argument("--count-ops", type=int, default=None, metavar="STEP",
                    help="count the aten ops of the optimizer step after STEP (about one GPU kernel each)")
    ap.add_argument("overrides", nargs="*", help="train key=value overrides")
    args = ap.parse_args(argv)
    if args.skeleton:
        make_skeleton(*args.skeleton)
        return 0

    from dirtune.train.config import load_config
    from dirtune.train.runner import run_training

    install()
    counter = None
    if args.count_ops is not None:
        import transformers

        counter = OpCounter(args.count_ops)
        init = transformers.Trainer.__init__

        def with_counter(self, *a, **kw):
            init(self, *a, **kw)
            self.add_callback(counter.callback)
        transformers.Trainer.__init__ = with_counter
    cfg = load_config(args.config, args.overrides)
    prof = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    summary = run_training(cfg)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    steps = summary.get("final_step") or 0
    from dirtune.train.run_folder import read_metrics

    evals = sum(r.get("kind") == "eval" for r in read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl"))
    text = table(wall, steps, evals)
    if counter is not None:
        text += f"\naten ops dispatched by optimizer step {args.count_ops + 1} (forward, backward, optimizer, callbacks): {counter.result}"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_s": wall, "steps": steps, "rows": {
            label: {"calls": len(TIMES.get(label, [])), "total_s": sum(TIMES.get(label, []))}
            for label, *_ in ROWS}}, indent=2))
    if prof:
        prof.dump_stats(args.cprofile)
        pstats.Stats(args.cprofile, stream=sys.stdout).sort_stats("cumulative").print_stats(40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
