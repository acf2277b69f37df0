"""One real local Ray for the end-to-end tests, and a tiny run configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config import RunConfig, load_config

TINY = [
    "name=tiny",
    "rounds=2",
    "clients_per_round=6",
    "progress=false",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=32",
    "model.num_experts=4",
    "model.top_k=2",
    "model.pretrain.steps=0",
    "model.pretrain.tokenizer_vocab=400",
    "lora.rank=2",
    "data.source=synthetic",
    "data.synthetic_docs_per_label=12",
    "data.num_clients=6",
    "data.partition=dirichlet",
    "data.alpha=1.0",
    "data.min_examples=2",
    "data.max_length=32",
    "train.batch_size=8",
    "train.lr=0.01",
    "eval.batch_size=16",
    "workers.num_workers=2",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_config(cache_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(*overrides: str) -> RunConfig:
        return load_config(None, [*TINY, f"cache_dir={cache_dir}", f"out_dir={tmp_path}", *overrides])

    return make
