"""The sbatch script a ``launcher=slurm`` job is submitted with, and how a sweep is submitted.

conf/launcher/slurm.yaml maps our config onto hydra-submitit-launcher's ``hydra.launcher`` node; the
launcher hands those fields to submitit's AutoExecutor (its own fields unprefixed, SLURM's prefixed
``slurm_``), which writes the script. :func:`sbatch_script` takes the same path to the same text, so
``dry_run=true`` shows what would be submitted (a test compares it with a script submitted for real).

Resources per job: nodes, tasks and GPUs per node from ``hardware`` (one task per process), CPUs per
task and memory per node from ``launcher.cpus_per_task`` / ``launcher.mem_gb``, which default to the
preset's ``hardware.cpus_per_task`` / ``hardware.mem_gb`` (docs/slurm-sizing.md).

hydra-submitit-launcher submits a whole sweep as one job array, sized once from the sweep's own config,
in which every swept key keeps its default (``-m hardware=cpu,cpu_x2`` gave both jobs the one task of
``hardware=cpu``). A Hydra launcher of our own that submitted one array per set of resources would have to
live in a ``hydra_plugins`` package (Hydra instantiates launchers from nowhere else), so instead
:func:`check_sweep_resources` refuses, before anything is submitted, a sweep whose jobs would not get the
resources their config asks for, naming the keys and the fix (one sweep per set of resources).
"""

from __future__ import annotations

import contextlib
import shutil
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from rlhf_exp.config.errors import ConfigError

# submitit's own job-start command, as hydra-submitit-launcher's jobs run it
SUBMIT_COMMAND = "{python} -u -m submitit.core._submit {folder}"


def launcher_params(node: DictConfig) -> dict[str, Any]:
    """A resolved ``hydra.launcher`` node as the launcher receives it (without ``_target_``)."""
    params = OmegaConf.to_container(node, resolve=True)
    params.pop("_target_", None)
    return params


def executor_parameters(launcher: DictConfig) -> tuple[str, dict, dict]:
    """(folder, executor init kwargs, update_parameters kwargs) exactly as the launcher builds them."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = launcher_params(launcher)
    folder = params.pop("submitit_folder")
    init = {"slurm_max_num_timeout": params.pop("max_num_timeout")}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    return folder, init, {k if k in base else f"slurm_{k}": v for k, v in params.items()}


def sbatch_script(hydra_cfg: DictConfig) -> str:
    """The script of a single (non-array) job for a composed config's ``hydra`` node."""
    import sys

    import submitit

    folder, init, params = executor_parameters(hydra_cfg.launcher)
    with _rendering_without_srun():
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", **init)
    executor.update_parameters(**params)
    command = SUBMIT_COMMAND.format(python=sys.executable, folder=executor.folder)
    return executor._executor._make_submission_file_text(command, "0")


@contextlib.contextmanager
def _rendering_without_srun():
    """submitit refuses to build a SLURM executor where ``srun`` is missing (a laptop preparing a
    submission); rendering the script needs no SLURM, so the check is lifted while the executor is made."""
    from submitit.slurm.slurm import SlurmExecutor

    if shutil.which("srun") is not None:
        yield
        return
    original = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 2)
    try:
        yield
    finally:
        SlurmExecutor.affinity = original


@contextlib.contextmanager
def _hydra_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_exp.config.errors import CONF_DIR
    from rlhf_exp.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="rlhf_exp"):
            yield lambda overrides: compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def compose_sbatch_script(overrides: list[str]) -> str:
    """``python -m rlhf_exp launcher=slurm ... dry_run=true``: compose with the hydra node, render."""
    with _hydra_compose() as compose:
        cfg = compose(overrides)
    return sbatch_script(cfg.hydra)


# launcher parameters that are not resources: a sweep may vary them (the array keeps the sweep's own)
NOT_SIZING = ("name", "submitit_folder")


def check_sweep_resources(launcher: str, fixed: list[str], jobs: Sequence[tuple[str, list[str]]]) -> None:
    """A sweep through hydra-submitit-launcher gets one set of resources, those of ``fixed`` (the command
    line without its swept overrides: Hydra composes the sweep's config so). ``jobs``: (label, overrides)
    of jobs that differ in the swept keys that can change resources. Refuses when one of them would be
    sized differently on its own, naming the keys, the values and what to do instead."""
    with _hydra_compose() as compose:
        given = _sizing(compose(fixed).hydra.launcher)
        wanted = [(label, _sizing(compose([*fixed, *overrides]).hydra.launcher)) for label, overrides in jobs]
    wrong = [(label, {k: v for k, v in sizing.items() if given.get(k) != v}) for label, sizing in wanted]
    wrong = [(label, diff) for label, diff in wrong if diff]
    if not wrong:
        return
    keys = sorted({k for _, diff in wrong for k in diff})
    shown = "; ".join(f"{label} needs {', '.join(f'{k}={_text(v)}' for k, v in diff.items())}" for label, diff in wrong)
    raise ConfigError(
        f"launcher={launcher} submits a sweep as one job array with one set of resources, those of the command "
        f"without its swept values ({', '.join(f'{k}={_text(given.get(k))}' for k in keys)}), but {shown}. Run one sweep "
        f"per set of resources, with {' and '.join(sorted({o.split('=', 1)[0] for _, ov in jobs for o in ov}))} "
        f"fixed in each (e.g. python -m rlhf_exp -m {wrong[0][0]} ...)")


def _sizing(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in launcher_params(node).items() if k not in NOT_SIZING}


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


def fail_job_at_exit() -> None:
    """In a SLURM job (submitit): once submitit has saved this Hydra job's result (the objective, NaN for a
    failed run, whose manifest says failed) and the process ends, end it with status 1, so that SLURM
    records the job FAILED (sacct) instead of COMPLETED. The result must exist first: without it the
    CLI would wait for a requeue, or see an incomplete job. Every other exit handler still runs."""
    import atexit
    import os
    import sys

    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return

    def _exit_failed() -> None:
        atexit.unregister(_exit_failed)
        atexit._run_exitfuncs()  # the handlers registered before this one (logging, ...), then the status
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)

    atexit.register(_exit_failed)
