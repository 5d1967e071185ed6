"""dirtune.integrations.attach in a plain transformers Trainer and in TRL's SFTTrainer, on a tiny
random LLaMA (CPU): LoRA (PEFT) and full fine-tuning, coupled penalty and decoupled turn.

The logged loss is checked against a task loss and a penalty computed here, independently of
both the trainers and dirtune (cross-entropy over every labelled token, 1 − cos per row in
float64), at every step; each step's batches cover the whole data set, so the expected value
does not depend on the order in which the trainer draws them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dirtune import BalancedAdamW
from dirtune.integrations import attach, make_optimizer
from dirtune.train.config import ConfigError

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_EXAMPLES, LENGTH, STEPS, LAM = 8, 24, 4, 300.0


def _records(tokenizer):
    """N fixed-length examples (no padding): every token is labelled."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tokenizer), (N_EXAMPLES, LENGTH), generator=g)
    return [{"input_ids": row.tolist()} for row in ids]


def _model(ckpt):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(PROJ), task_type="CAUSAL_LM")


def _dense_weights(model) -> dict[str, torch.Tensor]:
    """Every covered projection's effective weight, W or W0 + s·B·A, in float64."""
    out = {}
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJ:
            continue
        if hasattr(m, "base_layer"):
            w = m.base_layer.weight.double()
            for a in m.active_adapters:
                w = w + m.scaling[a] * (m.lora_B[a].weight.double() @ m.lora_A[a].weight.double())
        else:
            w = m.weight.double()
        out[name.replace("base_model.model.", "")] = w.detach().clone()
    return out


def _row_penalty(now, refs) -> float:
    """R_row of method.md §1: mean over tensors of mean over rows of 1 − cos(w_r, w0_r)."""
    terms = [(1 - F.cosine_similarity(now[k], refs[k], dim=1)).mean() for k in refs]
    return float(torch.stack(terms).mean())


def _task_loss(model, batches) -> float:
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
        labels = b["labels"][:, 1:]
        mask = labels != -100
        nll += F.cross_entropy(logits[:, :-1][mask].double(), labels[mask], reduction="sum").item()
        n += int(mask.sum())
    return nll / n


def _expectations(trainer, refs):
    """A callback that records, before each step, task loss + λ·R as computed here."""
    from transformers import TrainerCallback

    batches = list(trainer.get_train_dataloader())   # one pass = the whole data set
    assert sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches) == N_EXAMPLES * (LENGTH - 1)
    expected = {}

    class Expect(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                task = _task_loss(model, batches)
                pen = LAM * _row_penalty(_dense_weights(model), refs) if refs is not None else 0.0
            expected[state.global_step + 1] = (task, pen)

    trainer.add_callback(Expect())
    return expected


def _args(tmp_path, trl: bool, grad_accum: int, **kw):
    common = dict(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=N_EXAMPLES // grad_accum,
                  gradient_accumulation_steps=grad_accum, learning_rate=1e-2, weight_decay=0.1,
                  lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                  use_cpu=True, seed=0, disable_tqdm=True, **kw)
    if trl:
        from trl import SFTConfig

        return SFTConfig(max_length=LENGTH + 8, packing=False, **common)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def _trainer(kind, finetune, tiny_checkpoint, tmp_path, grad_accum=1):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = _model(tiny_checkpoint)
    data = Dataset.from_list(_records(tok))
    if kind == "trl":
        from trl import SFTTrainer

        return SFTTrainer(model=model, args=_args(tmp_path, True, grad_accum), train_dataset=data,
                          processing_class=tok, peft_config=_lora_config() if finetune == "lora" else None)
    from peft import get_peft_model
    from transformers import Trainer

    if finetune == "lora":
        model = get_peft_model(model, _lora_config())
    data = data.map(lambda r: {"labels": r["input_ids"]})
    return Trainer(model=model, args=_args(tmp_path, False, grad_accum), train_dataset=data)


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)   # accelerate's AcceleratedOptimizer


def _needs(kind):
    if kind == "trl":
        pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")


@pytest.mark.parametrize("kind,finetune,grad_accum", [
    ("trl", "lora", 2), ("trl", "full", 1), ("trainer", "lora", 1), ("trainer", "full", 2)])
