"""Loading a user's labelled text from local files through ``datasets.load_dataset``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from aggregation.errors import ConfigError
from fedsim.data import load_text_dataset

ROWS = [
    {"body": "the rocket reached orbit", "topic": "space"},
    {"body": "is there a god", "topic": "atheism"},
    {"body": "the probe landed", "topic": "space"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


class TestLoadTextDatasetSuccess:
    @pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
    def test_file_becomes_standard_columns_with_sorted_string_labels(self, tmp_path, suffix):
        # Prepare
        path = _write(tmp_path / f"posts{suffix}", ROWS)

        # Execute
        ds = load_text_dataset(str(path), text_field="body", label_field="topic")

        # Assert: "atheism" < "space", doc ids are row indices, source is the file stem
        assert ds.column_names == ["text", "label", "doc_id", "source"]
        assert list(ds["text"]) == [r["body"] for r in ROWS]
        assert list(ds["label"]) == [1, 0, 1]
        assert ds.features["label"].names == ["atheism", "space"]
        assert list(ds["doc_id"]) == ["0", "1", "2"]
        assert set(ds["source"]) == {"posts"}

    def test_integer_labels_stay_and_doc_id_and_source_columns_are_kept(self, tmp_path):
        # Prepare
        rows = [
            {"text": "a b", "label": 2, "doc_id": 10, "source": "site1"},
            {"text": "c d", "label": 0, "doc_id": 10, "source": "site2"},
        ]
        path = _write(tmp_path / "data.jsonl", rows)

        # Execute
        ds = load_text_dataset(str(path))

        # Assert
        assert list(ds["label"]) == [2, 0]
        assert list(ds["doc_id"]) == ["10", "10"]
        assert list(ds["source"]) == ["site1", "site2"]

    def test_a_local_file_can_be_loaded_as_any_split_name(self, tmp_path):
        path = _write(tmp_path / "eval.csv", ROWS)
        assert len(load_text_dataset(str(path), split="test", text_field="body", label_field="topic")) == 3


class TestLoadTextDatasetFailure:
    def test_config_error_names_the_path_when_file_is_missing(self, tmp_path):
        missing = tmp_path / "nope.jsonl"
        with pytest.raises(ConfigError) as info:
            load_text_dataset(str(missing))
        assert str(info.value) == f"data.source: file not found: {missing}"

    @pytest.mark.parametrize(
        ("field", "kwargs"), [("text_field", {"label_field": "topic"}), ("label_field", {"text_field": "body"})]
    )
    def test_config_error_names_column_and_file_when_a_column_is_missing(self, tmp_path, field, kwargs):
        path = _write(tmp_path / "posts.csv", ROWS)
        with pytest.raises(ConfigError, match=rf"data\.{field}: column '(text|label)' not found in {path}"):
            load_text_dataset(str(path), **kwargs)

    def test_config_error_when_suffix_is_unsupported(self, tmp_path):
        path = tmp_path / "posts.txt"
        path.write_text("hello\n")
        with pytest.raises(ConfigError, match="unsupported file type '.txt'"):
            load_text_dataset(str(path))

    def test_config_error_when_labels_are_fractional(self, tmp_path):
        path = _write(tmp_path / "x.csv", [{"text": "a", "label": 0.5}, {"text": "b", "label": 1.0}])
        with pytest.raises(ConfigError, match="data.label_field"):
            load_text_dataset(str(path))
