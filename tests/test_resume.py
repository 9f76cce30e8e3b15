"""Resume (issue #5): a run killed with SIGKILL, or stopped by SIGTERM/SIGUSR2, and relaunched with
resume=<run folder> continues from its latest complete checkpoint and logs what an uninterrupted run
logs (SFT through TRL's trainer, PPO through our own loop)."""

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


def start(args: list[str], root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    return subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args, f"output_root={root}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(root.glob(pattern)) or proc.poll() is not None:
            break
        time.sleep(0.05)
    return bool(list(root.glob(pattern)))


def killed_run(root: Path, after_checkpoint: int, args: list[str] = SFT, phase: str = "sft") -> Path:
    """Start the run, SIGKILL it once checkpoint-<after_checkpoint> is complete; return its folder."""
    proc = start(args, root)
    done = wait_for(f"runs/*/checkpoints/trainer/checkpoint-{after_checkpoint}/complete.json", root, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done, "the run ended or timed out before its checkpoint"
    run = only_run(root, phase)
    assert read_json(run / "manifest.json")["status"] == "running"  # killed: nothing could record it
    return run


def signalled_run(root: Path, after_metric: str, args: list[str], phase: str, sig=signal.SIGTERM) -> tuple[Path, str]:
    """Start the run, send ``sig`` once metrics.jsonl has a line with ``after_metric``; return its folder
    and stderr. The run saves a checkpoint at the end of the step and exits with 128+sig."""
    proc = start(args, root)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(root.glob("runs/*/metrics.jsonl"))
        if found and after_metric in found[0].read_text():
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    return only_run(root, phase), err


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
    assert "its previous attempt was killed before it could record how it ended" in proc.stderr
    expected, got = losses(uninterrupted), losses(run)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 5, 10, 15, 20, 25, 30, 35, 40]  # no step twice
    for (_, a), (_, b) in zip(expected, got):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (expected, got)
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "succeeded" and len(manifest["resumed_at"]) == 1
    assert manifest["attempts"] == [{"status": "running"}], manifest  # SIGKILLed: it never said how it ended
    summary, whole = read_json(run / "summary.json")["metrics"], read_json(uninterrupted / "summary.json")["metrics"]
    assert abs(summary["eval_loss"] - whole["eval_loss"]) <= 1e-5 and summary["gold_score"] == whole["gold_score"]
    assert summary["gold_score_initial"] == whole["gold_score_initial"]
    assert abs(summary["train_loss_mean"] - whole["train_loss_mean"]) <= 1e-5, "the whole run's mean loss"


@pytest.mark.slow
def test_sft_stopped_by_sigterm_saves_its_step_and_resumes_exactly(tmp_path, uninterrupted):
    """SIGTERM between two logs and between two save_steps: the step it stops at is saved (with the
    loss-logging window), and the resumed run logs exactly what the uninterrupted one logged."""
    run, err = signalled_run(tmp_path, '"train/loss"', SFT, "sft")
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "interrupted", manifest
    step, checkpoint = manifest["interrupted"]["step"], Path(manifest["interrupted"]["checkpoint"])
    assert manifest["interrupted"]["signal"] == "SIGTERM" and checkpoint.name == f"checkpoint-{step}"
    assert manifest["interrupted"]["received"] <= manifest["interrupted"]["time"], manifest  # same timezone
    assert 0 <= manifest["interrupted"]["seconds"] < 60, manifest
    assert (checkpoint / "complete.json").is_file()
    assert f"SIGTERM received; stopped after step {step}" in err and f"resume={run}" in err
    assert "Traceback" not in err
    proc = run_cli([f"resume={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"from step {step} (" in proc.stderr and "; its previous attempt was stopped by a signal" in proc.stderr
    expected, got = losses(uninterrupted), losses(run)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(expected, got):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, expected, got)
    summary, whole = read_json(run / "summary.json")["metrics"], read_json(uninterrupted / "summary.json")["metrics"]
    assert abs(summary["train_loss_mean"] - whole["train_loss_mean"]) <= 1e-5
    after = read_json(run / "manifest.json")
    assert after["status"] == "succeeded" and "interrupted" not in after, after
    (attempt,) = after["attempts"]
    assert {k: attempt[k] for k in ("status", "end_time", "interrupted", "error")} == \
        {k: manifest[k] for k in ("status", "end_time", "interrupted", "error")}, after


PPO_KEYS = ("ppo/reward", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss", "ppo/value_loss", "ppo/approx_kl",
            "ppo/entropy", "ppo/gold_reward")


def ppo_args(sft_run: Path, rm_run: Path) -> list[str]:
    return ["phase=ppo", f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}", "phase.max_steps=24",
            "phase.save_steps=4"]


def same_ppo_metrics(expected: Path, got: Path) -> None:
    a, b = read_metrics(expected), read_metrics(got)
    assert [r["step"] for r in a] == [r["step"] for r in b], "every step logged once, in order"
    for ra, rb in zip(a, b):
        for key in ra:
            if isinstance(ra[key], float) and not key.startswith("time/"):  # stage timings differ run to run
                assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (ra["step"], key, ra[key], rb[key])


@pytest.fixture(scope="module")
def ppo_uninterrupted(sft_run, rm_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ppo_whole")
    proc = run_cli([*ppo_args(sft_run, rm_run), f"output_root={root}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return only_run(root, "ppo")


@pytest.mark.slow
def test_ppo_killed_and_resumed_logs_what_an_uninterrupted_run_logs(tmp_path, sft_run, rm_run, ppo_uninterrupted):
    """Policy, critic, both optimizers, the adaptive KL controller, the sampling and mini-batch
    generator and the RNG states all come back: every later step's numbers are the same."""
    run = killed_run(tmp_path, after_checkpoint=12, args=ppo_args(sft_run, rm_run), phase="ppo")
    assert not (run / "summary.json").exists()
    proc = run_cli([f"resume={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "from step 12" in proc.stderr
    same_ppo_metrics(ppo_uninterrupted, run)
    steps = [r for r in read_metrics(run) if "ppo/reward" in r]
    assert len(steps) == 24 and all(k in steps[-1] for k in PPO_KEYS)
    assert steps[12]["ppo/kl_coef"] != steps[0]["ppo/kl_coef"], "the KL controller's state mattered"
    summary, whole = read_json(run / "summary.json")["metrics"], read_json(ppo_uninterrupted / "summary.json")["metrics"]
    assert summary["gold_score"] == whole["gold_score"] and summary["kl_coef_final"] == whole["kl_coef_final"]


@pytest.mark.slow
def test_ppo_stopped_by_sigusr2_saves_its_step_and_resumes_exactly(tmp_path, sft_run, rm_run, ppo_uninterrupted):
    run, err = signalled_run(tmp_path, '"ppo/reward"', ppo_args(sft_run, rm_run), "ppo", sig=signal.SIGUSR2)
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "interrupted" and manifest["interrupted"]["signal"] == "SIGUSR2", manifest
    step = manifest["interrupted"]["step"]
    assert Path(manifest["interrupted"]["checkpoint"]).name == f"checkpoint-{step}" and "Traceback" not in err
    proc = run_cli([f"resume={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"from step {step} (" in proc.stderr and "; its previous attempt was stopped by a signal" in proc.stderr
    same_ppo_metrics(ppo_uninterrupted, run)
    assert not (run / "checkpoints" / "trainer").exists() or read_json(run / "summary.json")["metrics"].get("best_checkpoint")


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
    validate(compose(["phase=ppo", "phase.save_steps=10"]))
    with pytest.raises(ConfigError, match=r"phase.save_minutes=0.0: must be > 0, or null"):
        validate(compose(["phase.save_minutes=0"]))
    with pytest.raises(ConfigError, match="launcher.max_num_timeout=3 requeues a job at its time limit, but "
                                          "phase.save_steps and phase.save_minutes are both null"):
        validate(compose(["phase.save_minutes=null", "launcher=slurm"]))
    validate(compose(["phase.save_minutes=null", "launcher=slurm", "launcher.max_num_timeout=0"]))
    validate(compose(["phase.save_minutes=null"]))  # local runs are never requeued
