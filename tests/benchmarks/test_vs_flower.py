"""benchmarks/vs_flower.py's table on hand-made per-round tables, its options, workloads and Flower's base copy.

The systems themselves (fedsim, Flower in its own venv) run in the benchmark, not here:
``vs_flower.py --workloads olmoe --quick`` is its smoke test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from benchmarks.vs_flower import WORKLOADS, flower_base, local_steps_list, summarise, workload_config
from fedsim.models import build_model, load_pretrained, save_base


def _rounds(wall: list[float], compute: list[float], *, clients: int = 4, update_bytes: int = 100) -> pd.DataFrame:
    n = len(wall)
    return pd.DataFrame({"round": range(1, n + 1), "round_wall_s": wall, "compute_s_sum": compute,
                         "clients": [clients] * n, "update_bytes": [update_bytes] * n})


def test_summarise_leaves_out_round_one_and_divides_by_fedsim_seconds_per_round():
    # Prepare: round 1 (startup) is slow in both; Flower listed first, so fedsim is found by name
    runs = {
        "flower (per call)": _rounds([20.0, 10.0, 12.0], [16.0, 12.0, 14.0], update_bytes=120),
        "fedsim": _rounds([10.0, 2.0, 4.0], [8.0, 3.0, 5.0]),
    }
    # Execute
    table = summarise(runs, workers=2).set_index("system")
    # Assert
    fedsim, flower = table.loc["fedsim"], table.loc["flower (per call)"]
    assert fedsim["s_per_round"] == pytest.approx(3.0)  # median of 2 and 4
    assert fedsim["s_per_call"] == pytest.approx((3.0 + 5.0) / 8)
    assert fedsim["ratio_to_fedsim"] == pytest.approx(1.0)
    assert fedsim["overhead_ratio"] == pytest.approx((2 / 1.5 + 4 / 2.5) / 2)
    assert flower["s_per_round"] == pytest.approx(11.0)
    assert flower["s_per_call"] == pytest.approx((12.0 + 14.0) / 8)
    assert flower["ratio_to_fedsim"] == pytest.approx(11.0 / 3.0)
    assert flower["update_bytes"] == 120
    # against fedsim's compute (one denominator for every row), and against its own
    assert flower["overhead_ratio"] == pytest.approx((10 / 1.5 + 12 / 2.5) / 2)
    assert flower["own_overhead_ratio"] == pytest.approx((10 / 6 + 12 / 7) / 2)


def test_summarise_counts_the_clients_that_reported_in_seconds_per_call():
    # Prepare: round 3 of the cached run lost a client, so 7 calls took 21 s
    cached = _rounds([9.0, 6.0, 6.0], [12.0, 12.0, 9.0])
    cached.loc[2, "clients"] = 3
    runs = {"fedsim": _rounds([5.0, 5.0, 5.0], [10.0, 10.0, 10.0]), "flower (cached)": cached}
    # Execute
    table = summarise(runs, workers=2).set_index("system")
    # Assert
    assert table.loc["flower (cached)", "s_per_call"] == pytest.approx(21.0 / 7)
    assert table.loc["flower (cached)", "ratio_to_fedsim"] == pytest.approx(6.0 / 5.0)


def test_local_steps_list_reads_one_count_or_several():
    # Execute, Assert
    assert local_steps_list("4") == (4,)
    assert local_steps_list("1,4,16") == (1, 4, 16)


@pytest.mark.parametrize("text", ["", "1,x", "0", "4,-1"])
def test_local_steps_list_rejects_what_is_not_a_positive_count(text: str):
    # Execute, Assert
    with pytest.raises(argparse.ArgumentTypeError):
        local_steps_list(text)


def test_olmoe_workload_is_olmoe_1b_7b_at_depth_2_with_lora_on_attention_and_experts(tmp_path: Path):
    # Execute
    cfg = workload_config("olmoe", local_steps=16, clients=4, rounds=2, workers=2, quick=False,
                          cache_dir=tmp_path, overrides=[])
    # Assert
    m = cfg.model
    assert (m.family, m.hidden_size, m.num_heads, m.num_kv_heads) == ("olmoe", 2048, 16, 16)
    assert (m.num_experts, m.intermediate_size, m.top_k, m.num_layers) == (64, 1024, 8, 2)
    assert m.hf_overrides == {"vocab_size": 50304} and m.pretrain.steps == 0
    assert (cfg.lora.rank, cfg.lora.attention, cfg.lora.experts) == (8, True, True)
    assert (cfg.train.local_steps, cfg.clients_per_round, cfg.data.num_clients, cfg.rounds) == (16, 4, 4, 2)
    assert (cfg.data.partition, cfg.strategy.name, cfg.workers.num_workers) == ("iid", "fedavg", 2)
    assert WORKLOADS["olmoe"].flower_modes == ("per_call", "cached")


def test_quick_shrinks_the_olmoe_widths_and_leaves_the_small_workloads_alone(tmp_path: Path):
    # Prepare
    def config(name: str, quick: bool):
        return workload_config(name, local_steps=1, clients=4, rounds=2, workers=2, quick=quick, cache_dir=tmp_path,
                               overrides=[])

    # Execute
    olmoe = config("olmoe", True)
    # Assert: the OLMoE family, its depth, LoRA and vocabulary override, at a smoke test's widths
    assert (olmoe.model.family, olmoe.model.hidden_size, olmoe.model.num_experts) == ("olmoe", 64, 8)
    assert olmoe.model.num_layers == 2 and olmoe.model.hf_overrides == {"vocab_size": 50304}
    for name in ("tiny", "demo"):
        assert config(name, True) == config(name, False)


def test_flower_base_in_the_hub_layout_holds_one_tensor_per_expert_and_the_same_weights(tmp_path: Path):
    # Prepare: a tiny OLMoE saved as fedsim saves its bases (fused experts)
    own = tmp_path / "base-olmoe"
    save_base(build_model("olmoe", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                          intermediate_size=16, num_experts=4, top_k=2, max_position=64, seed=0), own)
    # Execute
    hub = Path(flower_base(str(own), "hub", tmp_path))
    # Assert
    assert flower_base(str(own), "own", tmp_path) == str(own)
    with safe_open(str(hub / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert not any(name.endswith("experts.gate_up_proj") for name in names)
    mine, theirs = load_pretrained(str(own)).state_dict(), load_pretrained(str(hub)).state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
