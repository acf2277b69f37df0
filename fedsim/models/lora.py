"""LoRA on attention and fused experts, with the routers trained in full.

What peft 0.21 does with a fused expert tensor (``target_parameters``): a
``ParamWrapper`` wraps the experts module (one wrapper per targeted tensor,
nested: ``experts`` → ``experts.base_layer`` → the experts module) and keeps
all experts' factors in two ``nn.Linear`` weights, stacked along the rank
axis. For a parameter [E, d_out, d_in] (transformers stores expert weights
as out × in, e.g. ``gate_up_proj`` [E, 2I, H]):

- ``lora_A`` weight [r·E, d_in]: expert-major, expert e owns rows e·r … (e+1)·r − 1;
- ``lora_B`` weight [d_out, r·E]: expert-minor, expert e owns columns e, e + E, …,
  e + (r−1)·E (peft reads it as ``B.reshape(d_out, r, E)[:, :, e]``);
- ΔW_e = (α / r) · B_e A_e, with A_e [r, d_in], B_e [d_out, r].

The payload layout (``fedsim.models.layout``) splits both along these axes.
peft's own forward folds W + ΔW for every expert on each pass; fedsim
computes the same LoRA on each expert's routed rows instead
(``fedsim.models.expert_lora``), keeping peft's factors and format.

A family that keeps each expert as its own module (SwitchTransformers:
``experts.expert_e.wi``/``wo``, one ``nn.Linear`` each) gets peft's plain LoRA
``Linear`` on each expert's projections instead: expert e's factors are then
whole tensors of their own.
"""

from __future__ import annotations

from functools import reduce

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers import PreTrainedModel

from aggregation.errors import ConfigError
from fedsim.models.expert_lora import route_expert_lora
from fedsim.models.registry import FamilySpec, family_of


def apply_lora(
    model: PreTrainedModel,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    lora_attention: bool = True,
    lora_experts: bool = True,
    seed: int = 0,
    routed_experts: bool = True,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters and make its routers trainable.

    Trainable afterwards: the attention LoRA factors (if ``lora_attention``),
    the stacked expert LoRA factors (if ``lora_experts``) and every router's
    parameters in full; every other weight is frozen.

    The routers are made trainable by setting ``requires_grad`` on their own
    parameters, not through peft's ``modules_to_save``: that would swap each
    router for a wrapper holding a trainable copy, renaming the parameter
    and keeping a second, stale copy. The price is that peft's
    ``save_pretrained`` does not store router weights; fedsim saves trainable
    state through the payload buffer instead.

    Parameters
    ----------
    rank, alpha : int, float
        LoRA rank r and scale α (the update is scaled by α / r).
    dropout : float
        Dropout on the attention adapters' input. The experts' adapters get
        none: peft's fused-expert adapter cannot drop out its input (it folds
        B·A into the weight), and the routed computation keeps its numbers.
    seed : int
        Seeds the factors' initialisation (a forked RNG; the caller's RNG
        state is untouched). B starts at zero, so the wrapped model computes
        what ``model`` did.
    routed_experts : bool
        Compute the fused experts' LoRA on each expert's routed rows
        (``fedsim.models.expert_lora``: same loss, gradients and factors,
        without forming W + B·A for every expert on each forward). False keeps
        peft's own forward: the reference the tests compare against, and
        ``lora.routed_experts: false`` for a run.
    """
    spec = family_of(model)
    if not (lora_attention or lora_experts):
        raise ConfigError("model.lora: lora_attention and lora_experts are both off, nothing to adapt")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.lora.dropout: {dropout} is outside [0, 1)")
    config = LoraConfig(
        r=rank,
        # peft annotates lora_alpha as int but takes any number (scaling = lora_alpha / r)
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,  # set per attention adapter below; ParamWrapper rejects any other value
        target_modules=_target_modules(spec, lora_attention=lora_attention, lora_experts=lora_experts),
        target_parameters=list(spec.target_parameters) if lora_experts and spec.fused_experts else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        if lora_attention:
            _adapt_shared_experts(peft_model, config)
    if routed_experts and lora_experts and spec.fused_experts:
        route_expert_lora(spec.experts_modules(peft_model))
    if dropout > 0.0:
        in_experts = {id(m) for experts in spec.experts_modules(peft_model) for m in experts.modules()}
        for module in peft_model.modules():
            if isinstance(module, LoraLinear) and id(module) not in in_experts:  # experts get none in every family
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = nn.Dropout(p=dropout)
    for router in spec.routers(peft_model):
        for param in router.parameters():
            param.requires_grad_(True)
    return peft_model


def _target_modules(spec: FamilySpec, *, lora_attention: bool, lora_experts: bool) -> list[str] | str | None:
    """The ``target_modules`` option of peft's LoraConfig for ``spec``.

    The attention projections by name, plus, for a family with one module per expert, a full-match regex over
    each expert's projections (the dense layers' FFNs share their names).
    """
    if not spec.expert_linears:
        return list(spec.attention_projections) if lora_attention else None
    patterns = []
    if lora_attention:
        patterns.append(rf".*\.({'|'.join(spec.attention_projections)})")
    if lora_experts:
        block = spec.moe_block.split(".")[-1]
        patterns.append(rf".*\.{block}\.{spec.experts}\.[^.]+\.({'|'.join(spec.expert_linears)})")
    return "|".join(f"(?:{p})" for p in patterns)


def _adapt_shared_experts(peft_model: PeftModel, config: LoraConfig) -> None:
    """LoRA on every shared-expert projection, with peft's own LoRA ``Linear`` under the same adapter.

    Not through ``target_modules``: for model types whose experts
    transformers 5 fused (DeepSeek-V3 among them) peft rewrites every target
    named ``*.gate_proj``/``up_proj``/``down_proj`` into the fused experts'
    parameters (and doubles their rank), so a shared expert's projections
    would silently stay frozen.
    """
    spec = family_of(peft_model)
    adapter = peft_model.active_adapter
    for block in spec.moe_blocks(peft_model):
        for path in spec.shared_projections:
            *parents, name = path.split(".")
            parent = reduce(getattr, parents, block)
            target = getattr(parent, name)
            if isinstance(target, nn.Linear) and not isinstance(target, LoraLinear):
                adapted = LoraLinear(target, adapter, config=config, r=config.r, lora_alpha=config.lora_alpha)
                setattr(parent, name, adapted)
