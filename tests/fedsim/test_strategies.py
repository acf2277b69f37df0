"""The config names each strategy; the factory builds it with the configured options."""

from __future__ import annotations

import pytest

from aggregation import EntrySpec, FedAdam, FedAlignMoE, FedAvg, FedMoE, FedProx, PayloadLayout, PFLMoE
from fedsim.config import ConfigError, load_config
from fedsim.strategies import StrategyFactory

LAYOUT = PayloadLayout.build([
    EntrySpec("w", "shared", None, None, (2,)),
    EntrySpec("gate", "router", 0, None, (2, 1)),
    EntrySpec("e0", "expert", 0, 0, (1,), axis=0, start=0, stop=1),
    EntrySpec("e1", "expert", 0, 1, (1,), axis=0, start=1, stop=2),
])

OPTIONS = [
    "strategy.prox_mu=0.5", "strategy.fedadam.server_lr=0.2", "strategy.fedmoe.router_weighting=n",
    "strategy.pfl_moe.global_experts=frozen", "strategy.fedalign.beta=0.5", "strategy.fedalign.expert_agg=personalized",
]


@pytest.mark.parametrize(
    ("name", "cls"),
    [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedmoe", FedMoE), ("pfl_moe", PFLMoE),
     ("fedalign_moe", FedAlignMoE)],
)
def test_strategy_factory_builds_configured_strategy(name: str, cls: type) -> None:
    # Execute
    strategy = StrategyFactory(load_config(None, [f"strategy.name={name}", *OPTIONS]).strategy)(LAYOUT)

    # Assert: the type, and one option of each reached it
    assert type(strategy) is cls
    configured = {
        "fedprox": lambda s: s.configure(1, 1, seed=0).prox_mu == 0.5,
        "fedadam": lambda s: s.server_lr == 0.2,
        "fedmoe": lambda s: s.router_weighting == "n",
        "pfl_moe": lambda s: s.global_experts == "frozen",
        "fedalign_moe": lambda s: s.options.beta == 0.5 and s.personal is not None,
    }
    assert configured.get(name, lambda s: True)(strategy)


@pytest.mark.parametrize("name", ["fedmoe", "fedalign_moe"])
def test_strategies_that_read_routing_statistics_refuse_routing_stats_off(name: str) -> None:
    with pytest.raises(ConfigError, match="train.routing_stats"):
        load_config(None, [f"strategy.name={name}", "train.routing_stats=off"])


def test_fedalign_with_both_modules_off_needs_no_routing_statistics() -> None:
    cfg = load_config(None, ["strategy.name=fedalign_moe", "strategy.fedalign.gating=off",
                             "strategy.fedalign.semantic=false", "train.routing_stats=off"])
    assert not cfg.strategy.needs_routing_stats()


def test_personalized_without_semantic_names_the_field() -> None:
    with pytest.raises(ConfigError, match="strategy.fedalign"):
        load_config(None, ["strategy.fedalign.expert_agg=personalized", "strategy.fedalign.semantic=false"])
