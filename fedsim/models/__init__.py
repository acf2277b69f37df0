"""MoE models: families, LoRA, the payload layout and routing statistics."""

from fedsim.models.layout import build_layout, read_payload, write_payload
from fedsim.models.lora import apply_lora
from fedsim.models.registry import FAMILIES, FamilySpec, build_model, family_of, family_spec, load_pretrained, save_base
from fedsim.models.routing_hooks import RoutingRecorder

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "RoutingRecorder",
    "apply_lora",
    "build_layout",
    "build_model",
    "family_of",
    "family_spec",
    "load_pretrained",
    "read_payload",
    "save_base",
    "write_payload",
]
