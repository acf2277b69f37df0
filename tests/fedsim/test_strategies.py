"""The config names each strategy; the factory builds it with the configured options."""

from __future__ import annotations

import pytest

from aggregation import (
    EntrySpec,
    FedAdam,
    FedAlignMoE,
    FedAvg,
    FedMoE,
    FedProx,
    PayloadLayout,
    PFLMoE,
    ProximalTerm,
    RoutingRegulariserTerm,
)
from fedsim.config import ConfigError, load_config
from fedsim.strategies import StrategyFactory

LAYOUT = PayloadLayout.build([
    EntrySpec("w", "shared", None, None, (2,)),
    EntrySpec("gate", "router", 0, None, (2, 1)),
    EntrySpec("e0", "expert", 0, 0, (1,), axis=0, start=0, stop=1),
    EntrySpec("e1", "expert", 0, 1, (1,), axis=0, start=1, stop=2),
])

OPTIONS = [
    "strategy.fedprox.mu=0.5", "strategy.fedadam.server_lr=0.2", "strategy.fedmoe.router_weighting=n",
    "strategy.pfl_moe.global_experts=frozen", "strategy.fedalign.beta=0.5", "strategy.fedalign.expert_agg=personalized",
    "strategy.fedalign.reg_form=batch",
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
        "fedprox": lambda s: s.options.mu == 0.5 and s.configure(1, 1, seed=0).terms == (ProximalTerm(0.5),),
        "fedadam": lambda s: s.options.server_lr == 0.2,
        "fedmoe": lambda s: s.options.router_weighting == "n",
        "pfl_moe": lambda s: s.options.global_experts == "frozen",
        "fedalign_moe": lambda s: s.options.beta == 0.5 and s.personal is not None and s.options.reg_form == "batch",
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


def test_fedalign_reg_form_reaches_the_regulariser_its_clients_get() -> None:
    # Prepare: a target p_g exists once a state with one says so
    cfg = load_config(None, ["strategy.name=fedalign_moe", "strategy.fedalign.reg_form=batch"])
    strategy = StrategyFactory(cfg.strategy)(LAYOUT)
    strategy.load_state_dict({"p_g": [[0.5, 0.5]], "alpha": {}, "has_target": True})

    # Execute
    (term,) = strategy.configure(1, 2, seed=0).terms

    # Assert
    assert isinstance(term, RoutingRegulariserTerm)
    assert term.form == "batch"


@pytest.mark.parametrize(
    ("override", "new"),
    [("strategy.prox_mu=0.5", "strategy.fedprox.mu"), ("train.routing_reg=batch", "strategy.fedalign.reg_form")],
)
def test_moved_keys_fail_naming_where_they_are_now(override: str, new: str) -> None:
    old = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{old}: moved to {new}$"):
        load_config(None, ["strategy.name=fedprox", override])


def test_moved_key_in_a_yaml_file_fails_naming_where_it_is_now(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("strategy:\n  name: fedprox\n  prox_mu: 0.1\n")
    with pytest.raises(ConfigError, match=r"^strategy.prox_mu: moved to strategy.fedprox.mu$"):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "where"),
    [("fedprox", "its options are under strategy.fedprox"), ("fedalign_moe", "its options are under strategy.fedalign"),
     ("fedavg", "it takes no options")],
)
def test_strategy_options_on_a_builtin_fail_naming_where_its_options_are(name: str, where: str) -> None:
    message = rf"^strategy.options: only for a strategy named by import path; {name}: {where}$"
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"strategy.name={name}", "strategy.options.mu=0.5"])


def test_bad_builtin_option_fails_naming_the_dotted_field() -> None:
    with pytest.raises(ConfigError, match=r"^strategy.fedprox.mu: "):
        load_config(None, ["strategy.name=fedprox", "strategy.fedprox.mu=-1"])
