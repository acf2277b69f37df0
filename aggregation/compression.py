"""Lossy codecs for client updates on the wire, with per-slice scales and error feedback.

A client's update is encoded one payload slice at a time (the shared block,
each layer's routers, each expert of each layer: ``PayloadLayout.class_spans``)
so that an expert's scale or its top-k budget is its own. The simulator
applies ``encode`` on the client and hands the server what it would decode:
the strategies see exactly the values a deployment would receive, and the
bytes counted are those of the encoded slice.

Codecs: ``fp16`` and ``bf16`` (2 bytes a value); ``int8`` (1 byte a value and
one float32 scale per slice, symmetric, round to nearest); ``topk`` (the
``fraction`` largest magnitudes of each slice, as float32 values and int32
indices). With error feedback the part a codec dropped is carried by the
client to its next round: x' = x + residual, residual ← x' − decode(encode(x')).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Codec = Literal["none", "fp16", "bf16", "int8", "topk"]
CODECS: tuple[Codec, ...] = ("none", "fp16", "bf16", "int8", "topk")


@dataclass(frozen=True, slots=True)
class Encoded:
    """What the server receives of one update: decoded values, bytes per slice key, the relative error."""

    values: np.ndarray
    nbytes: dict[str, int]
    relative_error: float


def _slice(x: np.ndarray, codec: Codec, fraction: float) -> tuple[np.ndarray, int]:
    """Decoded values and wire bytes of one slice."""
    n = x.size
    if codec == "none":
        return x.copy(), 4 * n
    if codec == "fp16":
        return x.astype(np.float16).astype(np.float32), 2 * n
    if codec == "bf16":
        return torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy(), 2 * n
    if codec == "int8":
        peak = float(np.abs(x).max()) if n else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
        return (q.astype(np.float32) * np.float32(scale)), n + 4
    if codec == "topk":
        k = min(n, max(1, math.ceil(fraction * n))) if n else 0
        out = np.zeros_like(x)
        if k:
            keep = np.argpartition(np.abs(x), n - k)[n - k :]
            out[keep] = x[keep]
        return out, 8 * k
    raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")


def encode(
    values: np.ndarray,
    spans: dict[str, tuple[int, int]],
    codec: Codec,
    *,
    fraction: float = 0.1,
    residual: np.ndarray | None = None,
) -> tuple[Encoded, np.ndarray | None]:
    """Encode ``values`` (+ ``residual``) slice by slice; return what arrives and the new residual.

    ``spans`` maps each slice key to its [start, stop); together they must
    cover ``values``. The new residual is returned when ``residual`` was given
    (error feedback on), else None.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction}")
    x = values.astype(np.float32) if residual is None else values.astype(np.float32) + residual
    decoded = np.empty_like(x)
    nbytes: dict[str, int] = {}
    covered = 0
    for key, (a, b) in spans.items():
        decoded[a:b], nbytes[key] = _slice(x[a:b], codec, fraction)
        covered += b - a
    if covered != x.size:
        raise ValueError(f"slices cover {covered} of {x.size} values")
    norm = float(np.linalg.norm(x))
    error = float(np.linalg.norm(x - decoded)) / norm if norm > 0 else 0.0
    return Encoded(decoded, nbytes, error), (x - decoded if residual is not None else None)
