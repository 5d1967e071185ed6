"""One rank of the CPU (gloo) checks of tests/integration/test_distributed.py, on 2 or 4 ranks.

Run as `python _sharded_worker.py RANK WORLD PORT OUT_JSON [CHECKS]` (CHECKS: comma-separated
names of the check_* functions below without the prefix; default all). Every check compares a
sharded computation (FSDP2 `fully_shard` / DTensors `Shard(0)`) with the same computation on
whole tensors in this process, and records the largest difference (reduced with MAX over ranks,
so all ranks agree); rank 0 writes {check: value} to OUT_JSON. The test module asserts on them.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from dirtune.method import sharded
from dirtune.method.balanced_adamw import BalancedAdamW
from dirtune.method.penalty import angle_and_drift, direction_penalty, lora_direction_penalty
from dirtune.method.update_rules import apply_turn, apply_turns, balance_scales, decay_coefficients
from dirtune.models.direction import DirectionPenalty

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the tests' tiny-LLaMA builder
from tiny import make_tiny_llama  # noqa: E402

F64 = torch.float64
RESULTS: dict = {}


def record(name: str, value: float) -> None:
    """Largest difference over ranks."""
    t = torch.tensor([float(value)], dtype=F64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    RESULTS[name] = t.item()


def diff(a, b) -> float:
    a = a.full_tensor() if sharded.is_dtensor(a) else a
    b = b.full_tensor() if sharded.is_dtensor(b) else b
    return (a.detach().to(F64) - b.detach().to(F64)).abs().max().item() if a.numel() else 0.0


def shard(full: torch.Tensor, mesh) -> torch.Tensor:
    return distribute_tensor(full.detach().clone(), mesh, [Shard(0)])


def randn(*shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# Shapes with uneven shards, a single row and a 1-D tensor. Over 2 ranks: 5 rows as 3 + 2, and
# rank 1 holds no row of (1, 4). Over 4: 5 rows as 2 + 2 + 1 + 0 (torch.chunk's layout), 7 as
# 2 + 2 + 2 + 1, and ranks 1-3 hold no row of (1, 4): 4 empty shards.
SHAPES = [(5, 3), (4, 6), (1, 4), (7,)]


def check_reductions(mesh) -> None:
    fulls = [randn(*s, seed=i) for i, s in enumerate(SHAPES)]
    shards = [shard(f, mesh) for f in fulls]
    # local_rows follows DTensor's own layout
    record("local_rows", max(0.0 if torch.equal(sharded.local_rows(f, d), d.to_local()) else 1.0
                             for f, d in zip(fulls, shards)))
    empty = torch.tensor([float(sum(d.to_local().numel() == 0 for d in shards))], dtype=F64)
    dist.all_reduce(empty)  # over all ranks: the checks below did meet shards without rows
    RESULTS["empty_shards"] = empty.item()
    # sum_over_shards: one all-reduce for all sharded owners; plain owners left alone
    calls = []
    real = dist.all_reduce
    sharded.dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        plain = randn(3, 3, seed=9)
        owners = [*shards, plain]
        partials = torch.stack([d.to_local().square().sum() for d in shards] + [plain.square().sum()])
        full = sharded.sum_over_shards(partials, owners)
    finally:
        sharded.dist.all_reduce = real
    expect = torch.stack([f.square().sum() for f in fulls] + [plain.square().sum()])
    record("sum_over_shards", diff(full, expect))
    RESULTS["sum_over_shards_calls"] = len(calls)
    # rms-based balance scales
    record("balance_scales", max(abs(a - b) for a, b in zip(balance_scales(shards), balance_scales(fulls))))
    # selective decay: signs of <g, θ − a> of whole tensors
    anchors = [f + 0.1 * randn(*f.shape, seed=20 + i) for i, f in enumerate(fulls)]
    grads = [randn(*f.shape, seed=40 + i) for i, f in enumerate(fulls)]
    k_full = decay_coefficients(fulls, grads, anchors, [1.0] * 4, lr=0.1, weight_decay=1.0,
                                balance="selective")
    owners = shards

    def reduce(p, index):
        return sharded.sum_over_shards(p, [owners[i] for i in index])

    k_shard = decay_coefficients([d.to_local() for d in shards],
                                 [sharded.local_rows(g, d) for g, d in zip(grads, shards)],
                                 [sharded.local_rows(a, d) for a, d in zip(anchors, shards)],
                                 [1.0] * 4, lr=0.1, weight_decay=1.0, balance="selective", reduce=reduce)
    record("selective_decay", diff(k_shard, k_full))
    RESULTS["selective_decay_mixed_signs"] = float(0 < k_full.count_nonzero().item() < len(fulls))
    # the decoupled turn, per tensor and per row
    for granularity in ("tensor", "row"):
        ws = [f.clone() for f in fulls]
        ds = [shard(f, mesh) for f in fulls]
        for w, a in zip(ws, anchors):
            if w.ndim == 2:
                apply_turn(w, a, strength=0.3, granularity=granularity)
        apply_turns([d.to_local() for d in ds], [sharded.local_rows(a, d) for a, d in zip(anchors, ds)],
                    strength=0.3, granularity=granularity, reduce=reduce)
        record(f"turn_{granularity}", max(diff(d, w) for d, w in zip(ds, ws)))


def check_penalty(mesh) -> None:
    weights = [randn(*s, seed=60 + i) for i, s in enumerate(SHAPES)]
    refs = [w + 0.05 * randn(*w.shape, seed=80 + i) for i, w in enumerate(weights)]
    for granularity in ("row", "tensor"):
        for ref_kind in ("full", "dtensor"):
            full = [w.clone().requires_grad_() for w in weights]
            value = direction_penalty(full, refs, granularity)
            value.backward()
            ds = [shard(w, mesh).requires_grad_() for w in weights]
            rs = refs if ref_kind == "full" else [shard(r, mesh) for r in refs]
            got = direction_penalty(ds, rs, granularity)
            got.backward()
            name = f"penalty_{granularity}_{ref_kind}"
            record(name + "_value", abs(got.item() - value.item()))
            record(name + "_grad", max(diff(d.grad, f.grad) for d, f in zip(ds, full)))
    angle, drift = angle_and_drift(weights[1], refs[1])
    s_angle, s_drift = angle_and_drift(shard(weights[1], mesh), refs[1])
    record("angle", abs(angle.item() - s_angle.item()))
    record("drift", abs(drift.item() - s_drift.item()))


def check_refusals(mesh) -> None:
    by_cols = distribute_tensor(randn(4, 4, seed=1), mesh, [Shard(1)])
    for name, fn in (
            ("refuses_shard1", lambda: direction_penalty([by_cols], [randn(4, 4, seed=2)])),
            ("refuses_sharded_lora", lambda: lora_direction_penalty(
                shard(randn(4, 6, seed=3), mesh), randn(2, 6, seed=4), randn(4, 2, seed=5), 1.0))):
        try:
            fn()
            RESULTS[name] = 0.0
        except ValueError:
            RESULTS[name] = 1.0


def check_optimizer(mesh) -> None:
    """BalancedAdamW built on DTensor parameters (no swap) against whole ones, every mode."""
    modes = {
        "scale_row": dict(weight_decay=0.5, balance="scale", direction_weight=3.0, granularity="row"),
        "selective_tensor": dict(weight_decay=2.0, balance="selective", direction_weight=3.0,
                                 granularity="tensor"),
        "zero_scale_foreach": dict(weight_decay=0.5, anchor="zero", balance="scale", foreach=True),
        "none_turn_tensor": dict(weight_decay=0.0, anchor="none", balance="none",
                                 direction_weight=50.0, granularity="tensor"),
    }
    for name, kw in modes.items():
        inits = [randn(*s, seed=100 + i) for i, s in enumerate(SHAPES)]
        full = [torch.nn.Parameter(t.clone()) for t in inits]
        dts = [torch.nn.Parameter(shard(t, mesh)) for t in inits]
        opt_f = BalancedAdamW(full, lr=1e-2, anchor_dtype=None, **{"anchor": "init", **kw})
        opt_d = BalancedAdamW(dts, lr=1e-2, anchor_dtype=None, **{"anchor": "init", **kw})
        for step in range(6):
            for i, (f, d) in enumerate(zip(full, dts)):
                g = randn(*f.shape, seed=1000 * step + i)
                f.grad, d.grad = g, shard(g, mesh)
            opt_f.step()
            opt_d.step()
        record(f"optimizer_{name}", max(diff(d, f) for d, f in zip(dts, full)))


# --- a tiny LLaMA, sharded the way accelerate's FSDP2 preparation shards it -------------------------

def tiny_llama(dtype=torch.float32):
    # odd sizes: gate/up rows (67) and embedding rows (131) split unevenly over 2 or 4 ranks
    return make_tiny_llama(vocab_size=131, intermediate_size=67, max_position_embeddings=64).to(dtype)


def groups(model, turn: float, wd: float):
    """The trainer's grouping: covered projections (decay + turn), other matrices, 1-D (no decay)."""
    proj, other, flat = [], [], []
    for n, p in model.named_parameters():
        (flat if p.ndim < 2 else proj if n.rsplit(".", 2)[-2].endswith("proj") else other).append(p)
    return [{"params": proj, "weight_decay": wd, "direction_weight": turn},
            {"params": other, "weight_decay": wd, "direction_weight": 0.0},
            {"params": flat, "weight_decay": 0.0, "direction_weight": 0.0}]


