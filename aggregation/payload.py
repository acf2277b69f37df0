"""The payload layout: every trainable tensor in one flat float32 buffer.

A federated update crosses the wire as one contiguous numpy buffer plus this
layout table, so no algorithm ever parses parameter names: it asks the layout
for the router of layer ℓ or the slice of expert e in layer ℓ. A LoRA tensor
that peft stacks over experts is split here into one entry per expert, and the
entries of one (layer, expert) are adjacent, so an expert's whole update is
one contiguous range of the buffer (one read from the object store).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from aggregation.errors import LayoutMismatch

Role = Literal["router", "expert", "shared"]
ROLES: tuple[Role, ...] = ("shared", "router", "expert")
PAYLOAD_DTYPE = np.float32


@dataclass(frozen=True, slots=True)
class LayoutEntry:
    """One tensor, or one expert's slice of a tensor, inside the flat buffer.

    Attributes
    ----------
    param : str
        Name of the model parameter the values come from.
    role : {"router", "expert", "shared"}
    layer : int or None
        MoE layer index (counted over MoE layers only) for router and expert entries.
    expert : int or None
        Expert index for expert entries.
    shape : tuple of int
        Shape of this entry's values (the slice's shape when ``axis`` is set).
    offset, size : int
        Position and number of elements in the flat buffer.
    axis, start, stop : int or None
        When set, the entry is slice ``start:stop`` along ``axis`` of the parameter's
        *expert view*: the parameter reshaped so that it has one expert axis at ``axis``
        (peft's stacked LoRA A [r·E, in] is viewed as [E, r, in] with axis 0, its B
        [out, r·E], whose expert e owns columns e::E, as [out, r, E] with axis 2).
        Only the model side (``fedsim.models.layout``) reads these three fields.
    """

    param: str
    role: Role
    layer: int | None
    expert: int | None
    shape: tuple[int, ...]
    offset: int
    size: int
    axis: int | None = None
    start: int | None = None
    stop: int | None = None

    @property
    def key(self) -> str:
        """Unique name of the entry: the parameter, plus the expert for a slice."""
        return self.param if self.axis is None else f"{self.param}[expert={self.expert}]"


@dataclass(frozen=True, slots=True)
class EntrySpec:
    """An entry before placement: what to store, not yet where."""

    param: str
    role: Role
    layer: int | None
    expert: int | None
    shape: tuple[int, ...]
    axis: int | None = None
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class PayloadLayout:
    """Ordered entries of the flat buffer: shared, then routers by layer, then experts by (layer, expert)."""

    entries: tuple[LayoutEntry, ...]
    total: int
    _expert_spans: dict[tuple[int, int], tuple[int, int]] = field(repr=False, compare=False, default_factory=dict)
    _router_spans: dict[int, tuple[int, int]] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def build(cls, specs: Iterable[EntrySpec]) -> PayloadLayout:
        """Place the specs in canonical order and compute offsets and contiguous spans."""

        def order(s: EntrySpec) -> tuple[int, int, int]:
            return (ROLES.index(s.role), -1 if s.layer is None else s.layer, -1 if s.expert is None else s.expert)

        specs = sorted(specs, key=order)  # stable: keeps the model's order inside a group
        entries: list[LayoutEntry] = []
        offset = 0
        expert_spans: dict[tuple[int, int], tuple[int, int]] = {}
        router_spans: dict[int, tuple[int, int]] = {}
        for s in specs:
            if s.role in ("router", "expert") and s.layer is None:
                raise LayoutMismatch(f"{s.param}: role {s.role} needs a layer index")
            if s.role == "expert" and s.expert is None:
                raise LayoutMismatch(f"{s.param}: role expert needs an expert index")
            size = int(np.prod(s.shape)) if s.shape else 1
            entries.append(
                LayoutEntry(s.param, s.role, s.layer, s.expert, tuple(s.shape), offset, size, s.axis, s.start, s.stop)
            )
            # s.layer (and an expert's s.expert) are ints here: the checks above raised for None
            if s.role == "expert":
                k = (int(s.layer), int(s.expert))  # type: ignore[arg-type]
                lo, _ = expert_spans.get(k, (offset, offset))
                expert_spans[k] = (lo, offset + size)
            elif s.role == "router":
                lo, _ = router_spans.get(int(s.layer), (offset, offset))  # type: ignore[arg-type]
                router_spans[int(s.layer)] = (lo, offset + size)  # type: ignore[arg-type]
            offset += size
        keys = [e.key for e in entries]
        if len(set(keys)) != len(keys):
            raise LayoutMismatch("payload layout has duplicate entries")
        return cls(tuple(entries), offset, expert_spans, router_spans)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[LayoutEntry]:
        return iter(self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes of one flat payload: ``total`` values of ``PAYLOAD_DTYPE``."""
        return self.total * np.dtype(PAYLOAD_DTYPE).itemsize

    @property
    def num_layers(self) -> int:
        """Number of MoE layers that have a router or expert entry."""
        layers = {k[0] for k in self._expert_spans} | set(self._router_spans)
        return len(layers)

    def select(
        self, role: Role | None = None, layer: int | None = None, expert: int | None = None
    ) -> list[LayoutEntry]:
        """Entries matching every given criterion."""
        return [
            e
            for e in self.entries
            if (role is None or e.role == role)
            and (layer is None or e.layer == layer)
            and (expert is None or e.expert == expert)
        ]

    def expert_keys(self) -> list[tuple[int, int]]:
        """All (layer, expert) pairs with trainable expert parameters, in buffer order."""
        return list(self._expert_spans)

    def expert_span(self, layer: int, expert: int) -> tuple[int, int]:
        """[start, stop) of expert ``expert`` of MoE layer ``layer`` in the flat buffer."""
        return self._expert_spans[(layer, expert)]

    @property
    def expert_block(self) -> tuple[int, int]:
        """[start, stop) holding every expert entry: experts come last in canonical order, so it is one span."""
        if not self._expert_spans:
            return self.total, self.total
        return min(a for a, _ in self._expert_spans.values()), self.total

    def router_layers(self) -> list[int]:
        """MoE layers that have router entries, in buffer order."""
        return list(self._router_spans)

    def router_span(self, layer: int) -> tuple[int, int]:
        """[start, stop) of MoE layer ``layer``'s router entries in the flat buffer."""
        return self._router_spans[layer]

    def class_spans(self) -> dict[str, tuple[int, int]]:
        """[start, stop) per payload class at the finest grain.

        Keys "shared" (one block: shared entries come first), "router/L<l>",
        "expert/L<l>/E<e>": the keys of the communication profile and of the
        per-slice codecs (see ``payload_class``).
        """
        spans: dict[str, tuple[int, int]] = {}
        shared = self.select(role="shared")
        if shared:
            spans["shared"] = (shared[0].offset, shared[-1].offset + shared[-1].size)
        spans.update({f"router/L{layer}": span for layer, span in self._router_spans.items()})
        spans.update({f"expert/L{layer}/E{e}": span for (layer, e), span in self._expert_spans.items()})
        return spans

    def class_bytes(self) -> dict[str, int]:
        """Bytes per ``class_spans`` key; their sum is ``nbytes``."""
        itemsize = np.dtype(PAYLOAD_DTYPE).itemsize
        return {key: (b - a) * itemsize for key, (a, b) in self.class_spans().items()}

    def zeros(self) -> np.ndarray:
        """An all-zero flat payload of this layout: [total] of ``PAYLOAD_DTYPE``."""
        return np.zeros(self.total, dtype=PAYLOAD_DTYPE)

    def check(self, buffer: np.ndarray, *, what: str) -> None:
        """Raise LayoutMismatch naming ``what`` unless ``buffer`` fits this layout."""
        if buffer.ndim != 1:
            raise LayoutMismatch(f"{what}: has shape {buffer.shape}, layout expects a flat buffer of {self.total}")
        if buffer.shape[0] != self.total:
            raise LayoutMismatch(f"{what}: has {buffer.size} values, layout expects {self.total}")
        if buffer.dtype != PAYLOAD_DTYPE:
            raise LayoutMismatch(f"{what}: dtype {buffer.dtype}, layout expects {np.dtype(PAYLOAD_DTYPE)}")


def payload_class(key: str) -> tuple[str, int, int]:
    """``class_bytes`` key (or "routing_stats") → (class, layer, expert), -1 where not applicable."""
    parts = key.split("/")
    layer = int(parts[1][1:]) if len(parts) > 1 else -1
    expert = int(parts[2][1:]) if len(parts) > 2 else -1
    return parts[0], layer, expert
