"""FedAdam: one and two server steps computed by hand, state round trip, option checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from aggregation import EntrySpec, PayloadLayout
from aggregation.fedadam import FedAdam, FedAdamOptions
from aggregation.messages import ClientUpdate
from aggregation.strategy import ArrayReader


def _layout() -> PayloadLayout:
    return PayloadLayout.build([EntrySpec("w", "shared", None, None, (2,))])


def _reader(cid: int, rnd: int, n: int, delta: list[float]) -> ArrayReader:
    return ArrayReader(ClientUpdate(cid, rnd, n, np.array(delta, dtype=np.float32), ()))


def test_fedadam_first_step_hand_computed() -> None:
    # Prepare: Δ̄ = (1·[1, 0] + 3·[1, -2]) / 4 = [1, -1.5]; β1 = 0.9, β2 = 0.99, τ = 0.001, η = 0.1
    s = FedAdam(_layout(), FedAdamOptions(server_lr=0.1))
    s.begin(np.zeros(2, dtype=np.float32), round_idx=1)
    # Execute
    s.add(_reader(1, 1, 1, [1.0, 0.0]))
    s.add(_reader(2, 1, 3, [1.0, -2.0]))
    out = s.finish().payload
    # Assert: m = 0.1·Δ̄, v = 0.01·Δ̄², θ = 0.1·m/(√v + τ) = 0.1·0.1·Δ̄/(0.1·|Δ̄| + 0.001)
    expected = [0.01 * 1.0 / (0.1 + 0.001), 0.01 * -1.5 / (0.15 + 0.001)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_fedadam_second_step_uses_carried_moments() -> None:
    s = FedAdam(_layout(), FedAdamOptions(server_lr=1.0, beta1=0.5, beta2=0.5, tau=1.0))
    s.begin(np.zeros(2, dtype=np.float32), round_idx=1)
    s.add(_reader(1, 1, 1, [2.0, 0.0]))
    first = s.finish().payload  # m = [1, 0], v = [2, 0] → θ = [1/(√2 + 1), 0]
    s.begin(first, round_idx=2)
    s.add(_reader(1, 2, 1, [2.0, 0.0]))
    second = s.finish().payload  # m = [1.5, 0], v = [3, 0] → θ += 1.5/(√3 + 1)
    assert math.isclose(float(second[0]), 1 / (math.sqrt(2) + 1) + 1.5 / (math.sqrt(3) + 1), rel_tol=1e-6)
    assert second[1] == 0.0


def test_fedadam_state_round_trip_restores_moments() -> None:
    a = FedAdam(_layout(), FedAdamOptions(server_lr=0.1))
    a.begin(np.zeros(2, dtype=np.float32), round_idx=1)
    a.add(_reader(1, 1, 2, [0.5, 0.25]))
    a.finish()
    b = FedAdam(_layout(), FedAdamOptions(server_lr=0.1))
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.begin(np.ones(2, dtype=np.float32), round_idx=2)
        s.add(_reader(1, 2, 2, [0.1, -0.1]))
    np.testing.assert_array_equal(a.finish().payload, b.finish().payload)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"server_lr": 0.0}, "server_lr"), ({"server_lr": 0.1, "beta1": 1.0}, "beta1"),
     ({"server_lr": float("nan")}, "server_lr")],
)
def test_fedadam_rejects_bad_options(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        FedAdamOptions(**kwargs)
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


def test_fedadam_options_are_read_from_its_options() -> None:
    s = FedAdam(_layout(), FedAdamOptions(server_lr=0.5, beta1=0.1, beta2=0.2, tau=0.3))
    assert (s.options.server_lr, s.options.beta1, s.options.beta2, s.options.tau) == (0.5, 0.1, 0.2, 0.3)
    assert FedAdam(_layout()).options == FedAdamOptions()
