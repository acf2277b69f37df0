"""The job's first step: a cluster Python without fedsim's pins fails in one line that says what to do."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from fedsim import envcheck

REPO = Path(__file__).resolve().parents[2]


def test_pins_read_names_and_versions_when_lines_carry_extras_and_comments() -> None:
    # Execute
    found = envcheck.pins("# header\n\nray[default]==2.60.0\ntorch==2.13.0  # the CPU build\nrich\n")

    # Assert
    assert found == [("ray", "2.60.0"), ("torch", "2.13.0"), ("rich", None)]


def _check(tmp_path: Path, capsys: pytest.CaptureFixture[str], requirements: str) -> tuple[int, str]:
    """Run the check on a requirements file holding ``requirements``; its exit code and stderr."""
    path = tmp_path / "requirements.txt"
    path.write_text(requirements)
    code = envcheck.main([str(path)])
    return code, capsys.readouterr().err


def test_check_fails_in_one_line_naming_the_first_missing_pin_when_a_distribution_is_absent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare / Execute: one present pin before two absent ones
    code, err = _check(tmp_path, capsys,
                       f"pytest=={metadata.version('pytest')}\nno-such-dist-fedsim==1.0\nnor-this-one==2\n")

    # Assert
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"fedsim: error: the cluster's Python ({sys.executable}) lacks no-such-dist-fedsim "
                          "(fedsim pins no-such-dist-fedsim==1.0) and 1 more of requirements.txt: ")
    assert "ray start" in err and "--pip" in err


def test_check_passes_silently_when_every_pin_is_installed_at_its_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare / Execute
    code, err = _check(tmp_path, capsys,
                       f"pytest=={metadata.version('pytest')}\nPyYAML=={metadata.version('PyYAML')}\n")

    # Assert
    assert code == 0 and err == ""


def test_check_warns_and_passes_when_a_pin_is_installed_at_another_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU cluster's own torch build must not stop a run; the user still sees which versions differ."""
    # Prepare
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pytest==0.0.1\n")

    # Execute
    code = envcheck.main([str(requirements)])

    # Assert
    err = capsys.readouterr().err
    assert code == 0 and len(err.splitlines()) == 1
    assert err.startswith("fedsim: warning: ") and f"pytest {metadata.version('pytest')} (pinned 0.0.1)" in err


def test_check_ignores_the_local_label_when_the_installed_build_carries_one() -> None:
    """The torch here is `2.13.0+cpu`, on a GPU cluster `2.13.0+cu128`: both are the pinned 2.13.0."""
    # Prepare
    installed = metadata.version("torch")
    public = installed.split("+", 1)[0]

    # Execute
    missing, other = envcheck.problems([("torch", public)])

    # Assert
    assert (missing, other) == ([], [])


def test_check_fails_in_one_line_when_the_requirements_file_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = envcheck.main([str(tmp_path / "requirements.txt")])

    # Assert
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedsim: error: cannot read the pinned requirements ")
    assert str(tmp_path / "requirements.txt") in err and len(err.splitlines()) == 1


def test_check_runs_without_site_packages_and_names_torch_when_run_as_the_job_runs_it() -> None:
    """`python -S` sees no installed package, like a bare cluster Python.

    The check and `fedsim/__init__.py` must import only the standard library, or this ends in a traceback.
    """
    # Execute
    done = subprocess.run([sys.executable, "-S", "-m", "fedsim.envcheck"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)

    # Assert: torch is the first line of requirements.txt
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"fedsim: error: the cluster's Python ({sys.executable}) lacks torch "
                                  "(fedsim pins torch==")