def build(mesh, shard_it: bool, *, balance: str, turn: float, coupled: float, granularity: str,
          wd: float, dtype: torch.dtype, anchor_dtype=None):
    """Model, coupled penalty and optimizer in the order Trainer builds them under FSDP2: the
    optimizer on whole weights, then fully_shard, then the optimizer's params swapped."""
    model = tiny_llama(dtype)
    penalty = (DirectionPenalty(model, coupled, granularity=granularity, reference_dtype=None)
               if coupled else None)
    opt = BalancedAdamW(groups(model, turn, wd), lr=1e-2, anchor="init", balance=balance,
                        granularity=granularity, anchor_dtype=anchor_dtype, foreach=False)
    if shard_it:
        names = {id(p): n for n, p in model.named_parameters()}
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        new = dict(model.named_parameters())
        for g in opt.param_groups:  # what accelerate's fsdp2_switch_optimizer_parameters does
            g["params"] = [new[names[id(p)]] for p in g["params"]]
    return model, penalty, opt


def run_steps(model, penalty, opt, steps, shard_it: bool):
    rank, world = dist.get_rank(), dist.get_world_size()
    pen_values = []
    for step in steps:
        ids = torch.randint(0, 131, (4, 16), generator=torch.Generator().manual_seed(step))
        if shard_it:  # each rank its half of the global batch; FSDP2 averages the gradients
            ids = ids.chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        if penalty is not None:
            pen = penalty()
            pen_values.append(pen.item())
            loss = loss + pen
        loss.backward()
        opt.step()
        opt.zero_grad()
    return pen_values