def test_coupled_penalty_is_in_the_logged_loss(kind, finetune, grad_accum, tiny_checkpoint, tmp_path):
    _needs(kind)
    trainer = _trainer(kind, finetune, tiny_checkpoint, tmp_path, grad_accum)
    refs = _dense_weights(trainer.model)
    if finetune == "full":    # the references are kept in bf16 (method.reference_dtype's default)
        refs = {k: v.to(torch.bfloat16).double() for k, v in refs.items()}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    penalty = attach(trainer, penalty="coupled", direction_weight=LAM, anchor="init", balance="scale")
    expected = _expectations(trainer, refs)
    trainer.train()

    opt = _unwrapped(trainer.optimizer)
    assert isinstance(opt, BalancedAdamW) and type(trainer).__name__.endswith("TrainerWithDirtune")
    groups = {g["name"]: g for g in opt.param_groups}
    if finetune == "lora":   # B·A = 0 is the pretrained model: the adapters decay toward zero
        assert set(groups) == {"lora_A", "lora_B"} and {g["anchor"] for g in groups.values()} == {"zero"}
    else:
        assert groups["projections"]["anchor"] == "init" and groups["projections"]["weight_decay"] == 0.1
    assert all(g["direction_weight"] == 0 for g in groups.values())   # coupled: no turn in the optimizer
    assert penalty.mode == finetune and penalty.weight == LAM

    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == list(range(1, STEPS + 1))
    for r in logs:
        task, pen = expected[r["step"]]
        assert r["direction_penalty"] == pytest.approx(pen, rel=1e-4, abs=1e-7)
        assert r["loss"] == pytest.approx(task + pen, rel=1e-5, abs=1e-5)
    # the penalty is not negligible: it is larger than the tolerance by far
    assert max(expected[s][1] for s in range(2, STEPS + 1)) > 1e-3
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before)


@pytest.mark.parametrize("kind", ["trl", "trainer"])
def test_decoupled_turn_holds_the_direction(kind, tiny_checkpoint, tmp_path):
    """Full fine-tuning with the turn in the optimizer: the loss is the task loss alone, and the
    weights end closer to their pretrained directions than with the same run without the turn."""
    _needs(kind)
    angles = {}
    for dw in (0.0, 20.0):
        trainer = _trainer(kind, "full", tiny_checkpoint, tmp_path / str(dw))
        refs = _dense_weights(trainer.model)
        opts = dict(penalty="decoupled", direction_weight=dw) if dw else {}
        assert attach(trainer, weight_decay=0.0, **opts) is None
        expected = _expectations(trainer, None)
        trainer.train()
        opt = _unwrapped(trainer.optimizer)
        assert isinstance(opt, BalancedAdamW)
        groups = {g["name"]: g for g in opt.param_groups}
        assert groups["projections"]["direction_weight"] == dw
        assert groups["other_matrices"]["direction_weight"] == 0 and groups["no_decay"]["direction_weight"] == 0
        for r in (r for r in trainer.state.log_history if "loss" in r):
            assert "direction_penalty" not in r
            assert r["loss"] == pytest.approx(expected[r["step"]][0], rel=1e-5)
        angles[dw] = _row_penalty(_dense_weights(trainer.model), refs)
    assert angles[0.0] > 0 and angles[20.0] < 0.5 * angles[0.0]


def test_make_optimizer_and_keeping_the_trainers_own(tiny_checkpoint, tmp_path):
    """make_optimizer for Trainer(optimizers=...); attach(optimizer=None) adds only the penalty."""
    from transformers import Trainer

    trainer = _trainer("trainer", "lora", tiny_checkpoint, tmp_path)
    opt = make_optimizer(trainer.model, trainer.args)
    assert isinstance(opt, BalancedAdamW) and opt.param_groups[0]["lr"] == 1e-2
    with pytest.raises(ConfigError, match="into the loss"):
        make_optimizer(trainer.model, penalty="coupled", direction_weight=1.0)
    with pytest.raises(ConfigError, match="unknown option.*'lambda_dir'"):
        attach(trainer, lambda_dir=1.0)
    with pytest.raises(ConfigError, match="method.penalty: 'decoupled'.*lora"):
        attach(trainer, penalty="decoupled", direction_weight=1.0)

    mine = Trainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                   optimizers=(opt, None))
    with pytest.raises(ConfigError, match="its own optimizer"):
        attach(mine, penalty="coupled", direction_weight=LAM)
    penalty = attach(mine, optimizer=None, penalty="coupled", direction_weight=LAM)
    mine.train()
    assert _unwrapped(mine.optimizer) is opt and penalty.mode == "lora"
    assert all(r["direction_penalty"] >= 0 for r in mine.state.log_history if "loss" in r)
    with pytest.raises(ConfigError, match="already"):
        attach(mine, optimizer=None, penalty="coupled", direction_weight=LAM)


def test_readme_snippet_runs(tiny_checkpoint, tmp_path, monkeypatch):
    """The README's TRL snippet, as written, on the tiny model; on the CPU SFTConfig needs
    use_cpu/bf16=False, and two logged steps are enough here."""
    import re
    from pathlib import Path

    from datasets import Dataset

    _needs("trl")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it from TRL / axolotl / LLaMA-Factory", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "attach(trainer" in code and 'SFTConfig(output_dir="out"' in code
    code = code.replace('SFTConfig(output_dir="out"',
                        'SFTConfig(output_dir="out", use_cpu=True, bf16=False, max_steps=2, logging_steps=1, '
                        'report_to="none", save_strategy="no", disable_tqdm=True')
    monkeypatch.chdir(tmp_path)
    text = [{"text": "".join(chr(97 + (i * 7 + j) % 26) for j in range(30))} for i in range(8)]
    scope = {"model": str(tiny_checkpoint), "dataset": Dataset.from_list(text)}
    exec(compile(code, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert isinstance(_unwrapped(trainer.optimizer), BalancedAdamW)
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and logs[1]["direction_penalty"] > 0
