"""``python -m rlhf_exp pipeline=rlhf``: the whole chain in one command, and the lineage it leaves."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, read_json, run_cli


@pytest.mark.slow
def test_rlhf_pipeline_runs_the_chain_in_subfolders_and_tabulates_it(main_pipeline):
    proc, root = main_pipeline
    summary = read_json(root / "pipeline_summary.json")
    assert summary["status"] == "succeeded" and [p["phase"] for p in summary["phases"]] == ["sft", "rm", "ppo", "dpo"]
    for phase in ("sft", "rm", "ppo", "dpo"):
        assert read_json(root / phase / "manifest.json")["status"] == "succeeded"
        assert (root / phase / "metrics.jsonl").is_file() and (root / phase / "summary.json").is_file()
    rows = {p["phase"]: p["metrics"] for p in summary["phases"]}
    assert rows["rm"]["accuracy"] >= 0.65
    assert rows["ppo"]["gold"] >= rows["sft"]["gold"] + 0.05 and rows["ppo"]["KL"] < 2.0
    assert rows["dpo"]["gold"] > rows["sft"]["gold"]
    assert "phase  status" in proc.stdout and "ppo    succeeded  gold" in proc.stdout
    parents = {p["phase"]: p["path"] for p in read_json(root / "ppo" / "manifest.json")["parents"]}
    assert parents == {"sft": str(root / "sft"), "rm": str(root / "rm")}
    lineage = subprocess.run([sys.executable, "-m", "rlhf_exp.lineage", str(root / "ppo")], cwd=ROOT,
                             capture_output=True, text=True)
    assert lineage.returncode == 0
    assert [line.lstrip("├└─│ ").split()[0] for line in lineage.stdout.splitlines()] == ["ppo", "sft", "rm", "sft"]


def test_pipeline_phase_settings_are_checked_before_anything_trains(tmp_path):
    proc = run_cli(["pipeline=rlhf", "pipeline.ppo.kl_cof=0.1", f"output_root={tmp_path}"])
    assert proc.returncode == 2 and "pipeline.ppo: unknown key 'phase.kl_cof'" in proc.stderr
    assert "Did you mean 'phase.kl_coef'?" in proc.stderr and not list(tmp_path.iterdir())
    proc = run_cli(["pipeline=rlhf", "phase.beta=0.2", f"output_root={tmp_path}"])
    assert proc.returncode == 2 and "set a phase's values as pipeline.<phase>.<key>=value" in proc.stderr


def test_pipeline_dry_run_prints_each_phase_command(tmp_path):
    proc = run_cli(["pipeline=rlhf", "dry_run=true", "pipeline.ppo.kl_coef=0.1", f"output_root={tmp_path}"])
    assert proc.returncode == 0
    assert f"python -m rlhf_exp phase=ppo output_root={tmp_path} phase.kl_coef=0.1" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_lineage_of_an_unknown_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_exp.lineage", "nope", "--root", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a run folder nor a run id" in proc.stderr


SHORT = ["pipeline.sft.max_steps=60", "pipeline.sft.save_steps=20", "pipeline.sft.early_stopping_patience=0",
         "pipeline.rm.max_steps=20", "pipeline.ppo.max_steps=12", "pipeline.ppo.save_steps=4",
         "pipeline.dpo.max_steps=10"]


def _children(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _wait(condition, timeout: float = 300) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (exited, not yet reaped by its parent) has stopped too
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
def test_a_stopped_or_killed_pipeline_leaves_no_phase_running_and_resumes_reusing_finished_phases(tmp_path):
    """SIGTERM to the pipeline process alone (during SFT): passed on, the phase checkpoints, one line with the
    resume command, no process left; ``resume=<folder>`` continues. SIGKILL to the pipeline alone (during PPO):
    the kernel stops the phase too; the same command again reuses SFT and RM untouched, resumes PPO from its
    checkpoint and completes pipeline_summary.json. The folder is hydra.run.dir's, as for a single run."""
    import hashlib
    import os
    import signal

    folder = tmp_path / "chain"
    command = [sys.executable, "-m", "rlhf_exp", "pipeline=rlhf", *SHORT, f"hydra.run.dir={folder}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dry = run_cli(["pipeline=rlhf", *SHORT, f"hydra.run.dir={folder}", "dry_run=true"])
    assert dry.returncode == 0 and f"pipeline folder: {folder}" in dry.stdout, dry.stderr[-2000:]

    pipeline = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    assert _wait(lambda: (folder / "sft" / "metrics.jsonl").is_file() or pipeline.poll() is not None)
    # pipeline.preload (CPU hardware): the pre-imported phase server, and the phase forked from it
    (server,) = _children(pipeline.pid)
    (phase,) = _children(server)
    pipeline.send_signal(signal.SIGTERM)
    _, err = pipeline.communicate(timeout=300)
    assert pipeline.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert f"continue it with: python -m rlhf_exp resume={folder}" in err and "Traceback" not in err
    assert _gone(phase) and _gone(server)
    summary = read_json(folder / "pipeline_summary.json")
    assert [(r["phase"], r["status"]) for r in summary["phases"]] == [
        ("sft", "interrupted"), ("rm", "not started"), ("ppo", "not started"), ("dpo", "not started")]
    assert read_json(folder / "sft" / "manifest.json")["status"] == "interrupted"

    pipeline = subprocess.Popen([sys.executable, "-m", "rlhf_exp", f"resume={folder}"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = folder / "ppo" / "checkpoints" / "trainer" / "checkpoint-4" / "complete.json"
    assert _wait(lambda: checkpoint.is_file() or pipeline.poll() is not None), pipeline.stderr.read()[-3000:]
    processes = _descendants(pipeline.pid)
    assert len(processes) == 2, processes  # the phase server and the PPO phase
    finished = {p: hashlib.sha256((folder / p / "manifest.json").read_bytes()).hexdigest() for p in ("sft", "rm")}
    double = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 2 and f"in use by a live run (pid {pipeline.pid}" in double.stderr, double.stderr[-2000:]
    assert len(double.stderr.strip().splitlines()) == 1  # one line; the pipeline goes on untouched
    pipeline.kill()
    pipeline.wait()
    assert _wait(lambda: all(_gone(p) for p in processes), timeout=120), "the PPO phase ran on after its pipeline was killed"

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    for p in ("sft", "rm"):
        assert f"{p} already succeeded in {folder / p}: reused" in again.stderr
        assert hashlib.sha256((folder / p / "manifest.json").read_bytes()).hexdigest() == finished[p]
    ppo = read_json(folder / "ppo" / "manifest.json")
    assert ppo["status"] == "succeeded" and ppo["attempts"]
    summary = read_json(folder / "pipeline_summary.json")
    assert summary["status"] == "succeeded" and summary["resume_command"] is None
    assert [(r["phase"], r["status"]) for r in summary["phases"]] == [(p, "succeeded") for p in ("sft", "rm", "ppo", "dpo")]
    assert all(r["metrics"] for r in summary["phases"])