def full_params(model) -> dict:
    return {n: (p.full_tensor() if sharded.is_dtensor(p) else p).detach().clone()
            for n, p in model.named_parameters()}


def train(mesh, shard_it: bool, steps: int = 4, **kw):
    model, penalty, opt = build(mesh, shard_it, **kw)
    pen_values = run_steps(model, penalty, opt, range(steps), shard_it)
    return full_params(model), pen_values, opt


def check_checkpoint(mesh) -> None:
    """Save after 2 steps, load into a fresh model and optimizer prepared as Trainer prepares
    them (optimizer built, then sharded and swapped), continue: the same weights as without the
    interruption. As accelerate does for FSDP2: SHARDED_STATE_DICT through dcp.save/dcp.load
    into the fresh optimizer's own state dict as template; FULL_STATE_DICT gathered, through
    torch.save/torch.load(weights_only=True), then distributed."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    kw = dict(balance="scale", turn=5.0, coupled=0.0, granularity="tensor", wd=0.1, dtype=F64,
              anchor_dtype=torch.bfloat16)
    folder = os.path.join(os.path.dirname(sys.argv[4]), "dcp")
    for full in (False, True):
        # accelerate's FULL_STATE_DICT: gathered to rank 0's CPU, broadcast from it on loading
        options = StateDictOptions(full_state_dict=full, cpu_offload=full, broadcast_from_rank0=full)
        model, _, opt = build(mesh, True, **kw)
        run_steps(model, None, opt, range(2), True)
        if full:
            buf = io.BytesIO()
            torch.save({"model": get_model_state_dict(model, options=options),
                        "optimizer": get_optimizer_state_dict(model, opt, options=options)}, buf)
        else:
            dcp.save({"model": get_model_state_dict(model, options=options),
                      "optimizer": get_optimizer_state_dict(model, opt, options=options)},
                     checkpoint_id=folder)
        run_steps(model, None, opt, range(2, 4), True)
        fresh, _, opt2 = build(mesh, True, **kw)
        if full:
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
        else:  # templates from the fresh model and optimizer, filled in place
            saved = {"model": get_model_state_dict(fresh, options=options),
                     "optimizer": get_optimizer_state_dict(fresh, opt2, options=options)}
            dcp.load(saved, checkpoint_id=folder)
        set_model_state_dict(fresh, saved["model"], options=options)
        set_optimizer_state_dict(fresh, opt2, saved["optimizer"], options=options)
        run_steps(fresh, None, opt2, range(2, 4), True)
        a, b = full_params(model), full_params(fresh)
        name = "checkpoint_" + ("full" if full else "sharded")
        record(name, max(diff(a[n], b[n]) for n in a))
        anchors = [s["anchor"] for s in opt2.state.values()]
        RESULTS[name + "_anchors_kept"] = float(
            all(sharded.is_dtensor(x) and x.dtype == torch.bfloat16 for x in anchors))


def check_training(mesh) -> None:
    """float64 shows the method is exact under sharding (differences are round-off, ~1e-13);
    fp32 shows what a user sees (Adam turns the order of fp32 sums into ~1e-6 after 4 steps)."""
    scenarios = {
        "scale_turn_row": dict(balance="scale", turn=5.0, coupled=0.0, granularity="row", wd=0.1),
        "selective_turn_tensor": dict(balance="selective", turn=5.0, coupled=0.0,
                                      granularity="tensor", wd=1.0),
        "coupled_row": dict(balance="scale", turn=0.0, coupled=50.0, granularity="row", wd=0.1),
        "coupled_tensor": dict(balance="none", turn=0.0, coupled=50.0, granularity="tensor", wd=0.1),
    }
    runs = [(f"{name}_f64", dict(kw, dtype=F64)) for name, kw in scenarios.items()]
    runs.append(("scale_turn_row_f32", dict(scenarios["scale_turn_row"], dtype=torch.float32)))
    for name, kw in runs:
        ref, ref_pen, _ = train(mesh, False, **kw)
        got, got_pen, opt = train(mesh, True, **kw)
        record(f"train_{name}", max(diff(got[n], ref[n]) for n in ref))
        # the run moved the weights (else equality would prove nothing)
        init = tiny_llama(kw["dtype"]).state_dict()
        RESULTS[f"train_{name}_moved"] = max(diff(ref[n], init[n]) for n in ref)
        if ref_pen:
            record(f"train_{name}_penalty", max(abs(a - b) for a, b in zip(got_pen, ref_pen)))
            RESULTS[f"train_{name}_penalty_last"] = ref_pen[-1]
        # adoption dropped the unsharded state and kept DTensor anchors
        states = list(opt.state.values())
        RESULTS[f"train_{name}_anchors_sharded"] = float(
            len(states) == sum(len(g["params"]) for g in opt.param_groups)
            and all(sharded.is_dtensor(s["anchor"]) for s in states))


def check_fault_guard(mesh) -> None:
    """A NaN in one rank's gradient shard: every rank skips the step (else the ranks part ways)."""
    from types import SimpleNamespace

    from dirtune.train.callbacks import FaultGuard
    from dirtune.train.distributed import Unlogged

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    fully_shard(model, mesh=mesh)
    model(torch.randn(2, 4)).sum().backward()
    if dist.get_rank() == 1:
        model[0].weight.grad.to_local()[0, 0] = float("nan")
    guard = FaultGuard("skip", Unlogged(), lambda: torch.tensor(1.0))
    guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None, model=model)
    skipped = all(p.grad is None for p in model.parameters()) and guard.skipped == 1
    record("fault_guard_not_skipped", 0.0 if skipped else 1.0)


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    faulthandler.dump_traceback_later(int(os.environ.get("WORKER_TIMEOUT", "150")), exit=True)  # a hang in a collective shows where
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    everything = (check_reductions, check_penalty, check_refusals, check_optimizer, check_training,
                  check_checkpoint, check_fault_guard)
    chosen = sys.argv[5].split(",") if len(sys.argv) > 5 else [c.__name__[6:] for c in everything]
    unknown = set(chosen) - {c.__name__[6:] for c in everything}
    if unknown:
        raise SystemExit(f"unknown checks {sorted(unknown)}; known: {[c.__name__[6:] for c in everything]}")
    mesh = init_device_mesh("cpu", (world,))
    RESULTS["world"] = world
    started = time.perf_counter()
    try:
        for check in (c for c in everything if c.__name__[6:] in chosen):
            t0 = time.perf_counter()
            check(mesh)
            RESULTS[f"seconds_{check.__name__}"] = round(time.perf_counter() - t0, 2)
    except Exception:
        RESULTS["error"] = f"rank {rank}: {traceback.format_exc()}"
        if rank == 0 or "error" in RESULTS:
            with open(f"{out}.rank{rank}", "w") as f:
                json.dump(RESULTS, f)
        os._exit(1)  # do not wait in a collective the other rank will never join
    RESULTS["seconds"] = round(time.perf_counter() - started, 2)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active
    # exception") after everything is written and the group is closed: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
