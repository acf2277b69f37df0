"""A small byte-level BPE tokenizer trained on the corpus (for tiny demo models).

A 32k vocabulary would spend most of a tiny model's parameters and compute on
its embedding and output layers; a few thousand tokens trained on the corpus
itself keep them small. Byte-level, so no text is ever out of vocabulary.

The classification task scores the label as the next token after the prompt,
so each label word, preceded by a space (as it follows ``"Topic:"``), must be
exactly one token. Words the BPE did not merge into one token are added as
tokens; an added token is matched in raw text before pre-tokenisation, so
``" space"`` then becomes one token everywhere it occurs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from aggregation.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    label_words: Sequence[str],
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer whose label words are single tokens.

    Parameters
    ----------
    texts : iterable of str
        Training text (e.g. the corpus' ``text`` column).
    vocab_size : int
        Target vocabulary size, special tokens and the 256 byte symbols
        included; added label words may exceed it by ``len(label_words)``.
    label_words : sequence of str
        Words that must encode, after a space, to exactly one token.
    min_frequency : int
        Fewest occurrences of a pair for the trainer to merge it.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        ``pad_token="<pad>"``, ``bos_token="<s>"``, ``eos_token="</s>"``,
        ``unk_token="<unk>"`` (ids 0-3). It adds no special tokens on its own:
        callers place ``</s>`` and ``<pad>`` where they need them.
        ``save_pretrained``/``from_pretrained`` round-trip it.

    Raises
    ------
    ConfigError
        When ``vocab_size`` cannot hold the byte alphabet and special tokens,
        or a label word is empty or contains whitespace.
    """
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= minimum:
        raise ConfigError(f"model.vocab_size: must exceed {minimum} for byte-level BPE, got {vocab_size}")
    for word in label_words:
        if not word or word != word.strip() or any(c.isspace() for c in word):
            raise ConfigError(f"data.label_names: label word {word!r} must be one word without spaces")

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    missing = [w for w in label_words if len(tokenizer.encode(" " + w).ids) != 1]
    tokenizer.add_tokens([AddedToken(" " + w, normalized=False) for w in missing])

    # transformers 5's PreTrainedTokenizerFast (TokenizersBackend) declares an unannotated __init__(*args, **kwargs)
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
    )
    for word in label_words:
        ids = wrapped.encode(" " + word, add_special_tokens=False)
        if len(ids) != 1:  # pragma: no cover - guards a tokenizers behaviour change
            raise ConfigError(f"data.label_names: {word!r} still encodes to {len(ids)} tokens")
    return wrapped
