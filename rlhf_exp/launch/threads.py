"""CPU threads per process: how many intra-op threads (OMP_NUM_THREADS, ``torch.set_num_threads``) a run's
process uses.

torch's default is one thread per core of the machine, whatever else runs on it. On a shared machine those
threads spin against every other busy process: with other CPU-bound work on a 2-core machine the embedded
SFT ran 20-100x slower than idle, and the README's first command took 46 minutes instead of 48 s, while one
thread per process was no slower idle (measurements: docs/hardware.md, "CPU threads";
``benchmarks/contention.py``). The rule, applied where a phase starts (``cli.execute``, every worker too):

1. ``OMP_NUM_THREADS`` set by the user: that, untouched.
2. ``RLHF_EXP_THREADS=torch``: torch's own default (the old behaviour); ``RLHF_EXP_THREADS=<n>``: n.
3. the embedded model (``model.source=embedded``) or a model known to be small
   (``model.num_params`` < :data:`SMALL_MODEL_PARAMS`): 1 thread. Intra-op threads buy nothing at this
   size and collapse under contention.
4. otherwise the CPUs this process may use, divided among the run's processes on this machine (at least 1):
   under SLURM the CPUs allocated to the task; elsewhere min(cores in the CPU affinity mask (hyperthread
   siblings once), cgroup CPU quota) // local processes (``LOCAL_WORLD_SIZE`` inside torchrun, else ``hardware.num_processes``);
   a job of ``launcher=parallel`` counts only its share of the machine (:func:`share_cpus`).

Nothing here imports torch: :func:`apply` sets torch's count only when torch is already imported, and
OMP_NUM_THREADS (read when torch creates its pool) otherwise.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

SWITCH = "RLHF_EXP_THREADS"
# launcher=parallel: the CPUs each sweep job may use (the machine's split between the jobs running at once)
JOB_CPUS = "RLHF_EXP_JOB_CPUS"
# below this many parameters a model counts as small (matrices of a few hundred rows: threads cost more
# in synchronisation than they save, and spin when the cores are shared)
SMALL_MODEL_PARAMS = 10_000_000
CGROUP_ROOT = Path("/sys/fs/cgroup")

_applied: str | None = None  # the OMP_NUM_THREADS value this process set itself (not the user's)


def affinity_cpus(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """The cores this process may run on: its affinity mask (os.cpu_count() where that is unknown), with
    hyperthread siblings counted once (as torch's own default does) where sysfs gives the topology."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        package, core = _read(topo / "physical_package_id"), _read(topo / "core_id")
        if package is None or core is None:
            return max(1, len(cpus))  # no topology: logical CPUs
        cores.add((package.strip(), core.strip()))
    return max(1, len(cores))


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` ("<quota> <period>" or "max <period>") as CPUs; None = no limit."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _own_cgroup(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 cpu-controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def quota_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The cgroup CPU quota in CPUs (e.g. 1.5), None when there is none. cgroup v2: ``cpu.max`` of the
    root seen from here (a container's own cgroup) and of this process's cgroup and its ancestors; v1:
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` of the cpu controller. The smallest limit found counts."""
    v2_path, v1_path = _own_cgroup(proc_cgroup)
    limits: list[float] = []
    dirs = {root}
    if v2_path:
        here = root / v2_path.strip("/")
        dirs.update([here, *here.parents])
    for d in dirs:
        if d == root or root in d.parents:
            text = _read(d / "cpu.max")
            if text is not None and (cpus := parse_cpu_max(text)) is not None:
                limits.append(cpus)
    v1_dirs = [root / "cpu", root / "cpu,cpuacct", root]
    if v1_path:
        v1_dirs += [d / v1_path.strip("/") for d in v1_dirs[:2]]
    for d in v1_dirs:
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        try:
            q, p = int(quota or ""), int(period or "")
        except ValueError:
            continue
        if q > 0 and p > 0:
            limits.append(q / p)
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup"), share: bool = True) -> int:
    """The CPUs this process may use: its affinity, capped by the cgroup quota (rounded up: a quota of
    1.5 CPUs runs 2 threads part of the time), at least 1. Under SLURM: the CPUs allocated to the task.
    ``share``: a launcher=parallel job's share of them (:func:`share_cpus`)."""
    from rlhf_exp.launch.distributed import slurm_task_cpus

    slurm = slurm_task_cpus()
    cpus = affinity_cpus() if slurm is None else min(slurm, affinity_cpus())
    quota = quota_cpus(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    if share and os.environ.get(JOB_CPUS, "").isdigit():  # one of launcher=parallel's jobs: its share of the machine
        cpus = min(cpus, int(os.environ[JOB_CPUS]))
    return max(1, cpus)


def share_cpus(jobs: int) -> int:
    """launcher=parallel, in the launching process: each of ``jobs`` jobs running at once may use this process's
    usable CPUs // jobs (at least 1), recorded for the jobs (they inherit the environment). Returns the share."""
    share = max(1, usable_cpus(share=False) // max(1, jobs))
    os.environ[JOB_CPUS] = str(share)
    return share


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def small_model(model: Any) -> bool:
    """The embedded model, or a model whose configured parameter count is below SMALL_MODEL_PARAMS."""
    source = _get(model, "source")
    if str(getattr(source, "value", source)) == "embedded":
        return True
    params = _get(model, "num_params")
    return bool(params) and int(params) < SMALL_MODEL_PARAMS


def local_processes(cfg: Any, environ: Mapping[str, str] | None = None) -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE in a worker, else
    hardware.num_processes (1 under SLURM, where each task is given its own CPUs)."""
    env = os.environ if environ is None else environ
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    if env.get("SLURM_JOB_ID"):
        return 1
    return max(1, int(_get(_get(cfg, "hardware"), "num_processes", 1) or 1))


def user_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """OMP_NUM_THREADS as the user (or the launching process) set it; None when unset or set by us."""
    env = os.environ if environ is None else environ
    value = env.get("OMP_NUM_THREADS", "").strip()
    if not value or (environ is None and value == _applied):
        return None
    try:
        return max(1, int(value.split(",")[0]))
    except ValueError:
        return None


def cpu_threads(cfg: Any, model: Any = None, environ: Mapping[str, str] | None = None, *,
                cpus: int | None = None) -> int | None:
    """Intra-op threads for one process of this run (the rule in the module's docstring); None = leave
    torch's default (RLHF_EXP_THREADS=torch). ``cfg`` is the run's config (or anything with ``hardware``
    and ``model``); ``model`` overrides ``cfg.model``; ``cpus`` overrides :func:`usable_cpus`."""
    env = os.environ if environ is None else environ
    if (n := user_threads(environ)) is not None:
        return n
    switch = env.get(SWITCH, "").strip().lower()
    if switch == "torch":
        return None
    if switch:
        try:
            return max(1, int(switch))
        except ValueError:
            raise ValueError(f"{SWITCH}={env[SWITCH]!r}: expected 'torch' or a number of threads") from None
    if small_model(model if model is not None else _get(cfg, "model")):
        return 1
    return max(1, (cpus if cpus is not None else usable_cpus()) // local_processes(cfg, env))


def apply(n: int | None) -> int | None:
    """Use ``n`` intra-op threads in this process and its children: OMP_NUM_THREADS (read when torch
    creates its thread pool) and, when torch is already imported, ``torch.set_num_threads``.
    None: nothing changed. A count the user set in OMP_NUM_THREADS is left as it is."""
    global _applied
    if n is None:
        return None
    if user_threads() is None:
        os.environ["OMP_NUM_THREADS"] = str(n)
        _applied = str(n)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return n


def configure(cfg: Any) -> int | None:
    """Compute and apply this process's thread count (the one call, where a phase starts)."""
    return apply(cpu_threads(cfg))
