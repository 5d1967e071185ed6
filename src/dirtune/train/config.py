"""The one typed config tree: YAML -> dataclasses -> dotted `key=value` overrides -> validation.

Every leaf carries its default and a help string; a bad key or value raises `ConfigError`
naming the file, the dotted key, the bad value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import re
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dirtune.models.llama import PROJECTIONS


class ConfigError(ValueError):
    """A config problem a person can fix: the message names the key and what is accepted."""


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its default and help text (a list or dict default is copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


ALL_LINEAR = list(PROJECTIONS)
# data.columns keys: our record fields, the fields inside a chat message, the role values
COLUMN_KEYS = ("instruction", "input", "output", "messages", "text", "role", "content",
               "system", "user", "assistant")


@dataclass
class ModelConfig:
    path: str = option("", "transformers checkpoint directory (config.json, weights, tokenizer), or a .gguf file")
    tokenizer: Optional[str] = option(None, "tokenizer directory (or .gguf file) if not beside the weights")
    dtype: Literal["fp32", "bf16", "fp16"] = option("fp32", "dtype the weights are loaded and trained in")
    gradient_checkpointing: bool = option(False, "recompute activations: less memory, ~30% more time")
    attn_implementation: Literal["sdpa", "eager"] = option("sdpa", "attention kernel")
    from_scratch: bool = option(False, "random initialisation from path/config.json (pretraining a source model)")


@dataclass
class FinetuneConfig:
    type: Literal["lora", "full"] = option("lora", "LoRA adapters (PEFT) or every weight trainable")
    lora_r: int = option(16, "LoRA rank; higher adapts more and costs more memory")
    lora_alpha: float = option(32.0, "LoRA scale numerator: scale = alpha / r")
    lora_dropout: float = option(0.05, "dropout on the LoRA branch input")
    lora_targets: list[str] = option(list(ALL_LINEAR), "module names that get adapters")
    use_dora: bool = option(False, "DoRA (weight-decomposed LoRA), a baseline")
    loraplus_ratio: Optional[float] = option(None, "LoRA+: learning rate of B is this times that of A")
    train_embeddings: bool = option(False, "full fine-tuning only: also train embeddings and lm_head")


@dataclass
class DataConfig:
    train_file: Union[str, list[str]] = option(
        "", "training data: a .json/.jsonl (alpaca or chat), .txt (plain text), .parquet or .arrow file, "
            "a save_to_disk folder, or a list of them")
    valid_file: Optional[Union[str, list[str]]] = option(None, "validation file(s); if unset, valid_ratio of train_file")
    valid_ratio: float = option(0.05, "share of train_file held out for validation")
    test_file: Optional[Union[str, list[str]]] = option(None, "optional test file(s), evaluated at the end")
    test_ratio: float = option(0.0, "share of train_file held out as the test split (when test_file is unset)")
    forget_file: Optional[str] = option(None, "text from the source domain: its loss measures forgetting")
    forget_files: list[str] = option([], "named forget sets, 'name=path' each, evaluated beside valid as "
                                     "forget_<name>_loss: text (blocks) or alpaca/chat records (loss on "
                                     "the responses, under the run's template)")
    format: Literal["auto", "alpaca", "chat", "text"] = option("auto", "record format")
    template: Literal["auto", "llama2", "tokenizer", "plain"] = option(
        "auto", "prompt rendering: llama2 [INST], the tokenizer's chat template, or plain; auto: the tokenizer's if it has one")
    max_length: int = option(512, "tokens per example (and per packed block)")
    overlong: Literal["truncate", "reject"] = option("truncate", "what to do with longer examples")
    packing: bool = option(False, "pack examples into max_length blocks (text is always blocked)")
    train_on_prompt: bool = option(False, "also compute the loss on the prompt tokens")
    max_samples: Optional[int] = option(None, "use only the first N training records")
    max_eval_samples: Optional[int] = option(None, "use only the first N validation records (and forget-text rows)")
    seed: int = option(0, "seed of the validation split")
    train_weights: Optional[list[float]] = option(
        None, "mixing weights, one per train_file: each file's share of the training records "
              "(a file is subsampled or repeated to fit); null: every record of every file once")
    columns: dict[str, str] = option(
        {}, "record template: our field name -> yours, e.g. {instruction: question, output: answer}; "
            "keys: " + ", ".join(COLUMN_KEYS))


@dataclass
class MethodConfig:
    penalty: Literal["none", "coupled", "decoupled"] = option(
        "none", "weight direction penalty: in the loss (coupled) or applied by the optimizer")
    direction_weight: float = option(0.0, "lambda_dir: strength of the direction penalty")
    schedule: Literal["constant", "decay", "warmup"] = option(
        "constant", "strengths over training (lambda_dir; balanced_adamw's decay): constant, decay to 0, warmup from 0")
    granularity: Literal["row", "tensor"] = option("row", "one direction per output row or per tensor")
    targets: list[str] = option(list(ALL_LINEAR), "module names the penalty covers")
    reference_dtype: Literal["fp32", "bf16", "fp16", "same"] = option(
        "bf16", "dtype of the stored pretrained references (full fine-tuning only)")
    reference_device: Literal["same", "cpu"] = option("same", "where references/anchors live")
    every: int = option(1, "lazy regularization (coupled penalty): apply it every k steps with weight k*lambda_dir; 1 = every step")


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "balanced_adamw"] = option("adamw", "torch AdamW baseline or BalancedAdamW")
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "lambda: decay strength (towards the anchor for balanced_adamw)")
    betas: list[float] = option([0.9, 0.999], "Adam moment coefficients")
    eps: float = option(1e-8, "Adam epsilon")
    anchor: Literal["init", "zero", "none"] = option("init", "balanced_adamw: where decay pulls to")
    balance: Literal["none", "scale", "selective"] = option("scale", "balanced_adamw: per-tensor b_i")
    anchor_dtype: Literal["fp32", "bf16", "fp16"] = option("bf16", "balanced_adamw: anchor storage dtype")
    foreach: Optional[bool] = option(None, "force the foreach (True) or single-tensor (False) path")
    fused: Optional[bool] = option(
        None, "fused Triton step of balanced_adamw (true), not (false), or null = fused when every parameter is on CUDA and Triton imports")


@dataclass
class TrainConfig:
    output_dir: str = option("runs/run", "run folder: metrics, checkpoints, plots, resolved config")
    seed: int = option(42, "seed of initialisation, dropout and data order")
    max_steps: int = option(1000, "optimizer steps; -1 to use num_epochs")
    num_epochs: float = option(1.0, "epochs, used when max_steps is -1")
    batch_size: int = option(8, "examples per device per micro-batch")
    eval_batch_size: int = option(16, "examples per device per evaluation batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr_scheduler: Literal["cosine", "linear", "constant"] = option("cosine", "decay after warmup")
    warmup_steps: int = option(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = option(0.0, "warmup as a share of max_steps")
    max_grad_norm: float = option(1.0, "gradient clipping; 0 disables")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast compute dtype over model.dtype weights (fp32 weights + bf16 = classic AMP); GPU only")
    eval_every: int = option(50, "validation every k steps (and at step 0)")
    target_loss: Optional[float] = option(None, "stop at the first evaluation with loss <= this")
    save_every: int = option(0, "checkpoint every k steps; 0 = only at evaluations that improve")
    save_total_limit: int = option(2, "checkpoints kept besides the best")
    save_only_model: bool = option(
        False, "checkpoints hold the weights alone (no optimizer state): smaller and faster, not resumable")
    keep_best: Literal["disk", "memory"] = option(
        "disk", "best weights (lowest validation loss): a checkpoint folder at each improvement, or a copy in "
        "memory (no folders; not kept across a resume), put back at the end")
    save_final: bool = option(True, "write final/ (the best weights) at the end; false for runs whose weights nobody reads")
    plot: bool = option(True, "draw loss.png at the end of the run")
    log_every: int = option(1, "log training metrics every k steps")
    drift_every: int = option(10, "compute angle/drift to the pretrained weights every k steps")
    resume: Optional[str] = option(None, "checkpoint folder, or 'auto' for the newest in output_dir")
    overwrite: bool = option(False, "allow writing into an output_dir that already holds a run")
    nan_policy: Literal["stop", "skip"] = option("stop", "on a NaN/Inf loss or gradient")
    num_workers: int = option(0, "data loader workers")
    report_to: list[str] = option(["tensorboard"], "extra loggers: tensorboard, or none")
    progress: bool = option(True, "show a progress bar")
    device: str = option("auto", "auto (GPU if any), cpu, cuda or cuda:N")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- building from dicts

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        # plain types, then generics, then null: one wording whatever order the cached union has
        args = sorted(typing.get_args(tp), key=lambda a: (a is type(None), typing.get_origin(a) is not None))
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping of {} to {}".format(*(_type_name(a) for a in typing.get_args(tp)))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field type; raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: {value!r} is not valid; expected {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # typing caches unions as equal regardless of order, so Union[str, list[str]] may come back
        # as (list[str], str) when another module spelled it first: try the value's own type first
        for a in sorted(args, key=lambda a: a is not type(value)):
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str) and inner is str:  # "q_proj,v_proj" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def build_section(cls: type, data: Any, where: str) -> Any:
    """The dataclass `cls` (a config section, or the whole Config) from a mapping; ConfigError
    naming the dotted key (`where` is the section's own) for an unknown key or a bad value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {dotted!r}{hint}; accepted: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_section(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A command-line value: YAML scalar rules, so 1e-4, true, null and [a, b] all work."""
    try:
        return yaml.safe_load(text)
    # PyYAML raises ValueError/AttributeError (not YAMLError) for e.g. an impossible date
    # "2020-13-45" or "!!int x": the value is then taken as the literal text.
    except (yaml.YAMLError, ValueError, AttributeError):
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-4)")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_scalar(text)
    return data


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express.

    Long on purpose: the ladder of range checks, one line each (torch's optimizers' style).
    """
    checks = [
        (cfg.finetune.lora_r >= 1, "finetune.lora_r", cfg.finetune.lora_r, "an integer >= 1"),
        (0 <= cfg.finetune.lora_dropout < 1, "finetune.lora_dropout", cfg.finetune.lora_dropout, "0 <= x < 1"),
        (cfg.finetune.loraplus_ratio is None or cfg.finetune.loraplus_ratio > 0,
         "finetune.loraplus_ratio", cfg.finetune.loraplus_ratio, "null or a number > 0"),
        (0 <= cfg.data.valid_ratio < 1, "data.valid_ratio", cfg.data.valid_ratio, "0 <= x < 1"),
        (0 <= cfg.data.test_ratio < 1, "data.test_ratio", cfg.data.test_ratio, "0 <= x < 1"),
        (cfg.data.max_length >= 2, "data.max_length", cfg.data.max_length, "an integer >= 2"),
        (cfg.method.direction_weight >= 0, "method.direction_weight", cfg.method.direction_weight, "a number >= 0"),
        (cfg.method.every >= 1, "method.every", cfg.method.every, "an integer >= 1"),
        (cfg.optimizer.lr > 0, "optimizer.lr", cfg.optimizer.lr, "a number > 0"),
        (cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", cfg.optimizer.weight_decay, "a number >= 0"),
        (len(cfg.optimizer.betas) == 2 and all(0 <= b < 1 for b in cfg.optimizer.betas),
         "optimizer.betas", cfg.optimizer.betas, "two numbers in [0, 1)"),
        (cfg.optimizer.eps > 0, "optimizer.eps", cfg.optimizer.eps, "a number > 0 (Adam divides by sqrt(v) + eps)"),
        (cfg.train.max_steps == -1 or cfg.train.max_steps >= 1, "train.max_steps", cfg.train.max_steps, "-1 or >= 1"),
        (cfg.train.num_epochs > 0, "train.num_epochs", cfg.train.num_epochs, "a number > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size", cfg.train.batch_size, "an integer >= 1"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size", cfg.train.eval_batch_size, "an integer >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", cfg.train.grad_accum, "an integer >= 1"),
        (cfg.train.warmup_steps >= 0, "train.warmup_steps", cfg.train.warmup_steps, "an integer >= 0"),
        (0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio", cfg.train.warmup_ratio, "0 <= x < 1"),
        (cfg.train.max_grad_norm >= 0, "train.max_grad_norm", cfg.train.max_grad_norm, "a number >= 0"),
        (cfg.train.eval_every >= 1, "train.eval_every", cfg.train.eval_every, "an integer >= 1"),
        (cfg.train.save_every >= 0, "train.save_every", cfg.train.save_every, "an integer >= 0"),
        (cfg.train.save_total_limit >= 1, "train.save_total_limit", cfg.train.save_total_limit, "an integer >= 1"),
        (cfg.train.log_every >= 1, "train.log_every", cfg.train.log_every, "an integer >= 1"),
        (cfg.train.drift_every >= 0, "train.drift_every", cfg.train.drift_every, "an integer >= 0"),
        (cfg.train.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.train.device) is not None,
         "train.device", cfg.train.device, "auto, cpu, cuda or cuda:N"),
        (all(r in ("tensorboard", "none") for r in cfg.train.report_to), "train.report_to",
         cfg.train.report_to, "a list of 'tensorboard' or 'none'"),
        (0 <= cfg.train.seed < 2**32, "train.seed", cfg.train.seed, "an integer in [0, 2**32)"),
        (0 <= cfg.data.seed < 2**32, "data.seed", cfg.data.seed, "an integer in [0, 2**32)"),
        (cfg.train.num_workers >= 0, "train.num_workers", cfg.train.num_workers, "an integer >= 0"),
    ]
    for key, value in _floats(cfg):  # inf passes "> 0" checks, and nan fails them with a vague message
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not valid; expected a finite number")
    for ok, key, value, accepted in checks:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is not valid; expected {accepted}")
    validating = bool(cfg.data.valid_file) or cfg.data.valid_ratio > 0
    if validating and cfg.train.save_every and cfg.train.save_every % cfg.train.eval_every:
        # the best checkpoint is chosen at evaluations, so checkpoints must fall on them
        raise ConfigError(f"train.save_every: {cfg.train.save_every} is not a multiple of train.eval_every="
                          f"{cfg.train.eval_every}; with validation data checkpoints must fall on evaluations "
                          "(the best one is kept); use a multiple of eval_every, or 0 to save at evaluations "
                          "that improve")
    if cfg.method.schedule != "constant" and cfg.method.penalty == "none" and cfg.optimizer.name != "balanced_adamw":
        raise ConfigError(f"method.schedule: {cfg.method.schedule!r} schedules the method's strengths, but "
                          "there are none here (method.penalty: none, optimizer.name: adamw); set a "
                          "penalty or optimizer.name: balanced_adamw, or schedule: constant")
    from dirtune.data.forget import parse_forget_files  # stdlib-only module
    from dirtune.data.records import DataError
    try:
        parse_forget_files(cfg.data.forget_files)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.test_ratio > 0 and cfg.data.test_file:
        raise ConfigError(f"data.test_ratio: {cfg.data.test_ratio!r} holds out a test split of train_file, "
                          "but data.test_file is set too; use one of them")
    if cfg.method.penalty != "none" and cfg.method.direction_weight == 0:
        raise ConfigError("method.direction_weight: 0 with method.penalty="
                          f"{cfg.method.penalty!r} does nothing; set a weight > 0 or penalty: none")
    if cfg.method.every > 1 and cfg.method.penalty != "coupled":
        raise ConfigError(f"method.every: {cfg.method.every} applies the coupled penalty every k steps; with "
                          f"method.penalty: {cfg.method.penalty!r} there is none (the decoupled turn is part of "
                          "the optimizer step); set penalty: coupled or every: 1")
    if cfg.optimizer.fused and cfg.optimizer.foreach:
        raise ConfigError("optimizer.fused: true and optimizer.foreach: true pick two paths; set one of them")
    if cfg.method.penalty == "decoupled" and cfg.optimizer.name != "balanced_adamw":
        raise ConfigError("method.penalty: 'decoupled' is applied by the optimizer; "
                          "it needs optimizer.name: balanced_adamw")
    if cfg.method.penalty == "decoupled" and cfg.finetune.type == "lora":
        raise ConfigError("method.penalty: 'decoupled' turns full weights toward their pretrained direction; "
                          "with finetune.type: lora use penalty: coupled (the factored form)")
    if cfg.method.penalty == "coupled" and cfg.finetune.use_dora:
        raise ConfigError("method.penalty: 'coupled' needs W = W0 + s·B·A; DoRA's learned magnitudes break "
                          "that, so it is not supported with finetune.use_dora=true")
    if cfg.finetune.type == "full" and (cfg.finetune.use_dora or cfg.finetune.loraplus_ratio):
        raise ConfigError("finetune.use_dora / finetune.loraplus_ratio apply to finetune.type: lora only")
    _validate_data_mix(cfg.data)
    return cfg


def _floats(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float in the tree, list items included."""
    found = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += _floats(value, key + ".")
        elif isinstance(value, float):
            found.append((key, value))
        elif isinstance(value, list):
            found += [(f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, float)]
    return found


