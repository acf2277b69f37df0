"""``python -m fedsim.envcheck``: does this Python have fedsim's pinned packages? A job's first step.

A Ray Job runs its entrypoint with the ``python`` on the PATH of the ``ray start``
process, which need not be fedsim's environment. Run before anything imports
torch and friends, this names the first pinned distribution that Python lacks
in one line (exit 2) instead of a traceback from deep inside an import. Only
the standard library is imported here, and ``fedsim/__init__.py`` stays light,
so the check runs on any Python.

A pinned distribution installed at another version only warns: a GPU cluster
legitimately carries its own torch build (``2.11.0+cu128``), and fedsim runs
on a range of transformers versions. Local version labels (``+cu128``) are
ignored in the comparison.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"  # beside the packages: repo or job working_dir
REMEDY = ("start Ray from fedsim's environment (`source .venv/bin/activate`, or `conda activate fedsim`, before "
          "`ray start`), or submit with --pip")
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:==\s*([^\s;#]+))?")


def pins(text: str) -> list[tuple[str, str | None]]:
    """(distribution, pinned version or None) for each requirement line of ``text``; comments and blanks skipped."""
    found = []
    for line in text.splitlines():
        match = _PIN.match(line.split("#", 1)[0])
        if match:
            found.append((match.group(1), match.group(2)))
    return found


def problems(required: Sequence[tuple[str, str | None]]) -> tuple[list[str], list[str]]:
    """The pins this Python lacks (``torch==2.13.0``) and those installed at another public version."""
    missing, other = [], []
    for name, pinned in required:
        spec = f"{name}=={pinned}" if pinned else name
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(spec)
            continue
        if pinned and installed.split("+", 1)[0] != pinned:
            other.append(f"{name} {installed} (pinned {pinned})")
    return missing, other


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 2 with one ``fedsim: error:`` line when a pin is missing; one warning line for other versions."""
    args = sys.argv[1:] if argv is None else list(argv)
    path = Path(args[0]) if args else REQUIREMENTS
    try:
        required = pins(path.read_text())
    except OSError as exc:
        print(f"fedsim: error: cannot read the pinned requirements {path} ({exc.strerror})", file=sys.stderr)
        return 2
    missing, other = problems(required)
    python = sys.executable or "python"
    if missing:
        more = f" and {len(missing) - 1} more of {path.name}" if len(missing) > 1 else ""
        name = missing[0].split("==", 1)[0]
        print(f"fedsim: error: the cluster's Python ({python}) lacks {name} (fedsim pins {missing[0]}){more}: "
              f"{REMEDY}", file=sys.stderr)
        return 2
    if other:
        print(f"fedsim: warning: the cluster's Python ({python}) has {', '.join(other)}; continuing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
