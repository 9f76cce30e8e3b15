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
    with a non-zero status naming the jobs, and each job's log says why."""
    start = time.monotonic()
    proc = run_with_parent_broken_after_submission(["-m", "launcher=slurm", "phase=dpo", "seed=0,1",
                                                    f"output_root={tmp_path / 'out'}"], sft_run, tmp_path)
    assert proc.returncode == 1
    assert "2 of 2 sweep jobs failed" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - start < 300
    sweep, jobs = sweep_jobs(tmp_path / "out", "dpo")
    assert len(jobs) == 2
    logs = sorted(sweep.glob(".submitit/*/*_log.err"))
    assert len(logs) == 2 and all("model.safetensors is missing" in log.read_text() for log in logs)
    for job in jobs:
        if (job / "manifest.json").exists():  # (the parent is checked before the run folder is written)
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
        # the embedded model runs on 1 thread even with 2 CPUs allocated (rlhf_exp/launch/threads.py: intra-op
        # threads buy nothing at its size); a larger model gets the allocation (tests/launch/test_threads.py)
        assert manifest["cpu_threads"] == 1


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


# ------------------------------------------------------------------ when SLURM says no (docs/slurm-sizing.md)


def all_jobs() -> set[str]:
    listed = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-o", "JobIDRaw", "-S", "now-1days"],
                            capture_output=True, text=True, check=True, timeout=30)
    return set(listed.stdout.split())


def queued() -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True, timeout=30).stdout.strip()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rlhf_exp: error:")]


