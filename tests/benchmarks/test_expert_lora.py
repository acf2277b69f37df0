"""benchmarks/expert_lora.py at tiny widths: its arithmetic is what the routed step executes, and its rows add up."""

from __future__ import annotations

import pytest
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.expert_lora import QUICK, adapted, batch_of, loss_of, measure, saved_bytes, step_flops


@pytest.mark.parametrize("model", list(QUICK))
def test_step_flops_equal_the_matmuls_the_routed_step_executes(model: str) -> None:
    """The benchmark's arithmetic (the tokens' matmuls, forward and backward) is what torch's FLOP counter sees.

    That is, what it sees the routed path run (torch does not count CPU attention, so that part is left out): the
    count is right, and the routed path computes nothing beyond the routed rows.
    """
    # Prepare
    routed = adapted(QUICK[model], "routed")
    routed.train()
    ids, labels = batch_of(routed, 2, 16)
    # Execute
    counted = step_flops(routed, ids, labels)
    with FlopCounterMode(display=False) as executed:
        loss_of(routed, ids, labels).backward()
    # Assert
    assert counted.weights == executed.get_total_flops()
    assert counted.attention > 0


def test_peft_path_saves_more_for_backward_than_routed_path() -> None:
    # Prepare
    shape = QUICK["olmoe"]
    models = {path: adapted(shape, path) for path in ("peft", "routed")}
    ids, labels = batch_of(models["peft"], 4, 16)
    # Execute
    saved = {path: saved_bytes(m.train(), ids, labels) for path, m in models.items()}
    # Assert: peft's path keeps W + s·B·A of every expert (2 layers × 8 experts × 3·H·I fp32 values); the routed
    # path keeps instead a few per-row tensors (x·Aᵀ: rows × r) that are ~1 % of that here
    folded = 2 * 8 * 3 * 64 * 32 * 4
    assert saved["peft"] - saved["routed"] >= 0.95 * folded
    assert step_flops(models["peft"], ids, labels) == step_flops(models["routed"], ids, labels)


def test_measure_gives_one_row_per_token_shape_with_its_ratio() -> None:
    # Execute
    rows = list(measure(QUICK["deepseek_v2"], "routed"))
    # Assert
    assert [r["tokens"] for r in rows] == [f"{b}x{s}" for b, s in QUICK["deepseek_v2"].tokens]
    for row in rows:
        assert row["routed"] and row["path"] == "routed"
        assert row["ratio"] == pytest.approx(row["step_s"] / row["arithmetic_s"])
        assert row["rate_gflops"] > 0 and row["saved_mib"] > 0 and row["step_peak_gib"] > 0
    assert rows[0]["gflop"] < rows[1]["gflop"] < rows[2]["gflop"]
    assert rows[-1]["rows_per_expert"] == 4 * 16 * 2 / 8
