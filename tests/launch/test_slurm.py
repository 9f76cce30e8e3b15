"""On a real SLURM cluster (CI starts one with .ci/slurm_up.sh): a KL sweep as a job array, a 2-task
job, a failing job, and the submitted sbatch script against the dry run's rendering.

Without a cluster these skip, unless RLHF_EXP_REQUIRE_SLURM=1 (CI), where a missing cluster fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import read_json, run_cli
from tests.launch.test_launchers import normalised_script

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = None
    if shutil.which("sinfo") is None:
        problem = "no SLURM client (sinfo) on PATH"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 or "idle" not in proc.stdout and "mix" not in proc.stdout:
            problem = f"no idle SLURM node (sinfo: {(proc.stdout + proc.stderr).strip()[:200]})"
    if problem:
        if os.environ.get("RLHF_EXP_REQUIRE_SLURM") == "1":
            pytest.fail(f"RLHF_EXP_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(f"{problem}; CI starts one with .ci/slurm_up.sh")


def sweep_jobs(root, phase):
    (sweep,) = (root / "sweeps").iterdir()
    return sweep, sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.endswith(f"_{phase}"))


def test_kl_sweep_runs_every_job_under_slurm(tmp_path, sft_run, rm_run):
    proc = run_cli(["-m", "launcher=slurm", "phase=ppo", "phase.kl_ctrl=fixed", "phase.kl_coef=0.02,0.1,0.5",
                    f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}", "phase.max_steps=3",
                    f"output_root={tmp_path}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep, jobs = sweep_jobs(tmp_path, "ppo")
    assert len(jobs) == 3
    coefs, tasks = set(), set()
    for job in jobs:
        manifest = read_json(job / "manifest.json")
        assert manifest["status"] == "succeeded", manifest
        slurm = manifest["slurm"]
        assert slurm and slurm["job_id"] and slurm["array_job_id"], manifest
        tasks.add(slurm["array_task_id"])
        summary = read_json(job / "summary.json")
        assert summary["metrics"]["steps"] == 3
        coefs.add(OmegaConf.load(job / "config.yaml").phase.kl_coef)
    assert coefs == {0.02, 0.1, 0.5} and tasks == {"0", "1", "2"}
    # each job used the CPUs SLURM gave it (one core by default), not a thread per core of the node
    per_core = re.search(r"ThreadsPerCore=(\d+)", subprocess.run(["scontrol", "show", "node"], capture_output=True,
                                                                 text=True, check=True).stdout)
    if "OMP_NUM_THREADS" not in os.environ:  # (an exported one is the user's choice, and wins)
        assert {read_json(j / "manifest.json")["cpu_threads"] for j in jobs} == {int(per_core.group(1))}
    assert len({read_json(j / "manifest.json")["slurm"]["array_job_id"] for j in jobs}) == 1  # one job array
    # the script SLURM ran is the one `dry_run=true` renders for the same settings (less the array line)
    (submitted,) = sweep.glob(".submitit/*/*_submission.sh")
    real = [line for line in normalised_script(submitted.read_text()).splitlines() if not line.startswith("#SBATCH --array")]
    from rlhf_exp.launch.slurm import compose_sbatch_script

    rendered = compose_sbatch_script(["launcher=slurm", "phase=ppo", f"output_root={tmp_path}"])
    rendered = normalised_script(rendered.replace("%j", "%A_%a")).splitlines()
    assert [line for line in real if line.startswith("#SBATCH")] == [line for line in rendered if line.startswith("#SBATCH")]


def test_two_task_job_trains_as_two_gloo_processes(tmp_path):
    start = time.monotonic()
    proc = run_cli(["launcher=slurm", "hardware=cpu_x2", "phase.max_steps=16", "phase.logging_steps=4",
                    f"output_root={tmp_path}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, (job,) = sweep_jobs(tmp_path, "sft")
    manifest = read_json(job / "manifest.json")
    assert manifest["status"] == "succeeded" and manifest["world_size"] == 2
    assert manifest["slurm"]["ntasks"] == "2"
    metrics = read_json(job / "summary.json")["metrics"]
    assert metrics["steps"] == 16 and metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["num_processes"] == 2  # one gloo process group across the two SLURM tasks
    assert time.monotonic() - start < 300


def test_failing_job_is_reported_not_waited_on(tmp_path, sft_run):
    """A job whose parent's weights vanished after submission fails inside SLURM: the command ends
    with a non-zero status naming the job and the error, and the manifest says failed."""
    broken = tmp_path / "broken_sft"
    shutil.copytree(sft_run, broken)
    manifest = read_json(broken / "manifest.json")
    manifest["checkpoint"] = str(broken / "checkpoints" / "final")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "checkpoints" / "final" / "model.safetensors").unlink()
    start = time.monotonic()
    proc = run_cli(["-m", "launcher=slurm", "phase=dpo", f"phase.sft_run={broken}", "seed=0,1",
                    f"output_root={tmp_path / 'out'}"], timeout=600)
    assert proc.returncode != 0
    assert "2 of 2 sweep jobs failed" in proc.stderr, proc.stderr[-3000:]
    assert "no file named model.safetensors" in proc.stderr.split("sweep jobs failed")[1]
    assert time.monotonic() - start < 300
    _, jobs = sweep_jobs(tmp_path / "out", "dpo")
    for job in jobs:
        manifest = read_json(job / "manifest.json")
        assert manifest["status"] == "failed" and manifest["error"], manifest


def test_preempted_and_requeued_jobs_finish_like_an_uninterrupted_one(tmp_path, sft_run, rm_run):
    """Three identical PPO jobs in one array (only the free-form tag differs). One gets USR2 (what
    SLURM sends signal_delay_s before the time limit, and on preemption): it saves its step and
    requeues itself through submitit. One is requeued by `scontrol requeue` (SLURM sends SIGTERM): it
    saves its step and SLURM restarts it. Both continue from their checkpoint in their own folder, and
    every metric they log equals the uninterrupted job's."""
    import subprocess as sp
    import sys

    from tests.conftest import ROOT, read_metrics
    from tests.test_resume import same_ppo_metrics

    args = ["-m", "launcher=slurm", "phase=ppo", f"phase.sft_run={sft_run}", f"phase.reward_run={rm_run}",
            "phase.max_steps=40", "phase.save_steps=10", "tag=whole,usr2,requeue", f"output_root={tmp_path}"]
    proc = sp.Popen([sys.executable, "-m", "rlhf_exp", *args], cwd=ROOT, stdout=sp.PIPE, stderr=sp.PIPE, text=True)
    jobs: dict[str, object] = {}
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and len(jobs) < 2 and proc.poll() is None:
        for manifest in tmp_path.glob("sweeps/*/*_ppo/manifest.json"):
            tag = read_json(manifest)["tag"]
            metrics = manifest.parent / "metrics.jsonl"
            started = metrics.is_file() and metrics.read_text().count('"ppo/reward"') >= 3
            if tag in ("usr2", "requeue") and tag not in jobs and started:
                slurm = read_json(manifest)["slurm"]
                job_id = f"{slurm['array_job_id']}_{slurm['array_task_id']}"  # this task, not the whole array
                command = ["scancel", "--signal=USR2", job_id] if tag == "usr2" else ["scontrol", "requeue", job_id]
                sp.run(command, check=True, timeout=30)
                jobs[tag] = manifest.parent
        time.sleep(0.1)
    _, err = proc.communicate(timeout=600)
    assert len(jobs) == 2, f"the jobs never reached step 3: {err[-3000:]}"
    assert proc.returncode == 0, err[-3000:]
    (whole,) = [m.parent for m in tmp_path.glob("sweeps/*/*_ppo/manifest.json") if read_json(m)["tag"] == "whole"]
    for tag, folder in jobs.items():
        manifest = read_json(folder / "manifest.json")
        why = (tag, manifest, job_log(folder, manifest))
        assert manifest["status"] == "succeeded", why
        assert len(manifest["resumed_at"]) == 1 and manifest["slurm"]["restart_count"] == "1", why
        # the first attempt honoured the stop (saved its step, recorded it); "running" there would mean SLURM
        # killed it before (SIGKILL, KillWait seconds after SIGTERM)
        (first,) = manifest["attempts"]
        assert first["status"] == "interrupted", why
        assert first["interrupted"]["signal"] == {"usr2": "SIGUSR2", "requeue": "SIGTERM"}[tag], why
        assert 0 <= first["interrupted"]["seconds"] < 30, why
        steps = [r["step"] for r in read_metrics(folder) if "ppo/reward" in r]
        assert steps == list(range(1, 41)), (tag, steps)  # each step logged once
        same_ppo_metrics(whole, folder)
        gold = read_json(folder / "summary.json")["metrics"]["gold_score"]
        assert gold == read_json(whole / "summary.json")["metrics"]["gold_score"]


