"""LoRA on fused experts computed on the routed rows, without forming W + B·A.

peft 0.21 adapts a fused expert tensor W [E, d_out, d_in] through a
``ParamWrapper`` whose forward registers a parametrization returning
W + s·B·A for every expert (one ``baddbmm``), and runs the experts module on
that tensor. Its cost and memory follow E × d_out × d_in, not the tokens: the
folded tensor is built per forward, kept for backward, and its gradient (as
large again) is formed before reaching A and B.

Here the outermost wrapper of each experts module becomes a
:class:`RoutedExpertLora` (a ``ParamWrapper`` subclass: the instance keeps
its parameters, names, adapters and peft's whole API; only ``forward``
changes). Its forward sorts the (token, slot) pairs by expert and, for each
expert e that received rows x_e [n_e, d_in], computes

    y_e = x_e·W_eᵀ + s·(x_e·A_eᵀ)·B_eᵀ                      (per targeted tensor)

with A_e = lora_A[e·r:(e+1)·r] and B_e = lora_B.reshape(d_out, r, E)[:, :, e]
(the layout ``fedsim.models.lora`` documents), so a step's arithmetic and
saved activations follow the routed rows, and the base weights are read in
place. peft still owns the factors, their initialisation, ``save_pretrained``
and loading; the payload layout is untouched.

Whenever the routed computation would not be what peft computes (adapters
disabled or merged, several active adapters, a non-float base such as fp8,
an experts module laid out otherwise), the forward falls back to peft's own.
transformers internals used: the experts module's ``gate_up_proj`` /
``down_proj`` [E, out, in], ``act_fn`` (and ``_apply_gate`` when present), and
the flags ``use_experts_implementation`` sets (transformers 5.17–5.22).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora import ParamWrapper
from torch import nn
from torch.nn.utils import parametrize

_PROJECTIONS = ("gate_up_proj", "down_proj")
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True, slots=True)
class _Factors:
    """One adapted tensor's LoRA factors as per-expert views: A_e [r, d_in], B_e [d_out, r], and s = α / r."""

    a: tuple[torch.Tensor, ...]
    b: tuple[torch.Tensor, ...]
    scale: float


class RoutedExpertLora(ParamWrapper):
    """peft's ``ParamWrapper`` around a fused experts module, computing expert LoRA on the routed rows.

    Set as the class of the outermost wrapper by :func:`route_expert_lora`;
    the nested wrappers below it (one per adapted tensor) keep their class and
    are read, never called.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The experts' output for ``x`` and ``args`` = (top_k_index, top_k_weights), LoRA on the routed rows.

        Falls back to peft's own forward whenever the routed computation would not be what peft computes.
        """
        factors = _active_factors(self, args, kwargs)
        if factors is None:
            return super().forward(x, *args, **kwargs)
        top_k_index, top_k_weights = args
        return routed_experts_forward(self.get_base_layer(), factors, x, top_k_index, top_k_weights)


def route_expert_lora(experts_modules: list[nn.Module]) -> int:
    """Switch each fused experts module's outermost peft wrapper to :class:`RoutedExpertLora`.

    Parameters
    ----------
    experts_modules : list of nn.Module
        The module at each MoE layer's experts attribute (peft wrappers).

    Returns
    -------
    int
        How many were switched. One laid out otherwise than this module
        expects is left on peft's path, with a warning naming why.
    """
    switched = 0
    for module in experts_modules:
        reason = _unsupported(module)
        if reason is not None:
            name = type(module.get_base_layer() if isinstance(module, ParamWrapper) else module).__name__
            warnings.warn(f"fedsim: expert LoRA on {name} stays on peft's path (it materialises W + B·A per "
                          f"forward): {reason}", stacklevel=2)
            continue
        module.__class__ = RoutedExpertLora
        switched += 1
    return switched


