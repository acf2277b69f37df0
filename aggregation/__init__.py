"""Federated algorithms and the types that cross the wire; plain numpy/torch, no Ray."""

from aggregation.client_terms import ClientTerm, PayloadStart, ProximalTerm, RoutingRegulariserTerm, TermInputs
from aggregation.errors import ClientFailure, ConfigError, DataError, FedsimError, LayoutMismatch
from aggregation.fedadam import FedAdam, FedAdamOptions
from aggregation.fedalign_moe import FedAlignMoE, FedAlignOptions
from aggregation.fedavg import FedAvg
from aggregation.fedmoe import FedMoE, FedMoEOptions
from aggregation.fedprox import FedProx, FedProxOptions
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.options import Options
from aggregation.payload import PAYLOAD_DTYPE, EntrySpec, LayoutEntry, PayloadLayout
from aggregation.personal import PersonalExperts
from aggregation.pfl_moe import PFLMoE, PFLMoEOptions
from aggregation.routing_stats import RoutingStats
from aggregation.strategy import ArrayReader, RoundResult, Strategy, UpdateReader

__all__ = [
    "PAYLOAD_DTYPE",
    "ArrayReader",
    "ClientFailure",
    "ClientInstructions",
    "ClientTerm",
    "ClientUpdate",
    "ConfigError",
    "DataError",
    "EntrySpec",
    "FedAlignMoE",
    "FedAlignOptions",
    "FedAdam",
    "FedAdamOptions",
    "FedAvg",
    "FedMoE",
    "FedMoEOptions",
    "FedProx",
    "FedProxOptions",
    "FedsimError",
    "LayoutEntry",
    "LayoutMismatch",
    "Options",
    "PayloadLayout",
    "PayloadStart",
    "PersonalExperts",
    "PFLMoE",
    "PFLMoEOptions",
    "ProximalTerm",
    "RoundResult",
    "RoutingRegulariserTerm",
    "RoutingStats",
    "Strategy",
    "TermInputs",
    "UpdateReader",
]
