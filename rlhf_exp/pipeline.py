"""``pipeline=rlhf``: several phases in one command, each a normal run in a subfolder.

    <output_root>/pipelines/<time>_<name>/   (or hydra.run.dir=<folder>)
        pipeline.json             the pipeline's manifest: its overrides, status, resume command
        sft/ rm/ ppo/ dpo/        each with the run-folder contract (summary, metrics, manifest)
        pipeline_summary.json     the phases' key numbers (also printed as a table)

Every phase is composed and checked before the first one starts (a typo in ``pipeline.ppo.kl_coef``
fails at once, not after SFT and RM have trained). Each phase then runs as ``python -m rlhf_exp``
in a fresh process, with its parents pointed at the sibling folders.

Resuming: the same command again (or ``resume=<pipeline folder>``) continues the latest unfinished pipeline
of the same overrides under output_root: phases that succeeded are reused as they are, an interrupted phase
resumes from its last checkpoint (its own ``resume=auto``), the rest run. Stopping: SIGTERM or SIGINT (Ctrl-C)
to the pipeline is passed to the running phase, which saves a checkpoint and stops; the pipeline then says how
to resume, in one line. The phase runs in its own process group (a terminal's Ctrl-C reaches the pipeline only)
and is told by the kernel to stop (SIGTERM) if the pipeline process dies, even by SIGKILL: no phase runs on
alone.

On SLURM (``launcher=slurm``): the whole chain runs in one allocation, one job whose single task runs this
same pipeline with ``launcher=local`` phases on the job's node (:func:`submission_overrides`); see
docs/slurm-sizing.md, "Pipelines". The job is the pipeline folder's one live process (its lock); a requeued or
resubmitted job continues the pipeline there as above.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.errors import ConfigError
from rlhf_exp.tracking.folder import RunLock
from rlhf_exp.tracking.lineage import PARENTS
from rlhf_exp.tracking.run import write_json_atomic

# what the table shows for each phase (summary.json metric -> column)
COLUMNS = {
    "sft": {"gold_score": "gold", "eval_perplexity": "eval ppl"},
    "rm": {"eval_accuracy": "accuracy", "gold_accuracy": "gold accuracy"},
    "ppo": {"gold_score": "gold", "kl": "KL", "reward": "RM score"},
    "dpo": {"gold_score": "gold", "eval_rewards_accuracies": "pref. accuracy"},
}


def as_additions(overrides: list[str]) -> list[str]:
    """``pipeline.<phase>.<key>=v`` adds to that phase's free-form settings: Hydra takes it as ``+pipeline...`` (the
    phase's schema checks the key later)."""
    return [f"+{o}" if re.match(r"pipeline\.\w+\.\w", o) else o for o in overrides]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


# the pipeline's own overrides, not its phases' (hydra.*: where the pipeline itself runs; pipeline.preload: how its
# phases' processes start, not what they compute)
OWN = ("dry_run", "resume", "pipeline.preload")


def _own(override: str) -> bool:
    key = _key(override)
    return key in OWN or key == "hydra" or key.startswith("hydra.")


def _launcher(override: str) -> bool:
    key = _key(override)
    return key == "launcher" or key.startswith("launcher.")


def _value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def common_overrides(overrides: list[str]) -> list[str]:
    """The user's overrides that apply to every phase; phase settings must go through pipeline.<phase>."""
    common = []
    for o in overrides:
        key = _key(o)
        if key == "phase" or key.startswith("phase."):
            raise ConfigError(f"{o}: pipeline=... chooses the phases; set a phase's values as "
                              f"pipeline.<phase>.<key>=value (e.g. pipeline.ppo.kl_coef=0.1)")
        if key != "pipeline" and not key.startswith("pipeline."):
            common.append(o)
    return common


def phase_overrides(overrides: list[str], in_job: bool = False) -> list[str]:
    """The overrides every phase gets: the user's, less the pipeline's own; in the pipeline's SLURM job (``in_job``)
    the phases run with launcher=local on the job's node."""
    common = common_overrides([o for o in overrides if not _own(o) and not (in_job and _launcher(o))])
    return [*common, "launcher=local"] if in_job else common


