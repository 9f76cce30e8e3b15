"""Multi-process launch checks.

The entrypoint does not start worker processes yet (issue #4: after Hydra composes once, it will
start them through accelerate/torchrun, or one SLURM task per GPU). Until then a multi-process preset
stops with a clear message instead of silently running as one process, or, under an external
torchrun, making one run folder per rank.
"""

from __future__ import annotations

from omegaconf import DictConfig

from rlhf_exp.config.errors import ConfigError


def check_multiprocess_launch(cfg: DictConfig) -> None:
    wanted = cfg.hardware.num_processes * cfg.hardware.num_nodes
    if wanted > 1:
        raise ConfigError(
            f"hardware={cfg.hardware.name} asks for {wanted} processes; starting workers is not supported yet "
            "(issue #4). Run on one device: hardware=cpu, or hardware=a100x1 on one GPU."
        )


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU preset on a machine without a visible GPU fails here, not deep inside a trainer."""
    if cfg.hardware.accelerator != "cuda":
        return
    import torch  # GPU presets load torch right after this anyway

    if not torch.cuda.is_available():
        raise ConfigError(f"hardware={cfg.hardware.name} needs CUDA GPUs and none is visible here "
                          "(torch.cuda.is_available() is False): use hardware=cpu")
