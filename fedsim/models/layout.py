"""The payload layout of a model, and the in-place copies between the two.

``build_layout`` names every trainable parameter's role once; workers then
move the global payload in and out of the resident model with
``write_payload`` / ``read_payload``, copying into the existing parameters:
no parameter is created and the model is never rebuilt.

Expert entries index an *expert view* of their parameter: the parameter
reshaped to the entry's shape with an expert axis inserted at ``axis``;
``start:stop`` (always ``e:e+1``) selects expert e on that axis. This covers
every way experts are stacked:

- peft's ``lora_A`` [r·E, d_in], expert-major: view [E, r, d_in], ``axis`` 0,
  entry shape (r, d_in);
- peft's ``lora_B`` [d_out, r·E], expert-minor (columns e, e+E, …): view
  [d_out, r, E], ``axis`` 2, entry shape (d_out, r). This slice is strided,
  which a plain ``start:stop`` on the stored tensor cannot express;
- a fused expert tensor trained in full, [E, d_out, d_in]: the view is the
  tensor itself, ``axis`` 0, entry shape (d_out, d_in).

So each expert's entry holds exactly its own LoRA factors A_e, B_e (see
``fedsim.models.lora``), whatever the stacking. A family that keeps each
expert as its own module (SwitchTransformers) needs no view: every trainable
tensor inside expert e's module is an entry of expert e as it stands.
"""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import torch
from peft.tuners.lora import ParamWrapper
from torch import nn

from aggregation.errors import LayoutMismatch
from aggregation.payload import EntrySpec, LayoutEntry, PayloadLayout
from fedsim.models.registry import family_of

# id(parameter) → (MoE layer, expert axis of its expert view, shape of one expert's slice)
_ExpertTensors = dict[int, tuple[int, int, tuple[int, ...]]]


def build_layout(model: nn.Module) -> PayloadLayout:
    """Layout over every trainable parameter of ``model`` (usually a peft model).

    Roles: a router's parameters in MoE layer ℓ → ``router`` (ℓ); each
    expert's slice of an expert-stacked tensor → ``expert`` (ℓ, e);
    everything else (attention LoRA, …) → ``shared``. ℓ counts MoE layers
    from 0.
    """
    spec = family_of(model)
    routers = {id(p): layer for layer, router in enumerate(spec.routers(model)) for p in router.parameters()}
    experts = _expert_tensors(model)
    owned = _expert_module_tensors(model)
    specs: list[EntrySpec] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in owned:
            layer, expert = owned[id(param)]
            specs.append(EntrySpec(name, "expert", layer, expert, tuple(param.shape)))
        elif id(param) in experts:
            layer, axis, piece = experts[id(param)]
            num_experts = param.numel() // int(np.prod(piece))
            specs.extend(EntrySpec(name, "expert", layer, e, piece, axis, e, e + 1) for e in range(num_experts))
        elif id(param) in routers:
            specs.append(EntrySpec(name, "router", routers[id(param)], None, tuple(param.shape)))
        else:
            specs.append(EntrySpec(name, "shared", None, None, tuple(param.shape)))
    return PayloadLayout.build(specs)


def read_payload(model: nn.Module, layout: PayloadLayout) -> np.ndarray:
    """The model's current values of ``layout``'s entries, as one float32 buffer.

    On an accelerator the entries are gathered on the device first, so the
    buffer crosses to the host in a single copy.
    """
    params = _parameters(model, layout)
    out = layout.zeros()
    host = torch.from_numpy(out)
    device = _device(params)
    staging = host if device.type == "cpu" else torch.empty(layout.total, dtype=torch.float32, device=device)
    with torch.no_grad():
        for entry in layout:
            values = _entry_view(params[entry.param], entry)
            staging[entry.offset : entry.offset + entry.size].view(values.shape).copy_(values)
        if staging is not host:
            host.copy_(staging)
    return out


def write_payload(model: nn.Module, layout: PayloadLayout, buffer: np.ndarray) -> None:
    """Copy ``buffer`` into the model's parameters in place.

    ``buffer`` may be read-only (a zero-copy view of the object store): it
    is only read. It crosses to the model's device in one copy.
    """
    layout.check(buffer, what="payload")
    params = _parameters(model, layout)
    with warnings.catch_warnings():
        # torch warns that writing through a view of a read-only array is undefined; nothing writes to it here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        source = torch.from_numpy(buffer)
    source = source.to(_device(params))
    with torch.no_grad():
        for entry in layout:
            target = _entry_view(params[entry.param], entry)
            target.copy_(source[entry.offset : entry.offset + entry.size].view(target.shape))


def _expert_tensors(model: nn.Module) -> _ExpertTensors:
    """Every tensor stacked over experts in the MoE layers: peft's factors and the fused weights."""
    spec = family_of(model)
    out: _ExpertTensors = {}
    if not spec.fused_experts:
        return out
    for layer, module in enumerate(spec.experts_modules(model)):
        while isinstance(module, ParamWrapper):  # one wrapper per targeted tensor, nested
            for adapter in module.lora_A:
                a = cast(torch.Tensor, module.lora_A[adapter].weight)  # [r·E, d_in]
                b = cast(torch.Tensor, module.lora_B[adapter].weight)  # [d_out, r·E]
                r = a.shape[0] // cast(int, module.num_experts)
                out[id(a)] = (layer, 0, (r, a.shape[1]))
                out[id(b)] = (layer, 2, (b.shape[0], r))
            module = module.base_layer
        for name in spec.expert_parameters:
            fused = getattr(module, name)  # [E, d_out, d_in]
            out[id(fused)] = (layer, 0, tuple(fused.shape[1:]))
    return out


def _expert_module_tensors(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(parameter) → (MoE layer, expert) for every tensor inside a per-expert module (none for fused families)."""
    spec = family_of(model)
    if spec.fused_experts:
        return {}
    return {
        id(p): (layer, expert)
        for layer, module in enumerate(spec.experts_modules(model))
        for expert, child in enumerate(module.children())
        for p in child.parameters()
    }


def _parameters(model: nn.Module, layout: PayloadLayout) -> dict[str, nn.Parameter]:
    """The model's parameters named by ``layout``, in layout order; LayoutMismatch if one is missing."""
    params = dict(model.named_parameters())
    missing = sorted({e.param for e in layout} - params.keys())
    if missing:
        raise LayoutMismatch(f"model has no parameter {missing[0]!r} ({len(missing)} layout tensors missing)")
    return {e.param: params[e.param] for e in layout}


def _entry_view(param: nn.Parameter, entry: LayoutEntry) -> torch.Tensor:
    """The part of ``param`` that ``entry`` stores, as a view (a strided one for lora_B slices)."""
    try:
        if entry.axis is None:
            return param.view(entry.shape)
        expert_view = param.view(*entry.shape[: entry.axis], -1, *entry.shape[entry.axis :])
        # arg-type: start and stop are int | None in LayoutEntry, and set whenever axis is
        return expert_view.narrow(entry.axis, int(entry.start), int(entry.stop) - int(entry.start))  # type: ignore[arg-type]
    except (RuntimeError, IndexError) as exc:
        raise LayoutMismatch(
            f"{entry.key}: parameter of shape {tuple(param.shape)} does not hold an entry of shape {entry.shape}"
        ) from exc


def _device(params: dict[str, nn.Parameter]) -> torch.device:
    """Device of the layout's first tensor: where the buffer is staged (cross-device copies handle the rest)."""
    first = next(iter(params.values()), None)
    return torch.device("cpu") if first is None else first.device
