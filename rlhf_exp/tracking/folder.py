"""A run folder belongs to one live process: its lock, and the checks made before anything is written.

The lock is ``<run folder>/.lock``, a small JSON file: the owner's pid, host, process start time, SLURM job id,
when it took the lock, and a heartbeat (the file's modification time, touched every :data:`HEARTBEAT_S` seconds
by a daemon thread). It is created with ``O_EXCL`` (two launches cannot both take it) and removed when the owner
exits. A lock is **stale**, and taken over with one warning line, when

- its owner ran on this host and that process is gone (no such pid, or the pid now belongs to another process:
  its start time differs),
- its owner was an earlier start of this SLURM job (a requeued job restarts with the same job id), or
- its owner ran on another host and the heartbeat is older than :data:`STALE_AFTER_S` seconds (a node that died
  with the lock held; a requeued job restarting on another node).

Otherwise the owner is alive and a second launch into the folder is refused in one line naming it. In a
multi-process run the process that launches the others (or SLURM's rank 0 task) owns the lock.

:func:`check_before_launch` is what the CLI runs before Hydra writes anything (``.hydra/`` included), so a refused
command leaves every file of an existing folder as it was: the folder must be writable, the run in it must be this
run and unfinished (``resume=auto``), and nobody alive may hold its lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from rlhf_exp.config.errors import ConfigError

HEARTBEAT_S = 15.0
STALE_AFTER_S = 90.0
LOCK_NAME = ".lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; /proc/<pid>/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": time.time()}


def read_owner(run_dir: Path) -> dict | None:
    """The lock's owner record (with ``heartbeat``: seconds since epoch), or None when there is no lock. A lock
    file that cannot be parsed (its owner died while writing it) reads as an owner gone long ago."""
    path = Path(run_dir) / LOCK_NAME
    try:
        text, heartbeat = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        owner = {"pid": None, "host": None}
    owner["heartbeat"] = heartbeat
    return owner


def stale_reason(owner: dict) -> str | None:
    """Why the lock's owner is gone (the lock may be taken over), or None when it may still be running."""
    if owner.get("pid") is None:
        return "its lock file is unreadable"
    if owner.get("slurm_job_id") and owner["slurm_job_id"] == os.environ.get("SLURM_JOB_ID"):
        return f"SLURM job {owner['slurm_job_id']} was restarted (requeued)"
    if owner.get("host") == socket.gethostname():
        start = _process_start(int(owner["pid"]))
        if start is None:
            return f"process {owner['pid']} on this host has exited"
        if owner.get("process_start") and start != owner["process_start"]:
            return f"process {owner['pid']} on this host has exited (the pid now belongs to another process)"
        return None
    age = time.time() - float(owner.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat from host {owner.get('host')} is {age:.0f} s old (> {STALE_AFTER_S:.0f} s)"
    return None


def describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {since}"


class RunLock:
    """The lock of one run folder, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one with a warning; ConfigError when a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps(_me())
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(self.path.parent)
                if owner is None:
                    continue  # released meanwhile
                if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                    break  # ours already (a runner re-entering)
                reason = stale_reason(owner)
                if reason is None:
                    raise ConfigError(busy_message(self.path.parent, owner)) from None
                print(f"rlhf_exp: warning: taking over the lock of {self.path.parent} from {describe(owner)}: "
                      f"{reason}", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            try:
                os.write(fd, record.encode())
            finally:
                os.close(fd)
            break
        else:
            raise ConfigError(f"{self.path.parent}: could not take its lock ({self.path}); another launch is "
                              "starting in it at the same time")
        self._thread = threading.Thread(target=self._beat, name="rlhf_exp-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full disk does not stop the heartbeat's owner; the lock file itself is already written

    def release(self) -> None:
        self._stop.set()
        try:
            owner = read_owner(self.path.parent)
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def busy_message(run_dir: Path, owner: dict) -> str:
    return (f"{run_dir} is in use by a live run ({describe(owner)}): one process per run folder. Wait for it, stop "
            f"it (kill -TERM {owner.get('pid')} saves a checkpoint), or leave hydra.run.dir at its default for a new "
            f"run")


def check_writable(folder: Path, what: str) -> None:
    """``folder`` (or, when it does not exist yet, its nearest existing parent) accepts new files; checked with an
    anonymous temporary file, so nothing is left behind. ConfigError naming ``what`` otherwise."""
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{what}={folder}: {probe} is a file, not a folder; choose a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{what}={folder}: cannot write there ({probe} refuses new files: {reason}); choose a "
                          f"writable folder, "
                          f"e.g. {what}=$HOME/rlhf_runs") from None


def check_before_launch(cfg, run_dir: Path | None) -> None:
    """Everything that would refuse a launch into ``run_dir`` (None: a new folder under output_root), checked
    before Hydra writes anything: writable output_root and folder, the run in an existing folder is this run and
    may be continued, and no live process holds the folder's lock."""
    check_writable(Path(str(cfg.output_root)), "output_root")
    if run_dir is None:
        return
    check_writable(run_dir, "hydra.run.dir")
    if (run_dir / "manifest.json").is_file():
        resumable(cfg, run_dir)
    check_unlocked(run_dir)


def check_unlocked(folder: Path) -> None:
    """No live process holds ``folder``'s lock (ConfigError naming the owner otherwise); a stale lock is no
    obstacle (:meth:`RunLock.acquire` takes it over)."""
    owner = read_owner(folder)
    if owner is not None and stale_reason(owner) is None:
        raise ConfigError(busy_message(folder, owner))


def resumable(cfg, run_dir: Path) -> bool:
    """A folder that already holds a run is continued only when it is this run, unfinished, and
    resume=auto; anything else is refused (a run never writes into another run's folder)."""
    from rlhf_exp.tracking.run import config_hash

    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir}/manifest.json cannot be read ({exc.__class__.__name__}: {exc}); the folder's "
                          "run cannot be checked, so nothing is written into it: choose another folder") from None
    if str(cfg.resume) == "never":
        raise ConfigError(f"{run_dir} already holds a run and resume=never: leave hydra.run.dir at its default")
    if manifest.get("config_hash") != config_hash(cfg):
        raise ConfigError(f"{run_dir} holds another run (its config differs); a run never writes into another run's "
                          "folder: leave hydra.run.dir at its default, or continue it with resume=<that folder>")
    if manifest.get("status") == "succeeded":
        raise ConfigError(f"{run_dir} holds this run, and it already succeeded: nothing to resume")
    return True
