"""The Strategy base class: default configure, begin/add validation at the boundary, state, ArrayReader."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import Field

from aggregation import (
    ArrayReader,
    ClientInstructions,
    ClientUpdate,
    LayoutMismatch,
    Options,
    RoundResult,
    Strategy,
)


class _Recorder(Strategy):
    """Smallest concrete strategy: records the ids it accepted, returns the global unchanged."""

    name = "recorder"

    def begin(self, global_payload, *, round_idx):
        super().begin(global_payload, round_idx=round_idx)
        self.seen: list[int] = []

    def add(self, reader):
        update = self._checked(reader)
        self.seen.append(update.client_id)

    def finish(self):
        return RoundResult(self._global.copy())


@pytest.fixture
def strategy(layout4):
    return _Recorder(layout4)


def _global() -> np.ndarray:
    return np.zeros(4, dtype=np.float32)


class TestConfigure:
    def test_configure_asks_for_plain_training_when_not_overridden(self, strategy):
        # Execute
        ins = strategy.configure(6, 2, seed=1234)

        # Assert
        expected = ClientInstructions(client_id=6, round_idx=2, seed=1234, terms=(), start=None, residual=None)
        assert ins == expected


class _Opts(Options):
    step: float = Field(1.0, gt=0)


class _WithOptions(_Recorder):
    name = "with_options"
    options_type = _Opts


class TestOptions:
    def test_options_default_to_an_instance_of_options_type_when_not_given(self, strategy, layout4):
        # Execute / Assert
        assert strategy.options == Options()
        assert _WithOptions(layout4).options == _Opts(step=1.0)

    def test_options_are_kept_when_of_the_declared_type(self, layout4):
        # Execute / Assert
        assert _WithOptions(layout4, _Opts(step=2.0)).options.step == 2.0

    def test_constructor_raises_type_error_naming_both_types_when_options_are_of_another_type(self, layout4):
        # Execute / Assert
        with pytest.raises(TypeError, match="_WithOptions takes _Opts, got Options"):
            _WithOptions(layout4, Options())

    def test_reads_no_routing_stats_unless_overridden(self):
        # Execute / Assert
        assert _Recorder.reads_routing_stats(Options()) is False


class TestBegin:
    def test_begin_raises_naming_the_round_when_global_payload_has_wrong_size(self, strategy):
        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^round 4 global payload: has 5 values, layout expects 4$"):
            strategy.begin(np.zeros(5, dtype=np.float32), round_idx=4)

    def test_begin_raises_naming_the_round_when_global_payload_has_wrong_dtype(self, strategy):
        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^round 4 global payload: dtype float64"):
            strategy.begin(np.zeros(4, dtype=np.float64), round_idx=4)


class TestAddValidation:
    def test_add_raises_runtime_error_when_called_before_begin(self, strategy, make_reader):
        # Execute / Assert
        with pytest.raises(RuntimeError, match=r"before begin\(\)"):
            strategy.add(make_reader(1, 1, 1, [0, 0, 0, 0]))

    def test_add_raises_naming_client_and_round_when_delta_has_wrong_length(self, strategy, make_reader):
        # Prepare
        strategy.begin(_global(), round_idx=3)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^client 7 round 3 delta: has 3 values, layout expects 4$"):
            strategy.add(make_reader(7, 3, 10, [1, 2, 3]))

    def test_add_raises_naming_client_when_delta_has_wrong_dtype(self, strategy):
        # Prepare
        strategy.begin(_global(), round_idx=3)
        bad = ClientUpdate(client_id=7, round_idx=3, n_examples=1, delta=np.zeros(4, dtype=np.float16), routing=())

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^client 7 round 3 delta: dtype float16"):
            strategy.add(ArrayReader(bad))

    def test_add_raises_naming_both_rounds_when_update_is_for_another_round(self, strategy, make_reader):
        # Prepare
        strategy.begin(_global(), round_idx=3)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^client 7: update is for round 2, aggregating round 3$"):
            strategy.add(make_reader(7, 2, 10, [0, 0, 0, 0]))

    @pytest.mark.parametrize("n", [0, -1])
    def test_add_raises_naming_client_and_round_when_n_examples_is_not_positive(self, strategy, make_reader, n):
        # Prepare
        strategy.begin(_global(), round_idx=3)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=rf"^client 7 round 3: n_examples={n}, must be > 0$"):
            strategy.add(make_reader(7, 3, n, [0, 0, 0, 0]))

    def test_add_accepts_an_update_when_it_matches_layout_and_round(self, strategy, make_reader):
        # Prepare
        strategy.begin(_global(), round_idx=3)

        # Execute
        strategy.add(make_reader(7, 3, 1, [0, 0, 0, 0]))

        # Assert
        assert strategy.seen == [7]


class TestState:
    def test_state_dict_is_empty_when_strategy_is_stateless(self, strategy):
        # Execute / Assert
        assert strategy.state_dict() == {}

    def test_load_state_dict_accepts_empty_state(self, strategy):
        # Execute / Assert (no raise)
        strategy.load_state_dict({})

    def test_load_state_dict_raises_naming_class_and_keys_when_state_is_not_empty(self, strategy):
        # Execute / Assert
        with pytest.raises(ValueError, match=r"_Recorder keeps no state, got keys \['alpha', 'p_g'\]"):
            strategy.load_state_dict({"p_g": 1, "alpha": 2})


class TestArrayReader:
    def test_read_returns_a_view_of_the_requested_range(self, make_reader):
        # Prepare
        reader = make_reader(1, 1, 1, [10, 11, 12, 13])

        # Execute
        part = reader.read(1, 3)

        # Assert
        np.testing.assert_array_equal(part, [11, 12])
        assert np.shares_memory(part, reader.update.delta)


def test_round_result_defaults_to_empty_report_and_weights():
    # Execute
    r = RoundResult(np.zeros(4, dtype=np.float32))

    # Assert
    assert (r.report, r.client_weights) == ({}, {})
