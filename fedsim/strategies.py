"""The picklable factory the aggregator actor calls to build the configured strategy."""

from __future__ import annotations

from dataclasses import dataclass

from aggregation.payload import PayloadLayout
from aggregation.strategy import Strategy
from fedsim.config import StrategyConfig


@dataclass(frozen=True)
class StrategyFactory:
    """Builds the configured strategy once the payload layout is known (inside the aggregator).

    The class is resolved there, by name: a user's strategy is imported in the
    aggregator's own process.
    """

    config: StrategyConfig

    def __call__(self, layout: PayloadLayout) -> Strategy:
        """A fresh strategy of the configured ``name`` with its validated options over ``layout``."""
        return self.config.strategy_class()(layout, self.config.strategy_options())
