"""`dirtune` command line: one small function per subcommand; the work happens elsewhere.

User mistakes (bad config, bad data, missing files) end with a one-line message and exit 2,
never a traceback. Only argparse, yaml and the config are imported until a command needs torch,
so `--help` and config errors come back at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path


def _quiet_libraries() -> None:
    """Library chatter a user cannot act on, on every command: transformers' deprecation
    FutureWarnings (e.g. PEFT reading a renamed property) and its per-file loading/writing bars.
    Set before transformers is imported (it reads both variables then); a user's own setting wins."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _preflight(cfg) -> None:
    """What can be checked before torch is imported: the model and data are named and exist."""
    from dirtune.data.records import DataError
    from dirtune.models.errors import ModelError
    from dirtune.train.config import ConfigError

    if not str(cfg.model.path).strip():
        raise ConfigError("model.path is not set; give the transformers checkpoint folder to fine-tune "
                          "(e.g. model.path=/path/to/Llama-2-7b-hf)")
    path = Path(cfg.model.path).expanduser()
    if not path.exists():
        raise ModelError(f"{path.resolve()}: model folder not found")
    _not_a_run_folder(str(path), key="model.path: ")
    d = cfg.data
    if not (d.train_file if isinstance(d.train_file, list) else str(d.train_file).strip()):
        raise ConfigError("data.train_file is not set; give a data file (.json, .jsonl, .txt, .parquet, .arrow) "
                          "or a list of them")
    from dirtune.data.records import file_kind

    for key in ("train_file", "valid_file", "test_file", "forget_file"):
        value = getattr(d, key, None)
        for v in (value if isinstance(value, list) else [value] if value else []):
            if not Path(v).expanduser().exists():
                raise DataError(f"data.{key}: {Path(v).expanduser()}: not found")
            try:
                file_kind(Path(v).expanduser())  # a folder that is no saved dataset, an unknown suffix
            except DataError as e:
                raise DataError(f"data.{key}: {e}") from None


def _cmd_train(a: argparse.Namespace) -> int:
    from dirtune.train.config import load_config

    cfg = load_config(a.config, a.overrides)
    if a.overwrite:
        cfg.train.overwrite = True
    if a.resume:
        cfg.train.resume = a.resume
    _preflight(cfg)
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


