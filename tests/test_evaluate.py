"""python -m rlhf_exp.evaluate: the interval, ties, both-orders judging, the lm-eval hook, and the CLI on the
main command's runs (one ``pipeline=rlhf`` run per module)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types

import pytest

from rlhf_exp import evaluate as ev
from tests.conftest import ROOT

# ----------------------------------------------------------------------------------- the statistics


def test_wilson_interval_by_hand():
    # 7 wins, 2 ties, 1 loss: p = (7 + 2/2) / 10 = 0.8; Wilson with z = 1.959964:
    # centre = (p + z^2/2n) / (1 + z^2/n), half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z, n, p = 1.959964, 10, 0.8
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    t = ev.tally([1] * 7 + [0] * 2 + [-1])
    assert (t["n"], t["wins"], t["ties"], t["losses"]) == (10, 7, 2, 1)
    assert t["win_rate"] == pytest.approx(0.8)
    assert t["ci_low"] == pytest.approx(centre - half, abs=1e-6) and t["ci_high"] == pytest.approx(centre + half, abs=1e-6)
    assert (round(t["ci_low"], 4), round(t["ci_high"], 4)) == (0.4902, 0.9433)  # the textbook Wilson interval of 8/10
    # symmetric and within [0, 1] at the edges
    low, high = ev.wilson_interval(50, 100)
    assert low == pytest.approx(1 - high)
    assert ev.wilson_interval(0, 5)[0] == 0.0 and ev.wilson_interval(5, 5)[1] == 1.0


def test_ties_count_half_and_eps():
    assert ev.outcome(0.8, 0.8) == 0 and ev.outcome(0.8, 0.6) == 1 and ev.outcome(0.6, 0.8) == -1
    assert ev.outcome(1.00005, 1.0, eps=1e-4) == 0 and ev.outcome(1.001, 1.0, eps=1e-4) == 1
    t = ev.tally([0, 0, 0, 0])
    assert t["win_rate"] == 0.5 and t["ties"] == 4
    assert ev.tally([1, -1, 0, 0])["win_rate"] == 0.5


def test_gold_judge_ties_identical_and_equal_scores():
    prompts = ["3 1 2 =", "3 1 2 =", "3 1 2 =", "3 1 2 ="]
    policy = ["1 2 3", "1 3 2", "2 1 3", "1 2 3"]
    baseline = ["1 2 3", "1 2 3", "1 3 2", "2 1 3"]  # same; worse; equal gold (1/3 each); better
    judge = ev.judge_gold(prompts, policy, baseline)
    assert judge.outcomes == [0, -1, 0, 1]


# ----------------------------------------------------------------------------------- both orders


def test_position_biased_judge_gives_ties():
    def always_first(prompt, first, second):  # prefers position A whatever it holds
        return 5.0 + 0.1 * (len(first) - len(second))

    judge = ev.judge_pairwise("stub", always_first, ["q"] * 3, ["long answer", "x", "abc"], ["short", "yyyy", "abd"])
    assert judge.outcomes == [0, 0, 0]
    assert ev.tally(judge.outcomes)["win_rate"] == 0.5


def test_consistent_judge_and_bias_cancelled():
    def longer_with_bias(prompt, first, second):  # a real preference (longer) plus a position bias towards A
        return 1.0 + 2.0 * (len(first) - len(second))

    # policy longer: A-first margin 1+2d > 0, swapped margin -(1-2d) > 0 when d >= 1: win; shorter: loss
    judge = ev.judge_pairwise("stub", longer_with_bias, ["q"] * 3, ["aaaa", "a", "same"], ["a", "aaaa", "same"])
    assert judge.outcomes == [1, -1, 0]  # identical answers: a tie without asking
    verdict, margin = ev.both_orders(longer_with_bias, "q", "aaaa", "a")
    assert verdict == 1 and margin == pytest.approx(6.0)  # ((1 + 6) + (-(1 - 6))) / 2: the bias (1) cancels


@pytest.mark.slow
def test_model_judge_wiring(scaled_model):
    """A real (scaled-down, untrained) chat model as the judge: a finite margin, asked through its chat template."""
    folder = scaled_model("qwen2_5")
    judge = ev.ModelJudge(str(folder))
    ids = judge.text("3 1 2 =", "1 2 3", "3 2 1")
    assert judge.tokenizer.decode(ids).count("Answer A:") == 1
    margin = judge("3 1 2 =", "1 2 3", "3 2 1")
    assert math.isfinite(margin)
    verdict, _ = ev.both_orders(judge, "3 1 2 =", "1 2 3", "3 2 1")
    assert verdict in (-1, 0, 1)


# ----------------------------------------------------------------------------------- CLI


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rlhf_exp.evaluate", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_help_is_fast_and_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, rlhf_exp.evaluate as e; "
                          "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
    assert cli("--help").returncode == 0


def test_bad_folder_is_one_line(tmp_path):
    out = cli(str(tmp_path / "nope"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "error:" in out.stderr and "Traceback" not in out.stderr
    out = cli(str(tmp_path))  # a folder, but no run
    assert out.returncode == 2 and "without manifest.json" in out.stderr


@pytest.fixture(scope="module")
def pipeline(main_pipeline):
    """The README's main command (the session's, tests/conftest.py): sft/ rm/ ppo/ dpo/ under one pipeline folder."""
    return main_pipeline[1]


def check_consistent(result: dict, judge: str):
    from rlhf_exp.data.synthetic import gold_reward

    t = result["judges"][judge]
    rows = result["rows"]
    assert t["wins"] + t["ties"] + t["losses"] == t["n"] == len(rows) == result["prompts"]["n"]
    outcomes = [r[judge]["outcome"] for r in rows]
    assert ev.tally(outcomes)["win_rate"] == pytest.approx(t["win_rate"])
    if judge == "gold":  # recomputed from the answers alone
        wins = ties = 0
        for r in rows:
            a, b = gold_reward(r["prompt"], r["policy_answer"]), gold_reward(r["prompt"], r["baseline_answer"])
            wins += a > b
            ties += a == b
        assert (wins + ties / 2) / len(rows) == pytest.approx(t["win_rate"])
        assert (t["wins"], t["ties"]) == (wins, ties)
    low, high = ev.wilson_interval(t["wins"] + t["ties"] / 2, t["n"])
    assert (t["ci_low"], t["ci_high"]) == pytest.approx((low, high))


@pytest.mark.slow
def test_ppo_and_dpo_against_sft(pipeline, tmp_path):
    for phase in ("ppo", "dpo"):
        out = cli(str(pipeline / phase), "--num-prompts", "200")
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads((pipeline / phase / "evaluation.json").read_text())
        assert result["baseline"]["phase"] == "sft" and result["baseline"]["path"] == str((pipeline / "sft").resolve())
        assert set(result["judges"]) == {"gold", "rm"}
        assert result["judges"]["rm"]["reward_run_path"] == str((pipeline / "rm").resolve())
        assert "win rate" in out.stdout and "gold" in out.stdout
        for judge in ("gold", "rm"):
            check_consistent(result, judge)
        # measured on the tiny task (500 prompts): PPO 0.709 [0.668, 0.747], DPO 0.705 [0.664, 0.743] by gold
        assert result["judges"]["gold"]["win_rate"] > 0.5, result["judges"]["gold"]
    chosen = {p: json.loads((pipeline / p / "evaluation.json").read_text())["judges"]["rm"]["chosen_as"] for p in ("ppo", "dpo")}
    assert "PPO run's reward model" in chosen["ppo"] and "latest RM run trained from SFT" in chosen["dpo"]


@pytest.mark.slow
def test_explicit_baseline_judge_model_and_out(pipeline, tmp_path, scaled_model):
    judge = scaled_model("qwen2_5")
    out_file = tmp_path / "e.json"
    out = cli(str(pipeline / "ppo"), "--baseline", str(pipeline / "dpo"), "--judge", "gold", "--judge", str(judge),
              "--num-prompts", "8", "--out", str(out_file))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_file.read_text())
    assert result["baseline"]["phase"] == "dpo" and set(result["judges"]) == {"gold", str(judge)}
    check_consistent(result, "gold")
    check_consistent(result, str(judge))


@pytest.mark.slow
def test_one_line_errors_on_runs(pipeline, monkeypatch, capsys):
    cases = [
        ([str(pipeline / "sft")], "records no SFT parent: give --baseline"),
        ([str(pipeline / "rm")], "phase=rm; give a policy run"),
        ([str(pipeline / "dpo"), "--reward-run", str(pipeline / "ppo")], "not rm"),
        ([str(pipeline / "dpo"), "--judge", "nonsense"], "neither rm, gold, nor a model folder"),
    ]
    for argv, expected in cases:
        assert ev.main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and err.strip().count("\n") == 0, err
    # no gold reward and no reward model: nothing to judge with
    monkeypatch.setattr(ev, "held_out_prompts", lambda run: (["p"], "stub", False))
    monkeypatch.setattr(ev, "default_reward_run", lambda run, root: (None, "no RM here"))
    assert ev.main([str(pipeline / "dpo")]) == 2
    err = capsys.readouterr().err
    assert "no judge available" in err and err.strip().count("\n") == 0


@pytest.mark.slow
def test_lm_eval_hook_with_stub(pipeline, monkeypatch, tmp_path, capsys):
    """lm-eval is an extra (not installed for the tests): a stub module records the call."""
    calls = []
    stub = types.ModuleType("lm_eval")

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"tiny": {"acc,none": 0.5}}, "versions": {"tiny": 1}, "samples": "dropped"}

    stub.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", stub)
    out_file = tmp_path / "lm.json"
    assert ev.main([str(pipeline / "ppo"), "--skip-winrate", "--lm-eval", "tiny, other", "--lm-eval-limit", "3",
                    "--out", str(out_file)]) == 0
    (call,) = calls
    assert call["model"] == "hf" and call["tasks"] == ["tiny", "other"] and call["limit"] == 3
    assert call["model_args"] == f"pretrained={(pipeline / 'ppo' / 'checkpoints' / 'final').resolve()}"
    result = json.loads(out_file.read_text())
    assert result["lm_eval"]["results"] == {"tiny": {"acc,none": 0.5}} and "samples" not in result["lm_eval"]
    assert "lm-eval tiny: acc,none=0.5" in capsys.readouterr().out
    # without lm-eval installed: one line naming the extra
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert ev.main([str(pipeline / "ppo"), "--lm-eval", "tiny"]) == 2
    assert "pip install -e .[lmeval]" in capsys.readouterr().err


LM_TASK = """task: tiny_sort
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_real_tiny_task(pipeline, tmp_path):
    """The real harness on the SFT checkpoint, a 3-question local task (runs where the lmeval extra is installed)."""
    pytest.importorskip("lm_eval")
    rows = [{"prompt": "3 1 2 =", "choices": [" 1 2 3", " 3 2 1"], "label": 0},
            {"prompt": "5 4 9 =", "choices": [" 9 5 4", " 4 5 9"], "label": 1}]
    (tmp_path / "tiny_sort.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_sort.yaml").write_text(LM_TASK.format(data=tmp_path / "tiny_sort.jsonl"))
    out_file = tmp_path / "lm.json"
    out = cli(str(pipeline / "sft"), "--skip-winrate", "--lm-eval", "tiny_sort", "--lm-eval-include", str(tmp_path),
              "--out", str(out_file))
    assert out.returncode == 0, out.stderr[-3000:]
    assert 0.0 <= json.loads(out_file.read_text())["lm_eval"]["results"]["tiny_sort"]["acc,none"] <= 1.0
