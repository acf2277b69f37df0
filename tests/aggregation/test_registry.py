"""Strategy names → classes: the built-ins by name, a user's own by import path, each failure one ConfigError line."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregation import (
    ArrayReader,
    ClientUpdate,
    ConfigError,
    EntrySpec,
    FedAdam,
    FedAlignMoE,
    FedAvg,
    FedMoE,
    FedProx,
    Options,
    PayloadLayout,
    PFLMoE,
    Strategy,
)
from aggregation.registry import BUILTIN_STRATEGIES, is_import_path, strategy_class
from fedsim.config import load_config
from fedsim.strategies import StrategyFactory

LAYOUT = PayloadLayout.build([EntrySpec("w", "shared", None, None, (2,))])

USER_MODULE = '''
from pydantic import Field

from aggregation.fedavg import FedAvg
from aggregation.options import Options
from aggregation.strategy import RoundResult, Strategy


class ScaledOptions(Options):
    scale: float = Field(1.0, gt=0)
    reads_stats: bool = False


class Scaled(FedAvg):
    """FedAvg whose step is multiplied by ``scale``."""

    name = "scaled"
    options_type = ScaledOptions

    @classmethod
    def reads_routing_stats(cls, options):
        return options.reads_stats

    def finish(self):
        result = super().finish()
        step = result.payload - self._global
        return RoundResult(self._global + self.options.scale * step, result.report, result.client_weights)


class NotAStrategy:
    pass


class NoFinish(Strategy):
    name = "no_finish"

    def add(self, reader):
        pass


class BadOptions(FedAvg):
    name = "bad_options"
    options_type = dict


class ConfigureNotAMethod(FedAvg):
    name = "configure_not_a_method"
    configure = 3

not_a_class = 42
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a module, importable from ``tmp_path``, holding good and bad user strategies."""
    name = f"user_strategies_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


class TestBuiltins:
    @pytest.mark.parametrize(
        ("name", "cls"),
        [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedmoe", FedMoE), ("pfl_moe", PFLMoE),
         ("fedalign_moe", FedAlignMoE)],
    )
    def test_every_builtin_name_resolves_to_its_class(self, name, cls):
        # Execute / Assert
        assert strategy_class(name) is cls
        assert cls.name == name
        assert issubclass(cls.options_type, Options)

    def test_the_builtins_are_exactly_the_six_strategies(self):
        # Execute / Assert
        assert sorted(BUILTIN_STRATEGIES) == ["fedadam", "fedalign_moe", "fedavg", "fedmoe", "fedprox", "pfl_moe"]

    def test_unknown_name_names_strategy_name_and_lists_the_builtins(self):
        # Execute / Assert
        with pytest.raises(ConfigError) as err:
            strategy_class("fedfoo")
        message = str(err.value)
        assert message.startswith("strategy.name: unknown strategy 'fedfoo'")
        assert all(repr(name) in message for name in BUILTIN_STRATEGIES)
        assert "'package.module:Class'" in message
        assert "\n" not in message

    @pytest.mark.parametrize(("name", "expected"), [("fedavg", False), ("a.b:C", True), ("a:C", True)])
    def test_an_import_path_is_a_name_with_a_colon(self, name, expected):
        # Execute / Assert
        assert is_import_path(name) is expected