@pytest.mark.parametrize("args, reason, setting", [
    (["hardware=a100x1"], "Invalid generic resource (gres) specification", "hardware=a100x1 asks for 1 GPU(s) per node"),
    (["launcher.partition=nosuchpartition"], "Invalid partition name specified", "launcher.partition=nosuchpartition"),
])
def test_an_sbatch_refusal_is_one_line_and_exit_2(tmp_path, args, reason, setting):
    before = all_jobs()
    proc = run_cli(["launcher=slurm", *args, "phase.max_steps=1", f"output_root={tmp_path}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert line.startswith("rlhf_exp: error: sbatch refused the job:") and reason in line and setting in line, line
    assert "Traceback" not in proc.stderr + proc.stdout and "sbatch: error" not in proc.stderr
    assert all_jobs() == before  # nothing submitted, nothing running
    assert not list(tmp_path.glob("sweeps/*"))  # and no empty sweep folder left behind


@pytest.fixture
def short_partition():
    """A partition with MaxTime=1 minute, made at run time (root / SlurmUser only; gone at slurmctld restart):
    a job asking for more pends with reason PartitionTimeLimit forever."""
    name = "rlhf_short"
    nodes = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, timeout=30).stdout.split()[0]
    made = subprocess.run(["scontrol", "create", f"PartitionName={name}", f"Nodes={nodes}", "MaxTime=1", "Default=NO",
                           "State=UP"], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"cannot create a partition here (scontrol: {made.stderr.strip()}); needs root")
    yield name
    subprocess.run(["scontrol", "delete", f"PartitionName={name}"], capture_output=True, timeout=30)


def test_a_pending_reason_that_never_clears_is_cancelled_with_its_setting(tmp_path, short_partition):
    start = time.monotonic()
    proc = run_cli(["launcher=slurm", f"launcher.partition={short_partition}", "launcher.time_min=5",
                    "phase.max_steps=1", f"output_root={tmp_path}"], timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    # (Slurm 22.05 gives such a job PartitionTimeLimit, and at some scheduling passes PartitionConfig)
    assert re.search(r"pending with reason Partition(TimeLimit|Config)", line) and "launcher.time_min" in line, line
    assert "was cancelled (scancel" in line and "Traceback" not in proc.stderr
    assert took < 60, took
    job = re.search(r"SLURM job (\d+)", line).group(1)
    assert job not in queued()
    state = subprocess.run(["sacct", "-j", job, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True,
                           timeout=30).stdout.strip()
    assert state.startswith("CANCELLED"), state


def test_a_job_too_big_for_the_partition_is_cancelled(tmp_path):
    """Two nodes of two tasks on the one-node CI partition: PartitionConfig (no root needed)."""
    proc = run_cli(["launcher=slurm", "hardware=cpu_x2", "hardware.num_nodes=2", "phase.max_steps=1",
                    f"output_root={tmp_path}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert re.search(r"pending with reason Partition(Config|NodeLimit)", line) and "hardware.num_nodes" in line, line
    assert re.search(r"SLURM job (\d+)", line).group(1) not in queued()


def test_pending_timeout_cancels_a_job_that_waits_too_long(tmp_path):
    """A held job (JobHeldUser: a reason that can clear, so waited on) past launcher.pending_timeout_min."""
    start = time.monotonic()
    proc = run_cli(["launcher=slurm", "+launcher.additional_parameters.hold=true", "launcher.pending_timeout_min=0.1",
                    "phase.max_steps=1", f"output_root={tmp_path}"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "still pending after launcher.pending_timeout_min=0.1 (reason: JobHeldUser)" in line, line
    assert time.monotonic() - start < 60
    assert re.search(r"SLURM job (\d+)", line).group(1) not in queued()


def job_processes(folder: Path) -> list[int]:
    """The pids of the submitit job processes (on this node) whose command names ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if "submitit.core._submit" in cmdline and str(folder) in cmdline and "srun" not in cmdline.split()[0]:
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("stop", ["scancel", "sigkill"])
def test_a_stopped_running_job_is_one_line_with_its_resume_command(tmp_path, stop):
    """`scancel` of a running job: the job saves its step (SIGTERM), the command prints one line with the
    job id and the resume command, exits 1; that command continues the run in its folder, through SLURM.
    A job process killed outright (SIGKILL: as an OOM kill) ends FAILED without a result: one line too."""
    import signal
    import subprocess as sp
    import sys

    from tests.conftest import ROOT

    args = ["launcher=slurm", "phase.max_steps=400", "phase.early_stopping_patience=0", f"output_root={tmp_path}"]
    proc = sp.Popen([sys.executable, "-m", "rlhf_exp", *args], cwd=ROOT, stdout=sp.PIPE, stderr=sp.PIPE, text=True)
    deadline, job = time.monotonic() + 300, None
    while time.monotonic() < deadline and job is None and proc.poll() is None:
        for manifest in tmp_path.glob("sweeps/*/*_sft/manifest.json"):
            metrics = manifest.parent / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count("\n") >= 2:
                job = read_json(manifest)["slurm"]["job_id"]
                if stop == "scancel":
                    sp.run(["scancel", job], check=True, timeout=30)
                else:
                    for pid in job_processes(tmp_path):
                        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=300)
    assert job, f"the job never logged a step: {err[-3000:]}"
    assert proc.returncode == 1, err[-3000:]
    (line,) = error_lines(err)
    (folder,) = [m.parent for m in tmp_path.glob("sweeps/*/*_sft/manifest.json")]
    what = (f"was cancelled (sacct: CANCELLED by {os.getuid()})" if stop == "scancel" else
            f"ended without a result (sacct: FAILED; its log: .submitit/{job}/)")
    assert line == (f"rlhf_exp: error: SLURM job {job} {what}; continue its run from its last checkpoint with: "
                    f"python -m rlhf_exp resume={folder}"), line
    assert "Traceback" not in err and "UncompletedJobError" not in err
    if stop == "sigkill":
        return
    assert read_json(folder / "manifest.json")["status"] == "interrupted"
    resumed = run_cli([f"resume={folder}"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = read_json(folder / "manifest.json")
    assert manifest["status"] == "succeeded" and len(manifest["resumed_at"]) == 1, manifest
    assert read_json(folder / "summary.json")["metrics"]["steps"] == 400


def run_with_parent_broken_after_submission(args: list[str], sft_run: Path, tmp_path: Path):
    """``python -m rlhf_exp ARGS phase.sft_run=<copy of sft_run>`` submitted held (sbatch --hold: the launch
    checks pass), the copy's weights deleted, then the jobs released: they fail inside SLURM."""
    import subprocess as sp
    import sys

    from tests.conftest import ROOT

    broken = tmp_path / "broken_sft"
    shutil.copytree(sft_run, broken)
    manifest = read_json(broken / "manifest.json")
    manifest["checkpoint"] = str(broken / "checkpoints" / "final")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    proc = sp.Popen([sys.executable, "-m", "rlhf_exp", *args, f"phase.sft_run={broken}",
                     "+launcher.additional_parameters.hold=true"], cwd=ROOT, stdout=sp.PIPE, stderr=sp.PIPE, text=True)
    deadline, held = time.monotonic() + 120, []
    while time.monotonic() < deadline and not held and proc.poll() is None:
        time.sleep(0.5)
        held = [line.split()[0] for line in queued().splitlines() if line.endswith("JobHeldUser")]
    assert held, proc.communicate(timeout=60)
    (broken / "checkpoints" / "final" / "model.safetensors").unlink()
    for job in held:
        sp.run(["scontrol", "release", job.split("_")[0]], check=True, timeout=30)
    out, err = proc.communicate(timeout=600)
    return sp.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_failed_job_is_failed_in_sacct_with_a_clean_log(tmp_path, sft_run):
    """A run that fails inside its SLURM job exits 1 (sacct: FAILED), after submitit saved its result (the
    command reports it instead of waiting), and the job log holds our error, not submitit's traceback."""
    proc = run_with_parent_broken_after_submission(["launcher=slurm", "phase=dpo", f"output_root={tmp_path / 'out'}"],
                                                   sft_run, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 1 sweep jobs failed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    sweep, (job,) = sweep_jobs(tmp_path / "out", "dpo")
    (slurm_job,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()]
    accounted = subprocess.run(["sacct", "-j", slurm_job, "-X", "-n", "-P", "-o", "State,ExitCode"],
                               capture_output=True, text=True, check=True, timeout=30)
    assert accounted.stdout.split() == ["FAILED|1:0"], accounted.stdout
    log = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
    assert f"rlhf_exp: error: sweep job {job.name} failed" in log and "Submitted job triggered an exception" not in log, log


PIPELINE = ["pipeline=rlhf", "launcher=slurm", "pipeline.sft.max_steps=20", "pipeline.rm.max_steps=20",
            "pipeline.ppo.max_steps=40", "pipeline.ppo.save_steps=10", "pipeline.dpo.max_steps=40",
            "pipeline.dpo.save_steps=10"]


def test_a_pipeline_dry_run_shows_its_one_job_and_a_multi_node_pipeline_is_refused(tmp_path):
    """`pipeline=rlhf launcher=slurm`: one job, one task holding the preset's CPUs, the phases with launcher=local;
    a preset over several nodes is refused in one line (exit 2), nothing written."""
    proc = run_cli(["pipeline=rlhf", "launcher=slurm", "hardware=cpu_x2", "dry_run=true", f"output_root={tmp_path}"],
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sbatch = [line for line in proc.stdout.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in sbatch and "#SBATCH --cpus-per-task=2" in sbatch, sbatch
    assert "#SBATCH --job-name=rlhf_exp_pipeline_rlhf" in sbatch
    phases = [line for line in proc.stdout.splitlines() if line.startswith("python -m rlhf_exp phase=")]
    assert len(phases) == 4 and all("launcher=local" in line and "hardware=cpu_x2" in line for line in phases), phases
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    refused = run_cli(["pipeline=rlhf", "launcher=slurm", "hardware=a100x8", "hardware.num_nodes=2",
                       f"output_root={tmp_path}"], timeout=300)
    assert refused.returncode == 2 and error_lines(refused.stderr) == [refused.stderr.strip()], refused.stderr
    assert "hardware.num_nodes=2" in refused.stderr and "one node" in refused.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_pipeline_is_one_slurm_job_that_requeues_and_resumes(tmp_path):
    """`pipeline=rlhf launcher=slurm` runs the chain in one job. USR2 during PPO (what SLURM sends before the
    time limit, and on preemption): PPO saves its step, the job requeues itself and continues the pipeline
    (SFT and RM reused, PPO from its checkpoint). `scancel` during DPO: one line with the pipeline's resume
    command, exit 1; that command submits again and finishes the chain; PPO logged every step once."""
    import subprocess as sp
    import sys

    from tests.conftest import ROOT, read_metrics

    def progress(phase: str, key: str) -> int:
        found = list(tmp_path.glob(f"pipelines/*/{phase}/metrics.jsonl"))
        return found[0].read_text().count(key) if found else 0

    proc = sp.Popen([sys.executable, "-m", "rlhf_exp", *PIPELINE, f"output_root={tmp_path}"], cwd=ROOT,
                    stdout=sp.PIPE, stderr=sp.PIPE, text=True)
    signalled: list[str] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(signalled) < 2 and proc.poll() is None:
        (root,) = list(tmp_path.glob("pipelines/*")) or [None]
        job = (read_json(root / "pipeline.json").get("slurm_job_id") if root and (root / "pipeline.json").is_file()
               else None)
        if not signalled and job and progress("ppo", '"ppo/reward"') >= 3:
            sp.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
            signalled.append("usr2")
        elif signalled == ["usr2"] and job and progress("dpo", '"step"') >= 2:
            sp.run(["scancel", job], check=True, timeout=30)
            signalled.append("scancel")
        time.sleep(0.2)
    _, err = proc.communicate(timeout=300)
    assert signalled == ["usr2", "scancel"], err[-3000:]
    assert proc.returncode == 1, err[-3000:]
    (root,) = list(tmp_path.glob("pipelines/*"))
    (line,) = error_lines(err)
    assert line.endswith(f"continue its run from its last checkpoint with: python -m rlhf_exp resume={root}"), line
    assert "Traceback" not in err
    resumed = run_cli([f"resume={root}"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    pipeline = read_json(root / "pipeline.json")
    assert pipeline["status"] == "succeeded" and pipeline["attempts"] == 3, pipeline  # first start, requeue, resume
    rows = read_json(root / "pipeline_summary.json")["phases"]
    assert [(r["phase"], r["status"]) for r in rows] == [(p, "succeeded") for p in ("sft", "rm", "ppo", "dpo")]
    for phase in ("sft", "rm"):  # trained once, reused by the requeued job and the resumed one
        assert not read_json(root / phase / "manifest.json").get("resumed_at"), phase
    ppo = read_json(root / "ppo" / "manifest.json")
    (first,) = ppo["attempts"]
    assert first["status"] == "interrupted" and first["interrupted"]["signal"] == "SIGUSR2", ppo
    assert [r["step"] for r in read_metrics(root / "ppo") if "ppo/reward" in r] == list(range(1, 41))
    dpo = read_json(root / "dpo" / "manifest.json")
    assert dpo["status"] == "succeeded" and dpo["attempts"][0]["status"] == "interrupted", dpo
    assert read_json(root / "dpo" / "summary.json")["metrics"]["steps"] == 40