def routed_experts_forward(
    experts: nn.Module, factors: dict[str, _Factors], hidden: torch.Tensor, top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts' output [T, H] for ``hidden`` [T, H] routed to ``top_k_index`` [T, k] with ``top_k_weights``.

    What transformers' experts implementations compute, with each adapted
    projection's LoRA added on the expert's own rows. Experts are visited in
    turn: each gathers its rows, computes, and adds its weighted output into
    the [T, H] result in place, so no pass holds a [T·k, H] tensor beyond what
    autograd saves (a no-grad pass, as evaluation and the routing statistics
    run, holds one expert's rows at a time), and a per-expert view of the
    weights and factors keeps every backward a single gather.
    """
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    # the fused expert weights [E, 2I, H] and [E, H, I] (nn.Module types its attributes as Tensor | Module)
    w_up, w_down = cast(torch.Tensor, experts.gate_up_proj), cast(torch.Tensor, experts.down_proj)
    num_experts = w_up.shape[0]
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host read per layer
    tokens = torch.split(order // k, counts)
    weights = torch.split(top_k_weights.reshape(-1)[order], counts)
    autocast = torch.is_autocast_enabled(hidden.device.type)
    up, down = factors.get("gate_up_proj"), factors.get("down_proj")
    out: torch.Tensor | None = None
    for e in range(num_experts):
        if counts[e] == 0:
            continue
        x_e = hidden[tokens[e]]
        if not autocast:  # peft's path runs the experts in the base's dtype
            x_e = x_e.to(w_up.dtype)
        h = _gate(experts, _adapted_linear(x_e, w_up[e], up, e, autocast))
        y_e = _adapted_linear(h, w_down[e], down, e, autocast) * weights[e][:, None]  # promotes as transformers' do
        if out is None:
            out = torch.zeros(hidden.shape[0], y_e.shape[-1], dtype=y_e.dtype, device=y_e.device)
        out.index_put_((tokens[e],), y_e, accumulate=True)  # saves only the indices for backward
    if out is None:
        return torch.zeros_like(hidden).reshape(shape)
    return out.to(hidden.dtype).reshape(shape)


def _adapted_linear(
    x: torch.Tensor, weight: torch.Tensor, lora: _Factors | None, e: int, autocast: bool,
) -> torch.Tensor:
    """x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ (only x·W_eᵀ without an adapter on this tensor)."""
    y = F.linear(x, weight)
    if lora is None:
        return y
    a, b = lora.a[e], lora.b[e]
    if not autocast:
        a, b = a.to(weight.dtype), b.to(weight.dtype)
    return y + lora.scale * F.linear(F.linear(x, a), b)


def _gate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The experts' gating of a gate/up projection [n, 2I] → [n, I]: act(gate) · up."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is not None:
        return cast(torch.Tensor, apply_gate(h))
    gate, up = h.chunk(2, dim=-1)
    act_fn = cast(Callable[[torch.Tensor], torch.Tensor], experts.act_fn)
    return act_fn(gate) * up


def _wrappers(module: nn.Module) -> list[ParamWrapper]:
    """The nested peft wrappers from ``module`` down to the experts module, outermost first."""
    chain = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain


def _unsupported(module: nn.Module) -> str | None:
    """Why ``module`` cannot take the routed path (None when it can)."""
    chain = _wrappers(module)
    if not chain:
        return "no peft ParamWrapper around the experts"
    experts = chain[-1].base_layer
    names = [w.parameter_name for w in chain]
    if len(set(names)) != len(names) or not set(names) <= set(_PROJECTIONS):
        return f"adapted tensors {names}, expected a subset of {list(_PROJECTIONS)}"
    shapes = [tuple(getattr(getattr(experts, n, None), "shape", ())) for n in _PROJECTIONS]
    if any(len(s) != 3 for s in shapes) or shapes[0][0] != shapes[1][0] or shapes[0][2] != shapes[1][1]:
        return f"expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], found {shapes}"
    if shapes[0][1] != 2 * shapes[1][2]:
        return f"gate_up_proj {shapes[0]} is not gate and up fused ([E, 2I, H] with down_proj [E, H, I])"
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
              "has_post_expert_norm": False, "_is_expert_parallel": False}
    odd = [f"{flag}={getattr(experts, flag)}" for flag, want in layout.items() if getattr(experts, flag, want) != want]
    if odd:
        return f"experts module has {', '.join(odd)}"
    if not hasattr(experts, "act_fn"):
        return "experts module has no act_fn"
    if any(not getattr(w, "_did_swap_in_out_features", False) or w.num_experts != shapes[0][0] for w in chain):
        return "a wrapper does not read its tensor as [E, out, in]"
    return None


def _active_factors(outer: ParamWrapper, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, _Factors] | None:
    """The factors to add, by adapted tensor; None when peft's own forward must run instead."""
    if len(args) != 2 or kwargs:
        return None
    chain = _wrappers(outer)
    experts = chain[-1].base_layer
    if parametrize.is_parametrized(experts) or experts.gate_up_proj.dtype not in _COMPUTE_DTYPES:
        return None
    factors = {}
    for wrapper in chain:
        if wrapper.merged or wrapper.disable_adapters:
            return None
        adapters = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if len(adapters) > 1:
            return None
        if adapters:
            factors[wrapper.parameter_name] = _expert_views(wrapper, adapters[0])
    return factors


def _expert_views(wrapper: ParamWrapper, adapter: str) -> _Factors:
    """Expert e's A_e = A[e·r:(e+1)·r] and B_e = B.reshape(d_out, r, E)[:, :, e], as views of peft's factors."""
    a = cast(torch.Tensor, wrapper.lora_A[adapter].weight)  # [r·E, d_in], expert-major
    b = cast(torch.Tensor, wrapper.lora_B[adapter].weight)  # [d_out, r·E], expert-minor
    num_experts = cast(int, wrapper.num_experts)
    return _Factors(
        a=a.view(num_experts, -1, a.shape[-1]).unbind(0),
        b=b.view(b.shape[0], -1, num_experts).unbind(2),
        scale=float(wrapper.scaling[adapter]),
    )
