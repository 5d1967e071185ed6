"""BalancedAdamW: AdamW whose decay pulls toward an anchor with a balanced per-tensor strength,
plus the decoupled weight direction turn (method.md §2 and §1 "decoupled").

Laid out like torch.optim.AdamW: the class validates options and keeps state; `step` gathers
parallel lists and calls the functional entry `balanced_adamw`, which dispatches to the readable
`_single_tensor_balanced_adamw`, the `torch._foreach_*` `_multi_tensor_balanced_adamw` (same
signature, same arithmetic) or, when asked, the fused kernel of `dirtune.method.fused`.
The functional step `balanced_adamw` (which path runs) is here; the paths and the per-tensor
scalars live in `update_rules`, the fused kernels in `fused`. Imports only torch.

Sharded training (FSDP2, DeepSpeed): see `sharded.py` and docs/distributed.md. Parameters that
a wrapper swaps into the groups after construction (accelerate's FSDP2 preparation replaces
each parameter by its DTensor shard) are *adopted* at their first step: their anchors,
references and balance scales are taken then, from their value before that step.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from dirtune.method import sharded
from dirtune.method.common import ANCHORS, BALANCES, GRANULARITIES, check_choice
from dirtune.method.update_rules import (
    _multi_tensor_balanced_adamw,
    _single_tensor_balanced_adamw,
    balance_scales,
)

__all__ = ["BalancedAdamW", "balanced_adamw"]

# State tensors whose dtype is anchor_dtype, not the parameter's: load_state_dict must not cast them.
_ANCHOR_KEYS = ("anchor", "reference")


# ---------------------------------------------------------------- the functional step

def _fused_impl():
    try:
        from dirtune.method.fused import _fused_balanced_adamw
    except ModuleNotFoundError as e:
        if e.name != "dirtune.method.fused":
            raise
        raise ValueError("fused=True needs dirtune.method.fused, which this build does not have; "
                         "use fused=None (foreach on CUDA) or foreach=True") from None
    return _fused_balanced_adamw


# fused=None, foreach=None on CUDA: take the fused kernels (dirtune.method.fused) when Triton is
# installed. Sound: in fp32 they equal the foreach path to round-off; in bf16 they round each
# stored value once (as torch's fused AdamW), where the foreach path rounds after every op (the
# Adam denominator √v/√(1−β2^t) + ε three times), which is the few-ulp gap between the two;
# against the same step in float64 the kernels are the closer (tests/unit/method/test_fused.py,
# bench/perf/run.py's check on the GPU).
FUSED_BY_DEFAULT = True


def _fused_by_default(params: list[Tensor]) -> bool:
    """Whether fused=None means fused here: every parameter on CUDA, Triton importable, and
    FUSED_BY_DEFAULT set. CPU parameters never import dirtune.method.fused."""
    if not FUSED_BY_DEFAULT or not params or not all(p.device.type == "cuda" for p in params):
        return False
    try:
        from dirtune.method.fused import available
    except ImportError:
        return False
    return available()


def balanced_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    references: list[Tensor | None],
    scales: list[float],
    foreach: bool | None = None,
    fused: bool | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    anchor: str,
    balance: str,
    direction_weight: float,
    granularity: str,
) -> None:
    """Functional BalancedAdamW: one step for parallel lists (see BalancedAdamW for the algorithm).

    anchors[i] is a_i or None (anchor "zero"/"none"); references[i] is θ0_i or None; scales[i]
    is b_i of balance "scale" (ignored otherwise). Anchors and references may live on the CPU and
    in any floating dtype. foreach=None picks foreach when every parameter is on CUDA;
    fused=None with foreach=None picks the fused kernels there if FUSED_BY_DEFAULT is set.

    DTensor entries (FSDP2's row-sharded parameters, with their grads and state as DTensors of
    the same placements) are stepped on their local shards; whole-tensor sums are completed
    across shards (see sharded.py), so the step equals the unsharded one to round-off.

    Long on purpose: the functional step's signature is 22 parameters (torch's adamw() layout); the body is ~30 lines.
    """
    reduce = None
    if any(sharded.is_dtensor(p) for p in params):
        for p in params:
            sharded.shard_dims(p)  # refuses placements that split rows
        owners = list(params)

        def reduce(partials: Tensor, index: list[int]) -> Tensor:
            return sharded.sum_over_shards(partials, [owners[i] for i in index])

        params, grads, exp_avgs, exp_avg_sqs, anchors, references = (
            [sharded.local(t) for t in ts]
            for ts in (params, grads, exp_avgs, exp_avg_sqs, anchors, references))
    if fused is None and foreach is None:
        fused = _fused_by_default(params)
    # Shard sums are needed by "selective" decay and by the tensor-granularity turn; the fused
    # kernels sum per shard only, so sharded steps needing them take the foreach path instead.
    needs_sums = reduce is not None and (
        (balance == "selective" and weight_decay != 0 and anchor != "none")
        or (direction_weight != 0 and granularity == "tensor"))
    if fused and not needs_sums:
        func = _fused_impl()
    else:
        if foreach is None or fused:
            foreach = fused or (len(params) > 0 and all(p.device.type == "cuda" for p in params))
        func = _multi_tensor_balanced_adamw if foreach else _single_tensor_balanced_adamw
    extra = {"reduce": reduce} if reduce is not None else {}
    func(params, grads, exp_avgs, exp_avg_sqs, state_steps, anchors, references, scales,
         lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, anchor=anchor,
         balance=balance, direction_weight=direction_weight, granularity=granularity, **extra)


# ---------------------------------------------------------------- the optimizer

def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_options(o: dict[str, Any]) -> None:
    """The validation ladder: one ValueError per bad option, naming the value and what is accepted."""
    lr, eps, betas, wd, dw = o["lr"], o["eps"], o["betas"], o["weight_decay"], o["direction_weight"]
    if not (_number(lr) and 0.0 <= lr):
        raise ValueError(f"Invalid learning rate: {lr!r}; expected a float >= 0")
    if not (_number(eps) and 0.0 <= eps):
        raise ValueError(f"Invalid epsilon value: {eps!r}; expected a float >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_number, betas))):
        raise ValueError(f"Invalid betas: {betas!r}; expected two floats in [0, 1)")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]!r}; expected [0, 1)")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]!r}; expected [0, 1)")
    if not (_number(wd) and 0.0 <= wd):
        raise ValueError(f"Invalid weight_decay value: {wd!r}; expected a float >= 0")
    check_choice("anchor", o["anchor"], ANCHORS)
    check_choice("balance", o["balance"], BALANCES)
    if not (_number(dw) and 0.0 <= dw):
        raise ValueError(f"Invalid direction_weight: {dw!r}; expected a float >= 0")
    check_choice("granularity", o["granularity"], GRANULARITIES)
    dt = _as_dtype(o["anchor_dtype"])
    if o["anchor_dtype"] is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise ValueError(f"Invalid anchor_dtype: {o['anchor_dtype']!r}; expected a floating torch.dtype or None")
    if o["anchor_device"] not in (None, "cpu"):
        raise ValueError(f"Invalid anchor_device: {o['anchor_device']!r}; expected None or 'cpu'")
    if o["foreach"] and o["fused"]:
        raise ValueError("Invalid foreach/fused: both True; pick one")


def _as_dtype(value: Any) -> Any:
    """A torch.dtype from a dtype or its name as groups store it ("torch.bfloat16"); anything
    else is returned for the ladder to refuse."""
    if isinstance(value, str) and value.startswith("torch."):
        found = getattr(torch, value[len("torch."):], None)
        return found if isinstance(found, torch.dtype) else value
    return value


def _dtype_name(value: Any) -> Any:
    """Groups keep anchor_dtype by name: torch.distributed.checkpoint gathers a full optimizer
    state dict (FSDP's FULL_STATE_DICT) only through plain values, and a torch.dtype is not one."""
    value = _as_dtype(value)
    return str(value) if isinstance(value, torch.dtype) else value


def _normalise_device(device: Any) -> Any:
    """torch.device("cpu") and "cpu" both mean the CPU; anything else is left for the ladder to refuse."""
    if isinstance(device, torch.device) and device.type == "cpu" and device.index is None:
        return "cpu"
    return device


def _home(p: Tensor, anchor_device: str | None) -> torch.device:
    return torch.device("cpu") if anchor_device == "cpu" else p.device


def _store(t: Tensor, p: Tensor, anchor_device: str | None, dtype: torch.dtype | None) -> Tensor:
    """A private copy of t for the state, in `dtype` (None: p's dtype) at the anchor's home; CPU
    copies of accelerator params are pinned so the per-step upload can be asynchronous.

    For a DTensor parameter the copy is of the local shard, wrapped as a DTensor like p (so a
    checkpoint gathers it like the moments); a full tensor t is cut to p's rows first."""
    if sharded.is_dtensor(p):
        t = sharded.local(t) if sharded.is_dtensor(t) else sharded.local_rows(t, p)
        return sharded.wrap_like(_store(t, sharded.local(p), anchor_device, dtype or p.dtype), p)
    out = t.detach().to(device=_home(p, anchor_device), dtype=dtype or p.dtype, copy=True)
    if anchor_device == "cpu" and p.device.type == "cuda":
        out = out.pin_memory()
    return out


def _needs_structure(group: dict[str, Any]) -> str | None:
    """What in the group's options needs whole tensors or rows (None if it is all elementwise)."""
    decays = group["anchor"] != "none"
    if decays and group["balance"] != "none":
        return f"balance={group['balance']!r}"
    if group["direction_weight"] > 0:
        return f"direction_weight={group['direction_weight']} (the decoupled turn)"
    return None


def _refuse_flat(group: dict[str, Any], why: str) -> None:
    need = _needs_structure(group)
    if need is not None:
        raise ValueError(
            f"BalancedAdamW: {why}; {need} needs each tensor's rows and whole-tensor sums, which a "
            "flat partition (DeepSpeed ZeRO) does not keep. Supported there: anchor 'init', 'zero' "
            "or 'none' with balance='none' and direction_weight=0 (elementwise decay). For balance "
            "'scale'/'selective' or the turn, shard with FSDP2 (accelerate, fsdp_version: 2) or use "
            "DDP; see docs/distributed.md")


class BalancedAdamW(Optimizer):
    r"""AdamW with balanced decay toward an anchor and an optional decoupled direction turn.

    Algorithm (method.md symbols; every option may differ per parameter group)::

        input  η (lr), β1, β2 (betas), ε (eps), λ (weight_decay), λ_dir (direction_weight),
               anchor ∈ {init, zero, none}, balance ∈ {none, scale, selective}
        at construction (for each θ_i of the group):
            a_i  ← θ_i in anchor_dtype                          if anchor = init (the pretrained value)
            θ0_i ← a_i, or a copy of θ_i in anchor_dtype         if λ_dir > 0 and θ_i is 2-D
            b_i  ← s̄ / rms(a_i),  s̄ = mean_j rms(a_j)           if balance = scale
                   (anchor = zero: rms(θ_i) stands for rms(a_i); tensors with rms 0 get b_i = 1)
        for t = 1, 2, ...:
            g_i ← ∇_θi L
            if anchor ≠ none and λ ≠ 0:
                if balance = selective:  b_i ← 1 if −<g_i, θ_i − a_i> < 0 else 0
                k_i ← min(1, η·λ·b_i)                            (b_i = 1 for balance = none)
                θ_i ← θ_i − k_i·(θ_i − a_i)                      (anchor = zero: θ_i ← (1 − k_i)·θ_i)
            m_i ← β1·m_i + (1 − β1)·g_i
            v_i ← β2·v_i + (1 − β2)·g_i²
            m̂_i ← m_i / (1 − β1^t);   v̂_i ← v_i / (1 − β2^t)
            θ_i ← θ_i − η·m̂_i / (√v̂_i + ε)
            if λ_dir ≠ 0 and θ_i is 2-D:   (per output row, or per tensor: granularity)
                u ← θ/||θ||,  u0 ← θ0/||θ0||,  c ← <u, u0>,  κ ← min(1, η·λ_dir)
                θ ← θ + κ·||θ||·(u0 − c·u)                       (fp32; never turns past θ0)

    The decay comes first and the Adam step second, as in torch.optim.AdamW, so anchor="zero",
    balance="none" is torch's AdamW with the same λ (bitwise on the CPU), and λ = 0, λ_dir = 0 is
    AdamW whatever the anchor and balance.

    Args:
        params: tensors or parameter groups (dicts), as for any torch optimizer.
        lr: η. betas: (β1, β2). eps: ε. weight_decay: λ.
        anchor: where the decay pulls: "init" (the value at construction: decoupled L2-SP),
            "zero" (plain AdamW decay), "none" (no decay). Anchors are copied when the group is
            added (construction or add_param_group), so give the optimizer the pretrained weights.
            "init" stores one copy per tensor even while λ = 0, so a λ schedule can start at 0.
            Zero-initialised adapters (LoRA's B) should use "zero".
        balance: b_i: "none" (1), "scale" (s̄/rms(a_i), fixed at construction and carried in the
            state so a resumed run is exact), "selective" (decay only when <g_i, θ_i − a_i> > 0).
        direction_weight: λ_dir of the decoupled turn; 0 disables it. Needs λ_dir > 0 when the
            group is added if anchor ≠ "init", because that is when the reference is copied.
        anchor_dtype: dtype of anchors and references (None: the parameter's dtype); groups
            keep it by name ("torch.bfloat16"), which a distributed checkpoint can gather.
        foreach: True for torch._foreach_* kernels, False for the per-tensor loop, None for
            foreach when every parameter is on CUDA.
        anchor_device: None (beside each parameter) or "cpu": saves accelerator memory but
            uploads every anchor each step (anchor_dtype bytes per element over PCIe, e.g.
            2 bytes × 7e9 ≈ 14 GB ≈ 0.5 s per step for a 7B model in bf16).
        granularity: "row" (one turn per output row) or "tensor".
        fused: True runs the Triton kernels of dirtune.method.fused; None (with foreach=None)
            takes them when every parameter is on CUDA and Triton imports
            (FUSED_BY_DEFAULT); False never.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        anchor: str = "init",
        balance: str = "scale",
        direction_weight: float = 0.0,
        anchor_dtype: torch.dtype | None = torch.bfloat16,
        foreach: bool | None = None,
        *,
        anchor_device: str | None = None,
        granularity: str = "row",
        fused: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, anchor=anchor, balance=balance,
                        direction_weight=direction_weight, anchor_dtype=anchor_dtype,
                        foreach=foreach, anchor_device=_normalise_device(anchor_device),
                        granularity=granularity, fused=fused)
        _check_options(defaults)
        defaults["anchor_dtype"] = _dtype_name(anchor_dtype)
        if fused:
            _fused_impl()  # fail now, not at the first step, if the kernel module is missing
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group's options, then copy its anchors, references and balance scales."""
        if "anchor_device" in param_group:
            param_group["anchor_device"] = _normalise_device(param_group["anchor_device"])
        _check_options({**self.defaults, **param_group})
        if "anchor_dtype" in param_group:
            param_group["anchor_dtype"] = _dtype_name(param_group["anchor_dtype"])
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)  # a generator is read once
        param_group["params"] = params
        for p in params:
            p = p[1] if isinstance(p, tuple) else p  # named parameters: (name, tensor)
            if isinstance(p, Tensor) and torch.is_complex(p):
                raise ValueError(f"Invalid parameter: complex dtype {p.dtype} is not supported")
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise ValueError(f"Invalid parameter: dtype {p.dtype} is not floating point")
        super().add_param_group(param_group)
        self._snapshot(self.param_groups[-1])

    @torch.no_grad()
    def _snapshot(self, group: dict[str, Any], only: list[Tensor] | None = None) -> None:
        """Copy anchors and references of `only` (default: every parameter of the group), then
        the group's balance scales (over all of its parameters)."""
        anchor, device, dtype = group["anchor"], group["anchor_device"], _as_dtype(group["anchor_dtype"])
        if any(sharded.is_flat_partition(p) for p in group["params"]):
            # ZeRO-3 partitions: p.data is empty here; elementwise options are adopted at step 1
            _refuse_flat(group, "parameters partitioned by DeepSpeed ZeRO (ds_id) were given")
            return
        for p in group["params"] if only is None else only:
            state = self.state[p]
            if anchor == "init":
                state["anchor"] = _store(p, p, device, dtype)
            elif group["direction_weight"] > 0 and p.ndim == 2:
                state["reference"] = _store(p, p, device, dtype)
        if group["balance"] == "scale" and anchor != "none":
            values = [self.state[p]["anchor"] if anchor == "init" else p for p in group["params"]]
            for p, b in zip(group["params"], balance_scales(values), strict=True):
                self.state[p]["balance"] = b

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("anchor_device", None)
            group.setdefault("granularity", "row")
            group.setdefault("fused", None)
            group["anchor_dtype"] = _dtype_name(group.get("anchor_dtype"))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch, but keep anchors and references in their own dtype and at their home.

        Optimizer.load_state_dict casts floating state to the parameter's dtype (it calls
        Optimizer._process_value_according_to_param_policy directly, so overriding that has no
        effect); a post hook would be too late for anchors wider than the parameter. So they are
        taken out before and put back after. Pre-hooks therefore see no anchors.
        """
        state_dict = state_dict.copy()
        kept: dict[Any, dict[str, Tensor]] = {}
        rest: dict[Any, Any] = {}
        for pid, s in state_dict["state"].items():
            kept[pid] = {k: v for k, v in s.items() if k in _ANCHOR_KEYS}
            rest[pid] = {k: v for k, v in s.items() if k not in _ANCHOR_KEYS}
        state_dict["state"] = rest
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a state saved before groups kept the dtype by name
            group["anchor_dtype"] = _dtype_name(group.get("anchor_dtype"))
        owners = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(saved_ids, owners, strict=True):
            for key, value in kept.get(pid, {}).items():
                if value.shape != p.shape:
                    raise ValueError(f"loaded state of parameter {pid}: {key} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")
                self.state[p][key] = _store(value, p, group["anchor_device"], value.dtype)

    @torch.no_grad()
    def _adopt_new_params(self, with_moments: bool = False) -> None:
        """Take anchors, references and balance scales for parameters swapped into the groups
        after construction (not in the state): accelerate's FSDP2 preparation replaces every
        parameter by its DTensor shard this way, DeepSpeed ZeRO by flat partitions. Their value
        now, before their first step, is the pretrained one. State of parameters that left the
        groups is dropped (it would keep the unsharded anchors alive). `with_moments` also
        creates the (zero) moments that the first step would create."""
        fresh = [[p for p in g["params"] if p not in self.state] for g in self.param_groups]
        if not any(fresh):
            return
        for group, new in zip(self.param_groups, fresh):
            # a plain 1-D tensor may be a flat partition of many tensors (and cannot be told
            # from one); a DTensor or a 2-D tensor keeps its rows
            flat = [p for p in new if not sharded.is_dtensor(p) and p.ndim == 1]
            if flat:
                _refuse_flat(group, f"{len(flat)} 1-D parameter(s) of shape(s) "
                             f"{sorted({tuple(p.shape) for p in flat})[:3]} were swapped into the "
                             "optimizer after construction, as DeepSpeed ZeRO's flat partitions are")
        self._drop_stale_state()
        for group, new in zip(self.param_groups, fresh):
            if new:
                self._snapshot(group, only=new)
            for p in new if with_moments else ():
                self._init_moments(p)

    def _drop_stale_state(self) -> None:
        """Forget the state of tensors that are no longer in any group (a wrapper swapped them
        out): it holds their whole-size anchors, and torch's state_dict cannot name them."""
        live = {id(p) for g in self.param_groups for p in g["params"]}
        for key in [k for k in self.state if id(k) not in live]:
            del self.state[key]

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, after adopting swapped-in parameters with their full state.

        A checkpoint loader may ask for the state of a freshly prepared optimizer as a template
        (torch.distributed.checkpoint under FSDP2 does, before any step): every parameter must
        then have its entries, or the loaded state would silently be dropped."""
        self._drop_stale_state()
        self._adopt_new_params(with_moments=True)
        return super().state_dict()

    def _init_moments(self, p: Tensor) -> None:
        state = self.state[p]
        if "step" not in state:  # lazy, like torch; the step counter stays on the host
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        anchors: list[Tensor | None],
        references: list[Tensor | None],
        scales: list[float],
    ) -> None:
        """Append the group's parameters that have a gradient, and their state, to the lists."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("Invalid gradient: sparse gradients are not supported by BalancedAdamW")
            self._init_moments(p)
            state = self.state[p]
            if group["anchor_device"] is None:  # anchors follow their parameter, e.g. after model.to("cuda")
                for key in _ANCHOR_KEYS:
                    if key in state and state[key].device != p.device:
                        state[key] = state[key].to(p.device)
            anchor = state.get("anchor")
            if group["anchor"] == "init" and anchor is None:
                raise ValueError("anchor='init' but this parameter has no anchor in the state "
                                 "(was the state loaded from another optimizer?)")
            reference = anchor if group["anchor"] == "init" else state.get("reference")
            if group["direction_weight"] > 0 and p.ndim == 2 and reference is None:
                raise ValueError(f"direction_weight={group['direction_weight']} with anchor="
                                 f"{group['anchor']!r} needs a reference copied when the group is added; "
                                 "set direction_weight > 0 at construction")
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
            anchors.append(anchor if group["anchor"] == "init" else None)
            references.append(reference)
            scales.append(state.get("balance", 1.0))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adopt_new_params()
        for group in self.param_groups:
            lists: tuple[list, ...] = ([], [], [], [], [], [], [], [])
            self._init_group(group, *lists)
            beta1, beta2 = group["betas"]
            balanced_adamw(
                *lists,
                foreach=group["foreach"],
                fused=group["fused"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                anchor=group["anchor"],
                balance=group["balance"],
                direction_weight=group["direction_weight"],
                granularity=group["granularity"],
            )
        return loss
