"""Diversity of generated answers (token ids): distinct-n over a set of answers, and self-BLEU over several
samples per prompt. Pure Python: the held-out evaluations of PPO and DPO, the monitor's tests and
``rlhf_exp.compare`` read them without torch.
"""

from __future__ import annotations

import math
from collections import Counter


def distinct_n(answers: list[list[int]], n: int) -> float:
    """Distinct-n of a set of answers: unique n-grams over all n-grams, pooled over the answers (Li et al.,
    2016); 1.0 when no answer has n tokens. Falls as answers grow repetitive or alike."""
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _grams(tokens: list[int], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypothesis: list[int], references: list[list[int]], max_n: int = 4) -> float:
    """Sentence BLEU of one hypothesis against references (Papineni et al., 2002: clipped n-gram precisions up
    to ``max_n``, geometric mean, brevity penalty against the closest reference length), with add-one
    smoothing of the precisions for n > 1 (Lin & Och, 2004; short answers rarely share 4-grams): nltk's
    ``sentence_bleu`` with ``SmoothingFunction().method2`` for hypotheses of ``max_n`` tokens or more. A shorter
    hypothesis has no n-grams of the higher orders: those orders are left out of the mean (nltk would count each
    as a precision of 1/2 or 1, pulling short answers' scores towards a constant). 0 for an empty hypothesis or
    no references."""
    if not hypothesis or not references:
        return 0.0
    log_sum = 0.0
    orders = min(max_n, len(hypothesis))
    for n in range(1, orders + 1):
        hyp = _grams(hypothesis, n)
        best: Counter = Counter()
        for ref in references:
            best |= _grams(ref, n)  # the most times any one reference holds each n-gram
        matched = sum(min(count, best[g]) for g, count in hyp.items())
        total = max(len(hypothesis) - n + 1, 0)
        if n == 1:
            if matched == 0:
                return 0.0
            log_sum += math.log(matched / total)
        else:
            log_sum += math.log((matched + 1) / (total + 1))
    closest = min((len(r) for r in references), key=lambda length: (abs(length - len(hypothesis)), length))
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_sum / orders)


def self_bleu(groups: list[list[list[int]]], max_n: int = 4) -> float:
    """Self-BLEU (Zhu et al., 2018): each sample's BLEU against the other samples of the same prompt, averaged
    over samples and prompts. 1.0 when every prompt's samples are identical; lower = more diverse. Groups with
    fewer than two samples are skipped; NaN when none is left."""
    scores = [bleu(sample, group[:i] + group[i + 1:], max_n)
              for group in groups if len(group) > 1 for i, sample in enumerate(group)]
    return sum(scores) / len(scores) if scores else math.nan
