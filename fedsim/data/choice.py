"""Multiple-choice examples encoded for scoring by option log-likelihood.

An example is a context and N options; the model's answer is the option whose
tokens it gives the highest log-likelihood after the context (the
``multiple_choice`` output type of lm-evaluation-harness). Context and
options are encoded into fixed-width token arrays (saved with ``save_to_disk``
like :mod:`fedsim.data.encoded`), and a batch is packed into the rows a causal
LM or a seq2seq model scores; ``fedsim.engine.option_scoring`` sums the
option tokens' log-probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from aggregation.errors import ConfigError, DataError

CHOICE_COLUMNS = ("context_ids", "context_len", "option_ids", "option_len", "label")


class ChoiceTask:
    """Encodes multiple-choice examples into fixed-width context and option tokens.

    Context and options are tokenized separately (no special tokens), so the
    packers can place the context once per example (seq2seq) or before each
    option (causal LM) without re-tokenizing.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Must have a pad token (the padding value of every encoded array).
    num_options : int
        N, the options per example (4 for MMLU and HellaSwag).
    max_context_tokens : int
        Width of ``context_ids``; a longer context keeps its last tokens, since
        its end (``"Answer:"``, the sentence an ending continues) is what the
        options follow.
    max_option_tokens : int
        Width of ``option_ids``; a longer option keeps its first tokens.

    Raises
    ------
    ConfigError
        ``model.tokenizer`` without a pad token; ``data.max_length`` /
        ``data.max_option_length`` below 1; ``data.source`` for N < 2.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        num_options: int,
        max_context_tokens: int,
        max_option_tokens: int,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ConfigError("model.tokenizer: the multiple-choice task needs a pad token")
        if max_context_tokens < 1:
            raise ConfigError(f"data.max_length: must leave >= 1 context token, got {max_context_tokens}")
        if max_option_tokens < 1:
            raise ConfigError(f"data.max_option_length: must be >= 1, got {max_option_tokens}")
        if num_options < 2:
            raise ConfigError(f"data.source: multiple choice needs >= 2 options per example, got {num_options}")
        self.tokenizer = tokenizer
        self.num_options = int(num_options)
        self.max_context_tokens = int(max_context_tokens)
        self.max_option_tokens = int(max_option_tokens)
        self.pad_id = int(tokenizer.pad_token_id)

    def encode(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
        """Encode a batch of normalised examples (see :func:`load_choice_dataset`).

        Usable as ``ds.map(task.encode, batched=True, remove_columns=ds.column_names)``.

        Parameters
        ----------
        batch : mapping
            ``context`` (list of str), ``options`` (list of N str each),
            ``label`` (list of int in ``[0, N)``); ``doc_id``, when present,
            names an example in errors.

        Returns
        -------
        dict of numpy.ndarray
            ``context_ids`` int64 [B, max_context_tokens] and ``context_len``
            int64 [B]; ``option_ids`` int64 [B, N, max_option_tokens] and
            ``option_len`` int64 [B, N]; ``label`` int64 [B]. Token arrays are
            right-padded with the pad id.

        Raises
        ------
        DataError
            When an example has other than N options, a label outside
            ``[0, N)``, or a context or option that encodes to no token.
        """
        n, lc, lo = self.num_options, self.max_context_tokens, self.max_option_tokens
        contexts = [str(c) for c in batch["context"]]
        options = [[str(o) for o in opts] for opts in batch["options"]]
        labels = np.asarray(batch["label"], dtype=np.int64).reshape(-1)
        doc_ids = list(batch["doc_id"]) if "doc_id" in batch else list(range(len(contexts)))
        for b, opts in enumerate(options):
            if len(opts) != n:
                raise DataError(f"data.source: example {doc_ids[b]} has {len(opts)} options, the task expects {n}")
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            raise DataError(f"data.source: labels must be in [0, {n}), got {labels.min()}..{labels.max()}")

        size = len(contexts)
        flat = [o for opts in options for o in opts]
        ctx_tokens = self.tokenizer(contexts, add_special_tokens=False)["input_ids"] if size else []
        opt_tokens = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if size else []
        context_ids = np.full((size, lc), self.pad_id, dtype=np.int64)
        context_len = np.zeros(size, dtype=np.int64)
        option_ids = np.full((size, n, lo), self.pad_id, dtype=np.int64)
        option_len = np.zeros((size, n), dtype=np.int64)
        for b, ids in enumerate(ctx_tokens):
            kept = list(ids)[-lc:]  # left truncation: keep the end the options follow
            if not kept:
                raise DataError(f"data.source: example {doc_ids[b]}: context encodes to 0 tokens")
            context_ids[b, : len(kept)] = kept
            context_len[b] = len(kept)
        for k, ids in enumerate(opt_tokens):
            b, j = divmod(k, n)
            kept = list(ids)[:lo]
            if not kept:
                raise DataError(f"data.source: example {doc_ids[b]}: option {j} ({flat[k]!r}) encodes to 0 tokens")
            option_ids[b, j, : len(kept)] = kept
            option_len[b, j] = len(kept)
        return {
            "context_ids": context_ids,
            "context_len": context_len,
            "option_ids": option_ids,
            "option_len": option_len,
            "label": labels,
        }


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True, slots=True)
class ChoiceBatch:
    """Encoded multiple-choice examples as numpy arrays, and their packing into model rows."""

    context_ids: np.ndarray  # [B, Lc] int64, right-padded
    context_len: np.ndarray  # [B] int64
    option_ids: np.ndarray  # [B, N, Lo] int64, right-padded
    option_len: np.ndarray  # [B, N] int64
    label: np.ndarray  # [B] int64, index of the correct option

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def num_options(self) -> int:
        """N, the options per example."""
        return int(self.option_ids.shape[1])

    def rows(self, idx: np.ndarray) -> ChoiceBatch:
        """Select the examples at ``idx`` (any order)."""
        return ChoiceBatch(*(getattr(self, c)[idx] for c in CHOICE_COLUMNS))

    def pack_decoder_only(self, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows for a causal LM: each option after its context, one row per (example, option).

        Row ``b * N + n`` is example ``b``'s context then its option ``n``. The
        option token at position t is predicted by the logits at t - 1, so the
        scorer shifts ``target_mask`` left by one against the logits; a
        context has at least one token, so every option token has a predictor.

        Parameters
        ----------
        pad_id : int
            Value of the padding positions.

        Returns
        -------
        input_ids, attention_mask, target_mask : numpy.ndarray
            int64 [B*N, W], W = max over rows of context_len + option_len (no
            all-padding column). ``attention_mask`` is 1 on context and option
            tokens; ``target_mask`` is 1 on option tokens only.
        """
        b, n = self.option_len.shape
        ctx_len = np.repeat(self.context_len, n)  # [R], R = B*N
        opt_len = self.option_len.reshape(-1)
        width = int((ctx_len + opt_len).max(initial=0))
        pos = np.arange(width)[None, :]  # [1, W]
        in_ctx = pos < ctx_len[:, None]
        j = pos - ctx_len[:, None]  # position inside the option
        in_opt = (j >= 0) & (j < opt_len[:, None])
        ctx_rows = np.repeat(self.context_ids, n, axis=0)  # [R, Lc]
        opt_rows = self.option_ids.reshape(b * n, self.option_ids.shape[2])  # [R, Lo]
        ctx_vals = ctx_rows[:, np.minimum(pos[0], ctx_rows.shape[1] - 1)]
        opt_vals = np.take_along_axis(opt_rows, np.clip(j, 0, opt_rows.shape[1] - 1), 1)
        input_ids = np.where(in_ctx, ctx_vals, np.where(in_opt, opt_vals, pad_id)).astype(np.int64)
        return input_ids, (in_ctx | in_opt).astype(np.int64), in_opt.astype(np.int64)

    def pack_encoder_decoder(
        self, decoder_start_id: int, pad_id: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows for a seq2seq model: the context encoded once, each option decoded with teacher forcing.

        Parameters
        ----------
        decoder_start_id : int
            The decoder's first input token.
        pad_id : int
            Value of the padding positions of ``encoder_ids`` and ``decoder_ids``.

        Returns
        -------
        encoder_ids, encoder_mask : numpy.ndarray
            int64 [B, Wc], Wc = max context_len: the context, and 1 on its tokens.
        decoder_ids : numpy.ndarray
            int64 [B*N, Wo], Wo = max option_len, row ``b * N + n``:
            ``decoder_start_id`` then option ``n``'s tokens but the last, then pad.
        decoder_targets : numpy.ndarray
            int64 [B*N, Wo]: the option's tokens, -100 (ignored by
            ``cross_entropy``) at padding; aligned with the decoder's logits.
        """
        b, n = self.option_len.shape
        ctx_width = int(self.context_len.max(initial=0))
        encoder_mask = np.arange(ctx_width)[None, :] < self.context_len[:, None]
        encoder_ids = np.where(encoder_mask, self.context_ids[:, :ctx_width], pad_id).astype(np.int64)

        opt_len = self.option_len.reshape(-1)
        opt_width = int(opt_len.max(initial=0))
        opt_rows = self.option_ids.reshape(b * n, self.option_ids.shape[2])[:, :opt_width]
        in_opt = np.arange(opt_width)[None, :] < opt_len[:, None]
        decoder_targets = np.where(in_opt, opt_rows, -100).astype(np.int64)
        shifted = np.full_like(decoder_targets, pad_id)
        shifted[:, 1:] = np.where(in_opt[:, 1:], opt_rows[:, :-1], pad_id)
        if opt_width:
            shifted[:, 0] = decoder_start_id
        return encoder_ids, encoder_mask.astype(np.int64), shifted, decoder_targets


class ChoiceSplit:
    """Read-only view over an encoded multiple-choice split saved with ``save_to_disk``."""

    def __init__(self, ds: datasets.Dataset) -> None:
        missing = [c for c in CHOICE_COLUMNS if c not in ds.column_names]
        if missing:
            raise DataError(f"encoded multiple-choice split lacks columns {missing}")
        self._ds = ds.with_format("numpy", columns=list(CHOICE_COLUMNS))

    @classmethod
    def load(cls, path: str) -> ChoiceSplit:
        """Memory-map a split written by ``Dataset.save_to_disk``."""
        return cls(datasets.load_from_disk(path))

    def __len__(self) -> int:
        return len(self._ds)

    def take(self, rows: np.ndarray) -> ChoiceBatch:
        """Read the given rows (any order) as int64 arrays."""
        got = self._ds[np.asarray(rows, dtype=np.int64)]
        return ChoiceBatch(*(np.asarray(got[c], dtype=np.int64) for c in CHOICE_COLUMNS))
