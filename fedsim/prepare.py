"""Everything a run needs before any actor starts: base model, tokenizer, encoded data, partitions.

Expensive products (a pretrained base, an encoded split) are cached under
``cache_dir`` keyed by a hash of exactly the settings that shape them, written
to a temporary directory first and renamed into place, so a second run reuses
them and an interrupted one never leaves a half-written cache entry behind.
Workers later read the same paths: the base through ``from_pretrained``, the
encoded splits memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from aggregation.errors import ConfigError
from fedsim.config import RunConfig
from fedsim.data import (
    TopicTask,
    load_pretraining_texts,
    load_text_dataset,
    load_topic_corpus,
    make_synthetic_corpus,
    partition,
    partition_hash,
    split_by_document,
    train_bpe_tokenizer,
)
from fedsim.data.choice import ChoiceTask
from fedsim.data.choice_sources import load_choice_dataset
from fedsim.models import build_model, family_spec, save_base
from fedsim.models.pretrain import pretrain_lm

log = logging.getLogger("fedsim")

BASE_RECIPE = 2  # 2: pretrained on whole training documents (load_pretraining_texts)


@dataclass(frozen=True)
class PreparedRun:
    """Paths and partitions a run is built from (all picklable and small).

    ``task`` says how examples are scored: ``label_word`` (one candidate word
    per label, ``label_names`` / ``label_token_ids``) or ``choice`` (each
    example's own options, by log-likelihood; no label words).
    """

    base_path: str
    train_path: str
    test_path: str
    label_names: tuple[str, ...]
    label_token_ids: tuple[int, ...]
    partitions: tuple[np.ndarray, ...]
    partition_hash: str
    n_train: int
    n_test: int
    task: Literal["label_word", "choice"] = "label_word"
    num_options: int = 0  # options per example of a multiple-choice task


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, building it first (into a temp dir renamed into place) if absent."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build(tmp)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_raw(cfg: RunConfig) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """The labelled corpus the config names, with its label names (none for multiple choice)."""
    d = cfg.data
    if d.format != "text":
        return load_choice_dataset(d.source, format=d.format, split=d.split, hub_config=d.hub_config), ()
    if d.source == "gensim_topics":
        ds = load_topic_corpus(min_words=d.min_words, max_words=d.max_words, max_per_class=d.max_per_class)
    elif d.source == "synthetic":
        ds = make_synthetic_corpus(docs_per_label=d.synthetic_docs_per_label, words_per_doc=40, seed=d.split_seed)
    else:
        ds = load_text_dataset(d.source, split=d.split, text_field=d.text_field, label_field=d.label_field)
    names = getattr(ds.features.get("label"), "names", None)
    return ds, tuple(names) if names else tuple(f"label{i}" for i in sorted(set(ds["label"])))


# Data settings that only decide who gets which row, or how an option is scored: they never change the corpus,
# the base or the encoding.
PARTITION_ONLY = {
    "num_clients", "partition", "alpha", "labels_per_client", "min_examples", "partition_key", "option_score"
}


# Settings that only decide how examples are encoded, or how the base is loaded: never the corpus or the base.
ENCODING_ONLY = {"max_length", "max_option_length"}
LOADING_ONLY = {"pretrained", "quantization"}
# Model settings that only describe the run for `fedsim plan` (the real depth of a reduced model): never the base.
PLANNING_ONLY = {"full_depth"}


def _base_key(cfg: RunConfig) -> str:
    """Hash of everything that shapes the corpus, its split and the base built on it."""
    m = {k: v for k, v in cfg.model.model_dump(mode="json").items() if k not in LOADING_ONLY | PLANNING_ONLY}
    if not m["hf_overrides"]:
        del m["hf_overrides"]  # bases cached before the field existed keep their key
    d = {k: v for k, v in cfg.data.model_dump(mode="json").items() if k not in PARTITION_ONLY | ENCODING_ONLY}
    # Bump BASE_RECIPE when what the base is pretrained on changes, so stale caches are not reused.
    return _digest({"model": m, "data": d, "recipe": BASE_RECIPE})


def pretraining_texts(cfg: RunConfig, train: datasets.Dataset, test: datasets.Dataset) -> list[str]:
    """Unlabelled text for the tokenizer and the base: whole training documents, never a test one."""
    if cfg.data.source == "gensim_topics":
        return load_pretraining_texts(exclude_doc_ids=set(test["doc_id"]))
    return list(train["text"])


def prepare_base(cfg: RunConfig, train_texts: list[str], label_names: tuple[str, ...]) -> Path:
    """Directory holding the base model and tokenizer (``save_pretrained`` layout)."""
    if cfg.model.pretrained:
        path = Path(cfg.model.pretrained)
        if not path.exists() and (path.is_absolute() or cfg.model.pretrained.startswith(".")):
            raise ConfigError(f"model.pretrained: directory not found: {path}")
        return path
    m = cfg.model
    key = f"base-{m.family}-{_base_key(cfg)}"

    def build(tmp: Path) -> None:
        log.info("building base %s: tokenizer and %d pretraining steps", key, m.pretrain.steps)
        tokenizer = train_bpe_tokenizer(train_texts, vocab_size=m.pretrain.tokenizer_vocab, label_words=label_names)
        model = build_model(
            m.family,
            vocab_size=len(tokenizer),
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads,
            intermediate_size=m.intermediate_size,
            num_experts=m.num_experts,
            top_k=m.top_k,
            max_position=m.max_position,
            seed=m.pretrain.seed,
            overrides=m.hf_overrides,
        )
        if m.pretrain.steps > 0:
            torch.set_num_threads(os.cpu_count() or 1)
            task = TopicTask(tokenizer, list(label_names), cfg.data.max_length)
            blocks = task.encode_for_lm(train_texts, m.pretrain.block_size)
            pretrain_lm(
                model,
                blocks,
                steps=m.pretrain.steps,
                batch_size=m.pretrain.batch_size,
                lr=m.pretrain.lr,
                warmup_steps=m.pretrain.warmup_steps,
                seed=m.pretrain.seed,
                show_progress=cfg.progress,
            )
        save_base(model, tmp)
        tokenizer.save_pretrained(tmp)

    return _cached(Path(cfg.cache_dir) / key, build)


def _encode(task: TopicTask | ChoiceTask, ds: datasets.Dataset) -> datasets.Dataset:
    return ds.map(task.encode, batched=True, remove_columns=ds.column_names, desc=None)


def label_words(cfg: RunConfig, label_names: tuple[str, ...]) -> tuple[str, ...]:
    """The word each label is scored by, in label order: ``data.label_words[name]`` when set, else the name.

    A mapping by name, not a list by position: the label order depends on the
    source (a hub ClassLabel's order, or sorted names from a local file).
    """
    words = cfg.data.label_words
    if words is None:
        return label_names
    missing = [name for name in label_names if name not in words]
    extra = sorted(set(words) - set(label_names))
    if missing or extra:
        problem = f"no word for label {missing[0]!r}" if missing else f"{extra[0]!r} is not a label"
        raise ConfigError(f"data.label_words: {problem} (labels: {list(label_names)})")
    return tuple(words[name] for name in label_names)


def prepare(cfg: RunConfig) -> PreparedRun:
    """Build or reuse the base and the encoded splits, and partition the training split."""
    family_spec(cfg.model.family)  # an unknown family fails before any data is read
    raw, label_names = load_raw(cfg)
    words = label_words(cfg, label_names)
    train, test = split_by_document(raw, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)
    parts = partition(  # before the base: a partition that cannot be made fails before minutes of pretraining
        train,
        scheme=cfg.data.partition,
        num_clients=cfg.data.num_clients,
        seed=cfg.seed,
        alpha=cfg.data.alpha,
        labels_per_client=cfg.data.labels_per_client,
        label_key=cfg.data.partition_by,
        min_examples=cfg.data.min_examples,
    )
    base = prepare_base(cfg, pretraining_texts(cfg, train, test), words)
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, ImportError) as exc:
        # ImportError: a sentencepiece-only tokenizer without sentencepiece
        raise ConfigError(
            f"model.pretrained: no tokenizer could be loaded from {base}: {str(exc).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token_id is None:  # many decoder-only checkpoints ship none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    task: TopicTask | ChoiceTask
    if cfg.data.format == "text":
        task = TopicTask(tokenizer, list(words), cfg.data.max_length)
    else:
        task = ChoiceTask(tokenizer, num_options=len(raw[0]["options"]), max_context_tokens=cfg.data.max_length,
                          max_option_tokens=cfg.data.max_option_length)
    data_key = _digest({"base": str(base.resolve()), "split": _base_key(cfg), "max_length": cfg.data.max_length,
                        "max_option_length": cfg.data.max_option_length,
                        "fields": [cfg.data.text_field, cfg.data.label_field]})
    data_dir = Path(cfg.cache_dir) / f"data-{data_key}"

    def build(tmp: Path) -> None:
        _encode(task, train).save_to_disk(str(tmp / "train"))
        _encode(task, test).save_to_disk(str(tmp / "test"))

    _cached(data_dir, build)
    return PreparedRun(
        base_path=str(base),
        train_path=str(data_dir / "train"),
        test_path=str(data_dir / "test"),
        label_names=label_names,
        label_token_ids=tuple(int(t) for t in task.label_token_ids.tolist()) if isinstance(task, TopicTask) else (),
        partitions=tuple(parts),
        partition_hash=partition_hash(parts),
        n_train=len(train),
        n_test=len(test),
        task="label_word" if isinstance(task, TopicTask) else "choice",
        num_options=0 if isinstance(task, TopicTask) else task.num_options,
    )

