"""Diversity measures of generated answers (rlhf_exp.diversity): distinct-n and self-BLEU, by hand."""

from __future__ import annotations

import math

import pytest

from rlhf_exp.diversity import bleu, distinct_n, self_bleu


def test_distinct_n_by_hand():
    # unigrams of [1 2 1] + [1 3]: 1,2,1,1,3 -> {1,2,3} = 3 of 5; bigrams: (1,2),(2,1),(1,3) -> 3 of 3
    assert distinct_n([[1, 2, 1], [1, 3]], 1) == pytest.approx(3 / 5)
    assert distinct_n([[1, 2, 1], [1, 3]], 2) == 1.0
    assert distinct_n([[7, 7, 7, 7]], 2) == pytest.approx(1 / 3)  # one bigram, three times
    assert distinct_n([[5]], 2) == 1.0  # no bigram at all


def test_bleu_by_hand():
    # hypothesis 1 2 3 4 against 1 2 3 5: unigrams 3/4; smoothed bigrams (2+1)/(3+1), trigrams (1+1)/(2+1),
    # 4-grams (0+1)/(1+1); same length: no brevity penalty
    expected = (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu([1, 2, 3, 4], [[1, 2, 3, 5]]) == pytest.approx(expected)
    assert bleu([1, 2, 3, 4], [[1, 2, 3, 4]]) == pytest.approx(1.0)
    assert bleu([1, 2], [[3, 4]]) == 0.0  # no unigram in common
    assert bleu([], [[1]]) == 0.0 and bleu([1], []) == 0.0
    # clipped counts: "7 7 7 7" against one 7 matches once
    assert bleu([7, 7, 7, 7], [[7]], max_n=1) == pytest.approx(1 / 4)
    # brevity penalty: a 2-token hypothesis against a 4-token reference holding it
    assert bleu([1, 2], [[1, 2, 3, 4]], max_n=2) == pytest.approx(math.exp(1 - 4 / 2) * 1.0)
    # the closest reference length counts: with a 2-token reference too there is no penalty
    assert bleu([1, 2], [[1, 2, 3, 4], [1, 2]], max_n=2) == pytest.approx(1.0)
    # a 1-token hypothesis has unigrams only: its BLEU is the brevity penalty times its unigram precision
    assert bleu([5], [[5, 6]]) == pytest.approx(math.exp(1 - 2 / 1))
    assert bleu([5, 7], [[5, 6]]) == pytest.approx(math.sqrt(1 / 2 * 1 / 2))  # p1 1/2, smoothed p2 (0+1)/(1+1)


def test_self_bleu_rises_as_samples_grow_alike():
    same = [[[1, 2, 3, 4]] * 4, [[5, 6, 7]] * 4]
    assert self_bleu(same) == pytest.approx(1.0)
    varied = [[[1, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3], [1, 3, 2, 4]]]
    half = [[[1, 2, 3, 4], [1, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3]]]
    assert self_bleu(varied) < self_bleu(half) < 1.0
    # each sample against the others: the mean of the per-sample scores
    group = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 9]]
    by_hand = [bleu(group[0], [group[1], group[2]]), bleu(group[1], [group[0], group[2]]), bleu(group[2], group[:2])]
    assert self_bleu([group]) == pytest.approx(sum(by_hand) / 3)
    assert math.isnan(self_bleu([[[1, 2]]]))  # one sample per prompt: nothing to compare
