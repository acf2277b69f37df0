"""Load multiple-choice data in the MMLU and HellaSwag schemas through ``datasets.load_dataset``.

A hub name (online, or a filled cache) or a local ``.json``/``.jsonl``/``.csv``/
``.parquet`` file in either schema becomes one normalised Dataset: the
context with lm-evaluation-harness' prompt, the options, the index of the
correct one, the schema's partition key (``subject``, ``activity_label``),
and ``text`` (context and correct option) for pretraining a base.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from numbers import Integral
from typing import Any, Literal

from datasets import Dataset, Features, List, Value

from aggregation.errors import ConfigError
from fedsim.data.local import load_source

FORMATS: tuple[str, ...] = ("mmlu", "hellaswag")
KEY_OF_FORMAT = {"mmlu": "subject", "hellaswag": "activity_label"}
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_BRACKETED = re.compile(r"\[.*?\]")


def _preprocess(text: str) -> str:
    """HellaSwag clean-up as lm-evaluation-harness does it (WikiHow ``[title]``/``[step]`` artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    return _BRACKETED.sub("", text).replace("  ", " ")


def _field(row: Mapping[str, Any], name: str, i: int, where: str) -> str:
    """Return a row's string field; a missing (null) value is an error naming row and field."""
    value = row.get(name)
    if value is None:
        raise ConfigError(f"data.source: row {i} of {where}: {name} is missing")
    return str(value)


def _option_list(value: object, i: int, where: str, name: str) -> list[str]:
    """Return a row's options as strings; a string cell holds a JSON (or Python) list: CSV cannot store lists."""
    if isinstance(value, str):
        cell = value
        try:
            value = json.loads(cell)
        except ValueError:
            try:  # pandas' to_csv writes a list as its Python repr
                value = ast.literal_eval(cell)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                pass
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"data.source: row {i} of {where}: {name} must be a list of strings "
            f"(or a JSON list in a string), got {type(value).__name__}"
        )
    if any(v is None for v in value):
        raise ConfigError(f"data.source: row {i} of {where}: {name} has a missing option")
    return [str(v) for v in value]


def _answer_index(value: object, n: int, i: int, where: str, name: str, *, letters: bool) -> int:
    """Return the correct option's index from an int, integral float, digit string or (``letters``) "A".."Z"."""
    at = f"data.source: row {i} of {where}: {name}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{at} is missing")
    index: int | None = None
    if isinstance(value, str):
        text = value.strip().upper()
        if letters and len(text) == 1 and text in _LETTERS:
            index = _LETTERS.index(text)
            if index >= n:
                raise ConfigError(f"{at} {value!r} is not one of A..{_LETTERS[n - 1]}")
            return index
        try:
            index = int(text)
        except ValueError:
            pass
    elif isinstance(value, Integral) and not isinstance(value, bool):
        index = int(value)
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    if index is None:
        kind = f"a letter A..{_LETTERS[n - 1]} or an integer" if letters else "an integer"
        raise ConfigError(f"{at} {value!r} is not {kind}")
    if not 0 <= index < n:
        raise ConfigError(f"{at} {value!r} is not in 0..{n - 1}")
    return index


def _rows(raw: Dataset) -> Iterator[dict[str, Any]]:
    """Yield the rows as plain dicts, read a thousand at a time (row-by-row Arrow access is slow)."""
    for batch in raw.iter(batch_size=1024):
        names = list(batch)
        for values in zip(*(batch[c] for c in names), strict=True):
            yield dict(zip(names, values, strict=True))


def _require(raw: Dataset, names: Sequence[str], where: str, format: str) -> None:
    missing = [c for c in names if c not in raw.column_names]
    if missing:
        raise ConfigError(
            f"data.source: {where} lacks column(s) {missing} of the {format} format; columns are {raw.column_names}"
        )


def _mmlu_row(
    row: Mapping[str, Any], i: int, where: str, letter_columns: Sequence[str], default_subject: str
) -> tuple[str, list[str], str, str]:
    """Return context, options, subject and doc id of an MMLU row (choices from a list or ``A``..``D`` columns)."""
    question = _field(row, "question", i, where)
    if letter_columns:  # a blank cell is a missing option, so short rows cannot hide in a wide CSV
        choices = [_field(row, c, i, where) for c in letter_columns]
        blank = [c for c, text in zip(letter_columns, choices, strict=True) if not text.strip()]
        if blank:
            raise ConfigError(f"data.source: row {i} of {where}: {blank[0]} is missing")
    else:
        choices = _option_list(row.get("choices"), i, where, "choices")
    if len(choices) > len(_LETTERS):
        raise ConfigError(f"data.source: row {i} of {where}: choices has {len(choices)} options, at most 26 letters")
    lines = [question.strip()] + [f"{_LETTERS[k]}. {c}" for k, c in enumerate(choices)]
    subject = _field(row, "subject", i, where) if "subject" in row else default_subject
    return "\n".join(lines) + "\nAnswer:", [" " + _LETTERS[k] for k in range(len(choices))], subject, str(i)


