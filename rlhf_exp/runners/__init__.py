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
# what a phase's runner imports first (the costly imports, timed apart in summary.json "timings")
IMPORTS: dict[str, tuple[str, ...]] = {
    "sft": ("torch", "transformers", "peft", "trl.trainer.sft_trainer"),
    "rm": ("torch", "transformers", "peft", "trl.trainer.reward_trainer"),
    "dpo": ("torch", "transformers", "peft", "trl.trainer.dpo_trainer"),
    "ppo": ("torch", "transformers", "peft", "accelerate"),
}


def import_libraries(phase: str) -> None:
    """The ML libraries ``phase`` runs on (nothing new when pipeline.preload's process imported them already)."""
    for name in IMPORTS.get(phase, ()):
        importlib.import_module(name)


def get_runner(phase: str) -> Callable:
    if phase in PLANNED:
        raise ConfigError(f"phase={phase}: {PLANNED[phase]} is not implemented yet; phases available: "
                          f"{', '.join(RUNNERS)}")
    if phase not in RUNNERS:
        raise ConfigError(f"phase={phase}: no runner. Phases available: {', '.join(RUNNERS)}")
    return importlib.import_module(RUNNERS[phase]).run
