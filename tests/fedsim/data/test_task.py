"""Topic classification as next-token prediction: prompt layout, truncation, LM blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregation.errors import ConfigError, DataError
from fedsim.data import LABEL_NAMES, PROMPT_SUFFIX, TopicTask, train_bpe_tokenizer


@pytest.fixture(scope="module")
def task(topic_tokenizer) -> TopicTask:
    return TopicTask(topic_tokenizer, LABEL_NAMES, max_length=32)


class TestTopicTaskEncode:
    def test_label_pos_is_the_last_prompt_token_and_the_label_token_follows(self, task, topic_tokenizer):
        # Prepare
        text = "the shuttle reached orbit"

        # Execute
        enc = task.encode({"text": [text], "label": [1]})

        # Assert: the row is the tokenization of prompt + " space", then padding
        full = topic_tokenizer.encode(f"{text}{PROMPT_SUFFIX} space", add_special_tokens=False)
        pos = int(enc["label_pos"][0])
        assert enc["input_ids"][0, : pos + 2].tolist() == full
        assert topic_tokenizer.decode(enc["input_ids"][0, : pos + 1]) == text + "\nTopic:"
        assert topic_tokenizer.convert_ids_to_tokens(int(enc["input_ids"][0, pos])) == ":"
        assert enc["input_ids"][0, pos + 1] == enc["label_token"][0] == task.label_token_ids[1]
        assert enc["attention_mask"][0].tolist() == [1] * (pos + 2) + [0] * (32 - pos - 2)
        assert (enc["input_ids"][0, pos + 2 :] == topic_tokenizer.pad_token_id).all()
        assert enc["label"].tolist() == [1]

    def test_long_text_is_truncated_but_the_suffix_and_label_are_kept(self, task, topic_tokenizer):
        # Prepare
        text = " ".join(["astronauts aboard the station"] * 40)

        # Execute
        enc = task.encode({"text": [text, "short"], "label": [4, 0]})

        # Assert: the row is full, ends with suffix + label, and starts with the text's beginning
        pos = int(enc["label_pos"][0])
        assert pos == 32 - 2
        assert enc["attention_mask"][0].all()
        prompt = topic_tokenizer.decode(enc["input_ids"][0, : pos + 1])
        assert prompt.endswith("\nTopic:") and prompt.startswith("astronauts aboard the station")
        assert enc["input_ids"][0, -1] == task.label_token_ids[4]
        assert enc["label_pos"][1] < pos

    def test_shapes_and_dtypes_and_datasets_map(self, task, topic_corpus):
        # Execute
        subset = topic_corpus.select(range(10))
        encoded = subset.map(task.encode, batched=True, remove_columns=subset.column_names)
        arrays = encoded.with_format("numpy")[:]

        # Assert
        assert arrays["input_ids"].shape == arrays["attention_mask"].shape == (10, 32)
        assert arrays["label_pos"].shape == arrays["label_token"].shape == arrays["label"].shape == (10,)
        assert all(arrays[k].dtype == np.int64 for k in arrays)

    def test_argmax_over_label_token_logits_at_label_pos_scores_the_class(self, task):
        # Prepare: logits that put the most mass on the true label token at label_pos
        enc = task.encode({"text": ["a", "b", "c"], "label": [3, 0, 2]})
        logits = torch.zeros(3, 32, 1100)
        rows = torch.arange(3)
        logits[rows, torch.from_numpy(enc["label_pos"]), torch.from_numpy(enc["label_token"])] = 5.0

        # Execute
        scores = logits[rows, torch.from_numpy(enc["label_pos"])][:, task.label_token_ids]

        # Assert
        assert task.label_token_ids.dtype == torch.int64 and task.label_token_ids.shape == (5,)
        assert scores.argmax(1).tolist() == [3, 0, 2]

    def test_data_error_when_a_label_is_out_of_range(self, task):
        with pytest.raises(DataError, match=r"labels must be in \[0, 5\)"):
            task.encode({"text": ["a"], "label": [5]})


class TestTopicTaskConstruction:
    def test_config_error_when_a_label_word_is_several_tokens(self, topic_tokenizer):
        with pytest.raises(ConfigError, match="data.label_names: 'zyzzyvaquux' encodes to"):
            TopicTask(topic_tokenizer, ["space", "zyzzyvaquux"], max_length=32)

    def test_config_error_when_max_length_leaves_no_room_for_text(self, topic_tokenizer):
        with pytest.raises(ConfigError, match="data.max_length"):
            TopicTask(topic_tokenizer, LABEL_NAMES, max_length=4)


class TestEncodeForLm:
    def test_texts_are_joined_with_eos_and_cut_into_full_blocks(self, task, topic_tokenizer):
        # Prepare
        texts = ["the crew", "a movie about space"]
        stream = []
        for t in texts:
            stream += topic_tokenizer.encode(t, add_special_tokens=False) + [topic_tokenizer.eos_token_id]

        # Execute
        blocks = task.encode_for_lm(texts, 3)

        # Assert: the incomplete last block is dropped
        assert blocks.dtype == np.int64
        assert blocks.shape == (len(stream) // 3, 3)
        assert blocks.ravel().tolist() == stream[: blocks.size]
        assert task.encode_for_lm(texts, 10_000).shape == (0, 10_000)

    def test_config_error_when_block_size_is_zero(self, task):
        with pytest.raises(ConfigError, match="data.block_size"):
            task.encode_for_lm(["x"], 0)


def test_tokenizer_without_label_words_is_rejected_by_the_task():
    tokenizer = train_bpe_tokenizer(["spaces are spacious"] * 5, vocab_size=300, label_words=["orbit"])
    with pytest.raises(ConfigError, match="encodes to"):
        TopicTask(tokenizer, ["spaceship"], max_length=16)
