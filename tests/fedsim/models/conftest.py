"""Tiny MoE models for the model tests: hidden 32, 2 layers, 4 experts, top-2, LoRA rank 2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from fedsim.models import apply_lora, build_model  # noqa: E402


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
        """A randomly initialised model of ``family`` with these sizes."""
        return build_model(
            family,
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            intermediate_size=self.inter,
            num_experts=self.experts,
            top_k=self.top_k if top_k is None else top_k,
            max_position=64,
            seed=seed,
        )

    def lora(self, family: str, *, seed: int = 0, lora_experts: bool = True) -> PeftModel:
        """``model(family, seed=seed)`` with LoRA of this rank and alpha, no dropout."""
        return apply_lora(
            self.model(family, seed=seed), rank=self.rank, alpha=self.alpha, dropout=0.0, lora_experts=lora_experts
        )


@pytest.fixture(scope="session")
def tiny() -> TinyMoE:
    """The test models' sizes and builders."""
    return TinyMoE()


@pytest.fixture(params=["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"])
def family_name(request: pytest.FixtureRequest) -> str:
    """Each known family in turn."""
    return str(request.param)
