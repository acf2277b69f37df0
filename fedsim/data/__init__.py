"""The data layer: corpora, document-level splits, federated partitions, tokenizer, task.

Every corpus is a ``datasets.Dataset`` with the columns ``text`` (str),
``label`` (int), ``doc_id`` (str: rows of one document share it) and
``source`` (str: a natural partition key), whichever loader made it.
"""

from fedsim.data.corpora import LABEL_NAMES, load_pretraining_texts, load_topic_corpus
from fedsim.data.local import load_text_dataset
from fedsim.data.partition import SCHEMES, partition, partition_hash
from fedsim.data.split import split_by_document
from fedsim.data.synthetic import make_synthetic_corpus, synthetic_label_names
from fedsim.data.task import PROMPT_SUFFIX, TopicTask
from fedsim.data.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

__all__ = [
    "LABEL_NAMES",
    "PROMPT_SUFFIX",
    "SCHEMES",
    "SPECIAL_TOKENS",
    "TopicTask",
    "load_pretraining_texts",
    "load_text_dataset",
    "load_topic_corpus",
    "make_synthetic_corpus",
    "partition",
    "partition_hash",
    "split_by_document",
    "synthetic_label_names",
    "train_bpe_tokenizer",
]
