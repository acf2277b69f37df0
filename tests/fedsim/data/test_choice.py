"""Multiple-choice data: MMLU/HellaSwag loading and prompts, encoding, packing for scoring."""

# ruff: noqa: D102  (a test's name says what it checks)

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel, Features, List, Value

from aggregation.errors import ConfigError, DataError
from fedsim.data.choice import CHOICE_COLUMNS, ChoiceBatch, ChoiceSplit, ChoiceTask
from fedsim.data.choice_sources import load_choice_dataset
from fedsim.data.tokenizer import train_bpe_tokenizer

MMLU_ROWS = [
    {"question": " What is 2 + 2? ", "subject": "arithmetic", "choices": ["3", "4", "5", "6"], "answer": 1},
    {
        "question": "Which planet is red?",
        "subject": "astronomy",
        "choices": ["Venus", "Mars", "None", "NA"],
        "answer": 3,
    },
]
MMLU_CONTEXTS = [
    "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
    "Which planet is red?\nA. Venus\nB. Mars\nC. None\nD. NA\nAnswer:",
]
LETTERS = [" A", " B", " C", " D"]
HELLASWAG_ROWS = [
    {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
        "label": "3",
    },
    {
        "ind": 9001,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a sink [title] Rinse the sink.",
        "ctx_b": "then",
        "endings": ["Scrub it [substeps] well.", "Paint it.", "Leave.", "Sell the  house."],
        "label": "0",
    },
]


