"""Resume (issue #5, TRL phases): a run killed with SIGKILL and relaunched with resume=<run folder>
continues from its latest complete checkpoint and logs what an uninterrupted run logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, only_run, read_json, read_metrics, run_cli

SFT = ["phase.max_steps=40", "phase.logging_steps=5", "phase.save_steps=10", "phase.early_stopping_patience=0"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def killed_run(root: Path, after_checkpoint: int) -> Path:
    """Start the SFT run, SIGKILL it once checkpoint-<after_checkpoint> is complete; return its folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_exp", *SFT, f"output_root={root}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = list(root.glob(f"runs/*/checkpoints/trainer/checkpoint-{after_checkpoint}/complete.json"))
        if done or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done, "the run ended or timed out before its checkpoint"
    run = only_run(root, "sft")
    assert read_json(run / "manifest.json")["status"] == "running"  # killed: nothing could record it
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("whole")
    proc = run_cli([*SFT, f"output_root={root}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return only_run(root, "sft")


@pytest.mark.slow
def test_sft_killed_and_resumed_logs_what_an_uninterrupted_run_logs(tmp_path, uninterrupted):
    run = killed_run(tmp_path, after_checkpoint=20)
    proc = run_cli([f"resume={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stderr and "from step 20" in proc.stderr
    expected, got = losses(uninterrupted), losses(run)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 5, 10, 15, 20, 25, 30, 35, 40]  # no step twice
    for (_, a), (_, b) in zip(expected, got):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (expected, got)
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "succeeded" and len(manifest["resumed_at"]) == 1
    summary, whole = read_json(run / "summary.json")["metrics"], read_json(uninterrupted / "summary.json")["metrics"]
    assert abs(summary["eval_loss"] - whole["eval_loss"]) <= 1e-5 and summary["gold_score"] == whole["gold_score"]
    assert summary["gold_score_initial"] == whole["gold_score_initial"]


@pytest.mark.slow
def test_a_truncated_checkpoint_is_skipped_for_the_one_before(tmp_path, uninterrupted):
    run = killed_run(tmp_path, after_checkpoint=20)
    weights = run / "checkpoints" / "trainer" / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file
    proc = run_cli([f"resume={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: skipping checkpoint" in proc.stderr and "model.safetensors is 100 bytes" in proc.stderr
    assert "from step 10" in proc.stderr
    expected, got = losses(uninterrupted), losses(run)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(expected, got):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (expected, got)


def fake_run(folder: Path, status: str, config_hash: str) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"status": status, "config_hash": config_hash, "phase": "sft"}))
    return folder


def test_a_folder_holding_another_run_is_never_written_into(compose, tmp_path):
    from rlhf_exp.cli import resumable
    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.tracking.run import config_hash

    cfg = compose([])
    with pytest.raises(ConfigError, match="holds another run \\(its config differs\\)"):
        resumable(cfg, fake_run(tmp_path / "a", "failed", "0123"))
    with pytest.raises(ConfigError, match="it already succeeded: nothing to resume"):
        resumable(cfg, fake_run(tmp_path / "b", "succeeded", config_hash(cfg)))
    with pytest.raises(ConfigError, match="already holds a run and resume=never"):
        resumable(compose(["resume=never"]), fake_run(tmp_path / "c", "running", config_hash(cfg)))
    assert resumable(cfg, fake_run(tmp_path / "d", "running", config_hash(cfg)))


def test_resume_needs_a_run_folder(tmp_path):
    proc = run_cli([f"resume={tmp_path}"])
    assert proc.returncode == 2
    assert "not a run folder (it needs manifest.json and .hydra/overrides.yaml)" in proc.stderr


def test_resumable_checkpoints_are_checked(compose):
    from rlhf_exp.config.errors import ConfigError
    from rlhf_exp.config.validate import validate

    with pytest.raises(ConfigError, match="checkpoints must fall on evaluations"):
        validate(compose(["phase.save_steps=10", "phase.early_stopping_patience=2"]))
    validate(compose(["phase.save_steps=10", "phase.early_stopping_patience=2", "phase.eval_steps=5"]))
    with pytest.raises(ConfigError, match="resumable PPO checkpoints are not written yet"):
        validate(compose(["phase=ppo", "phase.save_steps=10"]))
