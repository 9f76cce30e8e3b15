"""What the CLI does between ``sbatch`` and a SLURM job's result (``launcher=slurm``).

hydra-submitit-launcher submits (``executor.map_array``) and then blocks in ``job.results()``: an sbatch
refusal surfaced as submitit's traceback, a job pending on a reason that never clears was waited on
forever, and a job cancelled with ``scancel`` ended the command with ``UncompletedJobError``. Hydra only
instantiates launchers from ``hydra_plugins`` packages, so :func:`install` wraps the plugin's
``SlurmLauncher.launch`` in the CLI process (never in the jobs) instead:

- sbatch refuses the job: one line with SLURM's reason and the setting to change, exit 2
  (:data:`EXIT_REFUSED`); nothing was submitted.
- a job pends on a reason that cannot clear by waiting (:func:`hopeless`: a per-job limit of the
  partition, QOS or association, an invalid account/QOS, impossible constraints): within seconds, one
  line with the reason and the setting, ``scancel``, exit 2. Any other reason (Priority, Resources,
  ReqNodeNotAvail, AssocMaxJobsLimit, held jobs, ...) can clear: one line after a minute, and the wait goes
  on, bounded by ``launcher.pending_timeout_min`` (null: forever) until the first job of the submission
  starts; past it the jobs are cancelled, exit 2.
- a running job cancelled (``scancel``, or by an admin), or killed by SLURM without a result (time limit
  with no requeue left, memory, node failure): one line with the job id, its state and the resume command
  of its run folder; the sweep's other jobs are waited on, and the command exits 1 (the sweep summary
  counts the job as not succeeded).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXIT_REFUSED = 2
# jobs that ended without a result (cancelled, killed), reported by the watcher: run folder (resolved) ->
# the line printed (the CLI's exit status does not repeat them)
REPORTED: dict[str, str] = {}

_PENDING_HINTS = [
    # (pattern of SLURM's reason, what to change)
    (r"PartitionTimeLimit", "launcher.time_min exceeds the partition's MaxTime (scontrol show partition): lower it, or "
                            "pick another launcher.partition"),
    (r"PartitionNodeLimit", "the job's node count (hardware.num_nodes of the hardware= preset) is outside the partition's "
                            "limits: fewer nodes, or another launcher.partition"),
    (r"PartitionConfig", "the job asks for more than the partition allows (scontrol show partition: its MaxTime "
                         "against launcher.time_min, its nodes against hardware.num_nodes and hardware.num_processes of "
                         "the hardware= preset, launcher.cpus_per_task, launcher.mem_gb): ask for less, or another "
                         "launcher.partition"),
    (r"Wall", "launcher.time_min exceeds the limit of the job's QOS/account: lower it, or another launcher.qos"),
    (r"Node", "the job's node count (hardware.num_nodes) exceeds the limit of its QOS/account: fewer nodes, or "
              "another launcher.qos"),
    (r"GRES|Gres", "the GPUs of the hardware= preset exceed the limit of the job's QOS/account: a smaller preset, or "
                   "another launcher.qos"),
    (r"Cpu|CPU", "the job's CPUs (launcher.cpus_per_task x tasks) exceed the limit of its QOS/account: fewer, or "
                 "another launcher.qos"),
    (r"Mem", "launcher.mem_gb exceeds the limit of the job's QOS/account: lower it, or another launcher.qos"),
    (r"InvalidAccount|AccountNotAllowed", "launcher.account is not valid for you on this partition (sacctmgr show assoc "
                                          "user=$USER)"),
    (r"InvalidQOS|QOSNotAllowed", "launcher.qos is not valid for you (sacctmgr show assoc user=$USER)"),
    (r"BadConstraints", "no node has the features of launcher.constraint (sinfo -o '%N %f')"),
    (r"DependencyNeverSatisfied", "the job's dependency (launcher.additional_parameters) can never be met"),
]


def hopeless(reason: str) -> bool:
    """A pending reason that waiting cannot clear: the job as submitted exceeds a per-job limit (of its
    partition, QOS or association) or names something invalid; only a change of the job or of the
    cluster's configuration lets it run. Reasons about others' jobs, free resources, your running-job
    counts, holds, reservations or nodes that are down (ReqNodeNotAvail: often a maintenance window)
    can clear, and are waited on."""
    return bool(re.fullmatch(r"Partition(Time|Node)Limit|PartitionConfig|(QOS|Assoc)Max\w*PerJob\w*|QOSMin\w+|InvalidAccount|"
                             r"InvalidQOS|AccountNotAllowed|QOSNotAllowed|BadConstraints|DependencyNeverSatisfied",
                             reason))


def pending_hint(reason: str) -> str:
    for pattern, hint in _PENDING_HINTS:
        if re.search(pattern, reason):
            return hint
    return "check launcher.* and the hardware= preset (dry_run=true prints the sbatch script)"


_SBATCH_HINTS = [
    (r"gres|generic resource|gpu", "{gpus}: pick a hardware= preset without GPUs (hardware=cpu) or a "
                                   "launcher.partition whose nodes have them (sinfo -o '%P %G')"),
    (r"No partition specified|default partition", "set launcher.partition (sinfo lists the partitions; a site default "
                                                  "goes in conf/site/local.yaml)"),
    (r"partition", "launcher.partition={partition} is not a partition you may use (sinfo lists them)"),
    (r"account", "launcher.account={account} is not valid for you here (sacctmgr show assoc user=$USER)"),
    (r"qos", "launcher.qos={qos} is not valid for you here (sacctmgr show assoc user=$USER)"),
    (r"time limit", "launcher.time_min={time_min} exceeds what the partition/QOS allows (scontrol show partition): "
                    "lower it"),
    (r"feature|constraint", "launcher.constraint={constraint} names features no node has (sinfo -o '%N %f')"),
    (r"[Mm]emory", "launcher.mem_gb={mem_gb} (memory per node) is more than a node has: lower it (sinfo -o '%N %m')"),
    (r"Node count", "hardware.num_nodes={nodes} is more nodes than the partition has or allows: fewer nodes, or "
                    "another launcher.partition"),
    (r"CPU count|cpus", "launcher.cpus_per_task={cpus_per_task} x tasks per node is more than a node has: lower it"),
    (r"node configuration is not available", "no node of the partition has what the job asks for ({gpus}, "
                                             "launcher.cpus_per_task={cpus_per_task}, launcher.mem_gb={mem_gb}): a "
                                             "smaller hardware= preset or another launcher.partition"),
    (r"contact slurm controller|Socket timed out|Connection refused", "the SLURM controller did not answer: try again "
                                                                      "(scontrol ping)"),
]


def sbatch_message(error: str, params: dict[str, Any], preset: str | None) -> str:
    """One line for sbatch's refusal: SLURM's reason and the setting to change."""
    lines = [line.strip() for line in error.splitlines() if "error:" in line]
    reasons = [line.split("error:", 1)[1].strip() for line in lines]
    # sbatch says "Batch job submission failed: <reason>", sometimes after a more specific line
    reason = "; ".join(dict.fromkeys(r.removeprefix("Batch job submission failed: ") for r in reasons)) or \
        (error.strip().splitlines() or ["no reason given"])[-1]
    gpus = params.get("gpus_per_node") or 0
    values = {**{k: "null" if v is None else v for k, v in params.items()},
              "gpus": f"hardware={preset or '...'} asks for {gpus} GPU(s) per node" if gpus else
              f"hardware={preset or '...'} (no GPUs)", "time_min": params.get("timeout_min")}
    hint = "check launcher.* and the hardware= preset (dry_run=true prints the sbatch script)"
    for pattern, text in _SBATCH_HINTS:
        if re.search(pattern, reason, re.IGNORECASE):
            hint = text.format_map(_Default(values))
            break
    return f"sbatch refused the job: {reason}; {hint}"


class _Default(dict):
    def __missing__(self, key: str) -> str:
        return "null"


def _run(command: list[str], timeout: float = 30) -> str | None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _refuse(message: str, sweep_dir: Path | None = None) -> None:
    """One line, exit 2. No job of this submission ran: a sweep folder holding only what the submission
    left (submitit's files, Hydra's multirun.yaml) is removed, and the exit skips the sweep summary
    written at exit (it would list no jobs)."""
    import os
    import shutil

    print(f"rlhf_exp: error: {message}", file=sys.stderr, flush=True)
    if sweep_dir is not None and sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= LEFTOVERS:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    sys.stdout.flush()
    os._exit(EXIT_REFUSED)


LEFTOVERS = {".submitit", "multirun.yaml", "sweep_summary.json"}


def _cancel(ids: list[str]) -> None:
    _run(["scancel", *ids])


def _base(job_id: str) -> str:
    return job_id.split("_", 1)[0]


def watch(jobs: list, pending_timeout_min: float | None, sweep_dir: Path | None = None, poll_s: float = 1.0) -> None:
    """Wait until every job is done (as submitit's ``job.done()`` says), watching why they pend."""
    ids = sorted({_base(j.job_id) for j in jobs})
    start = time.monotonic()
    started = False  # a job of this submission ran: the pending timeout no longer applies
    next_check, reported, hopeless_seen, pending_since = start + 2, set(), {}, {}
    while not all(j.done() for j in jobs):
        now = time.monotonic()
        if now >= next_check:
            waited = now - start
            next_check = now + (2 if waited < 60 else 10 if waited < 600 else 30)
            out = _run(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%r"])
            rows = [line.split("|") for line in (out or "").splitlines() if line.count("|") == 2]
            started = started or any(state != "PENDING" for _, state, _ in rows) or (out is not None and not rows)
            pending = [(job, reason) for job, state, reason in rows if state == "PENDING"]
            pending_since = {job: pending_since.get(job, now) for job, _ in pending}  # (again, after a requeue)
            for job, reason in pending:
                if hopeless(reason):
                    # seen twice, a few seconds apart: not a reason of the moment
                    if hopeless_seen.setdefault(reason, now) < now - 1:
                        _cancel(ids)
                        _refuse(f"SLURM job {job} cannot start: pending with reason {reason}, which waiting does not "
                                f"clear; {pending_hint(reason)}. The job was cancelled (scancel {' '.join(ids)}).", sweep_dir)
                    next_check = min(next_check, now + 2)
                elif now - pending_since[job] >= 60 and reason not in reported:
                    reported.add(reason)
                    print(f"rlhf_exp: SLURM job {job} has been pending for {(now - pending_since[job]) / 60:.0f} min: "
                          f"{reason}; still "
                          f"waiting (launcher.pending_timeout_min bounds the wait; squeue -j {_base(job)} shows it)",
                          file=sys.stderr, flush=True)
            if pending and not started and pending_timeout_min is not None and waited >= pending_timeout_min * 60:
                job, reason = pending[0]
                _cancel(ids)
                _refuse(f"SLURM job {job} was still pending after launcher.pending_timeout_min={pending_timeout_min:g} "
                        f"(reason: {reason}); it was cancelled (scancel {' '.join(ids)}). Raise or null "
                        f"launcher.pending_timeout_min to wait longer, or ask for less (launcher.time_min, the hardware= "
                        "preset) to start sooner.", sweep_dir)
        time.sleep(poll_s)


def final_states(jobs: list) -> dict[str, str]:
    """SLURM's final state of each job (sacct), e.g. {"65_1": "CANCELLED by 0"}."""
    ids = sorted({_base(j.job_id) for j in jobs})
    out = _run(["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobID,State"]) or ""
    states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {j.job_id: states.get(j.job_id, "") for j in jobs}


def run_folder_of(sweep_dir: Path, job_id: str) -> Path | None:
    """The run folder whose manifest records this SLURM job (``<array job>_<task>`` or a plain id); a pipeline's
    job (its folder holds pipeline.json): the pipeline's folder, which resumes the whole chain."""
    import json

    if (sweep_dir / "pipeline.json").is_file():
        return sweep_dir
    for manifest in sweep_dir.glob("*/manifest.json"):
        try:
            slurm = json.loads(manifest.read_text()).get("slurm") or {}
        except (OSError, ValueError):
            continue
        ids = {slurm.get("job_id"), f"{slurm.get('array_job_id')}_{slurm.get('array_task_id')}"}
        if job_id in ids:
            return manifest.parent
    return None


def ended_line(job_id: str, state: str, folder: Path | None) -> str:
    """One line for a job that ended without a result: cancelled, or killed by SLURM (time limit, memory)."""
    what = (f"was cancelled (sacct: {state})" if state.startswith("CANCELLED") else
            f"ended without a result (sacct: {state or 'state unknown'}; its log: .submitit/{job_id}/)")
    if folder is None:
        return f"rlhf_exp: error: SLURM job {job_id} {what} before its run started: nothing to resume; run the command again"
    return (f"rlhf_exp: error: SLURM job {job_id} {what}; continue its run from its last checkpoint with: "
            f"python -m rlhf_exp resume={folder}")


def _has_result(job, wait_s: float = 0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if all(j.paths.result_pickle.exists() for j in (job._sub_jobs or [job])):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)


class _Ended:
    """Stands in for a job that ended without a result in the launcher's ``[j.results()[0] for j in jobs]``: a completed
    Hydra job with a NaN objective (a failed trial to Optuna); the sweep summary reads its manifest."""

    def __init__(self, job, overrides: list[str]) -> None:
        self.job, self.overrides = job, overrides

    def results(self) -> list:
        from hydra.core.utils import JobReturn, JobStatus

        return [JobReturn(overrides=list(self.overrides), status=JobStatus.COMPLETED, _return_value=math.nan)]


def install(pending_timeout_min: float | None) -> None:
    """Wrap hydra-submitit-launcher's SLURM launch (in this process) as the module docstring says."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    original = SlurmLauncher.launch
    if getattr(original, "_rlhf_exp", False):
        return

    def launch(self, job_overrides, initial_job_idx):
        import submitit
        from submitit.core.utils import FailedJobError

        map_array = submitit.AutoExecutor.map_array
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        preset = self.config.hydra.runtime.choices.get("hardware")

        def watched_map_array(executor, fn, *iterable):
            captured = io.StringIO()  # submitit prints sbatch's stderr before raising it: said once, below
            try:
                with contextlib.redirect_stderr(captured):
                    jobs = map_array(executor, fn, *iterable)
            except FailedJobError as exc:  # sbatch refused: its stderr is in the message
                _refuse(sbatch_message(str(exc) or captured.getvalue(), self.params, preset), sweep_dir)
            sys.stderr.write(captured.getvalue())
            watch(jobs, pending_timeout_min, sweep_dir)
            states = final_states(jobs)
            watched = []
            for job, overrides in zip(jobs, iterable[0]):
                state = states.get(job.job_id, "")
                # a result can reach a shared file system late (submitit allows 15 s); a cancelled job has none
                if not _has_result(job, wait_s=0 if state.startswith("CANCELLED") else 15):
                    folder = run_folder_of(sweep_dir, job.job_id)
                    line = ended_line(job.job_id, state, folder)
                    print(line, file=sys.stderr, flush=True)
                    if folder is not None:
                        REPORTED[str(folder.resolve())] = line
                    watched.append(_Ended(job, overrides))
                else:
                    watched.append(job)
            return watched

        submitit.AutoExecutor.map_array = watched_map_array
        try:
            return original(self, job_overrides, initial_job_idx)
        finally:
            submitit.AutoExecutor.map_array = map_array

    launch._rlhf_exp = True
    SlurmLauncher.launch = launch