def _write(path: Path, rows: list[dict]) -> Path:
    """Write rows as the suffix says; CSV list cells hold JSON, as a user would have to write them."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
        pd.DataFrame(cells).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


class TestLoadMmlu:
    """MMLU files in every supported layout become the harness prompt."""

    @pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
    def test_file_becomes_harness_prompt_and_letter_options(self, tmp_path, suffix):
        # Prepare
        path = _write(tmp_path / f"exam{suffix}", MMLU_ROWS)

        # Execute
        ds = load_choice_dataset(str(path), format="mmlu")

        # Assert: the prompt is lm-evaluation-harness' default MMLU prompt; the answer is a letter
        assert ds.column_names == ["context", "options", "label", "subject", "text", "doc_id", "source"]
        assert list(ds["context"]) == MMLU_CONTEXTS
        assert list(ds["options"]) == [LETTERS, LETTERS]
        assert list(ds["label"]) == [1, 3]
        assert list(ds["subject"]) == ["arithmetic", "astronomy"]
        assert list(ds["text"]) == [MMLU_CONTEXTS[0] + " B", MMLU_CONTEXTS[1] + " D"]
        assert list(ds["doc_id"]) == ["0", "1"]
        assert list(ds["source"]) == ["exam", "exam"]
        assert ds.features["label"] == Value("int64")

    def test_hendrycks_csv_keeps_cells_as_text_and_takes_the_subject_from_the_stem(self, tmp_path):
        # Prepare: numbers and NA-like words must stay as written
        path = tmp_path / "college_physics_test.csv"
        pd.DataFrame(
            [
                {"question": "Pick one", "A": "2", "B": "None", "C": "NA", "D": "1.50", "answer": "C"},
                {"question": "Again", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "A"},
            ]
        ).to_csv(path, index=False)

        # Execute
        ds = load_choice_dataset(str(path), format="mmlu", split="test")

        # Assert
        assert ds[0]["context"] == "Pick one\nA. 2\nB. None\nC. NA\nD. 1.50\nAnswer:"
        assert list(ds["label"]) == [2, 0]
        assert set(ds["subject"]) == {"college_physics_test"}

    @pytest.mark.parametrize("answer", [2, "C", "c", "2", " 2 ", 2.0])
    def test_answer_may_be_an_index_a_letter_or_a_digit_string(self, tmp_path, answer):
        path = _write(tmp_path / "a.json", [{**MMLU_ROWS[0], "answer": answer}])
        assert load_choice_dataset(str(path), format="mmlu")["label"][0] == 2

    def test_class_label_answer_from_parquet_and_from_json(self, tmp_path):
        # Prepare: the hub's cais/mmlu stores the answer as ClassLabel(A..D)
        features = Features(
            {
                "question": Value("string"),
                "subject": Value("string"),
                "choices": List(Value("string")),
                "answer": ClassLabel(names=["A", "B", "C", "D"]),
            }
        )
        data = datasets.Dataset.from_dict({k: [r[k] for r in MMLU_ROWS] for k in features}, features=features)
        data.to_parquet(str(tmp_path / "cl.parquet"))
        data.to_json(str(tmp_path / "cl.jsonl"))

        # Execute
        from_parquet = load_choice_dataset(str(tmp_path / "cl.parquet"), format="mmlu")
        from_json = load_choice_dataset(str(tmp_path / "cl.jsonl"), format="mmlu")

        # Assert
        assert list(from_parquet["label"]) == list(from_json["label"]) == [1, 3]
        assert list(from_parquet["context"]) == MMLU_CONTEXTS

    def test_choices_written_by_pandas_as_a_python_list_also_load(self, tmp_path):
        path = tmp_path / "repr.csv"
        pd.DataFrame(MMLU_ROWS).to_csv(path, index=False)  # cells like "['3', '4', '5', '6']"
        assert list(load_choice_dataset(str(path), format="mmlu")["context"]) == MMLU_CONTEXTS


class TestLoadHellaswag:
    """HellaSwag rows become the harness' cleaned context and endings."""

    @pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
    def test_context_and_endings_are_cleaned_as_the_harness_does(self, tmp_path, suffix):
        # Prepare
        path = _write(tmp_path / f"hs{suffix}", HELLASWAG_ROWS)

        # Execute
        ds = load_choice_dataset(str(path), format="hellaswag", split="validation")

        # Assert: ctx_b capitalised; " [title]" -> ". ", other [..] removed, double spaces collapsed
        assert ds.column_names == ["context", "options", "label", "activity_label", "text", "doc_id", "source"]
        assert list(ds["context"]) == [
            "Roof shingle removal: A man is sitting on a roof. He",
            "Home and Garden: How to clean a sink. Rinse the sink. Then",
        ]
        assert ds[1]["options"] == [" Scrub it well.", " Paint it.", " Leave.", " Sell the house."]
        assert list(ds["label"]) == [3, 0]
        assert ds[0]["text"] == "Roof shingle removal: A man is sitting on a roof. He starts pulling up roofing."
        assert list(ds["activity_label"]) == ["Roof shingle removal", "Home and Garden"]
        assert list(ds["doc_id"]) == ["24", "9001"]
        assert set(ds["source"]) == {"hs"}

    def test_rows_of_one_video_share_their_source_id_as_document(self, tmp_path):
        rows = [{"ind": i, "source_id": f"video~{i // 2}", "activity_label": "x", "ctx": "c", "endings": ["a", "b"],
                 "label": 0} for i in range(4)]
        path = tmp_path / "v.json"
        path.write_text(json.dumps(rows))
        ds = load_choice_dataset(str(path), format="hellaswag")
        assert list(ds["doc_id"]) == ["video~0", "video~0", "video~1", "video~1"]

    def test_ctx_column_is_used_when_ctx_a_and_ctx_b_are_absent_and_doc_id_is_the_row(self, tmp_path):
        rows = [{"activity_label": "Cooking", "ctx": "A cook [step] stirs.", "endings": ["a", "b"], "label": 1}]
        ds = load_choice_dataset(str(_write(tmp_path / "c.json", rows)), format="hellaswag")
        assert ds[0]["context"] == "Cooking: A cook stirs."
        assert ds[0]["options"] == [" a", " b"] and ds[0]["doc_id"] == "0"


