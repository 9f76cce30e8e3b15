"""Stand-ins for what a dry run checks but a test machine may lack: a SLURM client whose controller
answers (``sbatch``/``sinfo`` on PATH), and parent runs (an SFT or reward-model run folder that
rlhf_exp.tracking.lineage.resolve_parents accepts). Dry runs load nothing, so neither is ever used
beyond those checks; the stand-in ``sbatch`` records every call, so a test can also show that nothing
was submitted."""

from __future__ import annotations

import json
import os
from pathlib import Path


def slurm_standins(folder: Path) -> tuple[dict[str, str], Path]:
    """``sbatch`` and ``sinfo`` in ``folder``, first on PATH (ahead of a real SLURM client, whether or
    not its controller is up, so a test behaves the same everywhere). Returns the environment to run
    with and the file that lists the stand-in sbatch's calls (absent while it was never called)."""
    folder.mkdir(parents=True, exist_ok=True)
    calls = folder / "sbatch_calls"
    for name, body in (("sbatch", f'echo "$@" >> "{calls}"\necho "sbatch: stand-in: nothing submitted" >&2\nexit 1\n'),
                       ("sinfo", "echo debug\n")):
        path = folder / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"}, calls


def parent_run(folder: Path, phase: str) -> Path:
    """A succeeded run of ``phase`` as resolve_parents needs it when given as phase.sft_run /
    phase.reward_run: a folder with a manifest.json (its run id, phase and status) that names an
    existing checkpoint folder. There are no weights in it: only a real run would load them."""
    checkpoint = folder / "checkpoints" / "final"
    checkpoint.mkdir(parents=True)
    manifest = {"run_id": folder.name, "phase": phase, "status": "succeeded", "checkpoint": str(checkpoint)}
    # what the parent checks read cheaply: a config, a header-only safetensors file; an RM's SFT parent
    # (the stand-in SFT run beside it) and its reward_stats.json
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"\x02" + bytes(7) + b"{}")
    if phase == "rm":
        manifest["parents"] = [{"phase": "sft", "run_id": "standin_sft", "path": str(folder.parent / "standin_sft")}]
        (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def parent_overrides(phase: str, root: Path) -> list[str]:
    """phase.sft_run=... (and phase.reward_run=... for PPO), naming stand-in parents made under ``root``."""
    from rlhf_exp.tracking.lineage import PARENTS

    overrides = []
    for parent, key in PARENTS[phase]:
        folder = root / f"standin_{parent}"
        if not folder.exists():
            parent_run(folder, parent)
        overrides.append(f"phase.{key}={folder}")
    return overrides
