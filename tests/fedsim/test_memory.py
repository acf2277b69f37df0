"""The GPU memory estimate of a worker and the packing check (analytic; no GPU here)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from aggregation.errors import ConfigError
from fedsim.config import load_config
from fedsim.driver import updates_in_flight
from fedsim.memory import GIB, WorkerMemory, check_gpu_packing, estimate_worker_memory, payload_nbytes
from fedsim.models import apply_lora, load_pretrained
from fedsim.models.layout import build_layout
from fedsim.prepare import prepare

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=32", "model.num_experts=4", "model.top_k=2", "model.pretrain.steps=0",
        "model.pretrain.tokenizer_vocab=400", "lora.rank=2", "data.source=synthetic", "data.synthetic_docs_per_label=8",
        "data.num_clients=4", "data.partition=iid", "data.min_examples=2", "data.max_length=32", "train.batch_size=4",
        "clients_per_round=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    overrides = [*TINY, f"cache_dir={tmp_path_factory.mktemp('cache')}"]
    return overrides, prepare(load_config(None, overrides)).base_path


def test_estimate_counts_the_real_models_values(base) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    overrides, path = base
    cfg = load_config(None, overrides)
    model = apply_lora(load_pretrained(path), rank=2, alpha=16.0, dropout=0.0)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Execute
    need = estimate_worker_memory(cfg, path)
    # Assert: fp32 base (frozen weights + routers) and 16 bytes per trainable value (value, grad, two moments)
    routers = 2 * 4 * 32
    assert need.base == 4 * (frozen + routers)
    assert need.trainable == 16 * trainable
    # activations: 2 layers × s·b·h·(10 + 24·k·I/(4h)) fp32 values, s = 32, b = 4, h = 32, k = 2, I = 32
    assert need.activations == 2 * 32 * 4 * 32 * (10 + 24 * 2 * 32 / (4 * 32)) * 4
    assert need.total == need.base + need.trainable + need.activations


def test_estimate_grows_with_batch_and_shrinks_with_expert_sharding(base) -> None:  # type: ignore[no-untyped-def]
    overrides, path = base
    small = estimate_worker_memory(load_config(None, overrides), path)
    big = estimate_worker_memory(load_config(None, [*overrides, "train.batch_size=8"]), path)
    sharded = estimate_worker_memory(load_config(None, [*overrides, "engine.backend=deepspeed", "engine.group_size=2"]),
                                     path)
    assert big.activations == pytest.approx(2 * small.activations)
    assert sharded.base < small.base and sharded.activations == pytest.approx(small.activations / 2)


def test_packing_that_does_not_fit_names_the_numbers(base) -> None:  # type: ignore[no-untyped-def]
    overrides, _ = base
    need = WorkerMemory(base=10 * GIB, trainable=1 * GIB, activations=9 * GIB)  # 20 GiB a worker
    check_gpu_packing(load_config(None, [*overrides, "workers.gpus_per_worker=0.25"]), need, 100 * GIB)  # 4 × 20 fits
    with pytest.raises(ConfigError, match=r"workers.gpus_per_worker: 0.2 packs 5 worker\(s\) on a GPU of 80.0 GiB, "
                                          r"each needing ~20.00 GiB .*100.00 GiB > 90% of the GPU; at most 3 per GPU"):
        check_gpu_packing(load_config(None, [*overrides, "workers.gpus_per_worker=0.2"]), need, 80 * GIB)


def test_the_driver_refuses_a_packing_of_the_configured_gpu(base) -> None:  # type: ignore[no-untyped-def]
    from fedsim.driver import _check_gpu_memory

    overrides, path = base
    cfg = load_config(None, [*overrides, "workers.gpus_per_worker=0.5", "workers.gpu_memory_gib=0.001",
                             "progress=false"])
    with pytest.raises(ConfigError, match="workers.gpus_per_worker: 0.5 packs 2 worker"):
        _check_gpu_memory(cfg, SimpleNamespace(base_path=path, num_options=0))  # type: ignore[arg-type]


def test_run_refuses_gpu_workers_on_a_cluster_without_gpus_before_any_actor_starts(  # type: ignore[no-untyped-def]
    ray_session, base, tmp_path: Path
) -> None:
    from fedsim.driver import run

    overrides, _ = base
    cfg = load_config(None, [*overrides, "workers.gpus_per_worker=0.5", "workers.gpu_memory_gib=0.001",
                             "progress=false"])
    with pytest.raises(ConfigError, match="workers: no worker fits: .* 0 GPUs"):
        run(cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_keeps_one_layers_activations(base) -> None:  # type: ignore[no-untyped-def]
    overrides, path = base
    plain = estimate_worker_memory(load_config(None, overrides), path)
    recomputed = estimate_worker_memory(load_config(None, [*overrides, "train.gradient_checkpointing=true"]), path)
    per_layer = plain.activations / 2  # the tiny model has 2 layers
    assert recomputed.activations == pytest.approx(2 * 32 * 4 * 32 * 4 + per_layer)  # 2 layer inputs s·b·h, fp32
    assert recomputed.base == plain.base and recomputed.trainable == plain.trainable


def test_estimate_halves_the_base_in_bf16_and_quarters_its_linear_weights_in_8bit(base) -> None:  # type: ignore[no-untyped-def]
    overrides, path = base
    full = estimate_worker_memory(load_config(None, overrides), path)
    half = estimate_worker_memory(load_config(None, [*overrides, "engine.precision=bf16"]), path)
    quantized = estimate_worker_memory(
        load_config(None, [*overrides, "model.quantization=8bit", "workers.gpus_per_worker=1"]), path
    )
    assert half.base == full.base / 2 and half.activations == full.activations / 2 and half.trainable == full.trainable
    assert quantized.base < half.base


def test_estimate_covers_an_encoder_decoder_and_options_as_rows(tmp_path: Path) -> None:
    # Prepare: a Switch base (2 encoder + 2 decoder layers)
    overrides = [*TINY, "model.family=switch_transformers", "model.top_k=1", f"cache_dir={tmp_path}"]
    cfg = load_config(None, overrides)
    path = prepare(cfg).base_path
    # Execute
    one = estimate_worker_memory(cfg, path)
    four = estimate_worker_memory(cfg, path, num_options=4)
    # Assert: 2 encoder layers over the prompts (4 × 32 tokens), 2 decoder layers over one token per example
    # (the label word's step), or each of the 4 options' 32 tokens, plus the keys and values of the encoded
    # prompt their cross-attention reads; t·h·(10 + 24·k·I/(4h)) values a layer, fp32
    per_token = 32 * (10 + 24 * 1 * 32 / (4 * 32))
    encoder = 2 * (4 * 32) * per_token
    assert one.activations == (encoder + 2 * (4 * 1 * per_token + 2 * 4 * 32 * 32)) * 4
    assert four.activations == (encoder + 2 * (16 * 32 * per_token + 2 * 16 * 32 * 32)) * 4


def test_payload_bytes_are_the_real_models_layout(base) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the layout the workers build, from the real model
    overrides, path = base
    cfg = load_config(None, overrides)
    layout = build_layout(apply_lora(load_pretrained(path), rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0,
                                     lora_attention=cfg.lora.attention, lora_experts=cfg.lora.experts))
    # Execute
    nbytes = payload_nbytes(cfg, path)
    # Assert
    assert nbytes == layout.nbytes > 0


def test_updates_in_flight_count_the_over_selected_cohort() -> None:
    plain = load_config(None, [*TINY, "data.num_clients=20", "clients_per_round=10"])
    over = load_config(None, [*TINY, "data.num_clients=20", "clients_per_round=10", "system.policy=over_select",
                              "system.over_selection=0.3"])
    assert updates_in_flight(plain) == 10
    assert updates_in_flight(over) == 13