def phase_args(cfg: DictConfig, phase: str, common: list[str], folder: Path | None) -> list[str]:
    args = [f"phase={phase}", *common]
    args += [f"phase.{k}={_value(v)}" for k, v in cfg.pipeline[phase].items()]
    if folder is not None:
        for parent, key in PARENTS[phase]:
            args.append(f"phase.{key}={folder.parent / parent}")
        args.append(f"hydra.run.dir={folder}")
    return args


def check(cfg: DictConfig, overrides: list[str]) -> dict[str, DictConfig]:
    """Compose and validate every phase's command before anything trains; returns the composed configs."""
    from rlhf_exp.cli import compose
    from rlhf_exp.config.validate import validate

    unknown = [p for p in cfg.pipeline.phases if p not in PARENTS]
    if unknown:
        raise ConfigError(f"pipeline.phases: unknown phase(s) {unknown}; phases: {', '.join(PARENTS)}")
    common = common_overrides(overrides)
    composed = {}
    for i, phase in enumerate(cfg.pipeline.phases):
        missing = [p for p, _ in PARENTS[phase] if p not in cfg.pipeline.phases[:i]]
        if missing:
            raise ConfigError(f"pipeline.phases: {phase} needs {', '.join(missing)} to run before it")
        try:
            composed[phase] = compose(phase_args(cfg, phase, common, None))
            validate(composed[phase])
        except ConfigError as exc:
            raise ConfigError(f"pipeline.{phase}: {exc}") from None
    return composed


MANIFEST = "pipeline.json"


def _folder(cfg: DictConfig, overrides: list[str], run_dir: Path | None) -> tuple[Path, bool]:
    """The pipeline's folder and whether it continues an earlier attempt: ``run_dir`` (hydra.run.dir or
    resume=<folder>) when given, else the latest unfinished pipeline of the same overrides under output_root, else
    a new time-stamped folder."""
    key = _identity(cfg, overrides)
    if run_dir is not None:
        manifest = _read(run_dir / MANIFEST)
        if manifest is not None and manifest.get("identity") != key:
            raise ConfigError(f"{run_dir} holds another pipeline (its overrides differ: {manifest.get('overrides')}); "
                              "leave hydra.run.dir at its default, or resume it with resume=<that folder>")
        if manifest is not None and manifest.get("status") == "succeeded":
            raise ConfigError(f"{run_dir} holds this pipeline, and it already succeeded: nothing to resume")
        return run_dir, manifest is not None
    parent = Path(str(cfg.output_root)).expanduser().resolve() / "pipelines"
    if str(cfg.resume) != "never" and parent.is_dir():
        for folder in sorted(parent.iterdir(), reverse=True):  # names start with the time: newest first
            manifest = _read(folder / MANIFEST)
            if manifest and manifest.get("identity") == key and manifest.get("status") != "succeeded":
                return folder, True
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return parent / f"{stamp}_{cfg.pipeline.name}", False


