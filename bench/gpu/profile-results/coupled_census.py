"""Per-step host census of one full fine-tuning run on the CPU (no GPU needed): ops, host
reads of device values, address-table uploads of the penalty's Triton path and whether the
covered weights' .grad tensors move between steps. Written for coupled-full-slowdown.md.

    TRITON_INTERPRET=1 PYTHONPATH=src:/path/to/triton python bench/gpu/profile-results/coupled_census.py METHOD [STEPS] [--bf16] [--reference | --no-kernels]

METHOD: adamw | wdp-coupled | wdp-decoupled (the smollm2-full bench's overrides); STEPS;
--bf16: under bf16 autocast, as the GPU runs were; --reference: the penalty's plain-torch path;
--no-kernels: the Triton path's host side only (launches counted, not run: host time). The model is
a random LLaMA with SmolLM2-135M's layout (30 layers, 7 projections each: 210 covered tensors
of 4 shapes), widths of about 1/9. With Triton's interpreter the penalty takes its CUDA path
(penalty_fused) on CPU tensors, as it does on the GPU.
"""

from __future__ import annotations

import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

METHODS = {
    "adamw": ["optimizer.name=adamw", "optimizer.weight_decay=0.0"],
    "wdp-coupled": ["optimizer.name=adamw", "method.penalty=coupled", "method.direction_weight=1.0e2"],
    "wdp-decoupled": ["optimizer.name=balanced_adamw", "optimizer.weight_decay=0.0",
                      "method.penalty=decoupled", "method.direction_weight=10"],
}
# ops that make the host wait for the device when run on CUDA tensors
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.masked_select",
            "aten.unique", "aten.repeat_interleave")


def _key(func) -> str:
    return f"aten.{func.overloadpacket.__name__}"


