"""What `fedsim run` prints, seen as a user sees it.

A subprocess on its own embedded Ray, a fresh cache (so the base is built, and transformers' save_pretrained
imports deepspeed), workers that Ray may restart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
NOISE = {
    "core_worker.cc": "Ray's error line about constructor arguments in the object store",
    "Setting accelerator": "DeepSpeed's accelerator warning",
    "Token authentication": "Ray's token authentication warning",
    "Started a local Ray instance": "Ray's start banner",
    "(ClientWorker pid=": "a worker's output forwarded by Ray",
}


def _fedsim_run(tmp_path: Path, *overrides: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FEDSIM_DEBUG"}
    command = [sys.executable, "-m", "fedsim", "run", *(["--debug"] if debug else []), "--out", str(tmp_path / "run"),
               *TINY, f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=420)


def test_run_console_holds_fedsim_lines_only_and_one_line_per_round(ray_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With another Ray running on this machine (this test process's): the run starts its own, never attaches."""
    # Execute: round 1 is not evaluated (eval.every=2), round 2 is; workers.max_restarts is 2 by default
    done = _fedsim_run(tmp_path, "eval.every=2")
    # Assert
    console = done.stdout + done.stderr
    assert done.returncode == 0, console
    for text, what in NOISE.items():
        assert text not in console, f"{what} reached the console:\n{console}"
    # one line each (rich pads it to the console's width)
    assert re.search(r"round 1/2  train_loss \d+\.\d{3}  test_acc –  \d+\.\d s *$", done.stderr, re.M), done.stderr
    evaluated = re.search(r"round 2/2  train_loss \d+\.\d{3}  test_acc \d\.\d{3}  \d+\.\d s *$", done.stderr, re.M)
    assert evaluated, done.stderr
    assert evaluated.group(0).strip() in (tmp_path / "run" / "run.log").read_text()


def test_run_with_debug_shows_debug_lines_and_library_warnings(tmp_path: Path) -> None:
    # Execute
    done = _fedsim_run(tmp_path, "rounds=1", debug=True)
    # Assert
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"DEBUG +round 1 cohort \[", done.stderr), done.stderr
    assert "Setting accelerator to CPU" in done.stdout + done.stderr  # DeepSpeed's own handler prints to stdout
