"""Scoring an example's candidates, in plain torch: label words, or options by log-likelihood.

A classification example's candidates are the label words: its scores are
the next-token logits of those words alone at the end of the prompt (a
verbaliser), so a likelier word outside the label set cannot win.

A multiple-choice example's candidates are its own options.
An option's score is the log-likelihood of its tokens after the context,
log p(o | c) = Σ_t log p(o_t | c, o_<t), summed (MMLU's letter answers, one
token each) or divided by the option's token count (HellaSwag's endings differ
in length, and a sum favours the short ones). The answer is the argmax over
options; training minimises the cross-entropy of the correct option against
the others (``label_words``), or the negative log-likelihood of its tokens
alone (``vocab``, plain language-model fine-tuning on the answer).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

OptionScore = Literal["sum", "mean"]


def label_word_scores(logits: torch.Tensor, label_token_ids: torch.Tensor) -> torch.Tensor:
    """Scores [B, C] of the C label words from next-token logits [B, V]; the prediction is their argmax."""
    return logits[:, label_token_ids]


def token_log_likelihoods(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-likelihood log p(target) of each scored token: ``logits`` [T, V] predict ``targets`` [T]; float32 [T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def option_scores(
    token_ll: torch.Tensor, rows: torch.Tensor, num_rows: int, num_options: int, score: OptionScore = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B, N] of the options, and their summed log-likelihoods [B, N].

    Parameters
    ----------
    token_ll : Tensor [T]
        Log-likelihood of each option token, from :func:`token_log_likelihoods`.
    rows : Tensor [T] of int64
        The packed row (``b * N + n``) each token belongs to.
    num_rows : int
        B·N; a row with no token scores 0 (``mean``: 0 as well).
    score : {"sum", "mean"}
        Sum over the option's tokens, or their mean.
    """
    summed = token_ll.new_zeros(num_rows).index_add(0, rows, token_ll)
    if score == "sum":
        scores = summed
    else:
        counts = torch.bincount(rows, minlength=num_rows).clamp_min(1)
        scores = summed / counts
    return scores.view(-1, num_options), summed.view(-1, num_options)


def option_loss(
    scores: torch.Tensor, summed: torch.Tensor, lengths: torch.Tensor, label: torch.Tensor,
    objective: Literal["label_words", "vocab"], reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """The training loss of a batch of examples.

    ``label_words``: cross-entropy of the correct option's score against the
    other options' (the options are the verbaliser). ``vocab``: the correct
    option's per-token negative log-likelihood, −summed[label] / lengths[label].
    ``lengths`` [B, N] counts each option's tokens.
    """
    if objective == "label_words":
        return F.cross_entropy(scores, label, reduction=reduction)
    picked = label[:, None]
    per_example = -summed.gather(1, picked).squeeze(1) / lengths.gather(1, picked).squeeze(1).clamp_min(1)
    return per_example.mean() if reduction == "mean" else per_example.sum()
