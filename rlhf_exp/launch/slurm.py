"""The sbatch script a ``launcher=slurm`` job is submitted with, rendered without submitting it.

conf/launcher/slurm.yaml maps our config onto hydra-submitit-launcher's ``hydra.launcher`` node; the
launcher hands those fields to submitit's AutoExecutor (its own fields unprefixed, SLURM's prefixed
``slurm_``), which writes the script. :func:`sbatch_script` takes the same path to the same text, so
``dry_run=true`` shows what would be submitted (a test compares it with a script submitted for real).
"""

from __future__ import annotations

import contextlib
import shutil

from omegaconf import DictConfig, OmegaConf

# submitit's own job-start command, as hydra-submitit-launcher's jobs run it
SUBMIT_COMMAND = "{python} -u -m submitit.core._submit {folder}"


def executor_parameters(launcher: DictConfig) -> tuple[str, dict, dict]:
    """(folder, executor init kwargs, update_parameters kwargs) exactly as the launcher builds them."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = OmegaConf.to_container(launcher, resolve=True)
    params.pop("_target_", None)
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


def compose_sbatch_script(overrides: list[str]) -> str:
    """``python -m rlhf_exp launcher=slurm ... dry_run=true``: compose with the hydra node, render."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_exp.config.errors import CONF_DIR
    from rlhf_exp.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="rlhf_exp"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        return sbatch_script(cfg.hydra)
    finally:
        GlobalHydra.instance().clear()