class OpCensus(TorchDispatchMode):
    """Counts every aten op run under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[_key(func)] += 1
        return func(*args, **(kwargs or {}))


def _tiny_smollm(path: Path) -> None:
    """SmolLM2-135M's layout (30 layers; q/o, k/v, gate/up, down shapes differ as there:
    hidden 576 = 9 heads x 64, 3 kv heads, intermediate 1536), at 1/9 of its widths."""
    from dirtune.data.synthetic import char_tokenizer

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=30,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def main(method: str, steps: int = 6, autocast: bool = False, path: str = "fused") -> dict:
    from dirtune.method import penalty, penalty_fused
    from dirtune.train import runner
    from dirtune.train.config import load_config
    from dirtune.data.synthetic import write_demo_data

    if not penalty_fused.interpreted():
        sys.exit("run with TRITON_INTERPRET=1 and Triton importable: the CUDA path is the one to count")
    # fused=None on CPU tensors would take the reference path; on the GPU it takes penalty_fused
    real_fused_module = penalty.fused_module
    penalty.fused_module = lambda tensors, fused, fn: (
        penalty_fused if fused is None and path != "reference" else real_fused_module(tensors, False, fn))
    launches = collections.Counter()
    signatures: set = set()
    if path == "no-kernels":   # the host's glue alone: each launch counted, not run
        def count_launch(kernel, ws, rs, extra, rows, cols, acc, **kw):
            # what Triton's JIT keys a compiled kernel on: dtypes, constexprs, int values and
            # 16-byte alignment of pointers; a new key every step would be a recompile every step
            tiles = penalty_fused._tiles(rows, cols)
            key = (kernel.fn.__name__, ws[0].dtype, rs[0].dtype, acc, rows, cols, tiles,
                   penalty_fused._aligned(ws) and penalty_fused._aligned(rs),
                   tuple((x.dtype, x.data_ptr() % 16 == 0) for x in extra if isinstance(x, torch.Tensor)),
                   tuple(sorted(kw.items())))
            launches.update([kernel.fn.__name__])
            signatures.add(key)

        penalty_fused._launch_rows = count_launch

    tmp = Path(tempfile.mkdtemp(prefix="census-"))
    _tiny_smollm(tmp / "model")
    files = write_demo_data(tmp / "data", seed=0, n_people=24, n_source_train=200, n_source_valid=20)
    cfg = load_config(None, [
        f"model.path={tmp / 'model'}", "model.dtype=fp32", "finetune.type=full",
        f"data.train_file={files['task_train']}", f"data.valid_file={files['task_valid']}",
        "data.max_length=160", "data.max_eval_samples=8", f"train.output_dir={tmp / 'run'}",
        "train.batch_size=8", "train.eval_batch_size=8", f"train.max_steps={steps}",
        "train.eval_every=1000", "train.progress=false", "train.report_to=[none]", "train.device=cpu",
        "train.drift_every=20", "train.log_every=5", "train.lr_scheduler=constant", "optimizer.lr=1e-4",
        "train.keep_best=memory", "train.plot=false", *METHODS[method]])

    uploads = collections.Counter()
    real_upload = penalty_fused._upload

    def counting_upload(values, device, kind):
        key = (device, kind, values)
        uploads[(kind, "hit" if key in penalty_fused._UPLOADS else "miss")] += 1
        return real_upload(values, device, kind)

    penalty_fused._upload = counting_upload

    reads = collections.Counter()   # host reads of tensor values, by caller
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def where() -> str:
        f = sys._getframe(2)
        return f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}"

    def item(self):
        reads[("item", where())] += 1
        return real_item(self)

    def tolist(self):
        reads[("tolist", where())] += 1
        return real_tolist(self)

    torch.Tensor.item, torch.Tensor.tolist = item, tolist

    census = OpCensus()
    per_step: list[dict] = []
    grads_prev: dict = {}

    class Step(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.t0 = time.perf_counter()
            self.ops0 = collections.Counter(census.ops)
            self.up0 = collections.Counter(uploads)
            self.reads0 = collections.Counter(reads)
            self.launches0 = collections.Counter(launches)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            # the gradients as the optimizer gets them (Trainer's zero_grad sets them to None later)
            ws = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
            ptrs = [None if w.grad is None else w.grad.data_ptr() for w in ws]
            self.moved = f"{sum(1 for i, p in enumerate(ptrs) if grads_prev.get(i) != p)}/{len(ws)}"
            grads_prev.update(enumerate(ptrs))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            casts = census.ops["aten._to_copy"] - self.ops0["aten._to_copy"]
            ops = census.ops - self.ops0
            per_step.append({
                "step": state.global_step,
                "host_s": round(time.perf_counter() - self.t0, 3),
                "aten_ops": sum(ops.values()),
                "sync_ops": {k: v for k, v in ops.items() if k in SYNC_OPS},
                "uploads": {f"{k}/{h}": v for (k, h), v in (uploads - self.up0).items()},
                "host_reads": {f"{k} {w}": v for (k, w), v in (reads - self.reads0).items()},
                "grads_moved": self.moved,
                "to_copy_ops": casts,
                "penalty_launches": dict(launches - self.launches0),
                "launch_signatures_so_far": len(signatures),
                "top_ops": dict((ops).most_common(6)),
            })

    real_trainer = runner.DirtuneTrainer

    class Counted(real_trainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(Step())

    runner.DirtuneTrainer = Counted
    if autocast:   # as on the GPU: fp32 weights under bf16 autocast (the runner sets it on CUDA only)
        real_args = runner.training_arguments

        def bf16_args(*a, **kw):
            import dataclasses
            return dataclasses.replace(real_args(*a, **kw), bf16=True)

        runner.training_arguments = bf16_args
    with census:
        runner.run_training(cfg)
    return {"method": method, "steps": per_step}


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    pos = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = next((f[2:] for f in flags if f in ("--reference", "--no-kernels")), "fused")
    result = main(pos[0], int(pos[1]) if len(pos) > 1 else 6, "--bf16" in flags, path)
    print(json.dumps(result, indent=1))
