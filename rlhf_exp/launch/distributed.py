"""Processes: how a run becomes one process per device, on one machine or under SLURM.

Three ways a run gets its workers, all ending in the same ``torch.distributed`` environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that accelerate and the TRL trainers read:

- Under SLURM (``launcher=slurm``): SLURM starts ``tasks_per_node = hardware.num_processes`` tasks per
  node, each running the Hydra job; :func:`from_submitit` exports the variables from submitit's job
  environment (master = the first node of the allocation, port from the job id). Multi-node is the same.
- On one machine (``hardware.num_processes > 1``, no SLURM): Hydra composes once and makes one run
  folder; :func:`spawn_workers` starts ``torchrun --standalone`` with one worker per device, each of
  which loads the run's pickled config (``rlhf_exp.launch.worker``). Hydra never initialises in a worker.
- Already inside torchrun/accelerate launch (RANK set): nothing to do.

Only rank 0 writes the run folder (``rlhf_exp.tracking.run.is_main_process``).
"""

from __future__ import annotations

import copy
import itertools
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.errors import ConfigError

LAUNCH_DIR = ".launch"  # inside the run folder: the workers' config


class WorkersFailed(RuntimeError):
    """A worker process of a multi-process run failed (its own traceback was printed above)."""


def world_size(cfg: DictConfig) -> int:
    return int(cfg.hardware.num_processes) * int(cfg.hardware.num_nodes)


def check_multiprocess_launch(cfg: DictConfig) -> None:
    """What can start the workers a preset asks for: several nodes need SLURM."""
    if cfg.hardware.num_nodes > 1 and cfg.launcher.name != "slurm":
        raise ConfigError(f"hardware={cfg.hardware.name} spans {cfg.hardware.num_nodes} nodes; only SLURM starts "
                          "processes on several machines: add launcher=slurm")


def check_accelerator(cfg: DictConfig, load_torch: bool = True) -> None:
    """A GPU preset on a machine without the GPUs it asks for fails here, not deep inside a trainer. Jobs
    that SLURM runs elsewhere are checked there (this machine may be a login node or a laptop without GPUs).

    What a dry run can see is checked first, without importing torch (:func:`visible_gpus`, the installed
    torch's build tag), so ``dry_run=true`` refuses with the same message; a real run (``load_torch``)
    then also asks torch itself, which catches what no file shows (a driver too old for this CUDA build)."""
    if cfg.hardware.accelerator != "cuda" or cfg.launcher.name == "slurm":
        return
    name, n = cfg.hardware.name, int(cfg.hardware.num_processes)
    found, source = visible_gpus()
    if found == 0:
        raise ConfigError(f"hardware={name} needs CUDA GPUs and none is visible here ({source}): use hardware=cpu, "
                          "or launcher=slurm to run it on GPU nodes")
    if found < n:
        raise ConfigError(f"hardware={name} starts {n} processes, one per GPU, and this machine has {found} GPUs "
                          f"({source}): use a preset for at most {found} GPUs, or launcher=slurm to run it on GPU nodes")
    build = _torch_version()
    if build is not None and build.partition("+")[2] == "cpu":
        raise ConfigError(f"hardware={name} needs CUDA GPUs and none is visible here (torch {build} is a CPU-only "
                          f"build; {source} lists {found}): install a CUDA build of torch, or use hardware=cpu")
    if not load_torch:
        return
    import torch  # GPU presets load torch right after this anyway

    if not torch.cuda.is_available():
        raise ConfigError(f"hardware={name} needs CUDA GPUs and none is visible here "
                          f"(torch.cuda.is_available() is False; {source} lists {found}): use hardware=cpu")
    if torch.cuda.device_count() < n:
        raise ConfigError(f"hardware={name} starts {n} processes, one per GPU, and this machine has "
                          f"{torch.cuda.device_count()} GPUs (torch.cuda.device_count())")