class TestImportPathFailures:
    @pytest.mark.parametrize("name", [":Scaled", "some.module:"])
    def test_a_path_without_module_or_class_is_refused(self, name):
        # Execute / Assert
        with pytest.raises(ConfigError, match=rf"^strategy.name: '{name}' is not 'package.module:Class'$"):
            strategy_class(name)

    def test_a_missing_module_names_it_and_the_python_path(self):
        # Execute / Assert
        with pytest.raises(ConfigError) as err:
            strategy_class("no_such_pkg_for_fedsim.strategies:Mine")
        message = str(err.value)
        assert message.startswith("strategy.name: cannot import 'no_such_pkg_for_fedsim.strategies' "
                                  "(ModuleNotFoundError: No module named 'no_such_pkg_for_fedsim')")
        assert message.endswith("is its directory on PYTHONPATH?")
        assert "\n" not in message

    def test_a_module_that_fails_to_import_is_reported_in_one_line(self, tmp_path, monkeypatch):
        # Prepare: a module whose import raises with a multi-line message
        name = f"broken_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text("raise RuntimeError('first line\\nsecond line')\n")
        monkeypatch.syspath_prepend(str(tmp_path))

        # Execute / Assert
        with pytest.raises(ConfigError) as err:
            strategy_class(f"{name}:Mine")
        assert str(err.value) == (f"strategy.name: cannot import '{name}' (RuntimeError: first line); "
                                  "is its directory on PYTHONPATH?")

    def test_a_missing_attribute_names_module_and_class(self, user_module):
        # Execute / Assert
        with pytest.raises(ConfigError, match=rf"^strategy.name: module '{user_module}' has no 'Missing'$"):
            strategy_class(f"{user_module}:Missing")

    @pytest.mark.parametrize("attr", ["NotAStrategy", "not_a_class", "ScaledOptions"])
    def test_something_other_than_a_strategy_subclass_is_refused(self, user_module, attr):
        # Execute / Assert
        with pytest.raises(ConfigError,
                           match=rf"^strategy.name: {user_module}:{attr} is not a subclass of aggregation.Strategy$"):
            strategy_class(f"{user_module}:{attr}")

    def test_a_non_strategy_class_of_fedsim_itself_is_refused(self):
        # Execute / Assert
        with pytest.raises(ConfigError, match="is not a subclass of aggregation.Strategy"):
            strategy_class("aggregation.options:Options")

    def test_the_abstract_base_names_the_methods_it_lacks(self):
        # Execute / Assert
        with pytest.raises(
            ConfigError,
            match=r"^strategy.name: aggregation.strategy:Strategy does not implement add, finish of the Strategy "
                  r"protocol$",
        ):
            strategy_class("aggregation.strategy:Strategy")

    def test_a_subclass_that_leaves_a_method_abstract_names_it(self, user_module):
        # Execute / Assert
        with pytest.raises(ConfigError, match=rf"^strategy.name: {user_module}:NoFinish does not implement finish "):
            strategy_class(f"{user_module}:NoFinish")

    def test_a_protocol_attribute_that_is_not_a_method_is_named(self, user_module):
        # Execute / Assert
        with pytest.raises(
            ConfigError, match=rf"^strategy.name: {user_module}:ConfigureNotAMethod.configure is not a method$"
        ):
            strategy_class(f"{user_module}:ConfigureNotAMethod")

    def test_options_type_that_is_not_an_options_subclass_is_refused(self, user_module):
        # Execute / Assert
        with pytest.raises(
            ConfigError,
            match=rf"^strategy.name: {user_module}:BadOptions.options_type must subclass aggregation.options.Options$",
        ):
            strategy_class(f"{user_module}:BadOptions")

    def test_load_config_reports_the_same_error_before_anything_starts(self):
        # Execute / Assert
        with pytest.raises(ConfigError, match=r"^strategy.name: cannot import 'no_such_pkg_for_fedsim'"):
            load_config(None, ["strategy.name=no_such_pkg_for_fedsim:Mine"])


class TestUserStrategy:
    def test_a_valid_user_strategy_resolves(self, user_module):
        # Execute
        cls = strategy_class(f"{user_module}:Scaled")

        # Assert
        assert cls.__name__ == "Scaled" and issubclass(cls, Strategy)
        assert cls.options_type.__name__ == "ScaledOptions"

    def test_config_validates_its_options_and_the_factory_builds_it_with_them(self, user_module):
        # Prepare
        cfg = load_config(None, [f"strategy.name={user_module}:Scaled", "strategy.options.scale=0.5"])

        # Execute
        strategy = StrategyFactory(cfg.strategy)(LAYOUT)

        # Assert: the class and its options, and a round that uses them (half of FedAvg's step)
        assert type(strategy).__name__ == "Scaled"
        assert type(strategy.options).__name__ == "ScaledOptions"
        assert strategy.options.scale == 0.5
        assert cfg.strategy.strategy_options() == strategy.options
        strategy.begin(np.zeros(2, dtype=np.float32), round_idx=1)
        strategy.add(ArrayReader(ClientUpdate(1, 1, 1, np.array([2.0, -4.0], dtype=np.float32), ())))
        np.testing.assert_allclose(strategy.finish().payload, [1.0, -2.0])

    def test_options_default_when_none_are_given(self, user_module):
        # Execute
        cfg = load_config(None, [f"strategy.name={user_module}:Scaled"])

        # Assert
        assert StrategyFactory(cfg.strategy)(LAYOUT).options.scale == 1.0

    @pytest.mark.parametrize(
        ("override", "message"),
        [
            ("strategy.options.scale=0", r"^strategy.options.scale: Input should be greater than 0"),
            ("strategy.options.mux=1", r"^strategy.options.mux: unknown key"),
            ("strategy.options.scale=true", r"^strategy.options.scale: .*expected a number, not true/false"),
        ],
    )
    def test_bad_options_fail_naming_the_dotted_field(self, user_module, override, message):
        # Execute / Assert
        with pytest.raises(ConfigError, match=message) as err:
            load_config(None, [f"strategy.name={user_module}:Scaled", override])
        assert "\n" not in str(err.value)

    def test_its_own_reads_routing_stats_decides_whether_routing_stats_may_be_off(self, user_module):
        # Prepare
        name = f"strategy.name={user_module}:Scaled"

        # Execute
        cfg = load_config(None, [name, "train.routing_stats=off"])

        # Assert
        assert not cfg.strategy.needs_routing_stats()
        with pytest.raises(ConfigError, match="train.routing_stats"):
            load_config(None, [name, "strategy.options.reads_stats=true", "train.routing_stats=off"])
