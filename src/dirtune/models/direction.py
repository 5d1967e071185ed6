"""DirectionPenalty: finds the weights a LLaMA model's direction penalty covers, and computes it.

`DirectionPenalty(model, weight)()` is `λ_dir·R` (method.md §1) over the target projections,
ready to be added to the loss (the *coupled* way; the decoupled turn belongs to the optimizer).

- PEFT LoRA layers (found by duck typing: `base_layer`, `lora_A`/`lora_B` ModuleDicts and a
  `scaling` dict) use the factored form against their own frozen base weight: nothing is
  copied, `reference_bytes == 0`.
- Trainable 2-D weights (full fine-tuning) get a detached copy of their value at construction,
  in `reference_dtype` on `reference_device`, kept as non-persistent buffers: they never enter a
  `state_dict` (they are not model weights). A bf16 copy of fp32 weights is rounded, so the
  penalty starts at about 1e-6 instead of 0 (an angle of ~0.06°); use `reference_dtype=None`
  for an exact reference.
- Covered modules that are frozen and not LoRA are skipped.
- Weights are read from their modules at each call, so a model sharded after construction
  (FSDP2 replaces each weight by a DTensor shard) is penalised through its shards; each full
  reference is then cut to this rank's rows once, and the rest freed.

Imports only torch, the method and models' torch-only tables: it knows transformers' and PEFT's layouts by attribute names.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from dirtune.method import sharded
from dirtune.method.lora_penalty import base_row_norms, lora_angle_and_drift
from dirtune.method.penalty import angles_and_drifts, direction_penalty, lora_direction_penalty
from dirtune.models.checks import DTYPES, LONG_NAMES
from dirtune.models.llama import PROJECTIONS

DEFAULT_TARGETS = PROJECTIONS


def _is_lora_layer(module: torch.nn.Module) -> bool:
    """PEFT's LoraLayer layout, without importing peft."""
    return (hasattr(module, "base_layer")
            and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict))


def _active_adapters(module: torch.nn.Module) -> list[str]:
    """Names of the adapters active on this layer (PEFT: `active_adapters`, older `active_adapter`)."""
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", [])
    if isinstance(names, str):
        names = [names]
    return [n for n in names if n in module.lora_A and n in module.lora_B]


def _base_weight(module: torch.nn.Module) -> torch.Tensor:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module.base_layer
    return base.weight


def _check_lora_layer(name: str, module: torch.nn.Module, adapters: list[str]) -> None:
    """Refuse layouts whose weight is not `W0 + Σ s·B·A` with `W0 = base_layer.weight`."""
    for a in adapters:
        variant = getattr(module, "lora_variant", {}).get(a)
        if getattr(module, "use_dora", {}).get(a) or variant is not None:
            kind = "DoRA" if getattr(module, "use_dora", {}).get(a) else type(variant).__name__
            raise ValueError(
                f"DirectionPenalty: {name} uses {kind} (adapter {a!r}); the direction penalty "
                "supports plain LoRA only (DoRA rescales rows, so W is not W0 + s·B·A). "
                "Use DoRA without the penalty, or LoRA with it")
    if getattr(module, "merged", False):
        raise ValueError(f"DirectionPenalty: {name} has merged adapters, so base_layer.weight is "
                         "no longer the pretrained reference; unmerge before building the penalty")
    if getattr(module, "fan_in_fan_out", False):
        raise ValueError(f"DirectionPenalty: {name} stores its weight transposed "
                         "(fan_in_fan_out=True); only nn.Linear-style layers are supported")
    w0 = _base_weight(module)
    if w0.dim() != 2 or not w0.is_floating_point():
        raise ValueError(f"DirectionPenalty: {name}: base weight {tuple(w0.shape)} {w0.dtype} is "
                         "not a 2-D floating-point matrix (quantized bases are not supported)")
    for a in adapters:
        A, B = module.lora_A[a].weight, module.lora_B[a].weight
        if A.dim() != 2 or B.dim() != 2 or (B.shape[0], A.shape[1]) != tuple(w0.shape):
            raise ValueError(f"DirectionPenalty: {name}: adapter {a!r} has lora_A "
                             f"{tuple(A.shape)} and lora_B {tuple(B.shape)}, which do not fit "
                             f"the base weight {tuple(w0.shape)}")


