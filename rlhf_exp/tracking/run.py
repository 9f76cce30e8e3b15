"""The run folder contract, written by every phase (later phases and users' tools read it).

    <run folder>/config.yaml     the fully resolved config the run used
    <run folder>/manifest.json   run id, phase, config hash, parents, git commit, times, status
    <run folder>/metrics.jsonl   one JSON object per logging step: {"step": n, "train/loss": ...}
    <run folder>/summary.json    {"phase": ..., "metrics": {...}, "checkpoint": path, "timings": {...}}
    <run folder>/checkpoints/    the phase's saved models

The manifest is written when the run starts (status "running") and rewritten in a ``finally`` when it
ends ("succeeded" or "failed" with the error), so a crashed run is never mistaken for a good parent.
Every file is replaced atomically (temporary name, then rename); metrics lines are flushed as written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.launch.signals import GUARD, Interrupted
from rlhf_exp.tracking.lineage import PARENTS, lineage_keys, model_label
from rlhf_exp.tracking.secrets import scrub, scrub_files

VOLATILE_KEYS = ("output_root", "dry_run", "tag", "resume")


def now_iso() -> str:
    return iso_of(dt.datetime.now().timestamp())


def iso_of(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, never a part: written to a temporary file beside
    it, flushed to disk, then renamed over it. A failed write (a full disk) removes the temporary file and leaves
    ``path`` as it was."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes, keep_existing: bool = False) -> None:
    """``write_text_atomic`` for bytes. ``keep_existing``: a file already at ``path`` stays as it is (a cache file
    named by its content: the first complete writer wins, and a reader that has it memory-mapped never sees it
    replaced); ``path`` is made with a hard link, or, where the file system has none, a rename when still absent."""
    import tempfile

    path = Path(path)
    # a temporary file of this process's own: two processes writing the same file (a worker recording its error
    # while rank 0 closes the run) must not write into one temporary file; the last rename wins, whole
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if not keep_existing:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # no hard links here (some network and FUSE file systems)
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class MetricsFile:
    """metrics.jsonl, appended one whole line at a time: each record is one ``write`` of the whole line, and a
    write that fails part-way (a full disk) is cut back to the end of the previous line, so the file never holds
    half a record. :func:`read_metrics` drops a torn last line left by a crash (power loss) with a warning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_line(self, line: str) -> None:
        data = line.encode()
        end = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"wrote {written} of {len(data)} bytes", str(self.path))
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, end)
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_metrics(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A last line that does not parse (cut by a crash mid-write) is dropped with a
    warning (and, with ``repair``, removed from the file); a bad line before the last is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record ({line[:80]!r})") from None
            print(f"rlhf_exp: warning: {path}: dropped its torn last line {number} (cut by a crash while it was "
                  "written)", file=sys.stderr)
            if repair:
                write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def config_hash(cfg: DictConfig) -> str:
    """Hash of what determines the result: the resolved config less where it is written."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in VOLATILE_KEYS:
        container.pop(key, None)
    blob = json.dumps(container, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so readers never choke."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Run:
    """One run's folder: config, manifest, metrics and summary, plus optional W&B mirroring."""

    def __init__(self, run_dir: Path, cfg: DictConfig, parents: list[dict] | None = None, resume: bool = False):
        self.dir = Path(run_dir).resolve()
        self.cfg = cfg
        self.run_id = run_id_of(self.dir)
        self.phase = str(cfg.phase.name)
        self.parents = parents or []
        self.checkpoint_dir = self.dir / "checkpoints"
        self.main = is_main_process()
        self._metrics_file = None
        self._sinks: list[Any] = []
        self._summary_written = False
        self.manifest: dict[str, Any] = {}
        # continuing this folder's run from its latest checkpoint: its earlier metrics stay
        self.resuming = resume
        self.previous: list[dict[str, Any]] = []
        # what the loaders read and the trainers kept, per split (summary.json "data")
        self.data: dict[str, dict[str, Any]] = {}
        # wall and CPU seconds of this process per stage (summary.json "timings"): see stage()
        self.timings: dict[str, dict[str, float]] = {}
        self._clock: tuple[float, float] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> Run:
        # this process's CPU seconds so far (imports, composing, checks; a phase forked from pipeline.preload's
        # pre-imported process starts at 0), then the clocks of the run itself
        self.timings["before_run"] = {"cpu_s": _process_cpu()}
        self._clock = (time.perf_counter(), _process_cpu())
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.resuming:
            self.previous = read_metrics(self.dir / "metrics.jsonl", repair=self.main)
        if not self.main:
            return self
        if self.resuming:
            return self._reopen()
        resolved = scrub(OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True))
        write_text_atomic(self.dir / "config.yaml", OmegaConf.to_yaml(resolved))
        scrub_files(self.dir / ".hydra")
        self.manifest = {
            "run_id": self.run_id,
            "phase": self.phase,
            "status": "running",
            "model": model_label(self.cfg),
            "data": str(self.cfg.data.name),
            "config_hash": config_hash(self.cfg),
            **lineage_keys(self.cfg),
            "parents": self.parents,
            "git_commit": git_commit(),
            "start_time": now_iso(),
            "end_time": None,
            "seed": int(self.cfg.seed),
            "command": scrub(command_line()),
            "host": socket.gethostname(),
            "launcher": str(self.cfg.launcher.name) if "launcher" in self.cfg else None,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "cpu_threads": _cpu_threads(),
            "slurm": _slurm_job(),
            "python": platform.python_version(),
            "tag": scrub(self.cfg.get("tag")),
        }
        write_json_atomic(self.dir / "manifest.json", self.manifest)
        self._metrics_file = MetricsFile(self.dir / "metrics.jsonl")
        self._open_sinks()
        return self

    def _reopen(self) -> Run:
        """Resume: the manifest says running again (with when it resumed); metrics are appended."""
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        # how the previous attempt ended; "running" means it was killed before it could say (SIGKILL, node loss)
        previous = {"status": self.manifest.get("status"), "end_time": self.manifest.get("end_time"),
                    "interrupted": self.manifest.pop("interrupted", None), "error": self.manifest.pop("error", None)}
        self.manifest.setdefault("attempts", []).append({k: v for k, v in previous.items() if v is not None})
        self.manifest.update(status="running", end_time=None)
        self.manifest.setdefault("resumed_at", []).append(now_iso())
        if _slurm_job() is not None:  # a requeued job: its restart count, perhaps another node
            self.manifest["slurm"] = _slurm_job()
        write_json_atomic(self.dir / "manifest.json", self.manifest)
        self._metrics_file = MetricsFile(self.dir / "metrics.jsonl")
        self._open_sinks(resume=True)
        return self

    def _open_sinks(self, resume: bool = False) -> None:
        if self.cfg.logger.name == "wandb":
            from rlhf_exp.tracking.wandb_sink import WandbSink, identity

            # the W&B group, job type, name and tags, kept in the manifest: a resumed run (resume=<folder> of a
            # sweep job runs as a single run) keeps those it started with
            ident = self.manifest.get("wandb") if resume else None
            if not isinstance(ident, dict):
                ident = scrub(identity(self.cfg.logger, self.dir, self.run_id, self.phase, model_label(self.cfg)))
                self.manifest["wandb"] = ident
                write_json_atomic(self.dir / "manifest.json", self.manifest)
            resolved = scrub(OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True))
            self._sinks.append(WandbSink(self.cfg.logger, self.run_id, self.dir, resolved, resume=resume, ident=ident))

    def alert(self, title: str, text: str) -> None:
        """An alert on every sink that has them (W&B; refused offline, said once there)."""
        if not self.main:
            return
        for sink in self._sinks:
            if hasattr(sink, "alert"):
                sink.alert(title, text)

    def _log_checkpoint(self, summary: dict[str, Any]) -> None:
        """``logger.log_artifacts``: the final checkpoint as a W&B artifact with its lineage (wandb_sink)."""
        logger = self.cfg.logger
        if not logger.get("log_artifacts") or summary["checkpoint"] is None:
            return
        from rlhf_exp.tracking.wandb_sink import artifact_name

        parents = [{"phase": p["phase"], "run_id": p["run_id"], "artifact": artifact_name(p["phase"], p["run_id"]),
                    "checkpoint": p.get("checkpoint")} for p in self.parents if p.get("run_id")]
        metadata = {"run_id": self.run_id, "phase": self.phase, "run_dir": str(self.dir),
                    **{k: self.manifest.get(k) for k in ("model", "data", "config_hash", "model_key", "data_key",
                                                         "seed", "git_commit")},
                    "parents": parents, "metrics": summary["metrics"]}
        for sink in self._sinks:
            if hasattr(sink, "log_checkpoint"):
                sink.log_checkpoint(summary["checkpoint"], self.phase, self.run_id, metadata, parents,
                                    mode=str(logger.get("artifact_mode", "reference")))

    def truncate_metrics(self, step: int) -> None:
        """Drop records logged after ``step`` (the checkpoint resumed from): they are logged again."""
        self.previous = [r for r in self.previous if r.get("step", 0) <= step]
        if not self.main:
            return
        self._metrics_file.close()
        write_text_atomic(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.previous))
        self._metrics_file = MetricsFile(self.dir / "metrics.jsonl")

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.main:
            return
        try:
            failed = exc_type is not None or not self._summary_written
            self.manifest["status"] = "failed" if failed else "succeeded"
            if isinstance(exc, Interrupted):  # a checkpoint was saved: resume=auto/<folder> continues it
                self.manifest["status"] = "interrupted"
                # received -> time: how long the stop took; under SLURM it must fit in KillWait after SIGTERM
                stopped = dt.datetime.now().timestamp()
                received = GUARD.received or stopped
                self.manifest["interrupted"] = {
                    "signal": signal.Signals(exc.signum).name, "step": exc.step, "checkpoint": exc.checkpoint,
                    "received": iso_of(received), "time": iso_of(stopped), "seconds": round(stopped - received, 2)}
            if exc is not None:
                self.manifest["error"] = scrub(f"{exc_type.__name__}: {exc}")[:2000]
            elif not self._summary_written:
                self.manifest["error"] = "the runner returned without writing a summary"
            self.manifest["end_time"] = now_iso()
            self.manifest["versions"] = _versions()
            try:
                write_json_atomic(self.dir / "manifest.json", self.manifest)
            except OSError:
                if exc is None:
                    raise
                # the disk that failed the run refuses the manifest too: it stays at its last good state
                # ("running": resume= continues from the last checkpoint); the run's own error is reported
        finally:
            if self._metrics_file is not None:
                self._metrics_file.close()
            for sink in self._sinks:
                sink.close(failed=exc_type is not None)

    def parent(self, phase: str) -> dict | None:
        """The resolved parent run of ``phase`` (run_id, path, checkpoint), or None."""
        return next((p for p in self.parents if p["phase"] == phase), None)

    # -- recording --------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str):
        """Times a stage of the run (``imports``, ``data``, ``models``, ``setup``, ``gold_initial``, ``train``, ``evaluate``,
        ``gold_final``, ``save``, ``reward_stats``): wall and CPU seconds of this process (every thread), added up per name
        into summary.json's ``timings``, beside ``before_run`` (CPU before the run folder opened: config, checks,
        lineage), ``other`` (the run's time in no stage: the tokenizer, data previews, writing files) and ``total`` (the run,
        from its folder opening to its summary). A name with a slash is a part of a stage (``train/evaluate``: the trainer's
        evaluations during training), left out of ``other``'s sum."""
        wall, cpu = time.perf_counter(), _process_cpu()
        try:
            yield
        finally:
            entry = self.timings.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - wall
            entry["cpu_s"] += _process_cpu() - cpu

    def _timings(self) -> dict[str, dict[str, float]]:
        out = {name: {k: round(v, 3) for k, v in entry.items()} for name, entry in self.timings.items()}
        if self._clock is not None:
            total = {"wall_s": time.perf_counter() - self._clock[0], "cpu_s": _process_cpu() - self._clock[1]}
            staged = [e for n, e in self.timings.items() if n != "before_run" and "/" not in n]
            out["other"] = {k: round(total[k] - sum(e[k] for e in staged), 3) for k in total}
            out["total"] = {k: round(v, 3) for k, v in total.items()}
        return out

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.main or not metrics:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics_file.write_line(json.dumps(record) + "\n")
        for sink in self._sinks:
            sink.log(metrics, step)

    def record_data(self, split: str, **counts: Any) -> None:
        """Counts of one split (``loaded``, ``kept``, ``dropped`` by reason, ``truncated``...), merged."""
        entry = self.data.setdefault(split, {})
        for key, value in counts.items():
            if isinstance(value, dict) and isinstance(entry.get(key), dict):
                entry[key] = {**entry[key], **value}
            else:
                entry[key] = value

    def count_length(self, split: str, total: int, dropped: int, truncated: int, rule: str) -> None:
        """Records cut or dropped for length: counted in summary.json and said once, never silently."""
        self.record_data(split, length_limit={"rule": rule, "of": total, "dropped": dropped, "truncated": truncated})
        if self.main and (dropped or truncated):
            parts = [f"{n} {what}" for n, what in ((dropped, "dropped"), (truncated, "truncated")) if n]
            print(f"rlhf_exp: warning: {split}: {' and '.join(parts)} of {total} records for length ({rule}); "
                  "raise phase.max_length to keep them whole (counts in summary.json 'data')", file=sys.stderr)

    def write_preview(self, rows: list[dict[str, Any]]) -> None:
        """data_preview.jsonl: the first records as the trainer sees them (rendered text, token count)."""
        if self.main and rows:
            write_text_atomic(self.dir / "data_preview.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def finish(self, metrics: dict[str, Any], checkpoint: str | Path | None) -> dict[str, Any]:
        summary = {
            "phase": self.phase,
            "run_id": self.run_id,
            "metrics": {k: _clean(v) for k, v in metrics.items()},
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
        }
        if self.data:
            summary["data"] = self.data
        summary["timings"] = self._timings()
        if self.main:
            write_json_atomic(self.dir / "summary.json", summary)
            self.manifest["checkpoint"] = summary["checkpoint"]
            for sink in self._sinks:
                sink.summary(summary["metrics"])
            try:
                self._log_checkpoint(summary)
            except Exception as exc:  # never the run's result
                print(f"rlhf_exp: W&B: checkpoint artifact not logged ({type(exc).__name__}: {exc})", file=sys.stderr)
        self._summary_written = True
        return summary


def _process_cpu() -> float:
    """CPU seconds of this process, all threads, user + system."""
    return time.process_time()


def _cpu_threads() -> int:
    """torch's intra-op CPU threads in this process, as rlhf_exp.launch.threads set them."""
    import torch

    return torch.get_num_threads()


def run_id_of(run_dir: Path) -> str:
    """A run's id is its folder's name; in a pipeline the folder is named after the phase (sft/, rm/),
    so the pipeline's folder name is prefixed to keep ids unique."""
    return f"{run_dir.parent.name}_{run_dir.name}" if run_dir.name in PARENTS else run_dir.name


def command_line() -> str:
    if os.environ.get("RLHF_EXP_COMMAND"):  # a worker process: the command the user typed
        return os.environ["RLHF_EXP_COMMAND"]
    argv0 = sys.argv[0]
    head = "python -m rlhf_exp" if argv0.endswith(("rlhf_exp/__main__.py", "rlhf-exp")) else argv0
    return " ".join([head, *sys.argv[1:]])


SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS",
              "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_RESTART_COUNT")


def _slurm_job() -> dict[str, str] | None:
    """The SLURM job this run ran in (None outside SLURM); array jobs record the array's id and index."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {k.removeprefix("SLURM_").lower(): os.environ[k] for k in SLURM_VARS if k in os.environ}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "hydra-core"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