def job_log(folder: Path, manifest: dict) -> str:
    """The tail of a sweep job's submitit stderr (every attempt of a requeued job appends to it)."""
    slurm = manifest.get("slurm") or {}
    task = f"{slurm.get('array_job_id')}_{slurm.get('array_task_id')}"
    logs = sorted(folder.parent.glob(f".submitit/{task}/*_log.err"))
    return "".join(log.read_text(errors="replace") for log in logs)[-4000:] or f"no submitit log for {task}"


def test_a_job_gets_the_cpus_and_memory_of_its_hardware_preset(tmp_path):
    """hardware.cpus_per_task / hardware.mem_gb (set by the GPU presets; given here on the CPU preset)
    reach sbatch, SLURM allocates them, and the job's threads follow (docs/slurm-sizing.md)."""
    proc = run_cli(["launcher=slurm", "hardware.cpus_per_task=2", "hardware.mem_gb=1", "phase.max_steps=1",
                    f"output_root={tmp_path}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep, (job,) = sweep_jobs(tmp_path, "sft")
    (submitted,) = sweep.glob(".submitit/*/*_submission.sh")
    assert {"#SBATCH --cpus-per-task=2", "#SBATCH --mem=1GB"} <= set(submitted.read_text().splitlines())
    manifest = read_json(job / "manifest.json")
    accounted = subprocess.run(["sacct", "-j", manifest["slurm"]["job_id"], "-X", "-n", "-P", "-o", "AllocCPUS,ReqMem"],
                               capture_output=True, text=True, check=True, timeout=30)
    assert accounted.stdout.split() == ["2|1G"], accounted.stdout
    if "OMP_NUM_THREADS" not in os.environ:  # (an exported one is the user's choice, and wins)
        assert manifest["cpu_threads"] == 2


def test_a_sweep_over_hardware_is_refused_before_anything_is_submitted(tmp_path):
    """hydra-submitit-launcher would size every job like the command without its swept values (one task
    here, also for cpu_x2): the sweep is refused with the fix, and nothing reaches SLURM or the disk."""
    def jobs() -> set[str]:
        listed = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-o", "JobIDRaw", "-S", "now-1days"],
                                capture_output=True, text=True, check=True, timeout=30)
        return set(listed.stdout.split())

    before = jobs()
    proc = run_cli(["-m", "launcher=slurm", "hardware=cpu,cpu_x2", "phase.max_steps=1", f"output_root={tmp_path}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "but hardware=cpu_x2 needs tasks_per_node=2. Run one sweep per set of resources" in proc.stderr
    assert not any(tmp_path.iterdir()) and jobs() == before
