"""The console: one readable line per round, and library chatter kept out unless debugging."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from fedsim import cli, quiet
from fedsim.console import DEBUG_ENV, RunLogOnly, debug_enabled, round_line, route_to_run_log


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def fedsim_records() -> Iterator[_Records]:
    """What reaches the ``fedsim`` logger's handlers (run.log's handler sits there during a run)."""
    handler = _Records()
    logger = logging.getLogger("fedsim")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def console_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what ``cli._console_logging`` sets up globally: its handler, warnings capture, FEDSIM_DEBUG."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    logger = logging.getLogger("fedsim")
    handlers, level = list(logger.handlers), logger.level
    yield
    for h in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(h)
    logger.setLevel(level)
    logging.captureWarnings(False)
    warnings_logger = logging.getLogger("py.warnings")
    for f in [f for f in warnings_logger.filters if isinstance(f, RunLogOnly)]:
        warnings_logger.removeFilter(f)


def test_round_line_with_evaluation_is_one_short_line() -> None:
    # Prepare
    row = {"train_loss": 0.45123, "test_accuracy": 0.58912, "wall_s": 13.44, "bytes_up": 123456}
    # Execute
    line = round_line(3, 15, row)
    # Assert
    assert line == "round 3/15  train_loss 0.451  test_acc 0.589  13.4 s"


def test_round_line_without_evaluation_shows_a_dash_for_accuracy() -> None:
    # Prepare: the rounds table holds NaN where a round was not evaluated
    row = {"train_loss": 1.6166, "test_accuracy": float("nan"), "wall_s": 7.88}
    # Execute
    line = round_line(1, 2, row)
    # Assert
    assert line == "round 1/2  train_loss 1.617  test_acc –  7.9 s"
    assert round_line(1, 2, {"train_loss": 1.6166, "wall_s": 7.88}) == line  # a row with no accuracy column at all


def test_round_line_of_an_async_run_counts_steps() -> None:
    line = round_line(4, 10, {"train_loss": 0.5, "test_accuracy": 1.0, "wall_s": 0.04}, step=True)
    assert line == "step 4/10  train_loss 0.500  test_acc 1.000  0.0 s"


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_debug_enabled_follows_fedsim_debug(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    # Prepare
    if value is None:
        monkeypatch.delenv(DEBUG_ENV, raising=False)
    else:
        monkeypatch.setenv(DEBUG_ENV, value)
    # Execute / Assert
    assert debug_enabled() is expected


def test_a_routed_library_logger_writes_to_run_log_only(fedsim_records: _Records) -> None:
    # Prepare: a library logger like DeepSpeed's: its own stdout handler, no propagation
    lib = logging.getLogger("fedsim-test-library")
    own = io.StringIO()
    lib.addHandler(logging.StreamHandler(own))
    lib.propagate = False
    route_to_run_log(lib)
    route_to_run_log(lib)
    # Execute
    lib.warning("Setting accelerator to CPU.")
    # Assert
    assert own.getvalue() == ""
    assert [r.getMessage() for r in fedsim_records.records] == ["Setting accelerator to CPU."]
    assert fedsim_records.records[0].file_only is True  # type: ignore[attr-defined]
    assert sum(isinstance(f, RunLogOnly) for f in lib.filters) == 1


def test_quiet_libraries_routes_deepspeed_outside_debug_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: fresh logger names, so other tests' calls do not count
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setattr(quiet, "LIBRARY_LOGGERS", ("fedsim-test-quiet",))
    # Execute
    quiet.quiet_libraries()
    monkeypatch.setenv(DEBUG_ENV, "1")
    monkeypatch.setattr(quiet, "LIBRARY_LOGGERS", ("fedsim-test-debug",))
    quiet.quiet_libraries()
    # Assert
    assert any(isinstance(f, RunLogOnly) for f in logging.getLogger("fedsim-test-quiet").filters)
    assert not logging.getLogger("fedsim-test-debug").filters


@pytest.mark.parametrize("command", [["run", "--config", "c.yaml"], ["resume", "runs/x"]])
def test_run_and_resume_take_debug(command: list[str]) -> None:
    assert cli._parser().parse_args([*command, "--debug"]).debug is True
    assert cli._parser().parse_args(command).debug is False


def test_console_shows_debug_lines_only_with_debug(console_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    log = logging.getLogger("fedsim")
    cli._console_logging(debug=False)
    # Execute
    log.info("an info line")
    log.debug("a debug line")
    quiet_err = capsys.readouterr().err
    cli._console_logging(debug=True)
    log.debug("another debug line")
    debug_err = capsys.readouterr().err
    # Assert
    assert "an info line" in quiet_err and "a debug line" not in quiet_err
    assert "another debug line" in debug_err
    assert debug_enabled()  # set for the driver's other switches and the workers Ray starts


def test_console_leaves_file_only_lines_to_run_log(console_logging: None, capsys: pytest.CaptureFixture[str],
                                                   fedsim_records: _Records) -> None:
    # Prepare
    cli._console_logging(debug=False)
    # Execute
    logging.getLogger("py.warnings").warning("a library's UserWarning")
    # Assert
    assert "UserWarning" not in capsys.readouterr().err
    assert [r.getMessage() for r in fedsim_records.records] == ["a library's UserWarning"]
