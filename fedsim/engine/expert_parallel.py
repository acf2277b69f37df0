"""Expert parallelism for an HF MoE model: its experts sharded over a torch.distributed group by DeepSpeed.

The route, and why (README, "Architecture"): DeepSpeed's AutoEP refuses peft
LoRA on experts, and DeepSpeed's own ``TopKGate`` routes differently from the
HF families (Mixtral renormalises its top-k weights, Qwen3-MoE and OLMoE may
not; DeepSpeed samples Mixtral's second expert unless told otherwise). So only
the experts are replaced: each MoE block keeps its HF router, and its
``experts`` module becomes :class:`ExpertParallelExperts`, a
``deepspeed.moe.layer.MoE`` whose gate replays the HF router's decisions
(:class:`ReplayedGate`) and whose local experts are SwiGLU FFNs with peft LoRA
on their two projections. DeepSpeed's ``MOELayer`` then does the dispatch and
the two all-to-all exchanges; a rank holds only its E / G experts.

The HF experts' fused weights [E, 2I, H] / [E, H, I] are one ``nn.Linear`` per
expert here, and the fused-tensor LoRA factors of expert e (A_e [r, d_in],
B_e [d_out, r], see ``fedsim.models.lora``) are exactly the factors of that
expert's LoRA ``Linear``: :func:`shard_experts` maps every payload entry of the
HF + peft model to the tensor that holds it here, so the payload layout is
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from deepspeed.moe.layer import MoE
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import ParamWrapper
from torch import nn
from transformers.activations import ACT2FN

from aggregation.errors import ConfigError
from aggregation.payload import LayoutEntry, PayloadLayout
from fedsim.models.registry import family_of

_PROJECTIONS = {"gate_up_proj": "gate_up", "down_proj": "down"}


class SwiGLUExpert(nn.Module):
    """One expert FFN as the HF families compute it: down(act(gate) · up), gate and up from one fused Linear."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The expert's output for the rows ``x`` [..., H], in the same shape."""
        # DeepSpeed hands each expert a strided [ep, 1, capacity, H] slice; on it the Linears would
        # fall back to batched matmuls over a broadcast weight (1.5x slower here), on 2-D rows to one mm.
        rows = x.reshape(-1, x.shape[-1])
        gate, up = self.gate_up(rows).chunk(2, dim=-1)
        out: torch.Tensor = self.down(self.act_fn(gate) * up).view(*x.shape[:-1], -1)
        return out


class ReplayedGate(nn.Module):
    """A DeepSpeed gate that replays the routing the HF router already chose for this forward pass.

    Capacity is the largest number of tokens any expert receives on any rank
    of the group, so no token is ever dropped: the same computation as the HF
    experts, only distributed.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ep_group: Any = None
        self.last_capacity = 0  # rows each expert computed in the latest pass (padding included)
        self._routes: tuple[torch.Tensor, torch.Tensor] | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        self.ep_group = ep_group

    def replay(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Routing of the next forward pass: expert ids [tokens, k] and their weights [tokens, k]."""
        self._routes = (top_k_index, top_k_weights)

    def forward(self, tokens: torch.Tensor, used_token: Any = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> tuple[Any, ...]:
        """The replayed routing in DeepSpeed's gate output, with no auxiliary loss and no token dropped.

        Returns
        -------
        tuple
            A zero auxiliary loss, the capacity, the number of experts, expert ids [k, tokens] and slots
            [k, tokens] (int32), weights [k, tokens] (float32) and each expert's token count [E].
        """
        if self._routes is None:
            raise RuntimeError("ReplayedGate: no routing given for this forward pass")
        index, weights = self._routes
        self._routes = None
        chosen = torch.zeros(index.shape[0], self.num_experts, dtype=torch.long, device=index.device)
        chosen.scatter_(1, index.long(), 1)
        counts = chosen.sum(dim=0)
        capacity = counts.max().reshape(1)
        if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
            torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        slot = torch.cumsum(chosen, dim=0) - 1  # each token's place in its experts' queues
        locations = slot.gather(1, index.long())
        self.last_capacity = int(capacity.item())
        no_aux_loss = tokens.new_zeros((), dtype=torch.float32)
        return (no_aux_loss, self.last_capacity, self.num_experts, index.t().to(torch.int32).contiguous(),
                locations.t().to(torch.int32).contiguous(), weights.t().float().contiguous(), counts)


class ExpertParallelExperts(nn.Module):
    """Drop-in for an HF experts module: ``forward(hidden [T, H], top_k_index, top_k_weights)``."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    @property
    def local_experts(self) -> nn.ModuleList:
        """The E / G experts this rank holds (DeepSpeed's ``deepspeed_experts``), in global expert order."""
        return cast(nn.ModuleList, self.moe.deepspeed_moe.experts.deepspeed_experts)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The experts' output [T, H] for ``hidden_states`` [T, H] routed as the HF router chose."""
        self.moe.deepspeed_moe.gate.replay(top_k_index, top_k_weights)
        out, _, _ = self.moe(hidden_states)
        return cast(torch.Tensor, out)


@dataclass(frozen=True)
class ExpertShard:
    """Where this rank keeps each payload entry it holds.

    ``tensors`` maps an entry's key to the tensor holding it (a LoRA factor of
    a local expert, or a shared or router tensor as the HF + peft model
    names it). Entries of other ranks' experts are absent.
    """

    tensors: dict[str, torch.Tensor]
    rank: int
    ep_size: int

    def owns(self, entry: LayoutEntry) -> bool:
        """Whether this rank holds ``entry``'s tensor."""
        return entry.key in self.tensors


def shard_experts(model: nn.Module, layout: PayloadLayout, *, ep_size: int, rank: int) -> ExpertShard:
    """Replace, in place, every MoE block's experts of ``model`` (HF + peft) by this rank's expert shard.

    ``model`` must carry LoRA on its fused experts (``fedsim.models.lora``)
    and ``layout`` must be its payload layout; both describe the model before
    the swap. Rank ``rank`` keeps global experts rank·E/G … (rank+1)·E/G − 1;
    the other experts' weights are released.
    """
    spec = family_of(model)
    config: Any = model.config
    num_experts = spec.num_experts(config)
    if num_experts % ep_size:
        raise ConfigError(f"engine.group_size: {ep_size} does not divide the {num_experts} experts per layer")
    per_rank = num_experts // ep_size
    first = rank * per_rank
    named = dict(model.named_parameters())
    by_id = {id(p): name for name, p in named.items()}
    tensors: dict[str, torch.Tensor] = {}
    expert_keys: dict[str, tuple[int, str, str]] = {}  # layer-qualified param name → (layer, projection, factor)

    for layer, block in enumerate(spec.moe_blocks(model)):
        wrapper = getattr(block, spec.experts)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        module = wrapper
        while isinstance(module, ParamWrapper):
            adapter = next(iter(module.lora_A))
            a = cast(torch.Tensor, module.lora_A[adapter].weight)
            b = cast(torch.Tensor, module.lora_B[adapter].weight)
            projection = _PROJECTIONS[module.parameter_name]
            factors[projection] = (a, b)
            expert_keys[by_id[id(a)]] = (layer, projection, "A")
            expert_keys[by_id[id(b)]] = (layer, projection, "B")
            module = module.base_layer
        if set(factors) != set(_PROJECTIONS.values()):
            raise ConfigError("engine.backend: deepspeed needs LoRA on the experts (lora.experts: true)")
        fused = module  # the HF experts module: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        rank_r = factors["gate_up"][0].shape[0] // num_experts
        template = SwiGLUExpert(config.hidden_size, fused.down_proj.shape[-1], config.hidden_act)
        inject_adapter_in_model(
            PeftLoraConfig(
                r=rank_r, lora_alpha=wrapper.scaling[adapter] * rank_r, target_modules=list(_PROJECTIONS.values())
            ),
            template,
        )
        moe = MoE(config.hidden_size, template, num_experts=num_experts, ep_size=ep_size,
                  k=spec.top_k(config), drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        moe.deepspeed_moe.gate = ReplayedGate(num_experts)
        experts = ExpertParallelExperts(moe)
        expert: Any  # a SwiGLUExpert whose two Linears peft wrapped in LoRA layers
        for local, expert in enumerate(experts.local_experts):
            global_e = first + local
            with torch.no_grad():
                expert.gate_up.base_layer.weight.copy_(fused.gate_up_proj[global_e])
                expert.down.base_layer.weight.copy_(fused.down_proj[global_e])
            for p in expert.parameters():
                p.requires_grad_(False)
            for projection in _PROJECTIONS.values():
                lora = getattr(expert, projection)
                for factor, linear in (("A", lora.lora_A[adapter]), ("B", lora.lora_B[adapter])):
                    linear.weight.requires_grad_(True)
                    tensors[_entry_key(layer, global_e, projection, factor)] = linear.weight
        setattr(block, spec.experts, experts)

    for entry in layout:
        if entry.role == "expert":
            layer, projection, factor = expert_keys[entry.param]
            if entry.key not in tensors and _entry_key(layer, entry.expert, projection, factor) in tensors:
                tensors[entry.key] = tensors.pop(_entry_key(layer, entry.expert, projection, factor))
        else:
            tensors[entry.key] = named[entry.param]
    leftover = [k for k in tensors if k.startswith("#")]
    if leftover:
        raise ConfigError(f"engine: expert tensors without a payload entry ({leftover[0]})")
    return ExpertShard(tensors, rank, ep_size)


def _entry_key(layer: int, expert: int | None, projection: str, factor: str) -> str:
    """A temporary name for a local expert's LoRA factor until the layout's own key replaces it."""
    return f"#L{layer}/E{expert}/{projection}/{factor}"
