"""Option log-likelihood scoring on hand-made log-probabilities whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.engine.option_scoring import label_word_scores, option_loss, option_scores, token_log_likelihoods

# One example, two options. Option 0 is one token (p = 0.5); option 1 is two tokens (p = 0.6, then 0.5).
# By sum, option 0 wins (log 0.5 > log 0.3); per token, option 1 wins (log 0.5 < (log 0.6 + log 0.5) / 2).
PROBS = torch.tensor([
    [0.1, 0.1, 0.5, 0.2, 0.1],  # predicts token 2, option 0's only token
    [0.1, 0.1, 0.1, 0.6, 0.1],  # predicts token 3, option 1's first
])
TARGETS = torch.tensor([2, 3, 4])
ROWS = torch.tensor([0, 1, 1])  # token → packed row b·N + n


def test_label_words_compete_only_among_themselves() -> None:
    # Prepare: label words are tokens 4 ("sports") and 7 ("space"); token 2 is likelier than both, but no label
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 1.5, 0.0, 0.0, 0.5], [0.0, 0.0, 9.0, 0.0, -1.0, 0.0, 0.0, 2.0]])
    # Execute
    scores = label_word_scores(logits, torch.tensor([4, 7]))
    # Assert: the first example reads "sports", the second "space"
    assert scores.tolist() == [[1.5, 0.5], [-1.0, 2.0]] and scores.argmax(dim=-1).tolist() == [0, 1]


def _logits_with_second_token(p: float) -> torch.Tensor:
    """The three predicting positions, the last one giving option 1's second token (token 4) probability p."""
    rest = (1 - p) / 4
    last = torch.full((5,), rest)
    last[4] = p
    return torch.log(torch.stack([PROBS[0], PROBS[1], last]))


def test_token_log_likelihoods_read_the_target_of_each_position() -> None:
    ll = token_log_likelihoods(_logits_with_second_token(0.5), TARGETS)
    torch.testing.assert_close(ll, torch.log(torch.tensor([0.5, 0.6, 0.5])))


def test_a_sum_favours_the_short_option_and_a_per_token_mean_the_likelier_tokens() -> None:
    # Prepare
    ll = token_log_likelihoods(_logits_with_second_token(0.5), TARGETS)
    # Execute
    by_sum, summed = option_scores(ll, ROWS, num_rows=2, num_options=2, score="sum")
    by_mean, _ = option_scores(ll, ROWS, num_rows=2, num_options=2, score="mean")
    # Assert: the hand-computed scores, and the answer each rule picks
    torch.testing.assert_close(by_sum, torch.tensor([[math.log(0.5), math.log(0.6 * 0.5)]]))
    torch.testing.assert_close(by_mean, torch.tensor([[math.log(0.5), (math.log(0.6) + math.log(0.5)) / 2]]))
    torch.testing.assert_close(summed, by_sum)
    assert by_sum.argmax(dim=-1).item() == 0 and by_mean.argmax(dim=-1).item() == 1


def test_the_likelier_option_wins_under_both_rules_when_its_tokens_dominate() -> None:
    ll = token_log_likelihoods(_logits_with_second_token(0.99), TARGETS)  # 0.6 · 0.99 > 0.5
    for score in ("sum", "mean"):
        scores, _ = option_scores(ll, ROWS, num_rows=2, num_options=2, score=score)  # type: ignore[arg-type]
        assert scores.argmax(dim=-1).item() == 1


def test_option_loss_is_the_cross_entropy_over_options_or_the_answer_tokens_nll() -> None:
    # Prepare: two examples × two options
    scores = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    summed = torch.tensor([[-1.0, -4.0], [-0.5, -6.0]])
    lengths = torch.tensor([[1, 2], [1, 2]])
    label = torch.tensor([0, 1])
    # Execute
    ce = option_loss(scores, summed, lengths, label, "label_words")
    nll = option_loss(scores, summed, lengths, label, "vocab", reduction="sum")
    # Assert
    expected_ce = (-torch.log_softmax(scores, dim=-1)[[0, 1], [0, 1]]).mean()
    torch.testing.assert_close(ce, expected_ce)
    assert nll.item() == pytest.approx(1.0 / 1 + 6.0 / 2)
