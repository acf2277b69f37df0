"""configs/scale/: each file loads, and builds at its real widths (on the meta device) to the published size."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config import load_config
from fedsim.models import build_model, family_spec

SCALE = Path(__file__).resolve().parents[2] / "configs" / "scale"

# name: (full depth, published parameter count in billions, to 0.05 B)
PUBLISHED = {
    "olmoe-1b-7b": (16, 6.92),
    "qwen1.5-moe-a2.7b": (24, 14.32),
    "deepseek-v2-lite": (27, 15.71),
    "switch-base-16": (12, 1.07),
}


def test_every_scale_config_is_covered() -> None:
    assert sorted(p.stem for p in SCALE.glob("*.yaml")) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_scale_config_builds_to_the_published_parameter_count_at_full_depth(name: str) -> None:
    # Prepare
    cfg = load_config(SCALE / f"{name}.yaml", [])
    m = cfg.model
    full_depth, billions = PUBLISHED[name]

    # Execute: the configured depth and the real one, shapes only
    def params(layers: int) -> tuple[int, int]:
        model = build_model(
            m.family, vocab_size=m.pretrain.tokenizer_vocab, hidden_size=m.hidden_size, num_layers=layers,
            num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
            num_experts=m.num_experts, top_k=m.top_k, max_position=m.max_position, seed=0,
            overrides=m.hf_overrides, device="meta",
        )  # fmt: skip
        return sum(p.numel() for p in model.parameters()), len(family_spec(m.family).moe_blocks(model))

    configured, moe_layers = params(m.num_layers)
    full, _ = params(full_depth)

    # Assert: the real model's size at full depth; a reduced depth keeps MoE layers and is smaller
    assert full / 1e9 == pytest.approx(billions, abs=0.05)
    assert moe_layers >= 2 and configured <= full
    assert cfg.model.pretrain.steps == 0 and cfg.lora.rank == 8 and cfg.rounds == 2 and cfg.clients_per_round == 20
