"""`run_training(cfg)`: the one training entry the CLI, the demo and the bench all call.

config -> run folder checked -> model (+LoRA) and data -> run folder claimed -> DirtuneTrainer
with callbacks -> final/ and summary.json
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from dirtune.data import collate
from dirtune.data.cache import build_datasets_cached
from dirtune.models.direction import DirectionPenalty
from dirtune.models.loading import check_tokenizer_matches, count_parameters, load_model, load_tokenizer
from dirtune.models.lora import apply_lora, prepare_full_finetune
from dirtune.train import distributed, run_folder
from dirtune.train.callbacks import BestInMemory, DriftMeter, EvalRecorder, FaultGuard, Progress
from dirtune.train.config import Config, ConfigError, check_device
from dirtune.train.faults import save_model_atomically
from dirtune.train.plots import plot_run
from dirtune.train.schedule import StrengthSchedule
from dirtune.train.trainer import DTYPES, DirtuneTrainer


def _select_device(device: str) -> None:
    """'cuda:N' for one process: narrow the visible GPUs before CUDA starts, so that Trainer
    (which always takes the current device) lands on GPU N."""
    if device.startswith("cuda:") and not torch.cuda.is_initialized():
        index = device.split(":", 1)[1]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            ids = [v.strip() for v in visible.split(",")]
            index = ids[int(index)] if int(index) < len(ids) else index
        os.environ["CUDA_VISIBLE_DEVICES"] = index


def build_model(cfg: Config, tokenizer=None):
    """Load (or initialise) the model and wrap it for LoRA or full fine-tuning."""
    # the model first: a wrong model.path is then reported as a missing model, not a tokenizer
    model = load_model(cfg.model, from_scratch=cfg.model.from_scratch)
    tokenizer = tokenizer or load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    check_tokenizer_matches(model, tokenizer)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.finetune.type == "lora":
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
        model = apply_lora(model, cfg.finetune)
    else:
        prepare_full_finetune(model, cfg.finetune.train_embeddings)
    return model, tokenizer


def build_penalty(model, cfg: Config):
    """The coupled penalty (weight lambda_dir), or a weight-0 instance used only to measure drift."""
    coupled = cfg.method.penalty == "coupled"
    # DoRA rescales each column by a learned magnitude: W is no longer W0 + s·B·A, so neither
    # the factored penalty nor the drift metric applies (config.validate refuses coupled + DoRA).
    if not coupled and (cfg.train.drift_every == 0 or cfg.finetune.use_dora):
        return None
    ref_dtype = None if cfg.method.reference_dtype == "same" else DTYPES[cfg.method.reference_dtype]
    return DirectionPenalty(model, cfg.method.direction_weight if coupled else 0.0,
                            granularity=cfg.method.granularity, targets=tuple(cfg.method.targets),
                            reference_dtype=ref_dtype,
                            reference_device="cpu" if cfg.method.reference_device == "cpu" else None)


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
    try:
        return _run_training(cfg)
    except BaseException:
        run_folder.restore_if_failed()  # a run --overwrite was replacing returns if no checkpoint was written
        raise
    finally:
        run_folder.release()  # the run folder's lock


def _run_training(cfg: Config) -> dict:
    started = time.perf_counter()
    _LAST.clear()  # the previous run's model: free it before this one loads
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
    out, resume_ckpt = distributed.on_main(lambda: run_folder.resolve(cfg), is_main, world)
    set_seed(cfg.train.seed)  # the same on every process: the same initial weights
    transformers.logging.set_verbosity_error()
    # our bar shows steps, loss and ETA; transformers' per-file load/save bars would interleave with it
    transformers.logging.disable_progress_bar()

    model, tokenizer = build_model(cfg)
    data = build_datasets_cached(cfg.data, tokenizer)  # the same data as the last runs: built once
    if is_main:
        print(data.summary(), file=sys.stderr)
    penalty = build_penalty(model, cfg)
    # Only now, with the model, the data and the method checked, touch the folder: a typo in
    # the config or a bad record never costs the run already there.
    if is_main:
        run_folder.claim(out, resume_ckpt)
        run_folder.write_manifest(out, cfg, data.data_files,
                                  {"parameters": count_parameters(model), "data": data.stats,
                                   "world_size": world})

    resume_step = None
    if resume_ckpt is not None:
        resume_step = json.loads((resume_ckpt / "trainer_state.json").read_text())["global_step"]
        if is_main:
            print(f"resuming from {resume_ckpt.name} of {resume_ckpt.parent} (step {resume_step})", file=sys.stderr)
    log = run_folder.MetricsLog(out / "metrics.jsonl", resume_step) if is_main else distributed.Unlogged()
    extra: dict = {}
    evals = {}
    if data.forget is not None and data.valid is not None:
        evals["forget"] = data.forget  # first: EvalRecorder writes one line when "valid" arrives
    if data.valid is not None:
        evals.update({f"forget_{name}": ds for name, ds in data.forget_sets.items()})
        evals["valid"] = data.valid
    # transformers 5 takes the TensorBoard folder from the environment only
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    args = training_arguments(cfg, out, resume_ckpt is not None, bool(evals))
    in_memory = bool(evals) and cfg.train.keep_best == "memory"
    recorder = EvalRecorder(log, cfg.train.target_loss, save_at_target=not in_memory)
    trainer = DirtuneTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=evals or None,
        data_collator=functools.partial(collate, pad_id=data.pad_id), processing_class=tokenizer,
        dirtune_cfg=cfg, penalty=penalty if cfg.method.penalty == "coupled" else None,
        metrics_log=log, extra_logs=extra,
    )
    guard = FaultGuard(cfg.train.nan_policy, log, lambda: trainer.last_loss)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(recorder)
    best = BestInMemory() if in_memory else None
    if best is not None:
        trainer.add_callback(best)
    trainer.add_callback(guard)
    trainer.add_callback(Progress(cfg.train.progress))
    if penalty is not None and cfg.train.drift_every > 0:
        trainer.add_callback(DriftMeter(penalty.angles, cfg.train.drift_every, extra))
    if cfg.method.schedule != "constant":
        trainer.add_callback(StrengthSchedule(cfg.method.schedule, penalty if cfg.method.penalty == "coupled" else None,
                                              decay=cfg.optimizer.name == "balanced_adamw", sink=extra))
    clock = distributed.StepClock()
    trainer.add_callback(clock)

    try:
        trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
    finally:  # also when a NonFiniteError stops the run: give the signals back to the caller
        guard.release_signals()

    test_loss = final = None
    if guard.interrupted is None:
        if best is not None:
            best.restore(trainer.state.global_step)
        if data.test is not None:
            test_loss = trainer.evaluate(eval_dataset={"test": data.test})["eval_test_loss"]
        # the model in memory: the best weights when validated (load_best_model_at_end or
        # BestInMemory), else the last
        if cfg.train.save_final:
            final = save_model_atomically(trainer, out / "final")
        _LAST.update(out=Path(out).resolve(), model=trainer.model, tokenizer=tokenizer)
    records = log.read()
    summary = summarise(records, cfg, recorder.target_step, trainer, test_loss)
    if data.forget_sets:  # absent otherwise: readers then fall back on forget_loss_start/end
        summary["forget"] = forget_summary(records, summary["best_step"], data.forget_sets)
    summary["epochs"] = _epochs(trainer.state.global_step, cfg, world, len(data.train))
    if in_memory:  # final/ holds the best weights; there is no checkpoint folder
        summary["best_checkpoint"] = str(final) if final else None
    summary.update(wall_time_s=time.perf_counter() - started, interrupted=guard.interrupted,
                   skipped_steps=guard.skipped, data=data.stats, final_model=str(final) if final else None,
                   **distributed.timing_summary(clock, world))
    if is_main:
        if guard.interrupted is None:
            run_folder.write_json_atomically(out / "summary.json", summary)
        if cfg.train.plot:
            plot_run(records, out / "loss.png", title=Path(out).name, target=cfg.train.target_loss)
    distributed.finish(world)
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