def _hellaswag_row(row: Mapping[str, Any], i: int, where: str, split_ctx: bool) -> tuple[str, list[str], str, str]:
    """Return context, options, activity label and doc id of a HellaSwag row, cleaned as the harness does."""
    if split_ctx:
        ctx = _field(row, "ctx_a", i, where) + " " + _field(row, "ctx_b", i, where).capitalize()
    else:
        ctx = _field(row, "ctx", i, where)
    activity = _field(row, "activity_label", i, where)
    endings = _option_list(row.get("endings"), i, where, "endings")
    # rows cut from one video share its source_id: they stay on one side of the document split
    key = "source_id" if row.get("source_id") is not None else "ind"
    doc_id = str(row[key]) if row.get(key) is not None else str(i)
    return _preprocess(activity + ": " + ctx), [" " + _preprocess(e) for e in endings], activity, doc_id


def load_choice_dataset(
    source: str,
    *,
    format: Literal["mmlu", "hellaswag"],
    split: str = "train",
    hub_config: str | None = None,
) -> Dataset:
    """Load a multiple-choice dataset into normalised, prompted columns.

    Parameters
    ----------
    source : str
        Path of a ``.json``, ``.jsonl``, ``.csv`` (with a header row) or
        ``.parquet`` file (builder chosen by suffix), or a hub dataset name
        such as ``cais/mmlu`` or ``Rowan/hellaswag`` (needs network, or a
        filled ``datasets`` cache).
    format : {"mmlu", "hellaswag"}
        The schema. ``mmlu``: ``question``, ``choices`` (a list, or a JSON list
        in a string) or the Hendrycks columns ``A``, ``B``, ... , ``answer``
        (an index, a ClassLabel, a letter or a digit string), ``subject``
        (optional: the file stem). ``hellaswag``: ``ctx_a`` and ``ctx_b`` (or
        ``ctx``), ``activity_label``, ``endings`` (a list, or a JSON list in a
        string), ``label`` (an index or a digit string), ``ind`` (optional).
    split : str
        Split to load; a local file is loaded as this split.
    hub_config : str, optional
        The hub dataset's configuration (``"all"``, ``"anatomy"``, ...).

    Returns
    -------
    datasets.Dataset
        ``context`` (str): the prompt up to the option, as lm-evaluation-harness
        builds it (MMLU: question, lettered choices, ``"Answer:"``; HellaSwag:
        ``"{activity_label}: {ctx}"`` cleaned of WikiHow artifacts);
        ``options`` (list of N str, each starting with a space: MMLU's letters
        ``" A"``..., HellaSwag's cleaned endings); ``label`` (int64 in
        ``[0, N)``); ``subject`` (MMLU) or ``activity_label`` (HellaSwag), the
        natural partition key; ``text`` (``context + options[label]``, for
        language-model pretraining); ``doc_id`` (str: the row index, or
        HellaSwag's ``source_id``, else its ``ind``: the endings of one video
        stay on one side of the train/test split); ``source`` (str: the file
        stem or hub name).

    Raises
    ------
    ConfigError
        ``data.format`` for an unknown format; ``data.source`` when the file
        is missing, unreadable or lacks a column, or a row has a missing field,
        an answer outside its options, or a number of options that differs
        from row 0's (every row needs the same N >= 2). The message names the
        row and the field.
    """
    if format not in FORMATS:
        raise ConfigError(f"data.format: must be one of {list(FORMATS)}, got {format!r}")
    raw, where, default_source = load_source(source, split, hub_config=hub_config, csv_as_strings=True)
    if len(raw) == 0:
        raise ConfigError(f"data.source: {where} split {split!r} has no rows")
    columns = raw.column_names
    if format == "mmlu":
        letter_columns: list[str] = []
        if "choices" not in columns:
            while len(letter_columns) < len(_LETTERS) and _LETTERS[len(letter_columns)] in columns:
                letter_columns.append(_LETTERS[len(letter_columns)])
        _require(raw, ["question", "answer"] + ([] if letter_columns else ["choices"]), where, format)
        label_name, options_name = "answer", "choices"
    else:
        split_ctx = "ctx_a" in columns and "ctx_b" in columns
        _require(raw, ["activity_label", "endings", "label"] + ([] if split_ctx else ["ctx"]), where, format)
        label_name, options_name = "label", "endings"

    key = KEY_OF_FORMAT[format]
    out: dict[str, list[Any]] = {c: [] for c in ("context", "options", "label", key, "text", "doc_id", "source")}
    n_options = 0
    for i, row in enumerate(_rows(raw)):
        if format == "mmlu":
            context, options, group, doc_id = _mmlu_row(row, i, where, letter_columns, default_source)
        else:
            context, options, group, doc_id = _hellaswag_row(row, i, where, split_ctx)
        if i == 0:
            n_options = len(options)
            if n_options < 2:
                raise ConfigError(
                    f"data.source: row 0 of {where}: {options_name} has {n_options} option(s), "
                    "multiple choice needs at least 2"
                )
        elif len(options) != n_options:
            raise ConfigError(
                f"data.source: row {i} of {where}: {options_name} has {len(options)} options "
                f"but row 0 has {n_options}; every row needs the same number"
            )
        label = _answer_index(row.get(label_name), n_options, i, where, label_name, letters=format == "mmlu")
        for column, value in (
            ("context", context),
            ("options", options),
            ("label", label),
            (key, group),
            ("text", context + options[label]),
            ("doc_id", doc_id),
            ("source", default_source),
        ):
            out[column].append(value)
    features = Features(
        {
            "context": Value("string"),
            "options": List(Value("string")),
            "label": Value("int64"),
            key: Value("string"),
            "text": Value("string"),
            "doc_id": Value("string"),
            "source": Value("string"),
        }
    )
    return Dataset.from_dict(out, features=features)
