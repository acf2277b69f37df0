"""Strategy registry: config name → a picklable factory the aggregator actor calls."""

from __future__ import annotations

from dataclasses import dataclass

from aggregation.fedadam import FedAdam
from aggregation.fedalign_moe import FedAlignMoE, FedAlignOptions
from aggregation.fedavg import FedAvg
from aggregation.fedmoe import FedMoE
from aggregation.fedprox import FedProx
from aggregation.payload import PayloadLayout
from aggregation.pfl_moe import PFLMoE
from aggregation.strategy import Strategy
from fedsim.config import StrategyConfig


@dataclass(frozen=True)
class StrategyFactory:
    """Builds the configured strategy once the payload layout is known (inside the aggregator)."""

    config: StrategyConfig

    def __call__(self, layout: PayloadLayout) -> Strategy:
        """A fresh strategy of the configured ``name`` (FedAvg by default) over ``layout``."""
        if self.config.name == "fedprox":
            return FedProx(layout, mu=self.config.prox_mu)
        if self.config.name == "fedadam":
            return FedAdam(layout, **self.config.fedadam.model_dump())
        if self.config.name == "fedmoe":
            return FedMoE(layout, **self.config.fedmoe.model_dump())
        if self.config.name == "pfl_moe":
            return PFLMoE(layout, **self.config.pfl_moe.model_dump())
        if self.config.name == "fedalign_moe":
            return FedAlignMoE(layout, FedAlignOptions(**self.config.fedalign.model_dump()))
        return FedAvg(layout)