def _identity(cfg: DictConfig, overrides: list[str]) -> str:
    """What makes two pipeline commands the same pipeline: its phases' settings and the common overrides."""
    kept = sorted(o.lstrip("+") for o in overrides if not _own(o))
    settings = {k: v for k, v in OmegaConf.to_container(cfg.pipeline, resolve=True).items() if k != "preload"}
    blob = json.dumps({"pipeline": settings, "overrides": kept},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _succeeded(folder: Path) -> bool:
    manifest = _read(folder / "manifest.json")
    return bool(manifest and manifest.get("status") == "succeeded" and (folder / "summary.json").is_file())


class _Forward:
    """While a phase runs: SIGTERM / SIGINT / SIGUSR2 to the pipeline are passed on to the phase (as SIGTERM for
    SIGINT, the stop every phase checkpoints on)."""

    def __init__(self):
        self.child = None
        self.received: int | None = None

    def __enter__(self):
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
        return self

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        self.received = self.received or signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
            if first:
                print(f"\nrlhf_exp: pipeline: {signal.Signals(signum).name} passed on to the running phase (pid "
                      f"{self.child.pid}); it saves a checkpoint and stops", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run(cfg: DictConfig, overrides: list[str], run_dir: Path | None = None, *, in_job: bool = False):
    """Run (or continue) the pipeline. Locally: prints the table and exits non-zero unless every phase succeeded.
    ``in_job`` (the pipeline's SLURM job, launcher=slurm): the phases run with launcher=local on this node, and the
    outcome is returned as ``(folder, status, signal received or None)`` for the job to hand over."""
    composed = check(cfg, overrides)
    common = phase_overrides(overrides, in_job)
    root, continuing = _folder(cfg, overrides, run_dir)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    lock = RunLock(root).acquire()  # one live process per pipeline folder (a double submit, a second terminal)
    try:
        return _run(cfg, overrides, root, continuing, common, in_job, composed)
    finally:
        lock.release()


def submission_overrides(cfg: DictConfig, root: Path) -> list[str]:
    """Hydra overrides that submit the pipeline as one SLURM job: its folder is the pipeline folder (the one-job
    sweep's folder, and submitit's logs in its .submitit/), one task on one node holding every CPU and GPU the
    hardware preset gives its processes (the phases start their own processes there, as on one machine), named
    after the pipeline."""
    per_task, processes = cfg.launcher.cpus_per_task, int(cfg.hardware.num_processes)
    cpus = int(per_task or 1) * processes if per_task is not None or processes > 1 else None  # null: SLURM's default
    return [f"hydra.sweep.dir={root}", "hydra.sweep.subdir=.", "hydra.launcher.tasks_per_node=1",
            *([f"hydra.launcher.cpus_per_task={cpus}"] if cpus is not None else []),
            f"hydra.launcher.name=rlhf_exp_pipeline_{cfg.pipeline.name}",
            f"hydra.launcher.submitit_folder={root}/.submitit/%j"]


def _phase_env(in_job: bool) -> dict | None:
    """A phase inside the pipeline's SLURM job runs as a local run: submitit's variables stay with the job's
    own process (the one submitit requeues); SLURM's stay (the allocation's CPUs, the job id in manifests)."""
    if not in_job:
        return None
    return {k: v for k, v in os.environ.items() if not k.startswith("SUBMITIT_")}


def _phase_server(cfg: DictConfig, root: Path, in_job: bool, composed: dict[str, DictConfig]):
    """pipeline.preload: one process that imports the ML libraries once and forks each phase from there
    (rlhf_exp.launch.preload), started now so that its imports are under way; None when off, on GPU hardware (CUDA
    must not be touched before a fork; there the import is small beside the training), without fork, with
    RLHF_EXP_THREADS=torch, or when every phase already succeeded."""
    if not cfg.pipeline.get("preload", True) or str(cfg.hardware.accelerator) != "cpu" or not hasattr(os, "fork"):
        return None
    if os.environ.get("RLHF_EXP_THREADS", "").strip().lower() == "torch":  # torch's default threads are fixed when
        return None  # torch is imported: a phase must import it in its own environment
    if all(_succeeded(root / phase) for phase in cfg.pipeline.phases):
        return None
    from rlhf_exp.data.loading import synthetic_key
    from rlhf_exp.launch.preload import PhaseServer

    # the embedded task's examples, built once in the server for the phases still to run (each would build them)
    keys = {synthetic_key(c.data) for p, c in composed.items() if not _succeeded(root / p)} - {None}
    return PhaseServer(env=_phase_env(in_job), warm=list(keys))


def _start_phase(server, args: list[str], env: dict | None):
    """The phase's process: forked from the pre-imported server, or (no server, or it could not fork) started
    afresh, in its own session, stopped with SIGTERM if the pipeline dies."""
    if server is not None and server.ready():
        try:
            return server.start(args, env)
        except (OSError, RuntimeError, ValueError) as exc:  # the server died: fresh processes from here on
            server.available, server.why_not = False, f"the phase server failed: {exc}"
    if server is not None and server.why_not:
        print(f"rlhf_exp: pipeline: phases start as separate processes ({server.why_not})", file=sys.stderr, flush=True)
        server.why_not = None
    from rlhf_exp.launch.preload import stop_with_parent

    return subprocess.Popen([sys.executable, "-m", "rlhf_exp", *args], start_new_session=True,
                            preexec_fn=stop_with_parent, env=env)


def _run(cfg: DictConfig, overrides: list[str], root: Path, continuing: bool, common: list[str], in_job: bool,
         composed: dict[str, DictConfig]):
    resume_command = f"python -m rlhf_exp resume={root}"
    manifest = _read(root / MANIFEST) or {"pipeline": str(cfg.pipeline.name), "identity": _identity(cfg, overrides),
                                           "overrides": [o for o in overrides if not _own(o)],
                                           "phases": list(cfg.pipeline.phases), "attempts": 0}
    manifest.update(status="running", resume_command=resume_command, attempts=int(manifest.get("attempts", 0)) + 1)
    if os.environ.get("SLURM_JOB_ID"):
        manifest["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    write_json_atomic(root / MANIFEST, manifest)
    if continuing:
        print(f"rlhf_exp: pipeline {cfg.pipeline.name}: continuing {root}", file=sys.stderr, flush=True)
    rows = []
    status = "succeeded"
    server = _phase_server(cfg, root, in_job, composed)
    with _Forward() as forward:
        for phase in cfg.pipeline.phases:
            folder = root / phase
            if _succeeded(folder):
                print(f"rlhf_exp: pipeline {cfg.pipeline.name}: {phase} already succeeded in {folder}: reused",
                      file=sys.stderr, flush=True)
            elif forward.received is None:
                print(f"rlhf_exp: pipeline {cfg.pipeline.name}: {phase} -> {folder}", file=sys.stderr, flush=True)
                forward.child = _start_phase(server, phase_args(cfg, phase, common, folder), _phase_env(in_job))
                while True:
                    try:
                        forward.child.wait()
                        break
                    except KeyboardInterrupt:  # a handler was replaced meanwhile: keep waiting for the phase
                        continue
                forward.child = None
            summary_path = folder / "summary.json"
            if forward.received is not None or not _succeeded(folder):
                stopped = forward.received is not None
                rows.append({"phase": phase, "path": str(folder), "status": "interrupted" if stopped else "failed"})
                status = "interrupted" if stopped else "failed"
                break
            summary = json.loads(summary_path.read_text())
            rows.append({"phase": phase, "run_id": summary["run_id"], "path": str(folder), "status": "succeeded",
                         "metrics": {col: summary["metrics"].get(key) for key, col in COLUMNS[phase].items()}})
    if server is not None:
        server.close()
    done = {row["phase"] for row in rows}
    rows += [{"phase": p, "path": str(root / p), "status": "not started"} for p in cfg.pipeline.phases if p not in done]
    write_json_atomic(root / "pipeline_summary.json", {
        "pipeline": cfg.pipeline.name, "status": status, "config": OmegaConf.to_container(cfg.pipeline),
        "overrides": manifest["overrides"], "phases": rows, "resume_command": None if status == "succeeded" else resume_command})
    write_json_atomic(root / MANIFEST, {**manifest, "status": status})
    print(table(rows))
    print(f"rlhf_exp: pipeline folder {root} (pipeline_summary.json)", flush=True)
    if in_job:
        return root, status, forward.received
    if status == "interrupted":
        print(f"rlhf_exp: pipeline stopped by {signal.Signals(forward.received).name} during {rows_stopped(rows)}; "
              f"continue it with: {resume_command}", file=sys.stderr)
        sys.exit(128 + int(forward.received))
    if status != "succeeded":
        print(f"rlhf_exp: error: pipeline stopped: phase {rows_stopped(rows)} failed (see its output above); fix it, "
              f"then continue with: {resume_command}", file=sys.stderr)
        sys.exit(1)
    return root


def rows_stopped(rows: list[dict]) -> str:
    return next((r["phase"] for r in rows if r["status"] in ("interrupted", "failed")), "?")


def table(rows: list[dict]) -> str:
    lines = [f"{'phase':<6} {'status':<10} key numbers", f"{'-' * 6} {'-' * 10} {'-' * 50}"]
    for row in rows:
        numbers = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in row.get("metrics", {}).items() if v is not None)
        lines.append(f"{row['phase']:<6} {row['status']:<10} {numbers}")
    return "\n".join(lines)