def check_device(device: str) -> None:
    """ConfigError if `train.device` asks for a GPU this process cannot see. A run check, not a
    config one (the same file is valid on a GPU machine); call it after 'cuda:N' narrowed
    CUDA_VISIBLE_DEVICES, which CUDA reads once."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"train.device: {device!r}, but this process sees no CUDA GPU "
                          "(torch.cuda.is_available() is False); use train.device=cpu, or auto to take a GPU when there is one")


def _validate_data_mix(data: DataConfig) -> None:
    """data.train_weights against data.train_file, and data.columns' keys and names."""
    for key in ("train_file", "valid_file", "test_file"):
        value = getattr(data, key)
        if isinstance(value, list) and (not value or not all(v.strip() for v in value)):
            raise ConfigError(f"data.{key}: {value!r} is not valid; expected a file or a non-empty list of files")
    weights = data.train_weights
    if weights is not None:
        files = data.train_file if isinstance(data.train_file, list) else [data.train_file]
        if len(weights) != len(files):
            raise ConfigError(f"data.train_weights: {weights!r} has {len(weights)} weight(s) but data.train_file "
                              f"names {len(files)} file(s); give one weight per file, in the same order")
        if not all(w > 0 for w in weights):
            raise ConfigError(f"data.train_weights: {weights!r} is not valid; expected numbers > 0 "
                              "(leave a file out of data.train_file rather than weigh it 0)")
    for ours, theirs in data.columns.items():
        if ours not in COLUMN_KEYS:
            close = difflib.get_close_matches(ours, COLUMN_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"data.columns: key {ours!r} is not known{hint}; accepted: {', '.join(COLUMN_KEYS)} "
                              "(each mapped to the name your files use, e.g. {output: answer})")
        if not theirs.strip():
            raise ConfigError(f"data.columns.{ours}: {theirs!r} is not valid; expected the field name your files use")


