"""The corpus-trained byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from aggregation.errors import ConfigError
from fedsim.data import LABEL_NAMES, SPECIAL_TOKENS, train_bpe_tokenizer

TEXTS = ["the shuttle reached orbit and the crew returned", "is there a god , asked the atheist"] * 20


class TestTrainBpeTokenizerSuccess:
    def test_label_words_after_a_space_are_one_token_each(self, topic_tokenizer):
        ids = [topic_tokenizer.encode(" " + w, add_special_tokens=False) for w in LABEL_NAMES]
        assert all(len(i) == 1 for i in ids)
        assert len({i[0] for i in ids}) == len(LABEL_NAMES)

    def test_special_tokens_come_first_and_vocabulary_is_small(self, topic_tokenizer):
        assert topic_tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
        assert (topic_tokenizer.pad_token, topic_tokenizer.bos_token) == ("<pad>", "<s>")
        assert (topic_tokenizer.eos_token, topic_tokenizer.unk_token) == ("</s>", "<unk>")
        assert len(topic_tokenizer) <= 1024 + len(LABEL_NAMES)

    def test_rare_label_word_is_added_and_encoding_is_lossless(self):
        # Execute: "zyzzyva" never occurs in the training text
        tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300, label_words=["zyzzyva", "orbit"])

        # Assert
        assert len(tokenizer.encode(" zyzzyva", add_special_tokens=False)) == 1
        text = "the crew saw a zyzzyva in orbit\nTopic: zyzzyva"
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text

    def test_save_pretrained_and_from_pretrained_round_trip(self, topic_tokenizer, tmp_path):
        # Execute
        topic_tokenizer.save_pretrained(tmp_path)
        loaded = [PreTrainedTokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)]

        # Assert
        text = "the space shuttle crew , a movie about atheism\nTopic: wikipedia"
        want = topic_tokenizer.encode(text, add_special_tokens=False)
        for tokenizer in loaded:
            assert tokenizer.encode(text, add_special_tokens=False) == want
            assert len(tokenizer) == len(topic_tokenizer)
            assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
            assert all(len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1 for w in LABEL_NAMES)


class TestTrainBpeTokenizerFailure:
    def test_config_error_when_vocab_cannot_hold_the_byte_alphabet(self):
        with pytest.raises(ConfigError, match="model.vocab_size"):
            train_bpe_tokenizer(TEXTS, vocab_size=200, label_words=["a"])

    def test_config_error_when_a_label_word_has_a_space(self):
        with pytest.raises(ConfigError, match="data.label_names"):
            train_bpe_tokenizer(TEXTS, vocab_size=300, label_words=["outer space"])
