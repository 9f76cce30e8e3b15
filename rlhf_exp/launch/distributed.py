"""Multi-process launch checks.

The entrypoint does not yet start worker processes itself (that lands with the sweeps and scale-out
work, issue #4). A multi-process preset is accepted when the processes were started by a launcher
that sets torch.distributed's environment (torchrun / accelerate launch); otherwise the user gets the
command that would work instead of a silent single-process run.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig

from rlhf_exp.config.errors import ConfigError


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_multiprocess_launch(cfg: DictConfig) -> None:
    wanted = cfg.hardware.num_processes * cfg.hardware.num_nodes
    if world_size_from_env() != wanted:
        raise ConfigError(
            f"hardware={cfg.hardware.name} asks for {wanted} processes but this is a single process; "
            "the entrypoint does not start workers itself yet (issue #4). Run on one device with "
            "hardware=cpu or hardware=a100x1."
        )