def visible_gpus() -> tuple[int, str]:
    """How many NVIDIA GPUs a process started here may use, counted without importing torch (a dry run
    loads no ML library), and where the count comes from: ``nvidia-smi -L`` (else the driver's
    /proc/driver/nvidia/gpus/), at most as many as CUDA_VISIBLE_DEVICES names when it is set."""
    count, source = None, ""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            if listed.returncode == 0:
                count = sum(line.startswith("GPU ") for line in listed.stdout.splitlines())
                source = "nvidia-smi -L"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if count is None:
        gpus = Path("/proc/driver/nvidia/gpus")
        count = len(list(gpus.iterdir())) if gpus.is_dir() else 0
        source = "/proc/driver/nvidia/gpus" if gpus.is_dir() else "no NVIDIA driver: no nvidia-smi, no /proc/driver/nvidia"
    names = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names is not None:
        # CUDA stops at the first invalid entry; "" and "-1" hide every GPU
        shown = list(itertools.takewhile(lambda e: e and not e.startswith("-"), (e.strip() for e in names.split(","))))
        if len(shown) < count:
            count, source = len(shown), f"CUDA_VISIBLE_DEVICES={names!r} shows {len(shown)} of the {count} that {source} lists"
    return count, source


def _torch_version() -> str | None:
    """The installed torch's version, read from its metadata (``2.13.0+cpu`` for a CPU-only wheel)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


from rlhf_exp.launch.sharding import SHARDED  # noqa: E402  (re-exported: the checks below use it)


def check_sharding(cfg: DictConfig) -> None:
    """ZeRO needs DeepSpeed installed (looked up, not imported)."""
    kind = str(cfg.hardware.distributed)
    if kind not in SHARDED:
        return
    if kind.startswith("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"hardware.distributed={kind} (hardware={cfg.hardware.name}) needs DeepSpeed: "
                              "pip install -e '.[deepspeed]'")


def check_slurm_available(cfg: DictConfig) -> None:
    """launcher=slurm needs sbatch and a controller that answers (checked once, before submitting)."""
    if cfg.launcher.name != "slurm":
        return
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher=slurm submits with sbatch, which is not on PATH here: run from a SLURM login "
                          "node, or use launcher=local")
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
        problem = None if probe.returncode == 0 else (probe.stderr or probe.stdout).strip().splitlines()[-1:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = [str(exc)]
    if problem:
        raise ConfigError(f"launcher=slurm: the SLURM controller does not answer (sinfo: {' '.join(problem)[:300]})")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def in_task_group() -> bool:
    """This process is one of several tasks of a SLURM/submitit job (not a worker we started)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" not in os.environ


def abort_task(run_dir: Path, exc: BaseException, record: bool = True) -> None:
    """A task of a multi-task SLURM job failed: record why in the manifest (rank 0 may be killed before
    it can; not when the folder was refused, as it may hold another run), print the traceback to this
    task's log, and exit non-zero at once so that srun (with SLURM_KILL_BAD_EXIT=1, set in the job
    script) stops the other tasks instead of leaving them waiting in a collective."""
    import traceback

    traceback.print_exception(exc)
    if record:
        mark_failed(run_dir, f"rank {rank()}: {type(exc).__name__}: {exc}"[:2000])
    print(f"rlhf_exp: error: rank {rank()} of {os.environ.get('WORLD_SIZE')} failed: {exc}", file=sys.stderr, flush=True)
    os._exit(1)