class TestLoadFailure:
    """Bad sources and rows are one-line errors naming the field."""

    def test_missing_file_names_the_path(self, tmp_path):
        missing = tmp_path / "nope.jsonl"
        with pytest.raises(ConfigError) as info:
            load_choice_dataset(str(missing), format="mmlu")
        assert str(info.value) == f"data.source: file not found: {missing}"

    def test_missing_column_names_column_and_format(self, tmp_path):
        path = _write(tmp_path / "q.json", [{k: v for k, v in MMLU_ROWS[0].items() if k != "question"}])
        with pytest.raises(ConfigError,
                           match=r"^data\.source: \S*/q\.json lacks column\(s\) \['question'\] of the mmlu"):
            load_choice_dataset(str(path), format="mmlu")

    def test_answer_letter_outside_the_options(self, tmp_path):
        path = _write(tmp_path / "x.json", [MMLU_ROWS[0], {**MMLU_ROWS[1], "answer": "E"}])
        with pytest.raises(ConfigError) as info:
            load_choice_dataset(str(path), format="mmlu")
        assert str(info.value) == f"data.source: row 1 of {path}: answer 'E' is not one of A..D"

    @pytest.mark.parametrize(("answer", "why"), [(4, "4 is not in 0..3"), ("maybe", "'maybe' is not a letter A..D")])
    def test_answer_index_out_of_range_or_unreadable(self, tmp_path, answer, why):
        path = _write(tmp_path / "x.json", [{**MMLU_ROWS[0], "answer": answer}])
        with pytest.raises(ConfigError, match=f"^data.source: row 0 of \\S*/x.json: answer {why}"):
            load_choice_dataset(str(path), format="mmlu")

    def test_rows_with_different_option_counts(self, tmp_path):
        path = _write(tmp_path / "x.jsonl", [MMLU_ROWS[0], {**MMLU_ROWS[1], "choices": ["a", "b", "c"], "answer": 0}])
        with pytest.raises(ConfigError) as info:
            load_choice_dataset(str(path), format="mmlu")
        assert str(info.value) == (
            f"data.source: row 1 of {path}: choices has 3 options but row 0 has 4; every row needs the same number"
        )

    def test_blank_letter_cell_in_a_hendrycks_csv_is_a_missing_option(self, tmp_path):
        path = tmp_path / "h.csv"
        pd.DataFrame([{"question": "q", "A": "a", "B": "b", "C": "c", "D": "", "answer": "A"}]).to_csv(
            path, index=False
        )
        with pytest.raises(ConfigError, match=r"^data\.source: row 0 of \S*/h\.csv: D is missing$"):
            load_choice_dataset(str(path), format="mmlu")

    def test_missing_field_and_unlabelled_row(self, tmp_path):
        no_question = _write(tmp_path / "m.json", [{**MMLU_ROWS[0], "question": None}])
        with pytest.raises(ConfigError, match=r"^data\.source: row 0 of \S*/m\.json: question is missing$"):
            load_choice_dataset(str(no_question), format="mmlu")
        unlabelled = _write(tmp_path / "t.jsonl", [{**HELLASWAG_ROWS[0], "label": ""}])  # the hub's test split
        with pytest.raises(ConfigError, match=r"^data\.source: row 0 of \S*/t\.jsonl: label is missing$"):
            load_choice_dataset(str(unlabelled), format="hellaswag")

    def test_choices_that_are_not_a_list(self, tmp_path):
        path = _write(tmp_path / "s.json", [{**MMLU_ROWS[0], "choices": "3 or 4"}])
        with pytest.raises(ConfigError, match=r"row 0 of \S*/s\.json: choices must be a list of strings"):
            load_choice_dataset(str(path), format="mmlu")

    def test_unknown_format(self, tmp_path):
        with pytest.raises(ConfigError, match=r"^data\.format: must be one of \['mmlu', 'hellaswag'\]"):
            load_choice_dataset(str(tmp_path / "x.json"), format="arc")  # type: ignore[arg-type]

    def test_hub_name_that_cannot_be_loaded_offline_is_one_line_on_data_source(self, monkeypatch):
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ConfigError) as info:
            load_choice_dataset("fedsim-test/no-such-choice-dataset", format="mmlu", hub_config="all")
        message = str(info.value)
        assert message.startswith(
            "data.source: cannot load hub dataset 'fedsim-test/no-such-choice-dataset' config 'all' split 'train'"
        )
        assert "\n" not in message


