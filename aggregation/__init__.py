"""Federated algorithms and the types that cross the wire; plain numpy/torch, no Ray."""

from aggregation.errors import ClientFailure, ConfigError, DataError, FedsimError, LayoutMismatch
from aggregation.fedadam import FedAdam
from aggregation.fedalign_moe import FedAlignMoE, FedAlignOptions
from aggregation.fedavg import FedAvg
from aggregation.fedmoe import FedMoE
from aggregation.fedprox import FedProx
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.payload import PAYLOAD_DTYPE, EntrySpec, LayoutEntry, PayloadLayout
from aggregation.personal import PersonalExperts
from aggregation.pfl_moe import PFLMoE
from aggregation.routing_stats import RoutingStats
from aggregation.strategy import ArrayReader, RoundResult, Strategy, UpdateReader

__all__ = [
    "PAYLOAD_DTYPE",
    "ArrayReader",
    "ClientFailure",
    "ClientInstructions",
    "ClientUpdate",
    "ConfigError",
    "DataError",
    "EntrySpec",
    "FedAlignMoE",
    "FedAlignOptions",
    "FedAdam",
    "FedAvg",
    "FedMoE",
    "FedProx",
    "FedsimError",
    "LayoutEntry",
    "LayoutMismatch",
    "PayloadLayout",
    "PersonalExperts",
    "PFLMoE",
    "RoundResult",
    "RoutingStats",
    "Strategy",
    "UpdateReader",
]
