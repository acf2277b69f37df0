"""Load a user's text-classification data through ``datasets.load_dataset``.

A local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or, when online, a hub
dataset name becomes a Dataset with the corpus columns (``text``, ``label``,
``doc_id``, ``source``), so everything downstream (split, partition, task)
treats it like the built-in corpus.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from aggregation.errors import ConfigError

BUILDER_OF_SUFFIX: dict[str, str] = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence ``datasets``' progress bars for the duration, then restore them."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def looks_like_path(source: str) -> bool:
    """Tell a file path (known suffix, explicit prefix, or existing file) from a hub name."""
    return (
        Path(source).suffix.lower() in BUILDER_OF_SUFFIX
        or source.startswith(("/", "./", "../", "~"))
        or Path(source).exists()
    )


def _first_line(exc: BaseException) -> str:
    """A library's message cut to its first line: errors reach the user as one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_utf8(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8, naming the first bad byte.

    ``datasets`` would fail deep inside its builder, in a message that hides the cause. One streaming pass,
    constant memory.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            block = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks, decoded with this one
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"data.source: {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                    f"{offset - pending + exc.start}); save it as UTF-8"
                ) from None
            if not block:
                return
            offset += len(block)


def load_source(
    source: str, split: str, *, hub_config: str | None = None, csv_as_strings: bool = False
) -> tuple[Dataset, str, str]:
    """The raw dataset of a hub name or a local file, a name for messages, and the default ``source`` value.

    ``csv_as_strings``: a CSV's cells are all read as text with no NA
    detection, so a cell ``"2"`` or ``"None"`` stays that text (multiple-choice
    options) instead of becoming a number or a missing value.
    """
    if not looks_like_path(source):
        try:
            with _quiet_progress():
                raw = datasets.load_dataset(source, hub_config, split=split)
        except Exception as exc:  # hub, network and builder errors alike
            config = "" if hub_config is None else f" config {hub_config!r}"
            raise ConfigError(
                f"data.source: cannot load hub dataset {source!r}{config} split {split!r} "
                f"(offline, or not a dataset?): {_first_line(exc)}"
            ) from exc
        return raw, f"hub dataset {source!r}", source

    path = Path(source).expanduser()
    if path.is_dir():
        raise ConfigError(f"data.source: {path} is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"data.source: file not found: {path}")
    builder = BUILDER_OF_SUFFIX.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"data.source: unsupported file type {path.suffix!r} for {path}; "
            f"use one of {sorted(BUILDER_OF_SUFFIX)}"
        )
    if builder != "parquet":
        _check_utf8(path)
    try:
        options: dict[str, Any] = {}
        if builder == "csv" and csv_as_strings:
            with path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            options = {"features": Features({name: Value("string") for name in header}), "na_filter": False}
        with _quiet_progress():
            raw = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **options)
    except Exception as exc:
        raise ConfigError(f"data.source: cannot read {path} as {builder}: {_first_line(exc)}") from exc
    return raw, str(path), path.stem


def _encode_labels(
    values: list[object], feature: object, where: str, field: str
) -> tuple[np.ndarray, list[str] | None]:
    """Encode labels as integers, with class names when the labels were strings.

    String labels map to their index in sorted order (so the mapping does not
    depend on row order); integer-valued numbers are kept as they are.
    """
    if isinstance(feature, ClassLabel):
        return np.asarray(values, dtype=np.int64), list(feature.names)
    if any(v is None for v in values):
        raise ConfigError(f"data.label_field: column {field!r} in {where} has missing values")
    if all(isinstance(v, str) for v in values):
        strings = cast(list[str], values)  # every value is a str (checked just above)
        names = sorted(set(strings))
        index = {name: i for i, name in enumerate(names)}
        return np.asarray([index[v] for v in strings], dtype=np.int64), names
    numbers = np.asarray(values)
    if numbers.dtype.kind in "iub":
        return numbers.astype(np.int64), None
    if numbers.dtype.kind == "f" and np.all(numbers == np.round(numbers)):
        return numbers.astype(np.int64), None
    raise ConfigError(
        f"data.label_field: column {field!r} in {where} must hold strings or integers, "
        f"found {numbers.dtype}"
    )


def load_text_dataset(
    source: str,
    *,
    split: str = "train",
    text_field: str = "text",
    label_field: str = "label",
) -> Dataset:
    """Load a labelled text dataset with the corpus columns.

    Parameters
    ----------
    source : str
        Path of a ``.json``, ``.jsonl``, ``.csv`` or ``.parquet`` file (the
        ``datasets`` builder is chosen by suffix), or a hub dataset name
        (needs network, or a filled ``datasets`` cache).
    split : str
        Split to load; a local file is loaded as this split.
    text_field, label_field : str
        Columns holding the text and the label.

    Returns
    -------
    datasets.Dataset
        ``text`` (str); ``label`` (int; a ClassLabel over the sorted names when
        the file's labels are strings); ``doc_id`` (str: the file's ``doc_id``
        column if present, else the row index); ``source`` (str: the file's
        ``source`` column if present, else the file stem or hub name).

    Raises
    ------
    ConfigError
        ``data.source`` when the file is missing, of an unknown type or
        unreadable; ``data.text_field``/``data.label_field`` when a column is
        missing or unusable.
    """
    raw, where, default_source = load_source(source, split)
    for key, column in (("text_field", text_field), ("label_field", label_field)):
        if column not in raw.column_names:
            raise ConfigError(
                f"data.{key}: column {column!r} not found in {where}; "
                f"columns are {raw.column_names}"
            )
    labels, names = _encode_labels(list(raw[label_field]), raw.features[label_field], where, label_field)
    n = len(raw)
    texts = ["" if t is None else str(t) for t in raw[text_field]]
    doc_ids = (
        [str(d) for d in raw["doc_id"]] if "doc_id" in raw.column_names else [str(i) for i in range(n)]
    )
    sources = (
        [str(s) for s in raw["source"]] if "source" in raw.column_names else [default_source] * n
    )
    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=names) if names is not None else Value("int64"),
            "doc_id": Value("string"),
            "source": Value("string"),
        }
    )
    rows = {"text": texts, "label": labels.tolist(), "doc_id": doc_ids, "source": sources}
    return Dataset.from_dict(rows, features=features)