# --------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tokenizer():
    """Train a tiny byte-level BPE on the prompts used here."""
    texts = list(MMLU_CONTEXTS) + ["A man is sitting on a roof. He starts pulling up roofing."] * 3
    return train_bpe_tokenizer(texts * 5, vocab_size=300, label_words=[])


def _example(context: str, options: list[str], label: int) -> dict[str, list]:
    return {"context": [context], "options": [options], "label": [label]}


class TestChoiceTask:
    """Tokenizing, truncating and padding contexts and options."""

    def test_context_and_options_are_tokenized_apart_and_right_padded(self, tokenizer):
        # Prepare
        task = ChoiceTask(tokenizer, num_options=4, max_context_tokens=64, max_option_tokens=4)

        # Execute
        enc = task.encode(_example(MMLU_CONTEXTS[0], LETTERS, 1))

        # Assert
        want = tokenizer.encode(MMLU_CONTEXTS[0], add_special_tokens=False)
        n = int(enc["context_len"][0])
        assert n == len(want) and enc["context_ids"][0, :n].tolist() == want
        assert (enc["context_ids"][0, n:] == tokenizer.pad_token_id).all()
        assert enc["option_len"].tolist() == [[len(tokenizer.encode(o)) for o in LETTERS]]
        for j, option in enumerate(LETTERS):
            ids = tokenizer.encode(option, add_special_tokens=False)
            assert enc["option_ids"][0, j].tolist() == ids + [tokenizer.pad_token_id] * (4 - len(ids))
        assert enc["label"].tolist() == [1]
        assert {k: v.shape for k, v in enc.items()} == {
            "context_ids": (1, 64),
            "context_len": (1,),
            "option_ids": (1, 4, 4),
            "option_len": (1, 4),
            "label": (1,),
        }

    def test_long_context_keeps_its_end_and_long_options_keep_their_start(self, tokenizer):
        # Prepare
        task = ChoiceTask(tokenizer, num_options=2, max_context_tokens=5, max_option_tokens=2)
        option = " A man is sitting on a roof."

        # Execute
        enc = task.encode(_example(MMLU_CONTEXTS[1], [option, " B"], 0))

        # Assert: left-truncated context ends with "Answer:", right-truncated option starts the option
        full = tokenizer.encode(MMLU_CONTEXTS[1], add_special_tokens=False)
        assert enc["context_len"].tolist() == [5] and enc["context_ids"][0].tolist() == full[-5:]
        assert tokenizer.decode(enc["context_ids"][0]).endswith("Answer:")
        assert enc["option_ids"][0, 0].tolist() == tokenizer.encode(option, add_special_tokens=False)[:2]
        assert enc["option_len"][0].tolist() == [2, len(tokenizer.encode(" B"))]

    def test_datasets_map_save_and_take_round_trip(self, tokenizer, tmp_path):
        # Prepare
        ds = load_choice_dataset(str(_write(tmp_path / "m.json", MMLU_ROWS)), format="mmlu")
        task = ChoiceTask(tokenizer, num_options=4, max_context_tokens=48, max_option_tokens=3)

        # Execute
        ds.map(task.encode, batched=True, remove_columns=ds.column_names).save_to_disk(str(tmp_path / "enc"))
        split = ChoiceSplit.load(str(tmp_path / "enc"))
        batch = split.take(np.array([1, 0]))

        # Assert
        assert len(split) == 2 and len(batch) == 2 and batch.num_options == 4
        assert batch.option_ids.shape == (2, 4, 3) and batch.option_ids.dtype == np.int64
        assert batch.label.tolist() == [3, 1]
        assert batch.context_ids.shape == (2, 48)

    def test_bad_construction(self, tokenizer):
        with pytest.raises(ConfigError, match=r"^model\.tokenizer: "):
            ChoiceTask(SimpleNamespace(pad_token_id=None), num_options=4, max_context_tokens=8, max_option_tokens=2)
        with pytest.raises(ConfigError, match=r"^data\.max_length: "):
            ChoiceTask(tokenizer, num_options=4, max_context_tokens=0, max_option_tokens=2)
        with pytest.raises(ConfigError, match=r"^data\.max_option_length: "):
            ChoiceTask(tokenizer, num_options=4, max_context_tokens=8, max_option_tokens=0)

    def test_bad_examples_are_data_errors(self, tokenizer):
        task = ChoiceTask(tokenizer, num_options=2, max_context_tokens=8, max_option_tokens=2)
        with pytest.raises(DataError, match="option 1 .* encodes to 0 tokens"):
            task.encode({**_example("Q:", [" a", ""], 0), "doc_id": ["7"]})
        with pytest.raises(DataError, match="example 0 has 3 options, the task expects 2"):
            task.encode(_example("Q:", [" a", " b", " c"], 0))
        with pytest.raises(DataError, match=r"labels must be in \[0, 2\)"):
            task.encode(_example("Q:", [" a", " b"], 2))

    def test_split_without_the_columns_is_refused(self):
        with pytest.raises(DataError, match="lacks columns"):
            ChoiceSplit(datasets.Dataset.from_dict({"label": [0]}))


