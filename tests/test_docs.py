"""The documentation (README.md and docs/*.md) checked against the repository.

Two checks per file, both fast (no Ray, no runs): every relative link reaches an existing file and, where it
names one, an existing heading; every ``fedsim run`` command in a fenced code block names an existing
``--config`` file and overrides that ``load_config`` accepts.
"""

import re
import shlex
from pathlib import Path

import pytest

from fedsim.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*/README.md"))]
IDS = [str(doc.relative_to(ROOT)) for doc in DOCS]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of a file's headings, a repeated one suffixed -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", doc.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(doc: Path) -> list[str]:
    """Link targets outside code (fenced blocks and inline code) that are not URLs."""
    text = INLINE_CODE.sub("", FENCE.sub("", doc.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def run_commands(doc: Path) -> list[list[str]]:
    """The arguments after ``fedsim run`` (or ``python -m fedsim run``) of each such line in a fenced block.

    A ``PYTHONPATH=dir`` before the command comes first, as given (a user strategy's directory).
    """
    commands = []
    for block in FENCE.findall(doc.read_text()):
        for line in block.replace("\\\n", " ").splitlines()[1:-1]:
            if not re.search(r"\bfedsim run\b", line):
                continue
            tokens = shlex.split(line, comments=True)
            for i in range(len(tokens) - 1):
                if tokens[i].endswith("fedsim") and tokens[i + 1] == "run":
                    commands.append([t for t in tokens[:i] if t.startswith("PYTHONPATH=")] + tokens[i + 2:])
                    break
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_relative_links_reach_a_file_and_heading(doc: Path) -> None:
    broken = []
    for target in relative_links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_run_commands_name_a_config_and_valid_overrides(doc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = []
    for args in run_commands(doc):
        for path in [a.partition("=")[2] for a in args if a.startswith("PYTHONPATH=")]:
            monkeypatch.syspath_prepend(str(ROOT / path))  # the command's user strategy imports, as in the shell
        args = [a for a in args if not a.startswith("PYTHONPATH=")]
        args = [a for a in args if a != "..." and not a.startswith("<")]  # placeholders
        config, overrides, skip_next = None, [], False
        for i, arg in enumerate(args):
            if skip_next:
                skip_next = False
            elif arg in ("--config", "-c"):
                config, skip_next = args[i + 1], True
            elif arg == "--out":
                skip_next = True
            elif "=" in arg:
                overrides.append(arg)
        if any("$" in o for o in overrides):
            continue  # values from the shell
        if config is not None and not (ROOT / config).is_file():
            wrong.append(f"{' '.join(args)}: no config file {config}")
            continue
        try:
            load_config(ROOT / config if config else None, overrides)
        except ConfigError as err:
            wrong.append(f"{' '.join(args)}: {err}")
    assert not wrong, f"{doc.name}: " + "; ".join(wrong)
