"""`dirtune` command line: one small function per subcommand; the work happens elsewhere.

User mistakes (bad config, bad data, missing files) end with a one-line message and exit 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_train(a: argparse.Namespace) -> int:
    from dirtune.train.config import load_config

    cfg = load_config(a.config, a.overrides)
    if a.overwrite:
        cfg.train.overwrite = True
    if a.resume:
        cfg.train.resume = a.resume
    if a.dry_run:
        return _dry_run(cfg)
    from dirtune.train.runner import run_training

    summary = run_training(cfg)
    keys = ("best_eval_loss", "best_step", "final_eval_loss", "final_step", "target_step", "test_loss",
            "forget_loss_start", "forget_loss_end", "best_checkpoint", "final_model", "wall_time_s")
    if os.environ.get("RANK", "0") == "0":  # one summary per run, from the process that wrote it
        print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    if summary.get("interrupted"):
        print(f"interrupted ({summary['interrupted']}): resume with train.resume=auto", file=sys.stderr)
        return 130
    return 0


def _dry_run(cfg) -> int:
    import yaml

    from dirtune.models.loading import count_parameters
    from dirtune.train.runner import build_model

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    model, _ = build_model(cfg)
    counts = count_parameters(model)
    print(f"# parameters: {counts['total']:,} total, {counts['trainable']:,} trainable "
          f"({100 * counts['trainable'] / max(counts['total'], 1):.3f}%)")
    print("# dry run: nothing trained")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from dirtune.eval import evaluate_loss

    result = evaluate_loss(a.checkpoint, a.data, max_length=a.max_length, batch_size=a.batch_size,
                           format=a.format, base=a.base)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from dirtune.models.lora import generate_text, load_for_inference, prompt_ids

    model, tokenizer = load_for_inference(a.checkpoint, base=a.base)
    # templated as training's data.template=auto renders a user turn, unless --raw
    prompt = a.prompt if a.raw else prompt_ids(tokenizer, [("user", a.prompt)])
    print(generate_text(model, tokenizer, prompt, max_new_tokens=a.max_new_tokens, greedy=not a.sample))
    return 0


def _cmd_chat(a: argparse.Namespace) -> int:
    from dirtune.models.lora import Conversation, load_for_inference

    model, tokenizer = load_for_inference(a.checkpoint, base=a.base)
    chat = Conversation(model, tokenizer, system=a.system, max_new_tokens=a.max_new_tokens)
    tty = sys.stdin.isatty()
    if tty:
        print("one line per turn; /reset clears the history, /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        if a.show_prompt:
            ids = chat.prompt_ids(text)
            print(f"--- prompt ({len(ids)} tokens) ---\n{tokenizer.decode(ids)}\n---", file=sys.stderr)
        print(chat.reply(text), flush=True)


def _cmd_merge(a: argparse.Namespace) -> int:
    from dirtune.models.lora import load_for_inference, merge_lora

    model, tokenizer = load_for_inference(a.adapter, base=a.base)
    merged = merge_lora(model)
    out = Path(a.out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    if a.format == "llama2c":
        from dirtune.models.convert_llama2c import convert_llama2c

        if not a.tokenizer:
            raise SystemExit("dirtune convert llama2c: --tokenizer TOKENIZER.model is required")
        out = convert_llama2c(a.source, a.tokenizer, a.out, dtype=a.dtype)
    elif a.format == "gguf":
        from dirtune.models.convert_gguf import convert_gguf

        out = convert_gguf(a.source, a.out, dtype=a.dtype)
    else:
        from dirtune.models.convert_meta import convert_meta

        out = convert_meta(a.source, a.out, dtype=a.dtype)
    print(f"transformers checkpoint written to {out}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from dirtune.demo import run_demo

    run_demo(out_dir=a.out, seed=a.seed, quick=a.quick)
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from dirtune.bench.config import load_bench_config
    from dirtune.bench.grid import run_bench

    cfg = load_bench_config(a.config, a.overrides)
    run_bench(cfg, a.out or cfg.output_dir, resume=not a.fresh, report_only=a.report_only)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dirtune", description="Direction-preserving fine-tuning of LLaMA-2 models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a YAML config (key=value overrides after it)")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-4")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")
    t.add_argument("--resume", nargs="?", const="auto", help="resume from a checkpoint (default: newest)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="loss and perplexity of a checkpoint on a dataset")
    e.add_argument("checkpoint")
    e.add_argument("data", help="data file (alpaca/chat JSON(L) or text)")
    e.add_argument("--format", default="auto", choices=["auto", "alpaca", "chat", "text"])
    e.add_argument("--max-length", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--base", help="base model for a LoRA adapter (default: from adapter_config.json)")
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("generate", help="continue a prompt from a checkpoint (LoRA adapter or full model)")
    g.add_argument("checkpoint")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--base", help="base model for a LoRA adapter")
    g.add_argument("--raw", action="store_true", help="pass the prompt as-is (no chat template / [INST])")
    g.set_defaults(func=_cmd_generate)

    ch = sub.add_parser("chat", help="chat with a checkpoint: one user turn per stdin line")
    ch.add_argument("checkpoint")
    ch.add_argument("--base", help="base model for a LoRA adapter")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--show-prompt", action="store_true", help="print each rendered prompt on stderr")
    ch.set_defaults(func=_cmd_chat)

    m = sub.add_parser("merge", help="fold a LoRA adapter into a standalone transformers checkpoint")
    m.add_argument("adapter")
    m.add_argument("out")
    m.add_argument("--base", help="base model (default: from adapter_config.json)")
    m.set_defaults(func=_cmd_merge)

    c = sub.add_parser("convert", help="llama2.c .bin, Meta consolidated.*.pth or .gguf -> transformers")
    c.add_argument("format", choices=["llama2c", "meta", "gguf"])
    c.add_argument("source", help="llama2.c .bin file, the Meta release folder, or a .gguf file")
    c.add_argument("out")
    c.add_argument("--tokenizer", help="sentencepiece tokenizer.model (llama2c)")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    c.set_defaults(func=_cmd_convert)

    d = sub.add_parser("demo", help="offline demo: make a source model, fine-tune it with AdamW and the method")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a smaller, faster version")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="methods x learning rates x seeds: steps to a target loss")
    b.add_argument("config")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--out", help="results folder (default: output_dir of the bench file)")
    b.add_argument("--fresh", action="store_true", help="redo runs that already finished")
    b.add_argument("--report-only", action="store_true", help="run nothing; report on the runs already there")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dirtune.errors import USER_ERRORS

    try:
        code = args.func(args)
    except USER_ERRORS as e:
        print(f"dirtune {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C: checkpoints are atomic
        print(f"dirtune {args.command}: interrupted", file=sys.stderr)
        code = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One of several launched processes: everything is written and the process group is
        # closed, but C++ communication threads can still abort the interpreter's teardown
        # ("terminate called without an active exception", seen with gloo), which the launcher
        # reports as a failed run. Leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
