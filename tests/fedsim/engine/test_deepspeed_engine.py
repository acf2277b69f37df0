"""The deepspeed engine in this process (a torch.distributed world of one, gloo) against the torch engine.

Tolerance: from the same payload, per-step losses agree to 1e-5 relative and
the deltas to 1e-4 absolute (lr 0.01; the two engines differ only in float
rounding: peft folds B·A into the fused expert weight, the deepspeed engine
applies each expert's LoRA as its own Linear).
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from actors.group import GroupContext
from aggregation.client_terms import ProximalTerm, RoutingRegulariserTerm
from aggregation.messages import ClientInstructions
from fedsim.config import load_config
from fedsim.engine.deepspeed_engine import DeepSpeedEngine, DeepSpeedEngineSpec
from fedsim.engine.expert_parallel import ExpertParallelExperts, shard_experts
from fedsim.engine.torch_engine import TorchEngine, TorchEngineSpec
from fedsim.models import apply_lora, build_layout, family_of, load_pretrained
from fedsim.prepare import PreparedRun, prepare
from tests.fedsim.engine.test_choice_engine import write_mmlu
from tests.fedsim.engine.test_torch_engine import TINY

DELTA_ATOL = 1e-4
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, PreparedRun]:  # type: ignore[type-arg]
    cfg = load_config(None, [*TINY, f"cache_dir={tmp_path_factory.mktemp('cache')}", "train.weight_decay=0.01"])
    run = prepare(cfg)
    recipe = dict(base_path=run.base_path, train_path=run.train_path, test_path=run.test_path,
                  label_token_ids=run.label_token_ids, lora=cfg.lora, train=cfg.train, faults=cfg.faults)
    return recipe, run


@pytest.fixture(scope="module")
def torch_engine(prepared) -> TorchEngine:  # type: ignore[no-untyped-def]
    return TorchEngineSpec(**prepared[0])()


@pytest.fixture(scope="module")
def world_port() -> int:
    return _free_port()  # one world of one per test process, joined by the first engine built


def _ds(prepared, port: int, **options: object) -> DeepSpeedEngine:  # type: ignore[no-untyped-def]
    return DeepSpeedEngineSpec(**prepared[0], **options)(GroupContext(0, 1, "127.0.0.1", port))


def _instr(cid: int, seed: int, **kw: object) -> ClientInstructions:
    return ClientInstructions(client_id=cid, round_idx=1, seed=seed, **kw)  # type: ignore[arg-type]


def test_shard_keeps_only_this_ranks_experts_with_the_hf_weights(prepared) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    recipe, _ = prepared
    model = apply_lora(load_pretrained(recipe["base_path"]), rank=2, alpha=4.0, dropout=0.0)
    layout = build_layout(model)
    fused = [b.experts.base_layer.base_layer for b in family_of(model).moe_blocks(model)]
    gate_up = [f.gate_up_proj.detach().clone() for f in fused]
    # Execute: rank 1 of 2 holds experts 2 and 3 of the 4
    shard = shard_experts(model, layout, ep_size=2, rank=1)
    # Assert
    owned = {e.expert for e in layout.select(role="expert") if shard.owns(e)}
    assert owned == {2, 3}
    assert all(shard.owns(e) for e in layout if e.role != "expert")
    for layer, block in enumerate(family_of(model).moe_blocks(model)):
        assert isinstance(block.experts, ExpertParallelExperts)
        local = block.experts.local_experts
        assert len(local) == 2
        torch.testing.assert_close(local[0].gate_up.base_layer.weight, gate_up[layer][2])
        torch.testing.assert_close(local[1].gate_up.base_layer.weight, gate_up[layer][3])


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_g1_matches_torch_engine(prepared, torch_engine, world_port, zero_stage) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    ds = _ds(prepared, world_port, zero_stage=zero_stage)
    # Assert: same layout and the same initial payload, so a run starts from the same global model
    assert ds.layout == torch_engine.layout
    np.testing.assert_array_equal(ds.initial_payload, torch_engine.initial_payload)
    # Execute: two clients in a row (the second must find fresh optimiser moments)
    for cid, seed in ((0, 5), (1, 7)):
        want_losses: list[float] = []
        got_losses: list[float] = []
        want = torch_engine.train(prepared[1].partitions[cid], torch_engine.initial_payload, _instr(cid, seed),
                                  step_losses=want_losses)
        got = ds.train(prepared[1].partitions[cid], ds.initial_payload, _instr(cid, seed), step_losses=got_losses)
        # Assert
        assert got is not None
        np.testing.assert_allclose(got_losses, want_losses, rtol=LOSS_RTOL)
        np.testing.assert_allclose(got.delta, want.delta, atol=DELTA_ATOL, rtol=0)
        assert np.abs(got.delta).max() > 10 * DELTA_ATOL  # the comparison is not between two near-zero deltas
        for a, b in zip(got.routing, want.routing, strict=True):
            assert a.n_tokens == b.n_tokens
            np.testing.assert_array_equal(a.counts, b.counts)
            np.testing.assert_allclose(a.p_sum, b.p_sum, rtol=1e-4)


def test_g1_regulariser_and_prox_match_torch_engine(prepared, torch_engine, world_port) -> None:  # type: ignore[no-untyped-def]
    ds = _ds(prepared, world_port)
    layers, experts = len(ds.layout.select(role="router")), 4
    p_g = np.full((layers, experts), 1.0 / experts, dtype=np.float32)
    # the regulariser first, as the engine added it before the proximal term when both were fields
    instr = _instr(2, 3, terms=(RoutingRegulariserTerm(0.1, p_g, np.ones_like(p_g)), ProximalTerm(0.5)))
    assert ds._param_weights == [1.0] * len(ds.trainable)  # a group of one: every tensor counts once
    want = torch_engine.train(prepared[1].partitions[2], torch_engine.initial_payload, instr)
    got = ds.train(prepared[1].partitions[2], ds.initial_payload, instr)
    np.testing.assert_allclose(got.delta, want.delta, atol=DELTA_ATOL, rtol=0)


def test_g1_evaluation_matches_torch_engine(prepared, torch_engine, world_port) -> None:  # type: ignore[no-untyped-def]
    ds = _ds(prepared, world_port)
    chunks = [(0, 4), (4, 10)]
    want = torch_engine.evaluate(torch_engine.initial_payload, chunks)
    got = ds.evaluate(ds.initial_payload, chunks)
    for a, b in zip(got, want, strict=True):
        assert (a.correct, a.count) == (b.correct, b.count)
        assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_g1_matches_torch_engine_with_shared_experts(tmp_path_factory, world_port, family: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare: families whose MoE block adds an always-on shared expert (and DeepSeek-V3's sigmoid router)
    cfg = load_config(None, [*TINY, f"cache_dir={tmp_path_factory.mktemp('cache')}", f"model.family={family}"])
    run = prepare(cfg)
    recipe = dict(base_path=run.base_path, train_path=run.train_path, test_path=run.test_path,
                  label_token_ids=run.label_token_ids, lora=cfg.lora, train=cfg.train)
    reference = TorchEngineSpec(**recipe)()  # type: ignore[arg-type]
    ds = DeepSpeedEngineSpec(**recipe)(GroupContext(0, 1, "127.0.0.1", world_port))  # type: ignore[arg-type]
    # Execute
    want_losses: list[float] = []
    got_losses: list[float] = []
    want = reference.train(run.partitions[1], reference.initial_payload, _instr(1, 3), step_losses=want_losses)
    got = ds.train(run.partitions[1], ds.initial_payload, _instr(1, 3), step_losses=got_losses)
    # Assert
    assert any("shared_expert" in e.param for e in ds.layout.select(role="shared"))
    np.testing.assert_allclose(got.delta, want.delta, atol=DELTA_ATOL, rtol=0)
    np.testing.assert_allclose(got_losses, want_losses, rtol=LOSS_RTOL)


def test_g1_matches_torch_engine_on_a_multiple_choice_task(tmp_path_factory, world_port) -> None:  # type: ignore[no-untyped-def]
    # Prepare: an MMLU-style file, options scored by log-likelihood (N rows an example)
    tmp = tmp_path_factory.mktemp("mmlu")
    cfg = load_config(None, [*TINY, f"cache_dir={tmp / 'cache'}", "data.format=mmlu",
                             f"data.source={write_mmlu(tmp / 'q.jsonl')}", "data.num_clients=3", "clients_per_round=3",
                             "data.max_length=48", "data.max_option_length=8"])
    run = prepare(cfg)
    recipe = dict(base_path=run.base_path, train_path=run.train_path, test_path=run.test_path, label_token_ids=(),
                  task="choice", lora=cfg.lora, train=cfg.train)
    reference = TorchEngineSpec(**recipe)()  # type: ignore[arg-type]
    ds = DeepSpeedEngineSpec(**recipe)(GroupContext(0, 1, "127.0.0.1", world_port))  # type: ignore[arg-type]
    # Execute
    want_losses: list[float] = []
    got_losses: list[float] = []
    want = reference.train(run.partitions[0], reference.initial_payload, _instr(0, 4), step_losses=want_losses)
    got = ds.train(run.partitions[0], ds.initial_payload, _instr(0, 4), step_losses=got_losses)
    scored = ds.evaluate(ds.initial_payload, [(0, run.n_test)])[0]
    expected = reference.evaluate(reference.initial_payload, [(0, run.n_test)])[0]
    # Assert
    assert got is not None
    np.testing.assert_allclose(got.delta, want.delta, atol=DELTA_ATOL, rtol=0)
    np.testing.assert_allclose(got_losses, want_losses, rtol=LOSS_RTOL)
    assert (scored.correct, scored.count) == (expected.correct, expected.count)
    assert scored.loss_sum == pytest.approx(expected.loss_sum, rel=1e-5)