def _not_a_run_folder(path: str, key: str = "") -> None:
    """A run folder given where its model is wanted: point at the model inside it."""
    from dirtune.models.errors import ModelError

    p = Path(path).expanduser()
    if (p / "final").is_dir() and not any((p / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ModelError(f"{key}{p}: is a run folder, not a model; its trained model is {p / 'final'}")


def _cmd_eval(a: argparse.Namespace) -> int:
    _not_a_run_folder(a.checkpoint)
    from dirtune.eval import evaluate_loss

    result = evaluate_loss(a.checkpoint, a.data, max_length=a.max_length, batch_size=a.batch_size,
                           format=a.format, base=a.base)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    _not_a_run_folder(a.checkpoint)
    from dirtune.models.lora import generate_text, load_for_inference, prompt_ids

    model, tokenizer = load_for_inference(a.checkpoint, base=a.base)
    # templated as training's data.template=auto renders a user turn, unless --raw
    prompt = a.prompt if a.raw else prompt_ids(tokenizer, [("user", a.prompt)])
    print(generate_text(model, tokenizer, prompt, max_new_tokens=a.max_new_tokens, greedy=not a.sample))
    return 0


def _cmd_chat(a: argparse.Namespace) -> int:
    _not_a_run_folder(a.checkpoint)
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
    from dirtune.errors import UsageError
    from dirtune.models.errors import ModelError

    adapter, out = Path(a.adapter).expanduser(), Path(a.out).expanduser()
    _not_a_run_folder(a.adapter)
    if adapter.is_dir() and not (adapter / "adapter_config.json").is_file():
        what = "a full model" if (adapter / "config.json").is_file() else "not a model or adapter folder"
        raise ModelError(f"{adapter}: {what}, not a LoRA adapter (no adapter_config.json); merge folds an "
                         "adapter into its base model")
    if out.exists() and out.resolve() == adapter.resolve():
        raise UsageError(f"{out}: is the adapter folder itself; write the merged model to another folder")
    if out.exists() and not a.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: already exists; choose another folder, or pass --overwrite to replace it "
                         "(it is replaced only once the merge has succeeded)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file; the merged model is a folder, choose another path")
    from dirtune.models.lora import load_for_inference, merge_lora

    model, tokenizer = load_for_inference(adapter, base=a.base)
    merged = merge_lora(model)
    # write beside OUT, then swap: a failed or interrupted merge leaves OUT as it was
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    try:
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if out.exists():
            out.rename(old)
        try:
            partial.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
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

    cfg = load_bench_config(a.config, a.overrides)
    from dirtune.bench.grid import run_bench

    run_bench(cfg, a.out or cfg.output_dir, resume=not a.fresh, report_only=a.report_only)
    return 0


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (unless the help already says it) and keeps
    the examples in the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        shown = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


def _examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """Long on purpose: argparse declarations, one block per subcommand: a table, not logic."""
    p = argparse.ArgumentParser(
        prog="dirtune", formatter_class=_Help,
        description="Direction-preserving fine-tuning of LLaMA-2 models. `dirtune COMMAND --help` "
                    "describes each command.",
        epilog=_examples("dirtune demo                                    # offline, ~1 minute on a CPU",
                         "dirtune train configs/small-full.yaml model.path=MODEL data.train_file=data.json"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, examples: tuple[str, ...]) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                              formatter_class=_Help, epilog=_examples(*examples))

    t = command("train", "fine-tune from a YAML config (key=value overrides after it)", (
        "dirtune train configs/small-full.yaml model.path=MODEL data.train_file=data.json",
        "dirtune train configs/llama2-7b-lora.yaml optimizer.lr=1e-4 --dry-run",
        "dirtune train run.yaml --resume                # from the newest checkpoint in train.output_dir"))
    t.add_argument("config", help="YAML config file; every key is in the README's config reference")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=1e-4 "
                                                "data.train_file=[a.json,b.json] (default: none)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter counts, train nothing")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in train.output_dir")
    t.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="resume from checkpoint folder CKPT, or alone: the newest in train.output_dir "
                        "(default: start afresh)")
    t.set_defaults(func=_cmd_train)

    e = command("eval", "loss and perplexity of a checkpoint on every labelled token of a data file", (
        "dirtune eval runs/run/final data/valid.jsonl --max-length 1024",))
    e.add_argument("checkpoint", help="a model folder or a LoRA adapter folder (e.g. runs/NAME/final)")
    e.add_argument("data", help="data file (.json, .jsonl, .txt, .parquet, .arrow)")
    e.add_argument("--format", default="auto", choices=["auto", "alpaca", "chat", "text"],
                   help="record format; auto tells it from the first record's keys")
    e.add_argument("--max-length", type=int, default=512, help="tokens per example (longer ones are truncated)")
    e.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    e.add_argument("--base", help="base model of a LoRA adapter (default: from adapter_config.json)")
    e.set_defaults(func=_cmd_eval)

    g = command("generate", "answer a prompt from a checkpoint (LoRA adapter, full model or .gguf)", (
        'dirtune generate runs/run/final "What is a kernel module?" --max-new-tokens 128',
        'dirtune generate runs/run/final "Once upon a time" --raw   # continue the text as written'))
    g.add_argument("checkpoint", help="a model folder, a LoRA adapter folder (e.g. runs/NAME/final) or a .gguf file")
    g.add_argument("prompt", help="a user turn, rendered with the model's chat template (LLaMA-2 [INST] "
                                  "without one), as training renders it; with --raw, the text itself")
    g.add_argument("--raw", action="store_true", help="pass the prompt as-is (no chat template / [INST])")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--base", help="base model of a LoRA adapter (default: from adapter_config.json)")
    g.set_defaults(func=_cmd_generate)

    ch = command("chat", "chat with a checkpoint: one user turn per line on stdin, the history kept", (
        "dirtune chat runs/run/final", "dirtune chat SmolLM2-135M-Instruct.Q4_1.gguf --system 'Be brief.'",
        "printf 'Hi\\nAnd then?\\n' | dirtune chat runs/run/final   # /reset clears, /exit ends"))
    ch.add_argument("checkpoint", help="a model folder, a LoRA adapter folder or a .gguf file")
    ch.add_argument("--base", help="base model of a LoRA adapter (default: from adapter_config.json)")
    ch.add_argument("--system", help="system message at the start of the conversation (default: none)")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most")
    ch.add_argument("--show-prompt", action="store_true", help="print each rendered prompt on stderr")
    ch.set_defaults(func=_cmd_chat)

    m = command("merge", "fold a LoRA adapter into a standalone transformers checkpoint", (
        "dirtune merge runs/run/final merged/",
        "dirtune merge runs/run/final merged/ --overwrite   # replace merged/ once the merge succeeded"))
    m.add_argument("adapter", help="LoRA adapter folder (adapter_config.json), e.g. runs/NAME/final")
    m.add_argument("out", help="folder to write the merged model to; must not exist or be empty")
    m.add_argument("--base", help="base model (default: from adapter_config.json)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it exists (only once the merge has succeeded)")
    m.set_defaults(func=_cmd_merge)

    c = command("convert", "llama2.c .bin, Meta consolidated.*.pth or .gguf -> transformers", (
        "dirtune convert llama2c stories260K.bin out/ --tokenizer tok512.model",
        "dirtune convert meta /path/to/llama-2-7b /path/to/Llama-2-7b-hf",
        "dirtune convert gguf SmolLM2-135M-Instruct.Q4_1.gguf smollm2/ --dtype bf16   # needs dirtune[gguf]"))
    c.add_argument("format", choices=["llama2c", "meta", "gguf"], help="source format: llama2c, meta or gguf")
    c.add_argument("source", help="llama2.c .bin file, the Meta release folder, or a .gguf file")
    c.add_argument("out", help="folder to write the transformers checkpoint to")
    c.add_argument("--tokenizer", help="sentencepiece tokenizer.model (llama2c: required; default: none)")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the written weights")
    c.set_defaults(func=_cmd_convert)

    d = command("demo", "offline demo: make a source model, fine-tune it with AdamW and the method", (
        "dirtune demo", "dirtune demo --quick --out /tmp/demo"))
    d.add_argument("--out", default="runs/demo", help="folder for the demo's data, runs, plot and JSON")
    d.add_argument("--seed", type=int, default=0, help="seed of the world, the models and the data order")
    d.add_argument("--quick", action="store_true", help="a smaller, faster version (a smoke test, not the demo)")
    d.set_defaults(func=_cmd_demo)

    b = command("bench", "methods x learning rates x seeds: steps to a target loss", (
        "dirtune bench bench/cpu-smoke.yaml", "dirtune bench bench/cpu-smoke.yaml jobs=2 --out /tmp/bench"))
    b.add_argument("config", help="bench YAML file (methods, tasks, grid)")
    b.add_argument("overrides", nargs="*", help="top-level key=value overrides, e.g. jobs=4 (default: none)")
    b.add_argument("--out", help="results folder (default: output_dir of the bench file)")
    b.add_argument("--fresh", action="store_true", help="redo runs that already finished")
    b.add_argument("--report-only", action="store_true", help="run nothing; report on the runs already there")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from dirtune.errors import ENVIRONMENT_ERRNOS, USER_ERRORS

    try:
        code = args.func(args)
    except USER_ERRORS as e:
        print(f"dirtune {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        # the machine, not the code: a full disk, a read-only or vanished folder, no permission
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"dirtune {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
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
