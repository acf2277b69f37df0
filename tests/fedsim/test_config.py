"""Config loading: YAML + dotted overrides, one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregation.errors import ConfigError
from fedsim.config import load_config


def test_load_config_applies_dotted_overrides(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 3\nmodel:\n  family: mixtral\n")
    # Execute
    cfg = load_config(path, ["rounds=5", "strategy.name=fedprox", "data.alpha=1.0", "train.local_steps=null"])
    # Assert
    assert cfg.rounds == 5
    assert cfg.strategy.name == "fedprox"
    assert cfg.data.alpha == 1.0
    assert cfg.train.local_steps is None
    assert cfg.model.family == "mixtral"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("rounds=0", "rounds"),
        ("roundz=3", "roundz"),
        ("strategy.name=fedfoo", "strategy.name"),
        ("data.alpha=-1", "data.alpha"),
        ("model.top_k=9", "model"),
        ("train.lr=abc", "train.lr"),
        ("clients_per_round=50", "clients_per_round"),
        ("workers.aggregator_cpus=0", "workers.aggregator_cpus"),
    ],
)
def test_load_config_rejects_bad_value_naming_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(field) or f" {field}" in message or field in message.split(":")[0]
    assert "\n" not in message


def test_aggregator_cpus_default_to_one_and_may_not_exceed_the_embedded_rays_cpus() -> None:
    # Execute / Assert
    assert load_config(None).workers.aggregator_cpus == 1
    assert load_config(None, ["workers.ray_num_cpus=4", "workers.aggregator_cpus=4"]).workers.aggregator_cpus == 4
    with pytest.raises(ConfigError, match=r"^workers.aggregator_cpus: 3 is more than workers.ray_num_cpus=2$"):
        load_config(None, ["workers.ray_num_cpus=2", "workers.aggregator_cpus=3"])


def test_load_config_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: 3\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(path)


def test_load_config_override_without_equals_rejected() -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["rounds"])


def test_digest_changes_with_section_value() -> None:
    a = load_config(None, ["model.hidden_size=64", "model.num_heads=4"])
    b = load_config(None, ["model.hidden_size=128"])
    assert a.digest("model") != b.digest("model")
    assert a.digest("data") == b.digest("data")


def test_a_bare_yaml_off_is_the_choice_off(tmp_path: Path) -> None:
    # Prepare: YAML 1.1 reads `off` as false
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  routing_stats: off\nstrategy:\n  fedalign:\n    gating: off\n")

    # Execute
    cfg = load_config(path, [])

    # Assert
    assert cfg.train.routing_stats == "off" and cfg.strategy.fedalign.gating == "off"


def test_false_for_a_choice_without_off_still_names_the_field() -> None:
    with pytest.raises(ConfigError, match="train.loss"):
        load_config(None, ["train.loss=false"])


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_max_update_norm_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(ConfigError, match="strategy.max_update_norm"):
        load_config(None, [f"strategy.max_update_norm={value}"])


def test_deadline_policy_needs_a_deadline() -> None:
    with pytest.raises(ConfigError, match="system: .*deadline_s"):
        load_config(None, ["system.policy=deadline"])


def test_a_missing_profiles_file_names_the_field(tmp_path: Path) -> None:
    from fedsim.sim.profiles import build_profiles

    cfg = load_config(None, [f"system.profiles={tmp_path / 'nope.csv'}"])
    with pytest.raises(ConfigError, match="^system.profiles: file not found"):
        build_profiles(cfg.system, 4, seed=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine.group_size=2"], "group_size > 1 needs backend 'deepspeed'"),
        (["engine.backend=deepspeed", "engine.group_size=3"],
         "^engine.group_size: 3 does not divide model.num_experts=8"),
        (["engine.backend=deepspeed", "lora.experts=false"], "^lora.experts: .*needs lora.experts=true"),
        (["engine.backend=deepspeed", "workers.gpus_per_worker=0.5"],
         "^workers.gpus_per_worker: .*whole GPUs per worker"),
        (["engine.backend=deepspeed", "engine.precision=bf16"], "^engine.precision: 'bf16' needs GPUs"),
        (["engine.backend=deepspeed", "engine.zero_stage=3"], "engine.zero_stage"),
        (["engine.backend=megatron"], "engine.backend"),
    ],
)
def test_engine_options_that_cannot_run_are_rejected(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_deepspeed_engine_options_load() -> None:
    cfg = load_config(None, ["engine.backend=deepspeed", "engine.group_size=4", "engine.zero_stage=2"])
    assert (cfg.engine.backend, cfg.engine.group_size, cfg.engine.zero_stage, cfg.engine.precision) == (
        "deepspeed", 4, 2, "auto"
    )


def test_tensorboard_without_its_package_names_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from fedsim.callbacks.tensorboard import require_tensorboard

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.tensorboard: .*fedsim\[tensorboard\]"):
        require_tensorboard()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["system.policy=async", "clients_per_round=4", "system.async_buffer=5"], "^system.async_buffer: 5 exceeds"),
        (["system.policy=async", "clients_per_round=10", "data.num_clients=10"],
         "^system.policy: .*needs clients_per_round < data.num_clients"),
    ],
)
def test_async_options_that_cannot_run_are_rejected(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_gradient_checkpointing_refuses_routing_stats_read_off_training() -> None:
    with pytest.raises(ConfigError, match="^train.gradient_checkpointing: it recomputes the routers"):
        load_config(None, ["train.gradient_checkpointing=true", "train.routing_stats=during"])
    assert load_config(None, ["train.gradient_checkpointing=true"]).train.gradient_checkpointing


def test_migrate_moves_the_keys_an_earlier_release_wrote(tmp_path: Path) -> None:
    # Prepare: a config.yaml as an earlier release dumped it (resume reads it back)
    path = tmp_path / "config.yaml"
    path.write_text("strategy:\n  name: fedprox\n  prox_mu: 0.3\ntrain:\n  routing_reg: batch\n")
    # Execute
    cfg = load_config(path, [], migrate=True)
    # Assert: the values reach their new places; without migrate the old keys are refused
    assert cfg.strategy.fedprox.mu == 0.3 and cfg.strategy.fedalign.reg_form == "batch"
    with pytest.raises(ConfigError, match=r"^strategy.prox_mu: moved to strategy.fedprox.mu$"):
        load_config(path, [])
