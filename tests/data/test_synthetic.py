"""The embedded task: gold reward, determinism, demonstrator habit, annotators, held-out prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf_exp.data.synthetic import SortTask, bt_temperature, build_task_data, gold_reward, habit, sigmoid


def settings(**overrides):
    base = dict(num_digits=5, num_sft_train=2000, num_sft_eval=100, sft_habit_fraction=0.6, sft_noise_fraction=0.0,
                num_pref_train=3000, num_pref_eval=100, annotator_agreement=0.72, drop_ties=True,
                num_eval_prompts=300)
    return SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize("answer,expected", [
    (" 1 1 3 4 5", 1.0),
    (" 1 1 3 5 4", 0.6),      # the habit: last two swapped
    (" 5 4 3 1 1", 0.2),      # only the middle digit lands right
    (" 1 1 3", 0.6),          # missing positions count as wrong
    (" 1 1 3 4 5 5", 5 / 6),  # an extra position counts as wrong
    ("", 0.0),
])
def test_gold_reward_by_hand(answer, expected):
    assert gold_reward("3 1 4 1 5 =", answer) == pytest.approx(expected)


def test_habit_swaps_last_two():
    assert habit([1, 2, 3, 4, 5]) == [1, 2, 3, 5, 4]


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = build_task_data(settings(), 0), build_task_data(settings(), 0), build_task_data(settings(), 1)
    assert a == b
    assert a["sft_train"] != c["sft_train"]


def test_demonstrations_carry_the_configured_habit_fraction():
    records = build_task_data(settings(num_sft_train=4000), 0)["sft_train"]
    golds = [gold_reward(r["prompt"], r["completion"]) for r in records]
    assert all(g in (1.0, 0.6) for g in golds), "habit-only demonstrations are either right or the habit"
    # the habit is visible only where the two largest digits differ
    visible = [g for r, g in zip(records, golds) if len(set(sorted(r["prompt"].split()[:-1])[-2:])) == 2]
    assert 0.57 < sum(g < 1 for g in visible) / len(visible) < 0.63


def test_noise_fraction_adds_random_mistakes():
    records = build_task_data(settings(sft_habit_fraction=0.0, sft_noise_fraction=0.5), 0)["sft_train"]
    golds = [gold_reward(r["prompt"], r["completion"]) for r in records]
    assert 0.35 < sum(g < 1 for g in golds) / len(golds) < 0.55
    assert len(set(golds)) > 2


def test_annotators_agree_with_gold_at_the_configured_rate():
    for agreement in (0.72, 0.9):
        pairs = build_task_data(settings(annotator_agreement=agreement), 0)["pref_train"]
        agree = sum(p.gold_chosen > p.gold_rejected for p in pairs) / len(pairs)
        assert abs(agree - agreement) < 0.03, (agreement, agree)


def test_ties_are_dropped_by_default_and_kept_on_request():
    assert all(p.gold_chosen != p.gold_rejected for p in build_task_data(settings(), 0)["pref_train"])
    kept = build_task_data(settings(drop_ties=False), 0)["pref_train"]
    assert any(p.gold_chosen == p.gold_rejected for p in kept)
    assert all(p.chosen != p.rejected for p in kept)


def test_held_out_prompts_are_unique_and_never_trained_on():
    data = build_task_data(settings(), 0)
    held_out = set(data["eval_prompts"])
    assert len(held_out) == len(data["eval_prompts"]) == 300
    trained = {r["prompt"] for r in data["sft_train"]} | {p.prompt for p in data["pref_train"]}
    assert not held_out & trained


def test_bt_temperature_hits_the_target():
    gaps = [0.2, 0.4, 0.4, 0.8, 1.0]
    t = bt_temperature(gaps, 0.75)
    assert sum(sigmoid(g / t) for g in gaps) / len(gaps) == pytest.approx(0.75, abs=1e-6)


def test_prompts_have_the_configured_length():
    task = SortTask(num_digits=7, seed=3)
    assert all(len(p.split()) == 8 for p in task.eval_prompts(20))
