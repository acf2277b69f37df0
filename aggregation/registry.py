"""Strategy names → classes: the built-ins by name, a user's own by import path.

``strategy.name: my_pkg.my_module:MyStrategy`` names a class outside fedsim;
it is imported when the config is loaded (so a typo fails before Ray starts)
and again in the aggregator and the workers, which need the module on their
Python path too (``PYTHONPATH`` or a Ray runtime environment).
"""

from __future__ import annotations

import importlib

from aggregation.errors import ConfigError
from aggregation.fedadam import FedAdam
from aggregation.fedalign_moe import FedAlignMoE
from aggregation.fedavg import FedAvg
from aggregation.fedmoe import FedMoE
from aggregation.fedprox import FedProx
from aggregation.options import Options
from aggregation.pfl_moe import PFLMoE
from aggregation.strategy import Strategy

BUILTIN_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedMoE, PFLMoE, FedAlignMoE)
}

_PROTOCOL = ("configure", "begin", "add", "finish", "state_dict", "load_state_dict")


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the ``module:Class`` form of a user's strategy."""
    return ":" in name


def strategy_class(name: str) -> type[Strategy]:
    """The class ``name`` stands for; a one-line ConfigError naming ``strategy.name`` when there is none.

    A user's class must subclass ``aggregation.Strategy`` (whose defaults give
    ``configure``, the state methods and the update checks) with ``add`` and
    ``finish`` implemented, and an ``options_type`` deriving from ``Options``.
    """
    if not is_import_path(name):
        if name not in BUILTIN_STRATEGIES:
            raise ConfigError(f"strategy.name: unknown strategy {name!r}; built-ins are "
                              f"{sorted(BUILTIN_STRATEGIES)}, or give a class as 'package.module:Class'")
        return BUILTIN_STRATEGIES[name]
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"strategy.name: {name!r} is not 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported the same way, in one line
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"strategy.name: cannot import {module_name!r} ({type(exc).__name__}: {reason}); "
                          "is its directory on PYTHONPATH?") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"strategy.name: module {module_name!r} has no {class_name!r}")
    if not isinstance(cls, type) or not issubclass(cls, Strategy):
        raise ConfigError(f"strategy.name: {name} is not a subclass of aggregation.Strategy")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ConfigError(f"strategy.name: {name} does not implement {', '.join(missing)} of the Strategy protocol")
    not_callable = [m for m in _PROTOCOL if not callable(getattr(cls, m, None))]
    if not_callable:
        raise ConfigError(f"strategy.name: {name}.{not_callable[0]} is not a method")
    if not (isinstance(cls.options_type, type) and issubclass(cls.options_type, Options)):
        raise ConfigError(f"strategy.name: {name}.options_type must subclass aggregation.options.Options")
    return cls