def refuse_external_launcher() -> None:
    """``torchrun``/``accelerate launch`` around ``python -m rlhf_exp`` would run Hydra in every rank
    (one run folder each): rlhf_exp starts its workers itself."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "SUBMITIT_EXECUTOR" not in os.environ:
        raise ConfigError("python -m rlhf_exp starts its own worker processes: run it without torchrun or accelerate "
                          "launch, and set hardware.num_processes (e.g. hardware=cpu_x2, hardware=a100x8)")


def read_metrics(run_dir: Path) -> dict:
    """The metrics rank 0 wrote to summary.json (NaN/inf are stored as strings there)."""
    import json

    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    return {k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in metrics.items()}


def from_submitit() -> bool:
    """Inside a SLURM/submitit job with several tasks: export the torch.distributed variables for this
    task (once). Returns True when this process is one of several tasks."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        tasks = env.num_tasks
    except (ImportError, RuntimeError):
        return False  # not a submitit job
    if tasks <= 1:
        return False
    if "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        # keep every GPU visible: accelerate selects cuda:LOCAL_RANK itself; hiding all but one GPU
        # per task (submitit's default) makes LOCAL_RANK > 0 point at a device that does not exist
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def slurm_task_cpus() -> int | None:
    """The CPUs SLURM allocated to this task (None outside SLURM): ``--cpus-per-task`` when given, else
    the task's share of the job's CPUs on this node."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    try:
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
        tasks = int(os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
        return max(1, int(os.environ["SLURM_CPUS_ON_NODE"]) // max(1, tasks))
    except (KeyError, ValueError):
        return None


def limit_cpu_threads(cfg: DictConfig | None = None) -> int | None:
    """This process's CPU threads (OMP_NUM_THREADS, torch's intra-op threads), set where a phase starts.
    With the run's ``cfg``: the rule of :mod:`rlhf_exp.launch.threads` (the user's OMP_NUM_THREADS; 1 for
    the embedded/small models; else the CPUs this process may use, SLURM's allocation or affinity and
    cgroup quota, divided among the run's local processes). Without: only inside a SLURM task, the CPUs
    SLURM allocated to it, unless OMP_NUM_THREADS is set. Without CPU binding on the cluster (TaskPlugin
    task/none) each task would otherwise start a thread per core of the node, and jobs sharing a node
    oversubscribe it (measured on a 2-core node with two tiny PPO jobs: a stop on SIGTERM, which finishes
    the step and saves, took up to 17 s instead of 0.1-0.2 s). Returns the count set (None: unchanged)."""
    from rlhf_exp.launch import threads

    if cfg is not None:
        return threads.configure(cfg)
    cpus = slurm_task_cpus()
    if cpus is None or "OMP_NUM_THREADS" in os.environ:
        return None
    return threads.apply(cpus)


def needs_spawn(cfg: DictConfig) -> bool:
    """This process must start the workers: the preset wants several and none is running yet."""
    return world_size(cfg) > 1 and "RANK" not in os.environ and "WORLD_SIZE" not in os.environ


def spawn_workers(cfg: DictConfig, run_dir: Path, resume: bool = False) -> None:
    """Start ``hardware.num_processes`` workers on this machine with torchrun and wait for them.
    Raises RuntimeError naming the failed rank's exit when any worker fails."""
    from rlhf_exp.tracking.run import command_line

    launch = run_dir / LAUNCH_DIR
    launch.mkdir(parents=True, exist_ok=True)
    resolved = copy.deepcopy(cfg)
    OmegaConf.resolve(resolved)  # interpolations fixed here, once, for every worker
    with open(launch / "config.pkl", "wb") as f:
        pickle.dump({"cfg": resolved, "resume": resume}, f)
    n = int(cfg.hardware.num_processes)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--max-restarts=0", "-m", "rlhf_exp.launch.worker", str(run_dir)]
    env = {**os.environ, "RLHF_EXP_COMMAND": command_line(),
           # DeepSpeed on CPU processes (tests, laptops): its CPU accelerator, over gloo
           **({"DS_ACCELERATOR": "cpu"} if cfg.hardware.accelerator == "cpu" else {}),
           # each worker's threads, set before it imports torch (threads.cpu_threads: the user's
           # OMP_NUM_THREADS, 1 for small models, else this machine's usable CPUs // n)
           **_worker_threads(cfg)}
    print(f"rlhf_exp: starting {n} worker processes (torchrun, {cfg.hardware.accelerator}"
          f"{', gloo' if cfg.hardware.accelerator == 'cpu' else ''}) for {run_dir}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        mark_failed(run_dir, f"a worker process failed (torchrun exit {proc.returncode}); its traceback is above")
        raise WorkersFailed(f"{n}-process run failed (torchrun exit {proc.returncode}); "
                           f"see the worker output above and {run_dir / 'manifest.json'}")


def _worker_threads(cfg: DictConfig) -> dict[str, str]:
    from rlhf_exp.launch import threads

    n = threads.cpu_threads(cfg)
    return {} if n is None else {"OMP_NUM_THREADS": str(n)}


def mark_failed(run_dir: Path, error: str) -> None:
    """A worker killed from outside (another rank crashed, OOM) cannot update its own manifest."""
    import json

    from rlhf_exp.tracking.run import now_iso, write_json_atomic
    from rlhf_exp.tracking.secrets import scrub

    path = run_dir / "manifest.json"
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    if manifest.get("status") == "running":
        manifest.update(status="failed", error=scrub(error), end_time=now_iso())
        write_json_atomic(path, manifest)