# --------------------------------------------------------------------------- packing

P = 1  # pad id handed to the packers; the batch below is stored with 0 as padding


@pytest.fixture
def batch() -> ChoiceBatch:
    """Two examples, two options each: contexts [5,6,7] and [11]."""
    return ChoiceBatch(
        context_ids=np.array([[5, 6, 7, 0], [11, 0, 0, 0]]),
        context_len=np.array([3, 1]),
        option_ids=np.array([[[8, 0, 0], [9, 10, 0]], [[12, 13, 14], [15, 0, 0]]]),
        option_len=np.array([[1, 2], [3, 1]]),
        label=np.array([1, 0]),
    )


class TestChoiceBatch:
    """Packing a batch into causal-LM and seq2seq rows, against arrays written by hand."""

    def test_decoder_only_rows_are_context_then_option_example_major(self, batch):
        input_ids, attention_mask, target_mask = batch.pack_decoder_only(pad_id=P)
        assert input_ids.tolist() == [
            [5, 6, 7, 8, P],
            [5, 6, 7, 9, 10],
            [11, 12, 13, 14, P],
            [11, 15, P, P, P],
        ]
        assert attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
        assert target_mask.tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 1, 0, 0, 0]]
        assert input_ids.dtype == attention_mask.dtype == target_mask.dtype == np.int64

    def test_encoder_decoder_rows_are_context_once_and_shifted_options(self, batch):
        encoder_ids, encoder_mask, decoder_ids, decoder_targets = batch.pack_encoder_decoder(
            decoder_start_id=2, pad_id=P
        )
        assert encoder_ids.tolist() == [[5, 6, 7], [11, P, P]]
        assert encoder_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
        assert decoder_ids.tolist() == [[2, P, P], [2, 9, P], [2, 12, 13], [2, P, P]]
        assert decoder_targets.tolist() == [[8, -100, -100], [9, 10, -100], [12, 13, 14], [15, -100, -100]]

    def test_rows_selects_examples_and_packing_follows(self, batch):
        picked = batch.rows(np.array([1]))
        assert len(picked) == 1 and picked.label.tolist() == [0]
        input_ids, _, target_mask = picked.pack_decoder_only(pad_id=P)
        assert input_ids.tolist() == [[11, 12, 13, 14], [11, 15, P, P]]
        assert target_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]

    def test_columns_constant_matches_the_fields(self):
        assert CHOICE_COLUMNS == tuple(ChoiceBatch.__dataclass_fields__)

    def test_an_empty_batch_packs_to_empty_rows(self, batch):
        empty = batch.rows(np.array([], dtype=np.int64))
        assert [a.shape for a in empty.pack_decoder_only(pad_id=P)] == [(0, 0)] * 3
        assert [a.shape for a in empty.pack_encoder_decoder(decoder_start_id=2, pad_id=P)] == [(0, 0)] * 4
