"""A run folder is never damaged (issue 13): a refused relaunch leaves every file byte-identical (``.hydra/``
included) and the killed run still resumes; one live process per folder (a lock, taken over when stale); metrics
lines are whole and JSON files atomic, a full disk ends the run in one line and ``resume=`` continues it once
space is freed; unwritable folders are refused before anything starts."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.tracking import folder as run_folder
from rlhf_exp.tracking.run import MetricsFile, read_metrics, write_json_atomic
from tests.conftest import ROOT, read_json, run_cli
from tests.test_resume import SFT, wait_for


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    # (a progress bar may precede the line on the terminal's same row: it redraws with \r)
    errors = re.findall(r"rlhf_exp: error:[^\n\r]*", proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_refused_relaunches_leave_the_folder_byte_identical_and_the_killed_run_resumes(tmp_path):
    run = tmp_path / "run"
    proc = launch([*SFT, f"hydra.run.dir={run}"])
    done = wait_for("checkpoints/trainer/checkpoint-10/complete.json", run, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done
    before = snapshot(run)
    assert ".hydra/overrides.yaml" in before and ".lock" in before  # SIGKILL left its lock behind
    refused = [
        [*SFT, "phase.learning_rate=0.01", f"hydra.run.dir={run}"],  # another setting into the folder
        [*SFT, "resume=never", f"hydra.run.dir={run}"],
        [*SFT, "phase.learning_rate=0.01", f"hydra.run.dir={run}", "dry_run=true"],  # a dry run refuses alike
    ]
    for args in refused:
        line = one_line_error(run_cli(args), 2)
        assert str(run) in line
        assert snapshot(run) == before, args
    # the killed run continues from its checkpoint, taking over the dead process's lock with a warning
    proc = run_cli([f"resume={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the lock" in proc.stderr and "has exited" in proc.stderr
    assert read_json(run / "manifest.json")["status"] == "succeeded"
    assert not (run / ".lock").exists()
    steps = [r["step"] for r in read_metrics_file(run) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def read_metrics_file(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_second_launch_into_a_live_run_is_refused_naming_the_owner(tmp_path):
    run = tmp_path / "run"
    args = ["phase.max_steps=100000", "phase.save_steps=50", "phase.early_stopping_patience=0", f"hydra.run.dir={run}"]
    first = launch(args)
    try:
        assert wait_for("metrics.jsonl", run, first), first.stderr.read()[-2000:] if first.poll() is not None else ""
        owner = json.loads((run / ".lock").read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        before = snapshot(run / ".hydra")
        second = run_cli(args)
        line = one_line_error(second, 2)
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "in use by a live run" in line
        assert snapshot(run / ".hydra") == before and first.poll() is None  # the first goes on untouched
    finally:
        first.kill()
        first.wait()


def test_lock_staleness_rules(tmp_path, monkeypatch):
    lock = run_folder.RunLock(tmp_path).acquire()
    try:
        owner = run_folder.read_owner(tmp_path)
        assert owner["pid"] == os.getpid() and run_folder.stale_reason(owner) is None  # alive: not stale
        # a dead process on this host
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        assert "has exited" in run_folder.stale_reason({**owner, "pid": dead.pid})
        # the pid reused by another process (another start time)
        assert "another process" in run_folder.stale_reason({**owner, "process_start": "1"})
        # another host: stale only once its heartbeat is old
        other = {**owner, "host": "elsewhere"}
        assert run_folder.stale_reason({**other, "heartbeat": time.time()}) is None
        old = time.time() - run_folder.STALE_AFTER_S - 5
        assert "heartbeat from host elsewhere" in run_folder.stale_reason({**other, "heartbeat": old})
        # an earlier start of this SLURM job (requeued): the restart takes over at once
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        assert "requeued" in run_folder.stale_reason({**other, "heartbeat": time.time(), "slurm_job_id": "4242"})
        monkeypatch.delenv("SLURM_JOB_ID")
        # a live owner elsewhere refuses a second lock
        (tmp_path / ".lock").write_text(json.dumps({**other, "pid": 1, "started": time.time()}))
        with pytest.raises(ConfigError, match="in use by a live run .*pid 1 on elsewhere"):
            run_folder.RunLock(tmp_path).acquire()
    finally:
        lock.release()


def test_metrics_lines_are_whole_and_a_torn_last_line_is_dropped(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.jsonl"
    metrics = MetricsFile(path)
    metrics.write_line(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    real_write = os.write

    def short_write(fd, data):  # a disk that fills part-way through the line
        real_write(fd, data[:7])
        return 7

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError) as failed:
        metrics.write_line(json.dumps({"step": 2, "loss": 0.5}) + "\n")
    assert failed.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "write", real_write)
    metrics.close()
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'  # cut back to the last whole line
    # a crash (power loss) can still leave a torn last line: dropped with a warning, and repaired on resume
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_metrics(path, repair=True) == [{"step": 1}, {"step": 2}]
    assert "torn last line 3" in capsys.readouterr().err
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # damage before the end is not guessed at
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"status": "running"})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_json_atomic(target, {"status": "failed"})
    assert json.loads(target.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("args, key", [
    (["output_root=/proc/rlhf_exp_x"], "output_root=/proc/rlhf_exp_x"),
    (["hydra.run.dir=/proc/rlhf_exp_x"], "hydra.run.dir=/proc/rlhf_exp_x"),
    (["hydra.run.dir=/proc/rlhf_exp_x", "dry_run=true"], "hydra.run.dir=/proc/rlhf_exp_x"),
    (["-m", "seed=1,2", "output_root=/proc/rlhf_exp_x"], "output_root=/proc/rlhf_exp_x"),
])
def test_unwritable_folders_are_refused_in_one_line(args, key):
    line = one_line_error(run_cli(args), 2)
    assert f"{key}: cannot write there" in line


def test_an_output_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    line = one_line_error(run_cli([f"output_root={tmp_path / 'f'}"]), 2)
    assert "is a file, not a folder" in line


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only: CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        if os.geteuid() != 0:
            pytest.skip(f"mounting a tmpfs needs root ({proc.stderr.strip()})")
        pytest.fail(f"mount tmpfs failed as root: {proc.stderr}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_and_resume_continues_after_freeing_space(small_disk):
    args = ["phase.max_steps=200", "phase.save_steps=20", "phase.logging_steps=1", "phase.early_stopping_patience=0",
            f"output_root={small_disk}"]
    proc = launch(args)
    wait_for("runs/*/checkpoints/trainer/checkpoint-20/complete.json", small_disk, proc)
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f:  # fill what is left: the next metrics line finds no space
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    _, err = proc.communicate(timeout=300)
    proc.stderr = err
    line = one_line_error(proc, 1)
    assert "no space left on device" in line and "resume=" in line
    (run,) = (small_disk / "runs").iterdir()
    records = read_metrics_file(run)  # every line whole
    assert records and read_json(run / "manifest.json")["status"] in ("running", "failed")
    assert not list(run.glob(".*.tmp"))
    ballast.unlink()
    resumed = run_cli([f"resume={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_json(run / "manifest.json")["status"] == "succeeded"
    steps = [r["step"] for r in read_metrics_file(run) if "train/loss" in r]
    assert steps == list(range(1, 201))
