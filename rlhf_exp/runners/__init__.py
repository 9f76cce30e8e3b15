"""Runners: one per phase, each ``run(cfg: RunConfig, run: Run) -> dict of summary metrics``.

A runner builds its trainer from the checked config, trains, saves the model the next phase loads,
evaluates and calls ``run.finish``. Modules are imported only when their phase runs.
"""

from __future__ import annotations

import importlib
from typing import Callable

from rlhf_exp.config.errors import ConfigError

RUNNERS: dict[str, str] = {
    "sft": "rlhf_exp.runners.sft",
    "dpo": "rlhf_exp.runners.dpo",
    "rm": "rlhf_exp.runners.rm",
    "ppo": "rlhf_exp.runners.ppo",
}
PLANNED: dict[str, str] = {}


def get_runner(phase: str) -> Callable:
    if phase in PLANNED:
        raise ConfigError(f"phase={phase}: {PLANNED[phase]} is not implemented yet; phases available: "
                          f"{', '.join(RUNNERS)}")
    if phase not in RUNNERS:
        raise ConfigError(f"phase={phase}: no runner. Phases available: {', '.join(RUNNERS)}")
    return importlib.import_module(RUNNERS[phase]).run
