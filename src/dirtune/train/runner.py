"""`run_training(cfg)`: the one training entry the CLI, the demo and the bench all call.

Shaped like a torchtune recipe, in three parts:

    setup   config -> run folder checked -> model (+LoRA), data, the method (compose.build_method)
            -> run folder claimed -> DirtuneTrainer with its callbacks
    train   trainer.train(): the training step is DirtuneTrainer.compute_loss (task loss +
            the coupled penalty) and the optimizer the method's plan built
    finish  best weights back, test loss, final/, summary.json, loss.png
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dirtune.data.cache import build_datasets_cached
from dirtune.models.loading import check_tokenizer_matches, count_parameters, load_model, load_tokenizer
from dirtune.models.lora import apply_lora, prepare_full_finetune
from dirtune.train import distributed, run_folder
from dirtune.train.callbacks import BestInMemory, DriftMeter, EvalRecorder, FaultGuard, Progress
from dirtune.train.compose import MethodParts, build_method
from dirtune.train.config import Config, ConfigError, check_device
from dirtune.train.atomic_save import save_model_atomically
from dirtune.train.gpus import narrow_visible_gpus
from dirtune.train.plots import plot_run
from dirtune.train.schedule import StrengthSchedule
from dirtune.train.trainer import DirtuneTrainer


def _select_device(device: str) -> None:
    """'cuda:N' for one process: narrow the visible GPUs before CUDA starts, so that Trainer
    (which always takes the current device) lands on GPU N."""
    if device.startswith("cuda:") and not torch.cuda.is_initialized():
        narrow_visible_gpus(int(device.split(":", 1)[1]))


def build_model(cfg: Config, tokenizer=None):
    """Load (or initialise) the model and wrap it for LoRA or full fine-tuning."""
    # the model first: a wrong model.path is then reported as a missing model, not a tokenizer
    m = cfg.model
    model = load_model(m.path, dtype=m.dtype, attn_implementation=m.attn_implementation,
                       from_scratch=m.from_scratch)
    tokenizer = tokenizer or load_tokenizer(m.tokenizer or m.path)
    check_tokenizer_matches(model, tokenizer)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.finetune.type == "lora":
        if m.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, cfg.finetune)
    else:
        prepare_full_finetune(model, cfg.finetune.train_embeddings)
    return model, tokenizer


def training_arguments(cfg: Config, out: Path, resuming: bool, has_valid: bool) -> TrainingArguments:
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio
    # keep_best=memory: no checkpoint folder per improvement and no reload (callbacks.BestInMemory)
    best_on_disk = has_valid and t.keep_best == "disk"
    save_strategy = "steps" if t.save_every else ("best" if best_on_disk else "no")
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        learning_rate=cfg.optimizer.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=warmup,
        max_grad_norm=t.max_grad_norm,
        bf16=t.mixed_precision == "bf16" and torch.cuda.is_available() and t.device != "cpu",
        fp16=t.mixed_precision == "fp16" and torch.cuda.is_available() and t.device != "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.log_every,
        eval_strategy="steps" if has_valid else "no",
        eval_steps=t.eval_every,
        eval_on_start=has_valid and not resuming,
        save_strategy=save_strategy if has_valid else "steps",
        save_steps=t.save_every or t.eval_every,
        save_total_limit=t.save_total_limit,
        save_only_model=t.save_only_model,
        metric_for_best_model="eval_valid_loss" if best_on_disk else None,
        greater_is_better=False,
        load_best_model_at_end=best_on_disk,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        disable_tqdm=True,
        dataloader_num_workers=t.num_workers,
        dataloader_pin_memory=torch.cuda.is_available() and t.device != "cpu",
        remove_unused_columns=False,
        use_cpu=t.device == "cpu",
        logging_nan_inf_filter=False,
    )


_LAST: dict = {}  # the last run this process trained: {"out", "model", "tokenizer"}


def trained_model(output_dir: str | Path):
    """(model, tokenizer) of the last run this process trained into `output_dir`, its best weights
    in memory, or None: lets a caller (the bench's metric) use the model without reading
    final/ back from disk."""
    if _LAST and _LAST["out"] == Path(output_dir).resolve():
        return _LAST["model"], _LAST["tokenizer"]
    return None


def run_training(cfg: Config) -> dict:
    """Train per `cfg`; write the run folder; return the summary (also in summary.json)."""
    started = time.perf_counter()
    try:
        run = setup(cfg)
        train(run)
        return finish(run, started)
    except BaseException:
        run_folder.restore_if_failed()  # a run --overwrite was replacing returns if no checkpoint was written
        raise
    finally:
        run_folder.release()  # the run folder's lock


@dataclass
class Run:
    """One training run between setup and finish: what setup built and finish reads."""

    cfg: Config
    out: Path
    resume_ckpt: Path | None
    is_main: bool
    world: int
    tokenizer: Any
    data: Any                      # data.DataBundle
    method: MethodParts
    log: Any                       # run_folder.MetricsLog, or distributed.Unlogged off the main process
    trainer: DirtuneTrainer | None = None
    recorder: EvalRecorder | None = None
    guard: FaultGuard | None = None
    best: BestInMemory | None = None
    clock: distributed.StepClock | None = None
    extra: dict = field(default_factory=dict)   # drift metrics and strengths for the next log line


def setup(cfg: Config) -> Run:
    """Everything before the first step: the folder resolved, model, data and method built and
    checked, only then the folder claimed, and the trainer made."""
    _LAST.clear()  # the previous run's model: free it before this one loads
    is_main, world = _start_processes(cfg)
    out, resume_ckpt = distributed.on_main(lambda: run_folder.resolve(cfg), is_main, world)
    set_seed(cfg.train.seed)  # the same on every process: the same initial weights
    transformers.logging.set_verbosity_error()
    # our bar shows steps, loss and ETA; transformers' per-file load/save bars would interleave with it
    transformers.logging.disable_progress_bar()

    model, tokenizer = build_model(cfg)
    data = build_datasets_cached(cfg.data, tokenizer)  # the same data as the last runs: built once
    if is_main:
        print(data.summary(), file=sys.stderr)
    method = build_method(model, cfg)
    # Only now, with the model, the data and the method checked, touch the folder: a typo in
    # the config or a bad record never costs the run already there.
    if is_main:
        run_folder.claim(out, resume_ckpt)
        run_folder.write_manifest(out, cfg, data.data_files,
                                  {"parameters": count_parameters(model), "data": data.stats,
                                   "world_size": world})
    resume_step = _resume_step(resume_ckpt, is_main)
    log = run_folder.MetricsLog(out / "metrics.jsonl", resume_step) if is_main else distributed.Unlogged()
    run = Run(cfg, out, resume_ckpt, is_main, world, tokenizer, data, method, log)
    _make_trainer(run, model)
    return run


def _start_processes(cfg: Config) -> tuple[bool, int]:
    """(is this the main process, how many processes): the device narrowed and checked, and the
    options a run of several processes cannot honour refused."""
    _select_device(cfg.train.device)
    check_device(cfg.train.device)
    # several processes (accelerate launch): all train, the main one alone writes the folder
    is_main, world = distributed.processes(cfg)
    if world > 1 and cfg.train.save_only_model:
        # transformers cannot reload the best weights of a sharded run from a weights-only save
        raise ConfigError("train.save_only_model: true is for single-process runs; "
                          f"this run has {world} processes, leave it false")
    if world > 1 and cfg.train.keep_best == "memory":
        raise ConfigError("train.keep_best: memory is for single-process runs; "
                          f"this run has {world} processes, use disk")
    return is_main, world


def _resume_step(resume_ckpt: Path | None, is_main: bool) -> int | None:
    if resume_ckpt is None:
        return None
    step = json.loads((resume_ckpt / "trainer_state.json").read_text())["global_step"]
    if is_main:
        print(f"resuming from {resume_ckpt.name} of {resume_ckpt.parent} (step {step})", file=sys.stderr)
    return step


def _eval_sets(data) -> dict:
    """The datasets evaluated at every evaluation, forget sets first: EvalRecorder writes one
    line when "valid" arrives."""
    evals = {}
    if data.forget is not None and data.valid is not None:
        evals["forget"] = data.forget
    if data.valid is not None:
        evals.update({f"forget_{name}": ds for name, ds in data.forget_sets.items()})
        evals["valid"] = data.valid
    return evals


def _make_trainer(run: Run, model) -> None:
    """The DirtuneTrainer of `run` and its callbacks: evaluation records and the target stop,
    the best weights in memory, fault handling, progress, drift, the strength schedule, timing."""
    cfg, data, method = run.cfg, run.data, run.method
    evals = _eval_sets(data)
    # transformers 5 takes the TensorBoard folder from the environment only
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.out / "tb")
    args = training_arguments(cfg, run.out, run.resume_ckpt is not None, bool(evals))
    in_memory = bool(evals) and cfg.train.keep_best == "memory"
    trainer = DirtuneTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=evals or None,
        data_collator=data.collator(), processing_class=run.tokenizer,
        dirtune_cfg=cfg, penalty=method.penalty, optimizer_plan=method.optimizer,
        metrics_log=run.log, extra_logs=run.extra,
    )
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    run.recorder = EvalRecorder(run.log, cfg.train.target_loss, save_at_target=not in_memory)
    run.guard = FaultGuard(cfg.train.nan_policy, run.log, lambda: trainer.last_loss)
    run.best = BestInMemory() if in_memory else None
    run.clock = distributed.StepClock()
    callbacks = [run.recorder, run.best, run.guard, Progress(cfg.train.progress)]
    if method.meter is not None:
        callbacks.append(DriftMeter(method.meter.angles, cfg.train.drift_every, run.extra))
    if cfg.method.schedule != "constant":
        callbacks.append(StrengthSchedule(cfg.method.schedule, method.penalty,
                                          decay=cfg.optimizer.name == "balanced_adamw", sink=run.extra))
    for cb in callbacks + [run.clock]:
        if cb is not None:
            trainer.add_callback(cb)
    run.trainer = trainer


def train(run: Run) -> None:
    """The training loop (transformers' Trainer; each step's loss is DirtuneTrainer.compute_loss)."""
    try:
        run.trainer.train(resume_from_checkpoint=str(run.resume_ckpt) if run.resume_ckpt else None)
    finally:  # also when a NonFiniteError stops the run: give the signals back to the caller
        run.guard.release_signals()


def finish(run: Run, started: float) -> dict:
    """After the last step: the best weights back, the test loss, final/, the summary (written to
    summary.json unless interrupted) and loss.png."""
    cfg, trainer, data = run.cfg, run.trainer, run.data
    test_loss = final = None
    if run.guard.interrupted is None:
        if run.best is not None:
            run.best.restore(trainer.state.global_step)
        if data.test is not None:
            test_loss = trainer.evaluate(eval_dataset={"test": data.test})["eval_test_loss"]
        # the model in memory: the best weights when validated (load_best_model_at_end or
        # BestInMemory), else the last
        if cfg.train.save_final:
            final = save_model_atomically(trainer, run.out / "final")
        _LAST.update(out=Path(run.out).resolve(), model=trainer.model, tokenizer=run.tokenizer)
    records = run.log.read()
    summary = summarise(records, cfg, run.recorder.target_step, trainer, test_loss)
    if data.forget_sets:  # absent otherwise: readers then fall back on forget_loss_start/end
        summary["forget"] = forget_summary(records, summary["best_step"], data.forget_sets)
    summary["epochs"] = _epochs(trainer.state.global_step, cfg, run.world, len(data.train))
    if run.best is not None:  # keep_best=memory: final/ holds the best weights; no checkpoint folder
        summary["best_checkpoint"] = str(final) if final else None
    summary.update(wall_time_s=time.perf_counter() - started, interrupted=run.guard.interrupted,
                   skipped_steps=run.guard.skipped, data=data.stats, final_model=str(final) if final else None,
                   **distributed.timing_summary(run.clock, run.world))
    if run.is_main:
        if run.guard.interrupted is None:
            run_folder.write_json_atomically(run.out / "summary.json", summary)
        if cfg.train.plot:
            plot_run(records, run.out / "loss.png", title=Path(run.out).name, target=cfg.train.target_loss)
    distributed.finish(run.world)
    return summary


def summarise(records: list[dict], cfg: Config, target_step, trainer, test_loss) -> dict:
    evals = [r for r in records if r.get("kind") == "eval"]
    losses = [(r["step"], r["eval_loss"]) for r in evals if isinstance(r.get("eval_loss"), float)]
    best_step, best = min(losses, key=lambda x: (x[1], x[0])) if losses else (None, None)
    forget = [r["forget_loss"] for r in evals if isinstance(r.get("forget_loss"), float)]
    return {
        "target_loss": cfg.train.target_loss,
        "target_step": target_step,
        "best_eval_loss": best,
        "best_step": best_step,
        "final_eval_loss": losses[-1][1] if losses else None,
        "final_step": trainer.state.global_step,
        "stopped_early": target_step is not None,
        "test_loss": test_loss,
        "forget_loss_start": forget[0] if forget else None,
        "forget_loss_end": forget[-1] if forget else None,
        "best_checkpoint": trainer.state.best_model_checkpoint,
    }


def forget_summary(records: list[dict], best_step, names) -> dict:
    """Per named forget set: its loss at the first and last evaluation, and at the best
    validation step (None where not measured)."""
    evals = [r for r in records if r.get("kind") == "eval"]
    out = {}
    for name in names:
        key = f"forget_{name}_loss"
        seen = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
        at_best = [v for step, v in seen if step == best_step]
        out[name] = {"start": seen[0][1] if seen else None, "end": seen[-1][1] if seen else None,
                     "at_best": at_best[-1] if at_best else None}
    return out


def _epochs(steps: int, cfg: Config, world: int, rows: int) -> float | None:
    """Passes over the training rows: optimizer steps x examples per step / rows."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    return steps * per_step / rows if rows else None
