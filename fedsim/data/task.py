"""Topic classification posed as next-token prediction for a causal LM.

An example is the prompt (the text, a newline, ``Topic:``) followed by one label token
(``" atheism"``, ``" space"``, ...). A causal LM is fine-tuned with the usual
next-token loss (or only the loss at the label position), and scored by
comparing, at the last prompt position, the logits of the label tokens only:
``pred = argmax(logits[b, label_pos[b], label_token_ids])``. Unlike a
classification head, this keeps the base model's output layer, so the same
LoRA/MoE code trains pretraining and the downstream task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from aggregation.errors import ConfigError, DataError

PROMPT_SUFFIX = "\nTopic:"


class TopicTask:
    """Encodes examples for training and scoring topic classification by an LM.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Must have a pad and an eos token, and encode each ``" " + label_name``
        to exactly one token (see :func:`fedsim.data.tokenizer.train_bpe_tokenizer`).
    label_names : sequence of str
        Label ``i`` is ``label_names[i]``.
    max_length : int
        Length of every encoded row: prompt, label token and right padding.

    Attributes
    ----------
    label_token_ids : torch.Tensor
        int64 [num_labels]: the token id of each label word.
    suffix_ids : list of int
        Token ids of :data:`PROMPT_SUFFIX`, appended after the (truncated) text.

    Raises
    ------
    ConfigError
        When a label word is not a single token, two labels share a token, the
        tokenizer lacks a pad or eos token, or ``max_length`` leaves no room
        for text.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, label_names: Sequence[str], max_length: int
    ) -> None:
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ConfigError("model.tokenizer: needs a pad token and an eos token")
        ids = []
        for name in label_names:
            encoded = tokenizer.encode(" " + name, add_special_tokens=False)
            if len(encoded) != 1:
                raise ConfigError(
                    f"data.label_names: {name!r} encodes to {len(encoded)} tokens after a space; "
                    "the task needs exactly one (train the tokenizer with it as a label word)"
                )
            ids.append(encoded[0])
        if len(set(ids)) != len(ids):
            raise ConfigError(f"data.label_names: two labels share a token: {list(label_names)}")
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.max_length = int(max_length)
        self.suffix_ids: list[int] = tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
        self.max_text_tokens = self.max_length - len(self.suffix_ids) - 1  # 1: the label token
        if self.max_text_tokens < 1:
            raise ConfigError(
                f"data.max_length: {max_length} leaves no room for text after the "
                f"{len(self.suffix_ids)}-token suffix and the label token"
            )
        self.label_token_ids = torch.tensor(ids, dtype=torch.int64)

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def encode(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
        """Encode a batch of examples into fixed-length rows.

        Usable as ``ds.map(task.encode, batched=True, remove_columns=ds.column_names)``.

        Parameters
        ----------
        batch : mapping
            ``text`` (list of str) and ``label`` (list of int in ``[0, num_labels)``).

        Returns
        -------
        dict of numpy.ndarray
            ``input_ids`` int64 [B, max_length]: text (truncated at the end so
            that the suffix always fits), suffix, label token, then pad;
            ``attention_mask`` int64 [B, max_length]: 1 up to and including the
            label token; ``label_pos`` int64 [B]: index of the last prompt token
            (the ``:`` of ``Topic:``), whose next-token logits are scored;
            ``label_token`` int64 [B]: ``input_ids[b, label_pos[b] + 1]``;
            ``label`` int64 [B].
        """
        texts = list(batch["text"])
        labels = np.asarray(batch["label"], dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise DataError(
                f"labels must be in [0, {self.num_labels}), got {labels.min()}..{labels.max()}"
            )
        text_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        size = len(texts)
        input_ids = np.full((size, self.max_length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((size, self.max_length), dtype=np.int64)
        label_pos = np.empty(size, dtype=np.int64)
        label_token = self.label_token_ids.numpy()[labels] if size else np.empty(0, np.int64)
        for b, ids in enumerate(text_ids):
            prompt = list(ids[: self.max_text_tokens]) + self.suffix_ids
            n = len(prompt)
            input_ids[b, :n] = prompt
            input_ids[b, n] = label_token[b]
            attention_mask[b, : n + 1] = 1
            label_pos[b] = n - 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "label_pos": label_pos,
            "label_token": label_token.astype(np.int64),
            "label": labels,
        }

    def encode_for_lm(self, texts: Iterable[str], block_size: int) -> np.ndarray:
        """Cut raw text into token blocks for causal-LM pretraining.

        The texts are tokenized, joined with ``</s>`` after each one, and cut
        into consecutive blocks; the last, incomplete block is dropped.

        Parameters
        ----------
        texts : iterable of str
            Documents or chunks, in order.
        block_size : int
            Tokens per block.

        Returns
        -------
        numpy.ndarray
            int64 [n_blocks, block_size] (``n_blocks`` may be 0).
        """
        if block_size < 1:
            raise ConfigError(f"data.block_size: must be >= 1, got {block_size}")
        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        stream = np.fromiter(
            (t for ids in encoded for t in (*ids, eos)), dtype=np.int64
        )
        n_blocks = stream.size // block_size
        return stream[: n_blocks * block_size].reshape(n_blocks, block_size)
