"""The config names each strategy; the factory builds it with the configured options."""

from __future__ import annotations

import pytest

from aggregation import EntrySpec, FedAdam, FedAvg, FedProx, PayloadLayout
from fedsim.config import load_config
from fedsim.strategies import StrategyFactory


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_strategy_factory_builds_configured_strategy(name: str, cls: type) -> None:
    layout = PayloadLayout.build([EntrySpec("w", "shared", None, None, (2,))])
    cfg = load_config(None, [f"strategy.name={name}", "strategy.prox_mu=0.5", "strategy.fedadam.server_lr=0.2"])
    strategy = StrategyFactory(cfg.strategy)(layout)
    assert type(strategy) is cls
    if name == "fedprox":
        assert strategy.configure(1, 1, seed=0).prox_mu == 0.5
    if name == "fedadam":
        assert strategy.server_lr == 0.2
