"""Named errors: one base class, and ClientFailure names its client and round."""

from __future__ import annotations

import pytest

from aggregation import ClientFailure, ConfigError, DataError, FedsimError, LayoutMismatch


@pytest.mark.parametrize("cls", [ConfigError, DataError, LayoutMismatch, ClientFailure])
def test_every_named_error_is_a_fedsim_error(cls):
    # Execute / Assert
    assert issubclass(cls, FedsimError)


def test_client_failure_names_client_and_round_when_raised():
    # Execute
    err = ClientFailure(3, 2, "CUDA out of memory")

    # Assert
    assert str(err) == "client 3 round 2: CUDA out of memory"
    assert (err.client_id, err.round_idx, err.reason) == (3, 2, "CUDA out of memory")
