"""Fault injection: NaN gradients in chosen steps of a real SFT run (in this process, through the
runner's own callbacks). They are never applied; skipped while phase.skip_nonfinite_batches allows,
then the run stops naming the step, with the last good state saved as a resumable checkpoint."""

from __future__ import annotations

import json
import math

import pytest
from transformers import TrainerCallback

from tests.conftest import read_metrics

ARGS = ["phase.max_steps=12", "phase.logging_steps=1", "phase.early_stopping_patience=0"]


class PoisonGradients(TrainerCallback):
    """Before the optimizer step of each step in ``steps``, one gradient becomes NaN."""

    def __init__(self, steps: set[int]):
        self.steps = steps

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan


def run_with_nan(monkeypatch, compose, tmp_path, steps: set[int], overrides: list[str]):
    from rlhf_exp import cli
    from rlhf_exp.runners import common

    original = common.callbacks

    def poisoned(cfg, run, data):
        log, callbacks = original(cfg, run, data)
        return log, [PoisonGradients(steps), *callbacks]  # before NonFiniteGuard looks at the gradients

    monkeypatch.setattr(common, "callbacks", poisoned)
    run_dir = tmp_path / "run"
    return run_dir, lambda: cli.execute(compose([*ARGS, *overrides, f"output_root={tmp_path}"]), run_dir)


def weights_finite(folder) -> bool:
    from safetensors.torch import load_file

    return all(bool(t.isfinite().all()) for t in load_file(str(folder / "model.safetensors")).values())


@pytest.mark.slow
def test_nan_gradients_stop_the_run_with_the_last_good_state_saved(monkeypatch, compose, tmp_path):
    run_dir, execute = run_with_nan(monkeypatch, compose, tmp_path, {7}, [])
    with pytest.raises(FloatingPointError, match=r"NaN/inf gradients in step 7 \(after 0 skipped\): training stopped "
                                                 r"before applying them.*The last good state \(after step 6\) is "
                                                 r"saved in .*checkpoint-6 \(resumable\)"):
        execute()
    checkpoint = run_dir / "checkpoints" / "trainer" / "checkpoint-6"
    assert (checkpoint / "complete.json").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert weights_finite(checkpoint)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "step 7" in manifest["error"]
    assert max(r["step"] for r in read_metrics(run_dir)) == 6


@pytest.mark.slow
def test_nan_gradients_are_skipped_while_allowed(monkeypatch, compose, tmp_path, capsys):
    run_dir, execute = run_with_nan(monkeypatch, compose, tmp_path, {3, 7}, ["phase.skip_nonfinite_batches=2"])
    metrics = execute()
    assert "NaN/inf gradients in step 3: its update is skipped (1 of phase.skip_nonfinite_batches=2)" in capsys.readouterr().err
    records = read_metrics(run_dir)
    assert [r["train/skipped_batches"] for r in records if "train/skipped_batches" in r] == [1.0, 2.0]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]  # the bad losses stay out of the logs
    assert metrics["steps"] == 12
    assert weights_finite(run_dir / "checkpoints" / "final")


@pytest.mark.slow
def test_more_nan_batches_than_allowed_stop_the_run(monkeypatch, compose, tmp_path):
    _, execute = run_with_nan(monkeypatch, compose, tmp_path, {2, 4, 6}, ["phase.skip_nonfinite_batches=2"])
    with pytest.raises(FloatingPointError, match=r"NaN/inf gradients in step 6 \(after 2 skipped\)"):
        execute()


def run_ppo_with_nan(monkeypatch, compose, tmp_path, sft_run, rm_run, calls: set[int], overrides: list[str]):
    """PPO with the policy loss of the chosen mini-batch updates (1-based call count) made NaN."""
    from rlhf_exp import cli
    from rlhf_exp.ppo import core, trainer

    original, count = core.clipped_policy_loss, [0]

    def poisoned(*args, **kwargs):
        stats = original(*args, **kwargs)
        count[0] += 1
        if count[0] in calls:
            stats.loss = stats.loss * math.nan
        return stats

    monkeypatch.setattr(trainer.core, "clipped_policy_loss", poisoned)
    cfg = compose(["phase=ppo", f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}", "phase.max_steps=6",
                   "phase.save_steps=2", *overrides, f"output_root={tmp_path}"])
    run_dir = tmp_path / "run"
    return run_dir, lambda: cli.execute(cfg, run_dir)


@pytest.mark.slow
def test_ppo_nan_updates_are_skipped_while_allowed_then_stop(monkeypatch, compose, tmp_path, sft_run, rm_run, capsys):
    # the 2nd update is step 1's second mini-batch (conf/recipe/tiny_ppo.yaml: 2 mini-batches per epoch)
    run_dir, execute = run_ppo_with_nan(monkeypatch, compose, tmp_path / "skip", sft_run, rm_run, {2},
                                        ["phase.skip_nonfinite_batches=1"])
    metrics = execute()
    assert "NaN/inf gradients in PPO step 1, mini-batch 2: its update is skipped (1 of " in capsys.readouterr().err
    assert metrics["steps"] == 6 and math.isfinite(metrics["kl"])
    assert [r.get("ppo/skipped_batches") for r in read_metrics(run_dir) if "ppo/reward" in r] == [1.0] * 6
    assert weights_finite(run_dir / "checkpoints" / "final")

    run_dir, execute = run_ppo_with_nan(monkeypatch, compose, tmp_path / "stop", sft_run, rm_run, {2}, [])
    with pytest.raises(FloatingPointError, match=r"NaN/inf gradients in PPO step 1, mini-batch 2: training stopped "
                                                 r"before applying them \(the weights stay finite; nothing is saved now"):
        execute()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"
