"""Named errors shared by every layer of fedsim.

They live on the ground floor (``aggregation/``) so that the actors and the
simulator can raise and catch them without importing upward.
"""

from __future__ import annotations


class FedsimError(Exception):
    """Base class of every error fedsim raises on purpose."""


class ConfigError(FedsimError):
    """A configuration value, key or referenced file is invalid.

    The message is one line that names the field (dotted path) or the file.
    """


class DataError(FedsimError):
    """The data cannot support the requested federation (e.g. too few examples)."""


class RunFailed(FedsimError):
    """The input was fine but a round could not complete; the run directory is marked failed (exit 1, not 2)."""


class LayoutMismatch(FedsimError):
    """An update or a model does not match the payload layout it claims."""


class ClientFailure(FedsimError):
    """Local training of one client failed; names the client and round."""

    def __init__(self, client_id: int, round_idx: int, reason: str) -> None:
        super().__init__(f"client {client_id} round {round_idx}: {reason}")
        self.client_id = client_id
        self.round_idx = round_idx
        self.reason = reason

    def __reduce__(self) -> tuple[type[ClientFailure], tuple[int, int, str]]:
        # Crosses process boundaries (Ray) with its own constructor arguments.
        return (type(self), (self.client_id, self.round_idx, self.reason))
