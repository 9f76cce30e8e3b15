"""Inter-annotator agreement on preference labels: percent agreement, Cohen's and Fleiss' kappa.

Labels are given as one list per item (pair), one entry per annotator (``None``: that annotator did not
label the item). Categories are any hashable values ("first"/"second"/"tie", ...). Pure Python, no
dependencies, so ``python -m rlhf_exp.data check`` stays light.

* percent agreement: over the items with at least two labels, the share of annotator pairs that gave the
  same label, averaged over items (Fleiss' P-bar, with each item's own number of labels).
* Cohen's kappa (Cohen 1960), two annotators: (p_o - p_e) / (1 - p_e) over the items both labelled, p_e
  from each annotator's own label frequencies. With more than two annotators: the mean over every pair.
* Fleiss' kappa (Fleiss 1971), more than two annotators: over the items every annotator labelled, chance
  agreement from the pooled label frequencies.

Reading (as the seeds do, after Landis & Koch): below ``POOR_BELOW`` (0.4) the labels are mostly noise and a
reward model trained on them learns little ("the RM trains on noise"); ``GOOD_FROM`` (0.6) and above is good
agreement; in between, moderate. A kappa is ``None`` when undefined (every label the same category:
chance agreement is 1).
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Hashable, Sequence

POOR_BELOW = 0.4
GOOD_FROM = 0.6

Labels = Sequence[Sequence[Hashable | None]]


def percent_agreement(labels: Labels) -> float | None:
    """Mean over items (with >= 2 labels) of the share of annotator pairs agreeing on the item."""
    shares = []
    for item in labels:
        given = [x for x in item if x is not None]
        if len(given) < 2:
            continue
        pairs = len(given) * (len(given) - 1)
        shares.append(sum(n * (n - 1) for n in Counter(given).values()) / pairs)
    return sum(shares) / len(shares) if shares else None


def cohen_kappa(a: Sequence[Hashable | None], b: Sequence[Hashable | None]) -> float | None:
    """Cohen's kappa of two annotators' labels over the items both labelled."""
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not both:
        return None
    n = len(both)
    p_o = sum(1 for x, y in both if x == y) / n
    freq_a, freq_b = Counter(x for x, _ in both), Counter(y for _, y in both)
    p_e = sum(freq_a[c] * freq_b[c] for c in freq_a) / (n * n)
    if p_e >= 1:
        return None
    return (p_o - p_e) / (1 - p_e)


def pairwise_cohen_kappa(labels: Labels) -> float | None:
    """Mean Cohen's kappa over every pair of annotators (annotator i = position i of each item)."""
    raters = max((len(item) for item in labels), default=0)
    columns = [[item[i] if i < len(item) else None for item in labels] for i in range(raters)]
    kappas = [k for a, b in combinations(columns, 2) if (k := cohen_kappa(a, b)) is not None]
    return sum(kappas) / len(kappas) if kappas else None


def fleiss_kappa_counts(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa from an items x categories table of how many annotators put each item in each category
    (every item rated by the same number of annotators, at least 2)."""
    rows = [list(r) for r in counts if sum(r)]
    if not rows:
        return None
    n = sum(rows[0])
    if n < 2 or any(sum(r) != n for r in rows):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings on every item")
    items = len(rows)
    p_j = [sum(r[j] for r in rows) / (items * n) for j in range(len(rows[0]))]
    p_bar = sum((sum(x * x for x in r) - n) / (n * (n - 1)) for r in rows) / items
    p_e = sum(p * p for p in p_j)
    if p_e >= 1:
        return None
    return (p_bar - p_e) / (1 - p_e)


def fleiss_kappa(labels: Labels) -> float | None:
    """Fleiss' kappa over the items that every annotator labelled."""
    raters = max((len(item) for item in labels), default=0)
    complete = [item for item in labels if len(item) == raters and all(x is not None for x in item)]
    categories = sorted({x for item in complete for x in item}, key=repr)
    if raters < 2 or not complete:
        return None
    return fleiss_kappa_counts([[Counter(item)[c] for c in categories] for item in complete])


def verdict(kappa: float | None) -> str:
    if kappa is None:
        return "undefined"
    kappa = round(kappa, 9)  # 0.4 computed as 0.39999... is 0.4
    if kappa < POOR_BELOW:
        return "poor"
    return "good" if kappa >= GOOD_FROM else "moderate"


def agreement(labels: Labels) -> dict:
    """Every measure for ``labels`` (items x annotators), with the headline kappa and its reading: Cohen's for
    two annotators, Fleiss' for more."""
    raters = max((len(item) for item in labels), default=0)
    complete = sum(1 for item in labels if len(item) == raters and all(x is not None for x in item))
    out = {"annotators": raters, "items": len(labels), "complete_items": complete,
           "percent_agreement": percent_agreement(labels), "cohen_kappa": None, "fleiss_kappa": None}
    if raters == 2:
        out["cohen_kappa"] = cohen_kappa([i[0] for i in labels], [i[1] for i in labels])
        out["kappa"], out["kappa_kind"] = out["cohen_kappa"], "cohen"
    elif raters > 2:
        out["cohen_kappa"] = pairwise_cohen_kappa(labels)  # the mean over annotator pairs
        out["fleiss_kappa"] = fleiss_kappa(labels)
        out["kappa"], out["kappa_kind"] = out["fleiss_kappa"], "fleiss"
    else:
        out["kappa"], out["kappa_kind"] = None, None
    out["verdict"] = verdict(out["kappa"])
    return out