def _weight_leaf_names(model: torch.nn.Module) -> list[str]:
    """Last name components of the modules that hold a 2-D weight (what `targets` can name),
    leaving out PEFT's own inner modules."""
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        w = getattr(module, "weight", None)
        if (isinstance(w, torch.Tensor) and w.dim() == 2 and parts[-1] != "base_layer"
                and not any(p.startswith("lora_") for p in parts)):
            names.add(parts[-1])
    return sorted(names)


def _resolve_dtype(value):
    if value is None or value == "same" or isinstance(value, torch.dtype):
        return None if value == "same" else value
    if value in DTYPES or value in LONG_NAMES:
        return DTYPES[LONG_NAMES.get(value, value)]
    raise ValueError(f"DirectionPenalty: reference_dtype={value!r} is not supported; accepted: "
                     f"a torch.dtype, None/'same', or one of {sorted([*DTYPES, *LONG_NAMES])}")


class DirectionPenalty(torch.nn.Module):
    """`λ_dir·R` of method.md §1 over the target projections of a (PEFT-wrapped) model.

    model:       any torch module; modules whose last name component is in `targets` are covered.
    weight:      `λ_dir` ≥ 0 (may be changed later: `penalty.weight = ...`).
    granularity: "row" (one direction per output row) or "tensor".
    reference_dtype:  dtype of the copied references (full fine-tuning): a torch.dtype, None
                 (= the weight's dtype), or "bf16"/"fp16"/"fp32"/"same".
    reference_device: None/"same" (the weight's device) or e.g. "cpu". CPU references are moved
                 to the weight's device at every call, in forward and again in backward
                 (transiently, 2 bytes per element for bf16; pinned when CUDA is present).
    fused:       None (default): the Triton kernels of dirtune.method.penalty_fused on CUDA (each
                 weight and reference, or each frozen LoRA base, read once per pass); False: the
                 plain-torch reference; True: the kernels or an error. On the fused path in one
                 process the full weights' gradient is added to `.grad` at the end of
                 `loss.backward()` (a `register_hook` on such a weight does not see that part).

    Attributes: `weight`, `granularity`, `names` (covered module names), `mode` ("lora",
    "full", or "mixed" when a LoRA model also has trainable target weights), `reference_bytes`.
    """

    def __init__(self, model: torch.nn.Module, weight: float, granularity: str = "row",
                 targets=DEFAULT_TARGETS, reference_dtype=torch.bfloat16, reference_device=None,
                 fused=None):
        """Long on purpose: DirectionPenalty's discovery of covered weights, checks and references in one pass over the modules."""
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                0 <= float(weight) < float("inf")):
            raise ValueError(f"DirectionPenalty: weight={weight!r} must be a finite number >= 0")
        if granularity not in ("row", "tensor"):
            raise ValueError(f"DirectionPenalty: granularity={granularity!r} is not supported; "
                             "accepted: 'row', 'tensor'")
        if isinstance(targets, str) or not targets:
            raise ValueError(f"DirectionPenalty: targets={targets!r} must be a non-empty list of "
                             "module names, e.g. ['q_proj', 'v_proj']")
        if not hasattr(model, "named_modules"):
            raise ValueError(f"DirectionPenalty: model must be a torch.nn.Module, got "
                             f"{type(model).__name__}")
        ref_dtype = _resolve_dtype(reference_dtype)
        ref_device = None if reference_device in (None, "same") else torch.device(reference_device)

        if fused not in (None, True, False):
            raise ValueError(f"DirectionPenalty: fused={fused!r}; accepted: None, True, False")
        self.weight = float(weight)
        self.fused = fused
        self.granularity = granularity
        self.targets = tuple(targets)
        self.names: list[str] = []
        self.reference_bytes = 0
        self._ref_device = ref_device      # None: beside each weight, wherever it moves
        # Plain lists: the model's modules and parameters must not become this module's children.
        self._lora: list[tuple[str, torch.nn.Module, list[str]]] = []
        self._full: list[tuple[str, torch.nn.Module]] = []   # (name, module owning the weight)
        # ||W0 rows||² of each frozen LoRA base, with the storage and version it was read from
        self._norms: dict[int, tuple[int, int, torch.Tensor]] = {}

        found, frozen, seen = set(), [], set()
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in self.targets:
                continue
            found.add(leaf)
            if _is_lora_layer(module) and _active_adapters(module):
                adapters = _active_adapters(module)
                _check_lora_layer(name, module, adapters)
                self._lora.append((name, module, adapters))
                self.names.append(name)
                continue
            w = getattr(module, "weight", None)
            if (isinstance(w, torch.Tensor) and w.dim() == 2 and w.requires_grad
                    and w.is_floating_point() and id(w) not in seen):
                seen.add(id(w))
                self._add_full(name, module, w, ref_dtype, ref_device)
                self.names.append(name)
            else:
                frozen.append(name)

        unknown = [t for t in self.targets if t not in found]
        if unknown or not self.names:
            leaves = _weight_leaf_names(model)
            if unknown:
                why = f"no module is named {unknown}"
            else:
                why = (f"the {len(frozen)} modules named {sorted(found)} are frozen and not LoRA "
                       f"(e.g. {frozen[:3]})")
            raise ValueError(f"DirectionPenalty: targets {list(self.targets)}: {why}; "
                             f"modules with a 2-D weight here are named {leaves[:16]}")
        self.mode = "mixed" if self._lora and self._full else ("lora" if self._lora else "full")

    def _add_full(self, name, module, w, ref_dtype, ref_device):
        ref = w.detach().to(device=ref_device or w.device, dtype=ref_dtype or w.dtype, copy=True)
        if ref.device.type == "cpu" and w.device.type == "cuda":
            ref = ref.pin_memory()     # lets the per-call host→device copy run asynchronously
        self.register_buffer(f"_ref{len(self._full)}", ref, persistent=False)
        self._full.append((name, module))
        self.reference_bytes += ref.numel() * ref.element_size()

    def _lora_factors(self):
        """Per LoRA layer: (W0, A, B, s); several active adapters are stacked into one
        `[s1·B1, s2·B2]·[A1; A2]` with s = 1."""
        bases, As, Bs, scales = [], [], [], []
        for _, module, adapters in self._lora:
            if len(adapters) == 1:
                a = adapters[0]
                A, B, s = module.lora_A[a].weight, module.lora_B[a].weight, module.scaling[a]
            else:
                A = torch.cat([module.lora_A[a].weight for a in adapters], 0)       # (Σr, k)
                B = torch.cat([module.scaling[a] * module.lora_B[a].weight
                               for a in adapters], 1)                              # (d, Σr)
                s = 1.0
            bases.append(_base_weight(module))
            As.append(A)
            Bs.append(B)
            scales.append(float(s))
        return bases, As, Bs, scales

    def _base_norms(self, bases: list[torch.Tensor]) -> list[torch.Tensor]:
        """`||W0 rows||²` per LoRA base, read once: the bases are frozen, and recomputing these
        every step would read every base weight once more. Recomputed if a base changes."""
        out = []
        for i, w in enumerate(bases):
            key = (w.data_ptr(), w._version)
            hit = self._norms.get(i)
            if hit is None or hit[:2] != key or hit[2].device != w.device:
                hit = (*key, base_row_norms(w))
                self._norms[i] = hit
            out.append(hit[2])
        return out

    def _weights(self) -> list[torch.Tensor]:
        """The covered weights as their modules hold them now (a wrapper may have replaced them)."""
        return [module.weight for _, module in self._full]

    def _refs(self, weights: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        weights = self._weights() if weights is None else weights
        refs = []
        for i, w in enumerate(weights):
            ref = self._buffers[f"_ref{i}"]
            if sharded.is_dtensor(w) and not sharded.is_dtensor(ref):
                # the model was sharded after this penalty was built: keep this rank's rows only,
                # beside the shard unless a reference_device was asked for (FSDP2 builds the
                # model on the CPU and shards it onto the GPUs)
                local = sharded.local_rows(ref, w).to(
                    device=self._ref_device or sharded.local(w).device, copy=True)
                if local.device.type == "cpu" and sharded.local(w).device.type == "cuda":
                    local = local.pin_memory()   # as _add_full: asynchronous uploads
                self.reference_bytes -= (ref.numel() - local.numel()) * ref.element_size()
                ref = self._buffers[f"_ref{i}"] = sharded.wrap_like(local, w)
            refs.append(ref)
        return refs

    def forward(self) -> torch.Tensor:
        """`λ_dir · R`, R the mean of `1 − cos` over all covered tensors (0-d fp32 tensor)."""
        parts = []
        device = (_base_weight(self._lora[0][1]) if self._lora else self._full[0][1].weight).device
        # fp32 math by design: under a caller's autocast the projections would run in bf16
        with torch.autocast(device.type, enabled=False):
            if self._lora:
                factors = self._lora_factors()
                parts.append((lora_direction_penalty(*factors, self.granularity,
                                                     base_sq_norms=self._base_norms(factors[0]),
                                                     fused=self.fused),
                              len(self._lora)))
            if self._full:
                weights = self._weights()
                parts.append((direction_penalty(weights, self._refs(weights), self.granularity,
                                                fused=self.fused, into_grad=True),
                              len(self._full)))
        if len(parts) == 1:
            R = parts[0][0]
        else:      # mean over all tensors = count-weighted mean of the two means
            R = sum(v * n for v, n in parts) / sum(n for _, n in parts)
        return self.weight * R

    @torch.no_grad()
    def angles(self) -> dict[str, dict[str, float]]:
        """Per module type (`q_proj`, ...): mean tensor angle ∠(W, W0) in degrees and mean
        relative drift `||W − W0|| / ||W0||` over the covered tensors of that type.

        LoRA layers in factored form (`lora_angle_and_drift`: no B·A is formed, one read of each
        base), full weights with one read of each weight and reference; one host sync in all."""
        kinds, angles, drifts = [], [], []
        device = (_base_weight(self._lora[0][1]) if self._lora else self._full[0][1].weight).device
        with torch.autocast(device.type, enabled=False):
            if self._lora:
                factors = self._lora_factors()
                a, d = lora_angle_and_drift(*factors, base_sq_norms=self._base_norms(factors[0]),
                                            fused=self.fused)
                kinds += [name.rsplit(".", 1)[-1] for name, _, _ in self._lora]
                angles.append(a.float())
                drifts.append(d.float())
            if self._full:
                weights = self._weights()
                a, d = angles_and_drifts(weights, self._refs(weights), fused=self.fused)
                kinds += [name.rsplit(".", 1)[-1] for name, _ in self._full]
                angles.append(a.float().to(device))
                drifts.append(d.float().to(device))
        values = torch.stack([torch.cat(angles), torch.cat(drifts)]).cpu()   # the one sync
        per_type: dict[str, list[int]] = defaultdict(list)
        for i, kind in enumerate(kinds):
            per_type[kind].append(i)
        return {kind: {"angle_deg": values[0, idx].mean().item(), "drift": values[1, idx].mean().item()}
                for kind, idx in per_type.items()}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, granularity={self.granularity!r}, mode={self.mode!r}, "
                f"tensors={len(self.names)}, reference_bytes={self.reference_bytes}")
