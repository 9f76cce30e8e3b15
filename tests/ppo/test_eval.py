"""PPO's held-out evaluation during training (phase.eval_steps): eval/* in metrics.jsonl at the evaluated steps,
and the checkpoint kept as "best" follows held-out gold, never the training rollouts' reward."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rlhf_exp.ppo.trainer import PPOTrainer
from tests.conftest import read_json, run_cli

EVAL_KEYS = {"eval/gold", "eval/rm_score", "eval/kl", "eval/response_length", "eval/entropy", "eval/distinct_1",
             "eval/distinct_2", "eval/self_bleu"}


def _selection(**phase) -> PPOTrainer:
    trainer = PPOTrainer.__new__(PPOTrainer)  # only the phase settings are read
    trainer.phase = SimpleNamespace(**{"best_kl_max": None, "kl_target": 1.0, **phase})
    return trainer


def test_best_checkpoint_metric_is_held_out_gold_else_rm_score_within_the_kl_band():
    trainer = _selection()
    assert trainer.selection_metric({"eval/gold": 0.8, "eval/rm_score": 5.0, "eval/kl": 9.0}) == 0.8
    assert trainer.selection_metric({"eval/rm_score": 1.5, "eval/kl": 1.9}) == 1.5  # 2 x kl_target = 2.0
    assert trainer.selection_metric({"eval/rm_score": 9.0, "eval/kl": 2.1}) is None  # over-optimised: not a candidate
    assert _selection(best_kl_max=5.0).selection_metric({"eval/rm_score": 9.0, "eval/kl": 2.1}) == 9.0
    assert trainer.selection_metric({}) is None  # no evaluation at that step: the rollouts' reward never counts


def test_ppo_logs_held_out_metrics_and_keeps_the_best_by_held_out_gold(sft_run, rm_run, tmp_path):
    proc = run_cli(["phase=ppo", f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}", "phase.max_steps=20",
                    "phase.eval_steps=5", "phase.save_steps=5", "phase.keep_checkpoints=1", "phase.eval_num_prompts=32",
                    f"output_root={tmp_path}"], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/kl" in r}
    assert sorted(evals) == [5, 10, 15, 20]
    for row in evals.values():
        assert EVAL_KEYS <= set(row), row
        assert 0 <= row["eval/gold"] <= 1 and 0 < row["eval/distinct_2"] <= 1 and row["eval/response_length"] > 0
        assert 0 < row["eval/self_bleu"] <= 1
    assert evals[5]["eval/kl"] > 0  # the policy moved away from the reference
    summary = read_json(run / "summary.json")["metrics"]
    assert summary["eval_gold"] == evals[20]["eval/gold"] and summary["eval_kl"] == evals[20]["eval/kl"]
    best_step = max(evals, key=lambda s: evals[s]["eval/gold"])
    if best_step == 20:  # the final policy is the best held-out one: nothing else kept
        assert "best_checkpoint" not in summary
    else:
        assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step}"), (summary, evals)
        assert summary["best_eval_metric"] == evals[best_step]["eval/gold"]
        marker = read_json(run / "checkpoints" / "trainer" / f"checkpoint-{best_step}" / "complete.json")
        assert marker["metric"] == evals[best_step]["eval/gold"]