def from_dict(data: dict, source: str = "config") -> Config:
    try:
        return validate(build_section(Config, data, ""))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file; every way it can fail is a ConfigError naming the file (and line)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; expected a YAML {what} (e.g. configs/small-full.yaml)")
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except (ValueError, AttributeError) as e:  # PyYAML's constructors, e.g. an impossible date
        raise ConfigError(f"{p}: a value is not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, validate."""
    data: Any = {}
    source = "command line"
    if path is not None:
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections "
                              f"({', '.join(f.name for f in dataclasses.fields(Config))})")
        source = str(path)
    apply_overrides(data, overrides or [])
    try:
        return from_dict(data, source)
    except ConfigError as e:
        if source != "command line" and _names_an_override(str(e), overrides or []):
            raise ConfigError("command line" + str(e)[len(source):]) from None
        raise


def _names_an_override(message: str, overrides: list[str]) -> bool:
    """Is the key a `from_dict` message is about one the command line set? Then the command
    line is to blame, not the file (whose name from_dict put first)."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    m = re.match(r"[^:]*: (?:unknown key '([^']+)'|([A-Za-z_][\w.]*))", message)
    about = (m.group(1) or m.group(2)) if m else None
    if about and any(about == k or about.startswith(k + ".") or k.startswith(about + ".") for k in keys):
        return True
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message) for k in keys if k)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) rows: the config reference in the README comes from this."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows
