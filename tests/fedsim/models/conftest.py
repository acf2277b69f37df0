"""Tiny MoE models for the model tests: hidden 32, 2 layers, 4 experts, top-2 (top-1 for Switch), LoRA rank 2.

Switch (encoder-decoder) has 2 encoder and 2 decoder layers, every one of them
sparse, so its tiny model has 4 MoE layers: the encoder's, then the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from fedsim.models import apply_lora, build_model, family_spec

FUSED_FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3"]
FAMILIES = [*FUSED_FAMILIES, "switch_transformers"]

# Decoder inputs of an encoder-decoder's batch (row i for the batch's sequence i; 0 starts the decoder):
# lengths 4, 2, 3, so the decoder's padding differs from any encoder batch's in the tests.
DECODER_IDS = torch.tensor([[0, 12, 7, 30], [0, 9, 0, 0], [0, 44, 5, 0]])
DECODER_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])


@dataclass(frozen=True)
class TinyMoE:
    """Sizes of the test models, and builders that use them."""

    vocab: int = 64
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    inter: int = 24
    experts: int = 4
    top_k: int = 2
    rank: int = 2
    alpha: float = 4.0

    def model(self, family: str, *, seed: int = 0, top_k: int | None = None) -> PreTrainedModel:
        """A randomly initialised model of ``family`` with these sizes (top-1 for a top-1 family)."""
        return build_model(
            family,
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            intermediate_size=self.inter,
            num_experts=self.experts,
            top_k=self.routed(family) if top_k is None else top_k,
            max_position=64,
            seed=seed,
        )

    def lora(self, family: str, *, seed: int = 0, lora_experts: bool = True) -> PeftModel:
        """``model(family, seed=seed)`` with LoRA of this rank and alpha, no dropout."""
        return apply_lora(
            self.model(family, seed=seed), rank=self.rank, alpha=self.alpha, dropout=0.0, lora_experts=lora_experts
        )

    # --- what differs between the families -----------------------------------------------------------------

    @staticmethod
    def encoder_decoder(family: str) -> bool:
        """Whether ``family``'s models are encoder-decoders (as transformers' config class says)."""
        return bool(family_spec(family).config_class().is_encoder_decoder)

    def routed(self, family: str) -> int:
        """Experts per token of this family's tiny model: ``top_k``, or 1 for a top-1 family."""
        return 1 if family_spec(family).top_k_key is None else self.top_k

    def moe_layers(self, family: str) -> int:
        """Number of MoE layers of the tiny model (every layer is MoE; an encoder-decoder has two stacks)."""
        return 2 * self.layers if self.encoder_decoder(family) else self.layers

    def attention_adapters(self, family: str) -> int:
        """Number of attention projections LoRA adapts in the tiny model.

        4 per decoder-only layer; for Switch, 4 per encoder layer (self-attention) and 8 per decoder layer
        (self- and cross-attention).
        """
        return self.layers * (4 + 8) if self.encoder_decoder(family) else self.layers * 4

    def up_width(self, family: str) -> int:
        """Output width of one expert's input projection: gate and up fused (2I), or Switch's ``wi`` (I)."""
        return self.inter if self.encoder_decoder(family) else 2 * self.inter

    # --- running a model of any family -----------------------------------------------------------------------

    @staticmethod
    def decoder_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed decoder input ids and mask [batch, 4] for an encoder-decoder's batch of ``batch`` sequences."""
        rows = torch.arange(batch) % DECODER_IDS.shape[0]
        return DECODER_IDS[rows], DECODER_MASK[rows]

    def forward(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model``'s forward pass on ``ids``, with the decoder inputs an encoder-decoder needs.

        An encoder-decoder gets ``decoder_inputs`` unless given decoder inputs, or labels to shift into them.
        """
        config: Any = model.config
        if config.is_encoder_decoder and "decoder_input_ids" not in kwargs and "labels" not in kwargs:
            decoder_ids, decoder_mask = self.decoder_inputs(ids.shape[0])
            kwargs.update(decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
        return model(input_ids=ids, attention_mask=mask, **kwargs)

    @staticmethod
    def router_weight(router: nn.Module) -> torch.Tensor:
        """The router's weight [E, H]: its own ``weight``, or Switch's ``classifier.weight``."""
        weight = getattr(router, "weight", None)
        if isinstance(weight, nn.Parameter):
            return weight
        classifier = router.get_submodule("classifier")
        assert isinstance(classifier, nn.Linear)
        return classifier.weight

    @staticmethod
    def router_logits(out: Any) -> list[torch.Tensor]:
        """The router logits [tokens, E] of each MoE layer, in layer order (an encoder-decoder's encoder first).

        ``out`` is the output of a forward pass with ``output_router_logits=True``.
        """
        if hasattr(out, "encoder_router_logits"):
            logits = [*out.encoder_router_logits, *out.decoder_router_logits]
        else:
            logits = list(out.router_logits)
        return [z.reshape(-1, z.shape[-1]) for z in logits]

    def layer_masks(self, family: str, mask: torch.Tensor, decoder_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The mask each MoE layer's tokens are under, in layer order.

        ``mask`` for a decoder-only model's or an encoder's layers, ``decoder_mask`` for a decoder's layers.
        """
        if not self.encoder_decoder(family):
            return [mask] * self.layers
        assert decoder_mask is not None
        return [mask] * self.layers + [decoder_mask] * self.layers


@pytest.fixture(scope="session")
def tiny() -> TinyMoE:
    """The test models' sizes and builders."""
    return TinyMoE()


@pytest.fixture(params=FAMILIES)
def family_name(request: pytest.FixtureRequest) -> str:
    """Each known family in turn."""
    return str(request.param)


@pytest.fixture(params=FUSED_FAMILIES)
def fused_family_name(request: pytest.FixtureRequest) -> str:
    """Each family whose experts are fused, stacked tensors (every family but Switch) in turn."""
    return str(request.param)
